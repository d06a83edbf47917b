"""KV-cache Decision Transformer: equals the recompute rollout where it should, and evict == mask."""
import numpy as np
import pytest
import torch
from transformers import AttentionInterface, DecisionTransformerConfig, DecisionTransformerModel

from envs.kv_rollout import make_env, run_kv, run_recompute
from envs.rollout import DTPolicy
from namm_transfer import H2O, FullCache, L2Norm, NAMMPolicy, RandomEviction, SnapKV
from namm_transfer.adapters.decision_transformer import KVStepper, sliding_window

from helpers_core import _REF_MASKS, _ref_attention

K = 4  # context of the tiny DTs


def tiny_dt(layers=2, heads=2, seed=0) -> DecisionTransformerModel:
    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=32, n_layer=layers, n_head=heads,
                                    n_inner=64, max_ep_len=1000, n_positions=64, bos_token_id=None,
                                    eos_token_id=None)
    return DecisionTransformerModel(cfg).eval()


def tiny_policy(layers=2) -> DTPolicy:
    return DTPolicy(tiny_dt(layers), np.zeros(11, np.float32), np.ones(11, np.float32), 1000.0, K, 1000)


class ActionLog:
    """Env wrapper that records the actions taken."""

    def __init__(self, env):
        self.env, self.actions = env, []
        self.action_space, self.observation_space = env.action_space, env.observation_space

    def reset(self, **kwargs):
        self.actions = []
        return self.env.reset(**kwargs)

    def step(self, action):
        self.actions.append(np.array(action, dtype=np.float64))
        return self.env.step(action)


def actions_of(run, steps=3 * K):
    env = ActionLog(make_env("Hopper-v5", steps).env)
    ep = run(env)
    return np.stack(env.actions), ep


def test_full_cache_equals_recompute_for_first_K_steps():
    dt = tiny_policy()
    ref, ep_ref = actions_of(lambda env: run_recompute(dt, env, 3600, seed=3, max_steps=3 * K))
    got, ep = actions_of(lambda env: run_kv(dt, env, FullCache(), 3600, seed=3, max_steps=3 * K))
    assert ep.length >= 2 * K and ep_ref.rollout == "recompute-last-K" and ep.rollout == "kv-cache"
    np.testing.assert_allclose(got[:K], ref[:K], atol=1e-5)
    assert not np.allclose(got[K + 1:], ref[K + 1:], atol=1e-5)  # afterwards full history != last K steps
    assert ep.realised_fraction == 1.0 and ep.final_cache_tokens == 3 * ep.length - 1


def test_sliding_window_equals_recompute_for_one_layer_dt():
    """With one layer a cached key depends only on its own token, so the K-step window is exact at every step."""
    dt = tiny_policy(layers=1)
    ref, _ = actions_of(lambda env: run_recompute(dt, env, 3600, seed=4, max_steps=3 * K))
    got, ep = actions_of(lambda env: run_kv(dt, env, sliding_window(K), 3600, seed=4, max_steps=3 * K))
    assert len(got) > K + 2
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert ep.final_cache_tokens == 3 * K - 4


def test_fast_path_equals_encoder_forward():
    model = tiny_dt()
    g = torch.Generator().manual_seed(0)
    states, rtg = torch.randn(40, 11, generator=g), torch.rand(40, generator=g)
    runs = []
    for fast in (True, False):
        stepper = KVStepper(model, H2O(0.5, delay=48), fast=fast)
        runs.append(torch.stack([stepper.step(states[t], rtg[t], t) for t in range(40)]))
        assert stepper.cache.log, "the policy should have evicted"
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=0)


def reference_embeddings(model, rtg, states, actions, timesteps) -> torch.Tensor:
    """(1, 3T, hidden): R_t, s_t, a_t interleaved, each + timestep embedding, then embed_ln (as the DT forward)."""
    time = model.embed_timestep(timesteps)
    r = model.embed_return(rtg[:, None]) + time
    s = model.embed_state(states) + time
    a = model.embed_action(actions) + time
    return model.embed_ln(torch.stack([r, s, a], dim=1).reshape(1, -1, time.shape[-1]))


@torch.no_grad()
def masked_reference_actions(model, embeds, events, heads):
    """One full encoder forward where query q cannot see key p if p was evicted (in that layer and head) by an
    eviction that ran once T_e tokens had been seen, for q >= T_e. Returns the action read at every state token."""
    n = embeds.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(model.config.n_layer):
        vis = causal.expand(1, heads, n, n).clone()
        for ev_layer, t_e, per_head in events:
            if ev_layer == layer:
                for h in range(heads):
                    vis[0, h, t_e:, per_head[h]] = False
        _REF_MASKS[layer] = vis
    AttentionInterface.register("test_ref_masked", _ref_attention)
    old = model.encoder.config._attn_implementation
    model.encoder.set_attn_implementation("test_ref_masked")
    try:
        h = model.encoder(inputs_embeds=embeds, position_ids=torch.zeros(1, n, dtype=torch.long)).last_hidden_state
    finally:
        model.encoder.set_attn_implementation(old)
    return model.predict_action(h[0, 1::3])


def namm(seed=1):
    return NAMMPolicy(torch.randn(4172, generator=torch.Generator().manual_seed(seed)) * 0.5, delay=48)


@pytest.mark.parametrize("make", [lambda: H2O(0.4, delay=48), lambda: L2Norm(0.3, delay=48),
                                  lambda: RandomEviction(0.3, seed=2, delay=48), lambda: SnapKV(0.4, delay=48),
                                  lambda: sliding_window(K), namm],
                         ids=["h2o", "l2", "random", "snapkv", "window", "namm"])
def test_evict_equals_mask_on_dt_encoder(make):
    model, heads, steps = tiny_dt(), 2, 60
    g = torch.Generator().manual_seed(5)
    states, actions = torch.randn(steps, 11, generator=g), torch.rand(steps, 3, generator=g) * 2 - 1
    rtg, timesteps = torch.rand(steps, generator=g) * 3, torch.arange(steps)
    events = []

    def on_evict(layer, keep):
        gone = layer.valid & ~keep
        events.append((layer.layer_idx, layer.tokens_seen, [layer.positions[0, h][gone[0, h]] for h in range(heads)]))

    stepper = KVStepper(model, make(), on_evict=on_evict)
    got = []
    for t in range(steps):
        got.append(stepper.step(states[t], rtg[t], timesteps[t]))
        stepper.set_action(actions[t])  # the action token appended next is the one "taken"
    assert sum(len(p) for *_, per_head in events for p in per_head) > 0, "the policy should evict something"
    if make is namm:
        assert all(t % 48 == 0 for _, t, _ in events)  # forwards split so every NAMM step sees 48 new tokens
    with torch.no_grad():
        ref = masked_reference_actions(model, reference_embeddings(model, rtg, states, actions, timesteps),
                                       events, heads)
    torch.testing.assert_close(torch.stack(got), ref, atol=1e-5, rtol=0)


def test_batched_rows_are_independent_episodes():
    model = tiny_dt()
    g = torch.Generator().manual_seed(6)
    states, rtg = torch.randn(2, 30, 11, generator=g), torch.rand(2, 30, generator=g)
    together = KVStepper(model, L2Norm(0.5, delay=48))
    both = torch.stack([together.step(states[:, t], rtg[:, t], torch.full((2,), t)) for t in range(30)], 1)
    for b in range(2):
        alone = KVStepper(model, L2Norm(0.5, delay=48))
        one = torch.stack([alone.step(states[b, t], rtg[b, t], t) for t in range(30)])
        torch.testing.assert_close(both[b], one, atol=1e-5, rtol=0)


def test_stepper_outputs_are_ordinary_tensors():
    """The stepper runs under torch.inference_mode; what it hands back outside it can be updated in place."""
    model = tiny_dt()
    stepper = KVStepper(model, FullCache())
    action = stepper.step(torch.zeros(model.config.state_dim), 1.0, 0)
    assert not action.is_inference()
    action.clamp_(-0.5, 0.5)
    hidden = stepper.feed(torch.zeros(1, 1, model.config.hidden_size))
    assert not hidden.is_inference()
    hidden.mul_(2)
    with torch.inference_mode():
        assert stepper.step(torch.zeros(model.config.state_dim), 1.0, 1).is_inference()  # no copy inside
