"""Transfer adapters: drive a transformer with a MemoryCache (causal LM, Decision Transformer, video LM)."""
