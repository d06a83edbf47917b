"""Decision Transformer adapter: a KV-cache rollout stepper around a `DecisionTransformerModel`'s GPT-2 encoder.

The standard DT rollout ("recompute-last-K") re-runs the whole model on the last K timesteps (3K tokens) at
every env step. `KVStepper` instead feeds each timestep's new tokens once into a `MemoryCache`:

    step 0:  R_0, s_0                       -> action a_0 read from s_0's hidden state
    step t:  a_{t-1}, R_t, s_t              -> action a_t read from s_t's hidden state

Tokens are embedded exactly as `DecisionTransformerModel.forward` does (embed_return / embed_state /
embed_action + embed_timestep, then embed_ln), the encoder gets position_ids = 0 (DT's convention: position
comes only from the timestep embedding, so evicting slots never disturbs positions), and the action comes
from `model.predict_action`. `DecisionTransformerModel.forward` ignores caches, so the encoder is driven here.

What "full" means for a KV rollout (the DT was trained on K-timestep windows):
  * `FullCache()`            unbounded history: the state token attends to every token of the episode so far
                             (up to 3000 tokens for Hopper), longer than anything the DT saw in training.
  * `sliding_window(K)`      the KV equivalent of the recompute rollout's window: after every forward the cache
                             keeps its newest 3K-4 tokens, so the next state token attends to exactly the
                             3K-1 tokens R_{t-K+1}, s_{t-K+1}, a_{t-K+1}, ..., R_t, s_t that recompute shows it.
                             It equals recompute exactly for a 1-layer DT; with more layers the cached keys of
                             older tokens were computed from their own (earlier) windows, as in any
                             sliding-window KV cache.
For the first K timesteps both equal the recompute rollout (up to float rounding).

Eviction schedule: a policy runs every `policy.delay` tokens. When delay > 3 a forward is split at multiples
of `delay`, so every eviction step sees exactly `delay` new tokens (NAMM needs a multiple of its hop, 16;
`NAMM_DT_DELAY` = 48 tokens = 16 whole timesteps). With delay <= 3 the policy runs at the end of every forward.

`fast=True` (default) runs the encoder's GPT-2 blocks written out with its own weights (no module-call overhead,
no causal-mask construction, which the memory attention does not use); `fast=False` calls `model.encoder(...,
cache=...)`. Both give the same actions to float rounding (tests/test_dt_adapter.py).

Batch rows are independent episodes (`envs.kv_rollout.kv_batch`): every linear map of the fast path is one matrix
product per row (`row_linear`), so a row's numbers do not depend on the batch size and a batched episode equals
the same episode alone bitwise while the rows keep equal token counts (full cache, window, token-budget baselines);
`keep_rows` drops finished episodes. A NAMM keeps different counts per row: filler slots then change float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import enable_memory_attention, memory_attention
from ..cache import MemoryCache
from ..policies import MemoryPolicy, Recency

TOKENS_PER_STEP = 3  # return-to-go, state, action
NAMM_DT_DELAY = 48  # 16 timesteps x 3 tokens: a multiple of NAMM's hop (16) and of whole timesteps


def sliding_window(context: int = 20) -> Recency:
    """The recompute rollout's K-timestep window as a KV policy (see the module docstring)."""
    return Recency(budget=TOKENS_PER_STEP * context - 4, sinks=0, delay=1)


def _rows(x) -> torch.Tensor:
    """(d,) -> (1, d); (B, d) unchanged."""
    return x[None] if x.dim() == 1 else x


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (B, n, in) @ weight (in, out) + bias as one matrix product per batch row (`baddbmm`): a row's result does
    not depend on how many rows the batch holds, unlike one (B*n, in) product whose kernel changes with B. This
    makes a batched rollout's episodes bitwise equal to the same episodes run one by one."""
    return torch.baddbmm(bias, x, weight.expand(x.shape[0], *weight.shape))


def _apply_linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for x (B, in) through `row_linear`."""
    return row_linear(x[:, None], linear.weight.T, linear.bias)[:, 0]


def predict_action_rows(model, hidden: torch.Tensor) -> torch.Tensor:
    """`model.predict_action(hidden)` (hidden (B, hidden)) with its linear layer applied per row."""
    head = model.predict_action
    layers = list(head) if isinstance(head, torch.nn.Sequential) else [head]
    out = _apply_linear(layers[0], hidden)
    for layer in layers[1:]:
        out = layer(out)
    return out


def _plain(t: torch.Tensor) -> torch.Tensor:
    """What a public method hands back: the stepper runs under torch.inference_mode (less per-op overhead), whose
    tensors refuse in-place updates outside it; outside inference mode the caller gets an ordinary copy."""
    return t if torch.is_inference_mode_enabled() else t.clone()


def step_embeddings(model, return_to_go: torch.Tensor, state: torch.Tensor, timestep: torch.Tensor,
                    prev_action: torch.Tensor | None = None, prev_timestep: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The new tokens of one timestep, (B, 2 or 3, hidden), as `DecisionTransformerModel.forward` embeds them:
    [a_{t-1}], R_t, s_t, each + its timestep embedding, then embed_ln.
    return_to_go (B, 1), state (B, state_dim), timestep (B,) long; prev_action (B, act_dim)."""
    time = model.embed_timestep(timestep)
    tokens = [_apply_linear(model.embed_return, return_to_go) + time, _apply_linear(model.embed_state, state) + time]
    if prev_action is not None:
        tokens.insert(0, _apply_linear(model.embed_action, prev_action) + model.embed_timestep(prev_timestep))
    return model.embed_ln(torch.stack(tokens, dim=1))


class KVStepper:
    """Incremental DT inference with a memory policy managing the encoder's KV cache. One episode per
    instance (or call `reset()`); batch rows are independent episodes stepped together.

        stepper = KVStepper(model, H2O(0.5, delay=48))
        action = stepper.step(state, return_to_go, timestep)   # state normalised as in training
    """

    def __init__(self, model, policy: MemoryPolicy, on_evict=None, fast: bool = True):
        self.model, self.policy, self.on_evict, self.fast = model.eval(), policy, on_evict, fast
        self._weights: dict | None = None
        enable_memory_attention(model.encoder)
        self.reset()

    def reset(self) -> None:
        self.cache = MemoryCache(self.policy, on_evict=self.on_evict, cut_forwards=False)  # step per timestep
        self.prev_action: torch.Tensor | None = None
        self.prev_timestep: torch.Tensor | None = None
        self.fractions: list[float] = []  # realised cache fraction after every step
        self.eviction_fractions: list[float] = []  # ... after the steps in which an eviction ran
        self._evictions_seen = 0
        self._lengths: list[float] = []  # stored tokens per layer, tracked without a device sync per step

    @property
    def device(self) -> torch.device:
        return self.model.embed_ln.weight.device

    def set_action(self, action: torch.Tensor) -> None:
        """Override the action token appended next (default: the action `step` returned)."""
        if self.prev_timestep is None:
            raise RuntimeError("set_action() needs a previous step(): it replaces the action that step returned")
        self.prev_action = _rows(torch.as_tensor(action, dtype=torch.float32, device=self.device))

    @torch.inference_mode()
    def keep_rows(self, rows: list[int]) -> None:
        """Continue with these batch rows only (finished episodes drop out): the cache's rows are selected with
        `MemoryCache.fork` (same policy, no step runs: every step due ran at the end of the last forward), and so
        are the pending action tokens. Per-step fraction statistics restart their per-layer lengths."""
        if rows == list(range(self.prev_action.shape[0] if self.prev_action is not None else len(rows))):
            return
        self.cache = self.cache.fork(self.policy, rows=rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.prev_action is not None:
            self.prev_action, self.prev_timestep = self.prev_action[index], self.prev_timestep[index]
        self._lengths, self._evictions_seen = [], len(self.cache.log)

    def split_points(self, n: int) -> list[tuple[int, int]]:
        """[start, end) pieces of the next n tokens so that no forward spans an eviction boundary."""
        d, seen = self.policy.delay, self.cache.tokens_seen
        if not self.policy.evicts or d <= TOKENS_PER_STEP:
            return [(0, n)]
        cuts = [i for i in range(1, n) if (seen + i) % d == 0]
        edges = [0, *cuts, n]
        return list(zip(edges[:-1], edges[1:]))

    def feed(self, embeds: torch.Tensor) -> torch.Tensor:
        """Run embedded tokens (B, n, hidden) through the encoder with the cache; returns hidden states."""
        with torch.inference_mode():
            hidden = self._feed(embeds)
        return _plain(hidden)

    def _feed(self, embeds: torch.Tensor) -> torch.Tensor:
        outs = []
        for s, e in self.split_points(embeds.shape[1]):
            x = embeds[:, s:e]
            outs.append(self._encode_fast(x) if self.fast else self._encode(x))
            self.cache.assert_captured()
        return torch.cat(outs, dim=1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's own forward, position_ids = 0 as DecisionTransformerModel passes them."""
        pos = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        return self.model.encoder(inputs_embeds=x, position_ids=pos, cache=self.cache, use_cache=True).last_hidden_state

    def _encode_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation written out with the encoder's own weights (GPT-2 pre-LN blocks, eval mode):
        no module-call overhead and no causal-mask construction (the memory attention builds its mask from the
        cache). Equal to `_encode` to float rounding (tested); about 1.6x faster per step on a CPU."""
        enc = self._weights or self._collect_weights()
        h = x + enc["wpe0"]  # position id 0 for every token
        b, n, d = h.shape
        for w in enc["blocks"]:
            attn = w["module"]
            y = F.layer_norm(h, (d,), *w["ln_1"])
            qkv = row_linear(y, *w["c_attn"]).view(b, n, 3, attn.num_heads, attn.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            k, v = self.cache.update(k, v, attn.layer_idx)
            o, _ = memory_attention(attn, q, k, v, None, scaling=attn.scaling)
            h = h + row_linear(o.reshape(b, n, d), *w["c_proj"])
            y = F.layer_norm(h, (d,), *w["ln_2"])
            h = h + row_linear(w["act"](row_linear(y, *w["c_fc"])), *w["mlp_proj"])
        return F.layer_norm(h, (d,), *enc["ln_f"])

    def _collect_weights(self) -> dict:
        """Plain references to the encoder's tensors (module attribute lookups cost more than the maths here).
        Taken on the first fast step: create the stepper after moving the model to its device."""
        enc = self.model.encoder
        ln = lambda m: (m.weight, m.bias, m.eps)  # noqa: E731
        conv = lambda m: (m.weight, m.bias)  # noqa: E731
        self._weights = {"wpe0": enc.wpe.weight[0], "ln_f": ln(enc.ln_f), "blocks": [
            {"module": blk.attn, "ln_1": ln(blk.ln_1), "c_attn": conv(blk.attn.c_attn), "c_proj": conv(blk.attn.c_proj),
             "ln_2": ln(blk.ln_2), "c_fc": conv(blk.mlp.c_fc), "mlp_proj": conv(blk.mlp.c_proj), "act": blk.mlp.act}
            for blk in enc.h]}
        return self._weights

    def step(self, state, return_to_go, timestep) -> torch.Tensor:
        """Append this timestep's tokens and return the predicted action ((act_dim,) or (B, act_dim))."""
        with torch.inference_mode():
            action = self._step(state, return_to_go, timestep)
        return _plain(action)

    def _step(self, state, return_to_go, timestep) -> torch.Tensor:
        unbatched = torch.as_tensor(state).dim() == 1
        dev = self.device
        state = _rows(torch.as_tensor(state, dtype=torch.float32, device=dev))
        rtg = torch.as_tensor(return_to_go, dtype=torch.float32, device=dev).reshape(state.shape[0], 1)
        t = torch.as_tensor(timestep, dtype=torch.long, device=dev).reshape(state.shape[0])
        x = step_embeddings(self.model, rtg, state, t, self.prev_action, self.prev_timestep)
        hidden = self._feed(x)
        action = predict_action_rows(self.model, hidden[:, -1])
        self.prev_action, self.prev_timestep = action, t
        self._track_fraction(x.shape[1])
        return action[0] if unbatched else action

    def _track_fraction(self, n_new: int) -> None:
        evicted = len(self.cache.log) > self._evictions_seen
        if evicted or not self._lengths:  # new tokens are valid in every row and head: lengths grow by n_new
            self._lengths = self.cache.cache_lengths()
            self._evictions_seen = len(self.cache.log)
        else:
            self._lengths = [n + n_new for n in self._lengths]
        self.fractions.append(sum(self._lengths) / len(self._lengths) / self.cache.tokens_seen)
        if evicted:
            self.eviction_fractions.append(self.fractions[-1])

    # ---- statistics ----------------------------------------------------------------------------------
    @property
    def tokens_seen(self) -> int:
        return self.cache.tokens_seen

    def mean_fraction(self) -> float:
        """Realised cache fraction (stored / seen tokens, mean over layers) averaged over the steps so far."""
        return sum(self.fractions) / len(self.fractions) if self.fractions else 1.0

    def mean_eviction_fraction(self) -> float | None:
        """The same, right after eviction steps only: what a fractional budget means (None if none ran)."""
        return sum(self.eviction_fractions) / len(self.eviction_fractions) if self.eviction_fractions else None
