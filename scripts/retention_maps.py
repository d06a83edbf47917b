"""Retention maps: which tokens NAMM kept, per layer, in each domain (PNG + HTML + JSON).

    python scripts/retention_maps.py --domain language [--task passkey --tokens 1024 --index 0 --layer 15]
    python scripts/retention_maps.py --domain dt [--env hopper-medium --max-steps 200]
    python scripts/retention_maps.py --domain video [--dataset synthetic --frames 32 --index 0]
    python scripts/retention_maps.py --domain dt --renorm --save-renorm runs/namm-renorm-dt    # + the ablation
    python scripts/retention_maps.py --domain dt --env minigrid-memory --policies namm,h2o,l2,recency,snapkv --episodes 100

The map is the model's final cache after running one input with the NAMM as its memory policy (language: the
prompt's chunked prefill; DT: one KV-cache episode; video: the multimodal prefill): for each layer, the share of
KV heads that still hold each token. Outputs in --out (default runs/retention/<domain>):
  language  <policy>_layers.png (layers x prompt tokens), <policy>_layer<L>_text.png and .html (the prompt,
            kept tokens shaded)
  dt        <policy>_types.png (layers x return/state/action), <policy>_timesteps.png (type x timestep, layer L)
  video     <policy>_frames.png (frames x layers: share of each frame's video tokens kept), <policy>_layers.png
and retention.json (the numbers, settings, the command). Tokens fed after a layer's last eviction step were never
scored and count as kept.

DT only: --policies adds eviction baselines (scripts/run_dt.py names) at --budget (default: NAMM's mean cache
fraction right after its eviction steps over the mapped episodes, as run_dt.py matches them); --episodes N runs
reset seeds --seed .. --seed+N-1 and maps the first. Tasks whose env marks the cue and the choice in its infos
(minigrid-memory) also get, per policy, which timesteps' state tokens the cache held entering the choice
(policies_timesteps.png, cue timesteps outlined) and the share of cue state tokens kept, over the N episodes.

--renorm adds "namm-renorm": the same parameters with normalisation statistics re-estimated on this target model
by a keep-all pass (zero parameters, the NAMM's config) over calibration inputs that exclude the mapped one
(language: --calib-n validation prompts; dt: --calib-n episodes with other reset seeds; video: --calib-n videos
of the synthetic validation split, or other samples of the dataset). --save-renorm DIR writes it as a checkpoint for the harnesses (--namm DIR); scripts/make_tables.py
names their rows namm-renorm.

Default NAMM: namm_transfer/checkpoints/namm-smollm2 (pass --namm PATH when it is not there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np  # noqa: E402

from namm_transfer.cli import UsageError, budget, int_in, load_namm_arg, out_help, run_cli  # noqa: E402
from namm_transfer.records import in_repo, write_json  # noqa: E402
from namm_transfer.reporting import retention as ret  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, choices=["language", "dt", "video"])
    ap.add_argument("--namm", default=None, help="NAMM checkpoint (default namm_transfer/checkpoints/namm-smollm2)")
    ap.add_argument("--model", default=None, help="language: model name (default smollm2-135m; tiny-llama for "
                                                  "tests); video: as scripts/run_video.py --model")
    ap.add_argument("--task", default="passkey", help="language task")
    ap.add_argument("--tokens", type=int_in(64), default=1024, help="language prompt length")
    ap.add_argument("--index", type=int_in(0), default=0, help="which test sample (language, video)")
    ap.add_argument("--layer", type=int_in(0), default=None, help="layer for the per-token views (default: middle)")
    ap.add_argument("--chunk", type=int_in(1), default=128)
    ap.add_argument("--env", default="hopper-medium", help="dt task")
    ap.add_argument("--checkpoint", default=None, help="dt checkpoint (default: the embedded hopper-medium DT)")
    ap.add_argument("--max-steps", type=int_in(1), default=200, help="dt episode cap")
    ap.add_argument("--episodes", type=int_in(1), default=1, help="dt: episodes per policy (the first is mapped)")
    ap.add_argument("--policies", default="namm", help="dt: namm plus baselines of scripts/run_dt.py, e.g. "
                                                      "namm,h2o,l2,recency,snapkv")
    ap.add_argument("--budget", type=budget, default=None, help="dt: baseline budget (default: NAMM's, matched)")
    ap.add_argument("--seed", type=int_in(0), default=0, help="dt reset seed / video seed")
    ap.add_argument("--dataset", default="synthetic", help="video dataset")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--frames", type=int_in(1), default=32)
    ap.add_argument("--delay", type=int_in(1), default=None,
                    help="eviction period (default: the domain's harness default)")
    ap.add_argument("--evict-during", default="video", choices=["video", "prompt"],
                    help="video: as run_video.py (eviction steps only while the video is read)")
    ap.add_argument("--renorm", action="store_true", help="also map namm-renorm (see above)")
    ap.add_argument("--save-renorm", default=None, help="write the namm-renorm checkpoint here")
    ap.add_argument("--calib-n", type=int_in(1), default=2, help="calibration prompts / episodes / videos for --renorm")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--out", default=None, help=out_help("retention", "<domain>"))
    args = ap.parse_args(argv)
    if args.save_renorm:
        args.renorm = True
    args.baselines = [p.strip() for p in args.policies.split(",") if p.strip() and p.strip() != "namm"]
    if args.baselines and args.domain != "dt":
        ap.error("--policies with baselines is for --domain dt")
    return args


def namm_path(args) -> str:
    from namm_transfer.checkpoints import DEFAULT_NAMM

    path = Path(args.namm) if args.namm else DEFAULT_NAMM
    if not (path.exists()):
        raise UsageError(f"no NAMM checkpoint at {path}" + ("" if args.namm else
                         " (the shipped language NAMM is not in this checkout): pass --namm PATH, a folder written "
                         "by scripts/train_namm.py (e.g. runs/namm-smollm2/namm) or an official ckpt.pt"))
    return str(path)


# ------------------------------------------------------------------------------------------------ targets
# Each target: .namm (the policy on the target's schedule), .run(policy) -> (keep (L, n) array, extra dict),
# .calibrate(collector) (keep-all pass over calibration inputs), .plot(label, keep, out) -> [paths].


class LanguageTarget:
    def __init__(self, args):
        from namm_transfer.language.tasks import make_split
        from train_namm import load_model

        self.args = args
        model_name = args.model or "smollm2-135m"
        self.namm = load_namm_arg(namm_path(args), args.delay)
        self.model, self.tok = load_model(model_name, args.device)
        sample = make_split(args.task, "test", args.index + 1, args.tokens, self.tok)[args.index]
        self.ids = self.encode(sample)
        self.calib = [self.encode(s) for s in make_split(args.task, "validation", args.calib_n, args.tokens, self.tok)]
        self.describe = f"{model_name}, {args.task} test sample {args.index} ({self.ids.shape[1]} tokens)"

    def encode(self, sample):
        return self.tok(sample.prompt(self.tok, "raw"), return_tensors="pt").input_ids.to(self.args.device)

    def prefill(self, policy, ids):
        from namm_transfer import MemoryCache, enable_memory_attention
        from namm_transfer.adapters.causal_lm import prefill

        enable_memory_attention(self.model)
        cache = MemoryCache(policy)
        prefill(self.model, ids, cache, self.args.chunk)
        return cache

    def run(self, policy):
        cache = self.prefill(policy, self.ids)
        return ret.cache_keep_matrix(cache, self.ids.shape[1]), {"scored_until": scored_until(cache.log)}

    def calibrate(self, collector) -> None:
        for ids in self.calib:
            self.prefill(collector, ids)

    def plot(self, label, keep, extra, out: Path) -> list[Path]:
        from namm_transfer.reporting.plots import plot_heatmap, plot_text_retention

        layer = pick_layer(self.args, keep)
        tokens = [self.tok.decode([t]) for t in self.ids[0].tolist()]
        html_path = out / f"{label}_layer{layer}.html"
        until = extra["scored_until"]
        html_path.write_text(ret.text_html(tokens, keep[layer], f"{label}, layer {layer}: {self.describe}; tokens "
                                           f"from {until} on were not scored by an eviction step yet"))
        png = plot_heatmap(keep, out / f"{label}_layers.png", f"{label}: tokens kept per layer — {self.describe}",
                           "prompt token", "layer", scored_until=until)
        text_png = plot_text_retention(tokens, keep[layer], out / f"{label}_layer{layer}_text.png",
                                       f"{label}, layer {layer}: {self.describe}. Shade = share of KV heads keeping "
                                       f"the token; grey on white = evicted; italics (token {until} on) = not "
                                       "scored by an eviction step yet", scored_until=until)
        return [png, html_path, text_png]


class DTTarget:
    CUE, DECISION = "cue_visible", "at_junction"  # env infos (envs/minigrid_memory.py) that mark cue and choice

    def __init__(self, args):
        import run_dt
        from envs.kv_rollout import make_env
        from envs.registry import get_spec

        self.args, self.run_dt = args, run_dt
        flags = ["--env", args.env, "--namm", namm_path(args), "--device", args.device]
        flags += ["--checkpoint", args.checkpoint] if args.checkpoint else []
        flags += ["--delay", str(args.delay)] if args.delay else []
        bad = [p for p in args.baselines if p not in run_dt.BASELINES + ("window",)]
        if bad:
            raise UsageError(f"--policies: {bad} are not baselines of scripts/run_dt.py ({', '.join(run_dt.BASELINES)}"
                             ", window)")
        self.rd_args = run_dt.parse_args(flags)
        try:
            self.dt = run_dt.load_checkpoint(self.rd_args)
            self.namm, _ = run_dt.load_namm_policy(self.rd_args)
            spec = get_spec(args.env)
        except (run_dt.UsageError, ValueError) as err:
            raise UsageError(str(err)) from None
        self.dt.model.to(args.device)
        self.target = spec.target_returns[0]
        self.steps = min(args.max_steps, self.dt.max_ep_len)
        self.env = make_env(spec.gym_id, self.steps)
        self.describe = f"{Path(self.rd_args.checkpoint).name} on {spec.name}, reset seed {args.seed}"

    def episode(self, policy, seed: int, on_step=None):
        """One KV-cache episode (envs.kv_rollout.kv_episode) keeping the stepper, whose cache is mapped."""
        from envs.kv_rollout import kv_episode
        from namm_transfer.adapters.decision_transformer import KVStepper

        stepper = KVStepper(self.dt.model, policy)
        total, _, infos = kv_episode(self.dt, self.env, stepper, self.target, seed, on_step)
        return stepper, total, infos

    def baseline(self, name: str, budget: float):
        return self.run_dt.make_kv_policy(name, self.rd_args, self.dt, None, budget)

    def baseline_budget(self, report: dict) -> tuple[float, str]:
        if self.args.budget is not None:
            return self.args.budget, "--budget"
        fr = report["policies"]["namm"]["eviction_fraction_mean"]
        if fr is None:
            raise UsageError("NAMM ran no eviction step in these episodes: pass --budget for the baselines")
        return fr, "NAMM's mean cache fraction after its eviction steps, these episodes"

    def one(self, policy, seed: int):
        """(final keep map, numbers) of one episode; with cue/choice infos, the cache entering the choice."""
        snaps = []
        stepper, total, infos = self.episode(
            policy, seed, lambda t, s: snaps.append(ret.cache_keep_matrix(s.cache, s.tokens_seen)))
        keep = ret.cache_keep_matrix(stepper.cache, stepper.tokens_seen)
        extra = {"return": total, "tokens_seen": stepper.tokens_seen, "scored_until": scored_until(stepper.cache.log),
                 "type_shares": dict(zip(ret.DT_TYPES, ret.dt_type_shares(keep).mean(0).tolist())),
                 "eviction_fraction": stepper.mean_eviction_fraction()}
        d = next((t for t, info in enumerate(infos) if info.get(self.DECISION)), None)
        if d:  # the cache after step d-1 holds R_0, s_0, ..., s_{d-1}: state token of timestep u at 3u + 1
            state = snaps[d - 1][:, 1::3]
            cue = [t for t in range(d) if infos[t].get(self.CUE)]
            extra.update(decision_step=d, cue_steps=cue, state_kept_entering_decision=state.mean(0).tolist(),
                         cue_kept_share=float(state[:, cue].mean()) if cue else None,
                         cue_kept_share_per_layer=state[:, cue].mean(1).tolist() if cue else None)
        return keep, extra

    def run(self, policy):
        runs = [self.one(policy, self.args.seed + e) for e in range(self.args.episodes)]
        keep, extra = runs[0]
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        every = [x for _, x in runs]
        extra.update(episodes=len(runs), returns=[x["return"] for x in every],
                     eviction_fraction_mean=mean([x["eviction_fraction"] for x in every
                                                  if x["eviction_fraction"] is not None]))
        cue = [x["cue_kept_share"] for x in every if x.get("cue_kept_share") is not None]
        if cue:
            per_layer = [x["cue_kept_share_per_layer"] for x in every if x.get("cue_kept_share") is not None]
            extra.update(cue_kept_share_mean=mean(cue), cue_kept_episodes=len(cue),
                         cue_kept_share_per_layer_mean=np.mean(per_layer, axis=0).tolist(),
                         success_rate=100 * float(np.mean(np.array(extra["returns"]) > 0)))
        return keep, extra

    def calibrate(self, collector) -> None:
        for e in range(self.args.calib_n):
            self.episode(collector, 10_000 + self.args.seed + e)

    def plot(self, label, keep, extra, out: Path) -> list[Path]:
        from namm_transfer.reporting.plots import plot_heatmap

        layer = pick_layer(self.args, keep)
        a = plot_heatmap(ret.dt_type_shares(keep), out / f"{label}_types.png",
                         f"{label}: share of each token type kept — {self.describe}", "token type", "layer",
                         xticklabels=list(ret.DT_TYPES), cbar="share kept (mean over KV heads)")
        b = plot_heatmap(ret.dt_type_map(keep[layer]), out / f"{label}_timesteps.png",
                         f"{label}, layer {layer}: kept tokens by timestep — {self.describe}", "timestep",
                         "token", yticklabels=list(ret.DT_TYPES),
                         scored_until=extra["scored_until"] / 3)
        return [a, b]

    def plot_policies(self, report: dict, out: Path) -> list[Path]:
        """Policies x timesteps: the state tokens held entering the choice (mapped episode), cue outlined."""
        from namm_transfer.reporting.plots import plot_timestep_retention

        rows = {label: (p["state_kept_entering_decision"], p["cue_steps"]) for label, p in report["policies"].items()
                if "state_kept_entering_decision" in p}
        if not rows:
            return []
        notes = ", ".join(f"{label} {p['cue_kept_share_mean']:.0%}" for label, p in report["policies"].items()
                          if p.get("cue_kept_share_mean") is not None)
        n = self.args.episodes
        title = (f"State tokens in the cache entering the choice (share of layers x KV heads) — {self.describe}; "
                 f"outlined: timesteps that show the cue. Cue tokens kept, mean over {n} episode(s): {notes}")
        return [plot_timestep_retention(rows, out / "policies_timesteps.png", title)]


class VideoTarget:
    def __init__(self, args):
        import run_video as rv
        from video.pipeline import prepare_inputs

        self.args, self.rv = args, rv
        flags = ["--dataset", args.dataset, "--frames", str(args.frames), "--seed", str(args.seed),
                 "--namm", namm_path(args), "--device", args.device, "--chunk", str(args.chunk)]
        for flag, value in (("--model", args.model), ("--data-root", args.data_root), ("--delay", args.delay)):
            if value is not None:
                flags += [flag, str(value)]
        a = rv.parse_args(flags)
        notes: list[str] = []
        try:
            samples = rv.load_samples(a, notes)
            self.namm = rv.load_namm_policy(a)
            self.model, self.processor = rv.load_model(a, notes)
            delay = rv.resolve_delay(a, self.model, self.namm, notes)
            if self.namm.delay != delay:
                self.namm = rv.load_namm_policy(a, delay)
        except rv.UsageError as err:
            raise UsageError(str(err)) from None
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        if args.index >= len(samples):
            raise UsageError(f"--index {args.index}: the dataset has {len(samples)} samples")
        self.inputs = prepare_inputs(samples[args.index], self.processor, args.frames)
        if args.dataset == "synthetic":  # calibrate on the validation split: no test video is seen twice
            try:
                others = rv.load_samples(rv.parse_args(flags + ["--split", "val"]), notes)[: args.calib_n]
            except rv.UsageError as err:
                raise UsageError(str(err)) from None
        else:
            others = [s for i, s in enumerate(samples) if i != args.index][: args.calib_n]
        self.calib = [prepare_inputs(s, self.processor, args.frames) for s in others]
        self.describe = f"{Path(a.model).name}, {samples[args.index].id}, {self.inputs.num_frames} frames"

    def prefill(self, policy, inputs):
        from namm_transfer.adapters.video_lm import generate_video

        log = ret.EvictionLog()
        generate_video(self.model, inputs.enc, policy, max_new_tokens=1, chunk_size=self.args.chunk, on_evict=log,
                       evict_during=self.args.evict_during)
        return log

    def run(self, policy):
        from namm_transfer.adapters.video_lm import video_positions

        ids = self.inputs.enc["input_ids"]
        log = self.prefill(policy, self.inputs)
        if not log.layers:
            raise UsageError(f"no eviction step ran: the prompt has {ids.shape[1]} tokens, the NAMM evicts every "
                             f"{policy.delay} (pass a smaller --delay or more --frames)")
        keep = log.keep_matrix(ids.shape[1])
        self.frames = ret.frame_index(video_positions(self.model, ids)[0].cpu().numpy(), self.inputs.num_frames)
        shares = ret.frame_shares(keep, self.frames, self.inputs.num_frames)
        return keep, {"scored_until": max(t for _, t, _ in log.steps),
                      "frame_shares_mean_over_layers": shares.mean(1).tolist(),
                      "video_kept_share": float(keep[:, self.frames >= 0].mean()),
                      "text_kept_share": float(keep[:, self.frames < 0].mean())}

    def calibrate(self, collector) -> None:
        if not self.calib:
            raise UsageError("--renorm needs calibration videos other than the mapped one: the dataset has one")
        for inputs in self.calib:
            self.prefill(collector, inputs)

    def plot(self, label, keep, extra, out: Path) -> list[Path]:
        from namm_transfer.reporting.plots import plot_heatmap

        shares = ret.frame_shares(keep, self.frames, self.inputs.num_frames)
        video = np.flatnonzero(self.frames >= 0)
        a = plot_heatmap(shares, out / f"{label}_frames.png",
                         f"{label}: share of each frame's video tokens kept — {self.describe}", "layer", "frame",
                         cbar="share kept (mean over KV heads)")
        b = plot_heatmap(keep, out / f"{label}_layers.png", f"{label}: tokens kept per layer — {self.describe}",
                         f"prompt token (video tokens: {video[0]}-{video[-1]})", "layer",
                         scored_until=extra["scored_until"])
        return [a, b]


TARGETS = {"language": LanguageTarget, "dt": DTTarget, "video": VideoTarget}


def scored_until(log) -> int:
    """Tokens seen at the last eviction step (later tokens were never scored); 0 when none ran."""
    return max((r.tokens_seen for r in log), default=0)


def pick_layer(args, keep: np.ndarray) -> int:
    layer = len(keep) // 2 if args.layer is None else args.layer
    if not 0 <= layer < len(keep):
        raise UsageError(f"--layer {layer}: the model has {len(keep)} layers")
    return layer


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args, argv))


def run(args, argv=None) -> int:
    import torch

    from namm_transfer.reporting.calibration import renormalise, save_renormalised

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    target = TARGETS[args.domain](args)
    policies = {"namm": target.namm}
    if args.renorm:
        try:
            policies["namm-renorm"] = renormalise(target.namm, target.calibrate)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if args.save_renorm:
            save_renormalised(policies["namm-renorm"], args.save_renorm,
                              {"domain": args.domain, "target": target.describe, "calibration_inputs": args.calib_n})
            print(f"wrote {args.save_renorm} (use it as --namm in the harnesses)", file=sys.stderr)
    out = Path(args.out or ROOT / "runs" / "retention" / args.domain)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": ["python", "scripts/retention_maps.py", *(sys.argv[1:] if argv is None else argv)],
              "input": target.describe, "policies": {}}
    written = []
    for label in [*policies, *args.baselines]:
        if label in policies:
            policy = policies[label]
        else:  # DT baselines, at the budget NAMM (or --budget) sets
            budget, source = target.baseline_budget(report)
            policy = target.baseline(label, budget)
            report["baseline_budget"] = {"budget": budget, "source": source}
        keep, extra = target.run(policy)
        written += target.plot(label, keep, extra, out)
        source = getattr(policy, "source", None)
        report["policies"][label] = {"source": source and in_repo(source), "delay": policy.delay,
                                     "kept_share_per_layer": keep.mean(1).tolist(),
                                     "kept_share": float(keep.mean()), **extra}
        cue = extra.get("cue_kept_share_mean")
        print(f"{label}: kept {100 * keep.mean():.1f}% of {keep.shape[1]} tokens (mean over {keep.shape[0]} layers)"
              + ("" if cue is None else f"; cue state tokens kept entering the choice {100 * cue:.1f}% "
                 f"(mean over {extra['cue_kept_episodes']} episodes)"))
    if hasattr(target, "plot_policies"):
        written += target.plot_policies(report, out)
    write_json(out / "retention.json", report)
    print("wrote " + ", ".join(map(str, written + [out / "retention.json"])), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
