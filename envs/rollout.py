"""Decision Transformer evaluation: the standard recompute-last-K rollout and an evaluation helper.

Each env step calls ``DecisionTransformerModel.forward`` on the last K timesteps (left-padded to K with an
attention mask), as the official ``evaluate_episode_rtg`` and the HF example do; the return-to-go target
starts at ``target_return / scale`` and is decremented by ``reward / scale`` after every step.
A DT with discrete actions (``action_type: discrete`` in its config) outputs logits: the env gets their argmax and
the DT its one-hot row as the next action token (:meth:`DTPolicy.env_action`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from envs.registry import RefScores, Scorer


@dataclass
class DTPolicy:
    """A DT plus the constants it was trained with (state normalisation, return scale, context K)."""

    model: torch.nn.Module
    state_mean: np.ndarray
    state_std: np.ndarray
    scale: float = 1000.0
    context: int = 20
    max_ep_len: int = 1000
    meta: dict = field(default_factory=dict)
    discrete_actions: bool = False

    def env_action(self, pred: torch.Tensor) -> tuple[object, torch.Tensor]:
        """(what env.step takes, the action token fed back to the DT) for one predicted action: continuous: the
        prediction both times; discrete: the argmax of the logits and its one-hot row."""
        if not self.discrete_actions:
            return pred.cpu().numpy(), pred
        a = int(pred.argmax(-1))
        return a, torch.nn.functional.one_hot(torch.tensor(a, device=pred.device), pred.shape[-1]).to(pred.dtype)


_META_KEYS = ("env_name", "gym_id", "dataset_id", "dataset_source", "target_returns")


def load_dt(path: str | Path, state_mean=None, state_std=None, scale: float | None = None,
            context: int | None = None) -> DTPolicy:
    """Load a ``save_pretrained`` DT. Stats come from its config (``state_mean``/``state_std``, as
    scripts/train_dt.py writes them) unless given (public edbeeching checkpoints keep them on the model card)."""
    from transformers import DecisionTransformerModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing keys would print above the error raised below
    try:
        model, info = DecisionTransformerModel.from_pretrained(str(path), output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    model.eval()
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with fresh (random or empty) values: refuse instead of acting on them
        raise ValueError(f"{path}: the weights lack {len(missing)} of the model's tensors (e.g. {missing[:3]}); "
                         "not a DecisionTransformerModel checkpoint for its config.json")
    cfg = model.config
    mean = state_mean if state_mean is not None else getattr(cfg, "state_mean", None)
    std = state_std if state_std is not None else getattr(cfg, "state_std", None)
    if mean is None or std is None:
        raise ValueError(f"{path}: config has no state_mean/state_std; pass them (e.g. from the model card)")
    scale = float(scale or getattr(cfg, "return_scale", 1000.0))
    context = int(context or getattr(cfg, "context_length", 20))
    if not (math.isfinite(scale) and scale > 0) or context < 1:
        raise ValueError(f"{path}: config.json has return_scale {scale:g} and context_length {context}; they must "
                         "be a finite number > 0 and an integer >= 1")
    return DTPolicy(
        model=model,
        state_mean=np.asarray(mean, dtype=np.float32),
        state_std=np.asarray(std, dtype=np.float32),
        scale=scale,
        context=context,
        max_ep_len=int(cfg.max_ep_len),
        meta={k: getattr(cfg, k) for k in _META_KEYS if hasattr(cfg, k)},
        discrete_actions=getattr(cfg, "action_type", "continuous") == "discrete",
    )


@torch.inference_mode()
def predict_action(policy: DTPolicy, states: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                   rtg: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Action for the last timestep from the last K steps (inputs: (T, ·) unbatched, states normalised)."""
    K = policy.context
    states, actions, rewards, rtg, timesteps = (x[-K:] for x in (states, actions, rewards, rtg, timesteps))
    n, pad = states.shape[0], K - states.shape[0]

    def left_pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.new_zeros((pad, *x.shape[1:])), x])[None]

    mask = torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(n, dtype=torch.long)])[None]
    out = policy.model(
        states=left_pad(states), actions=left_pad(actions), rewards=left_pad(rewards),
        returns_to_go=left_pad(rtg), timesteps=left_pad(timesteps), attention_mask=mask, return_dict=True,
    )
    return out.action_preds[0, -1]


@dataclass
class EpisodeResult:
    ret: float
    length: int
    score: float | None  # normalised 0-100 on `score_source`
    score_source: str | None


def rollout_recompute(policy: DTPolicy, env, target_return: float, seed: int | None = None,
                      refs: RefScores | None = None) -> EpisodeResult:
    """One episode of the standard recompute-last-K DT rollout."""
    obs, _ = env.reset(seed=seed)
    mean, std = torch.from_numpy(policy.state_mean), torch.from_numpy(policy.state_std)
    act_dim = policy.model.config.act_dim
    states = ((torch.as_tensor(obs, dtype=torch.float32) - mean) / std)[None]
    actions = torch.zeros((0, act_dim))
    rewards = torch.zeros((0, 1))
    rtg = torch.tensor([[target_return / policy.scale]], dtype=torch.float32)
    timesteps = torch.zeros(1, dtype=torch.long)
    ret, t = 0.0, 0
    for t in range(policy.max_ep_len):
        actions = torch.cat([actions, torch.zeros(1, act_dim)])  # placeholder for the action to predict
        rewards = torch.cat([rewards, torch.zeros(1, 1)])
        action, token = policy.env_action(predict_action(policy, states, actions, rewards, rtg, timesteps))
        actions[-1] = token
        obs, r, terminated, truncated, _ = env.step(action)
        ret += float(r)
        rewards[-1] = float(r)
        if terminated or truncated:
            break
        states = torch.cat([states, ((torch.as_tensor(obs, dtype=torch.float32) - mean) / std)[None]])
        rtg = torch.cat([rtg, rtg[-1:] - float(r) / policy.scale])
        timesteps = torch.cat([timesteps, torch.tensor([min(t + 1, policy.max_ep_len - 1)])])
    score = None if refs is None else float(refs.normalize(ret))
    return EpisodeResult(ret, t + 1, score, None if refs is None else refs.source)


def evaluate(policy: DTPolicy, gym_id: str, target_return: float, episodes: int = 10, seed: int = 0,
             refs: dict[str, Scorer] | None = None, verbose: bool = False) -> dict:
    """Mean/std return and length over ``episodes`` (reset seeds seed, seed+1, ...), plus one mean/std
    normalised score per named scale in ``refs`` (e.g. ``{"d4rl": ..., "local": ...}``), never mixed."""
    import gymnasium as gym

    env = gym.make(gym_id, max_episode_steps=policy.max_ep_len)
    results = []
    for i in range(episodes):
        res = rollout_recompute(policy, env, target_return, seed=seed + i)
        results.append(res)
        if verbose:
            print(f"  episode {i}: return {res.ret:.1f}, length {res.length}", flush=True)
    env.close()
    rets = np.array([r.ret for r in results])
    out = {
        "gym_id": gym_id, "target_return": target_return, "episodes": episodes, "seed": seed,
        "rollout": "recompute-last-K", "return_mean": float(rets.mean()), "return_std": float(rets.std()),
        "length_mean": float(np.mean([r.length for r in results])), "returns": rets.tolist(),
    }
    for name, ref in (refs or {}).items():
        scores = ref.normalize(rets)
        out[f"score_{name}_mean"], out[f"score_{name}_std"] = float(scores.mean()), float(scores.std())
    return out


def save_json(obj: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))



def main(argv: list[str] | None = None) -> dict:
    """``python -m envs.rollout CHECKPOINT [--episodes 10] [--target 3600]``: recompute-rollout evaluation."""
    import argparse

    from envs.registry import get_spec

    p = argparse.ArgumentParser(description="Evaluate a saved DT with the standard recompute-last-K rollout.")
    p.add_argument("checkpoint")
    p.add_argument("--env", default="", help="task name (default: env_name in the checkpoint's config)")
    p.add_argument("--target", type=float, action="append", help="target return(s); default: the task's")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pol = load_dt(args.checkpoint)
    spec = get_spec(args.env or pol.meta.get("env_name", ""))
    from envs.data import dt_scorers

    refs, note = dt_scorers(spec, pol.meta)
    if note:
        print(note, flush=True)
    res = {}
    for t in args.target or spec.target_returns:
        r = evaluate(pol, spec.gym_id, t, episodes=args.episodes, seed=args.seed, refs=refs)
        res[f"target_{int(t)}"] = r
        scores = ", ".join(f"{n} score {r[f'score_{n}_mean']:.1f} ± {r[f'score_{n}_std']:.1f}" for n in refs)
        print(f"{spec.gym_id} target {t:.0f}: return {r['return_mean']:.1f} ± {r['return_std']:.1f} "
              f"(length {r['length_mean']:.0f}), {scores}", flush=True)
    if args.out:
        save_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
