"""The cross-dataset Decision Transformer evaluation (issue 17): run_dt on every grid task, then the grid table.

    python scripts/eval_grid.py                                      # embedded DTs, the nine tasks, 20 episodes each
    python scripts/eval_grid.py --checkpoints hub --d4rl-dir DIR     # the public DTs (local Hub cache) + D4RL files
    python scripts/eval_grid.py --tasks hopper-medium,walker2d-medium --episodes 5
    python scripts/eval_grid.py --namm training/namm-c50/namm --out results/dt/grid-c50

For each task of --tasks (default: hopper, walker2d, halfcheetah x expert, medium, medium-replay, in that order) it
runs scripts/run_dt.py in this process with
    --env T --policies full,namm,h2o,l2,recency --rollout kv --episodes N --batch N --threads 1 --no-progress
    --out OUT/T
and --checkpoint: the embedded envs/checkpoints/dt-T (--checkpoints embedded; a task without one is skipped with a
line naming the command that makes it, the others still run) or the public edbeeching/decision-transformer-gym-T
(--checkpoints hub; read from the local Hub cache, no network; with --d4rl-dir DIR also --state-stats
DIR/T-v2.hdf5 when that file exists). Every policy runs the same reset seeds (episode e of seed s: 1000*s + e), so
NAMM − baseline differences are paired. A task that fails is reported and the others still run; a rerun resumes
each task (run_dt skips the episodes its episodes.jsonl already holds; other settings in a folder are refused).
At the end, scripts/make_tables.py over every OUT/<task> folder with results writes OUT/table.md (the cross-domain
rows, then the "Decision Transformer grid" section: scores with 95% intervals, cache %, paired differences),
OUT/table.csv and OUT/dt_grid.csv — the same as `python scripts/make_tables.py OUT/* --out OUT`.
OUT: --out, default results/dt/grid (embedded) or results/dt/grid-hub (hub). Exit code 1 only when no task of
--tasks has results.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from namm_transfer.cli import int_in, load_script  # noqa: E402
from namm_transfer.records import in_repo  # noqa: E402
from namm_transfer.reporting.dt_grid import GRID_TASKS as GRID  # noqa: E402

POLICIES = "full,namm,h2o,l2,recency"
DEFAULT_OUT = {"embedded": ROOT / "results" / "dt" / "grid", "hub": ROOT / "results" / "dt" / "grid-hub"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(GRID), help="comma-separated task names (default: the nine)")
    ap.add_argument("--checkpoints", choices=["embedded", "hub"], default="embedded",
                    help="embedded: envs/checkpoints/dt-<task>; hub: edbeeching/decision-transformer-gym-<task>")
    ap.add_argument("--checkpoints-dir", default=None,
                    help="where the embedded DTs live (default: envs/checkpoints; dt-<task> in it)")
    ap.add_argument("--d4rl-dir", default=None, help="with --checkpoints hub: folder of <task>-v2.hdf5 files, whose "
                                                     "state statistics are passed as --state-stats when present")
    ap.add_argument("--namm", default=None, help="NAMM checkpoint (run_dt's default: the shipped language NAMM)")
    ap.add_argument("--episodes", type=int_in(1), default=20, help="episodes per policy and task (default 20)")
    ap.add_argument("--batch", type=int_in(1), default=None, help="episodes per batched forward (default: --episodes)")
    ap.add_argument("--max-steps", type=int_in(1), default=None, help="cap episode length (tests, smoke runs)")
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="output folder (default: results/dt/grid, or results/dt/grid-hub "
                                                "with --checkpoints hub); one subfolder per task")
    args = ap.parse_args(argv)
    args.task_list = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list:
        ap.error("--tasks is empty")
    if args.d4rl_dir and args.checkpoints != "hub":
        ap.error("--d4rl-dir goes with --checkpoints hub (the embedded DTs carry their state statistics)")
    args.out = Path(args.out) if args.out else DEFAULT_OUT[args.checkpoints]
    return args


def run_dt_argv(args, task: str, run_dt) -> tuple[list[str] | None, str]:
    """(run_dt's argv for one task, "") or (None, why the task is skipped)."""
    from envs.registry import TASKS

    argv = ["--env", task, "--policies", POLICIES, "--rollout", "kv", "--episodes", str(args.episodes),
            "--batch", str(args.batch or args.episodes), "--threads", str(args.threads), "--device", args.device,
            "--no-progress", "--out", str(args.out / task)]
    if args.checkpoints == "embedded":
        folder = Path(args.checkpoints_dir or run_dt.CHECKPOINTS) / f"dt-{task}"
        if not folder.exists():
            return None, f"no embedded DT ({in_repo(folder)}): {run_dt.how_to_make(task)}"
        if args.checkpoints_dir:  # run_dt's own default otherwise, so its run.json reads as a plain run_dt run
            argv += ["--checkpoint", str(folder)]
    else:
        spec = TASKS.get(task)
        hub_id = spec.hf_checkpoint if spec is not None else None
        if hub_id is None:
            return None, f"no public DT for {task} (edbeeching/decision-transformer-gym-<task>: the nine grid tasks)"
        argv += ["--checkpoint", hub_id]
        if args.d4rl_dir:
            stats = Path(args.d4rl_dir) / f"{task}-v2.hdf5"
            if stats.is_file():
                argv += ["--state-stats", str(stats)]
            else:
                print(f"  {task}: {stats} not found: the model card's state statistics are used", flush=True)
    if args.namm:
        argv += ["--namm", args.namm]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    return argv, ""


def has_results(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dt = load_script("run_dt")
    n = len(args.task_list)
    ran, skipped = [], []
    print(f"eval_grid: {n} task(s), {args.episodes} episodes each, {args.checkpoints} DTs -> {in_repo(args.out)}",
          flush=True)
    for i, task in enumerate(args.task_list, 1):
        argv_task, why = run_dt_argv(args, task, run_dt)
        if argv_task is None:
            print(f"[{i}/{n}] {task}: skipped — {why}", flush=True)
            skipped.append(task)
            continue
        print(f"[{i}/{n}] {task}: run_dt.py {' '.join(argv_task)}", flush=True)
        start = time.perf_counter()
        try:
            code = run_dt.main(argv_task)
        except Exception:  # noqa: BLE001 — one task's failure must not stop the grid
            traceback.print_exc()
            code = 1
        took = time.perf_counter() - start
        if code == 0:
            print(f"[{i}/{n}] {task}: done in {took:.0f} s -> {in_repo(args.out / task)}", flush=True)
            ran.append(task)
        else:
            print(f"[{i}/{n}] {task}: failed (exit {code}, its error is above) after {took:.0f} s", flush=True)
            skipped.append(task)
    folders = sorted(p for p in args.out.glob("*") if p.is_dir() and has_results(p)) if args.out.is_dir() else []
    with_results = [t for t in args.task_list if has_results(args.out / t)]
    if not folders:
        print("eval_grid: no task has results; no table written", file=sys.stderr)
        return 1
    md, written, _ = load_script("make_tables").make_tables([str(p) for p in folders], args.out)
    print(md, end="")
    print(f"eval_grid: ran {len(ran)}, skipped or failed {len(skipped)} ({', '.join(skipped) or 'none'}); "
          f"wrote {', '.join(in_repo(p) for p in written)}", flush=True)
    return 0 if with_results else 1


if __name__ == "__main__":
    sys.exit(main())
