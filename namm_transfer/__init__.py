"""namm_transfer: an evolved KV-cache memory (NAMM) and eviction baselines for any HF transformer."""
from .attention import enable_memory_attention
from .cache import CaptureError, MemoryCache, UnsupportedAttention
from .checkpoints import load_namm, save_namm, import_official
from .namm import NAMMConfig
from .policies import (FullCache, H2O, L2Norm, LayerView, MemoryPolicy, NAMMPolicy, RandomEviction, Recency,
                       SnapKV, make_policy, resolve_budget)

__all__ = ["enable_memory_attention", "CaptureError", "UnsupportedAttention", "MemoryCache", "load_namm", "save_namm",
           "import_official", "NAMMConfig", "FullCache", "H2O", "L2Norm", "LayerView", "MemoryPolicy", "NAMMPolicy",
           "RandomEviction", "Recency", "SnapKV", "make_policy", "resolve_budget"]
