"""Budget sweep: the baselines at several cache budgets, NAMM once, then score vs realised cache % plots.

    python scripts/sweep_budgets.py --domain language --budgets 0.25,0.5,0.75 -- --model smollm2-135m --n 8 --delay 512
    python scripts/sweep_budgets.py --domain video --budgets 0.1,0.25,0.5 -- --dataset synthetic --limit 8
    python scripts/sweep_budgets.py --domain dt --budgets 0.05,0.1,0.25 -- --episodes 5
    python scripts/sweep_budgets.py --domain language --nproc-per-node 2 --budgets 0.5,0.75 -- --n 50 --delay 256

Runs the domain's harness (scripts/eval_language.py, run_video.py, run_dt.py) into sub-folders of --out:
  namm/          --policies full,namm           (NAMM's cache size is emergent: one point per sweep)
  budget-<b>/    --policies <methods> --budget b (dt: --rollout kv)
Arguments after `--` go to every harness call unchanged (not --policies, --budget or --out: the sweep sets
them); they are checked by the harness's own parser before anything runs. --nproc-per-node N > 1 runs each
call under `torchrun --standalone --nproc-per-node N` (the harnesses shard samples over the ranks and write the
same records and summary as one process; on CPU each rank should get --threads 1). Each harness writes command.json with
its exact argv into its sub-folder, so the table names the command. Reruns resume (the harnesses skip what their
records already hold; more budgets may be added); <out>/run.json records the domain, methods and harness
arguments, and a rerun with others into the same --out (default <checkout>/runs/sweep/<domain>) is refused. Then
scripts/make_tables.py writes <out>/table.md, table.csv and sweep_*.png.

Language: without NAMM in a run, eval_language.py evicts every --delay tokens (default 512): pass the NAMM's delay
so the baselines evict on its schedule.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from namm_transfer.cli import budget, default_out, int_in, name_list, number_list, out_help, run_cli  # noqa: E402
from namm_transfer.runs import open_run  # noqa: E402

HARNESS = {"language": "eval_language.py", "video": "run_video.py", "dt": "run_dt.py"}
OWNED_FLAGS = ("--policies", "--budget", "--out")
METHODS = ("h2o", "l2", "recency", "snapkv", "random", "oracle")  # oracle: language only


def budget_tag(b: float) -> str:
    return f"budget-{b:g}"


def launcher(nproc: int) -> list[str]:
    """How a harness call starts, as printed: plain python, or torchrun with `nproc` ranks on this machine."""
    return ["python"] if nproc == 1 else ["torchrun", "--standalone", "--nproc-per-node", str(nproc)]


def plan(domain: str, budgets: list[float], methods: list[str], namm: bool, out: Path,
         harness_args: list[str], nproc: int = 1) -> list[tuple[Path, list[str]]]:
    """[(sub-folder, argv)] of every harness call, NAMM first; argv starts with launcher(nproc)."""
    script = str(ROOT / "scripts" / HARNESS[domain])
    try:
        script = os.path.relpath(script)
    except ValueError:
        pass
    calls = []
    if namm:
        calls.append((out / "namm", ["--policies", "full,namm"]))
    for b in budgets:
        extra = ["--rollout", "kv"] if domain == "dt" else []
        calls.append((out / budget_tag(b), ["--policies", ",".join(methods), "--budget", f"{b:g}", *extra]))
    return [(sub, [*launcher(nproc), script, *flags, *harness_args, "--out", str(sub)]) for sub, flags in calls]


def harness_argv(cmd: list[str]) -> list[str]:
    """The harness's own arguments in a planned call (what follows the script)."""
    return cmd[next(i for i, a in enumerate(cmd) if a.endswith(".py")) + 1:]


def executable(cmd: list[str]) -> list[str]:
    """A planned call as this interpreter runs it (torchrun as `python -m torch.distributed.run`)."""
    if cmd[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    return [sys.executable, *cmd[1:]]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--domain", required=True, choices=sorted(HARNESS))
    ap.add_argument("--budgets", required=True, type=number_list(budget, "budgets"),
                    help="comma-separated fractions in (0, 1] (or whole token counts >= 2), each once")
    ap.add_argument("--methods", type=name_list(METHODS), default="h2o,l2,recency", help="baselines to sweep")
    ap.add_argument("--no-namm", action="store_true", help="skip the NAMM (and full-cache) reference run")
    ap.add_argument("--out", default=None, help=out_help("sweep", "<domain>"))
    ap.add_argument("--nproc-per-node", type=int_in(1), default=1,
                    help="ranks per harness call: > 1 runs each under torchrun on this machine (default 1: python)")
    ap.add_argument("--dry-run", action="store_true", help="print the harness commands, run nothing")
    args, rest = ap.parse_known_args(argv)
    rest = rest[1:] if rest[:1] == ["--"] else rest
    clash = [a for a in rest if a.split("=")[0] in OWNED_FLAGS]
    if clash:
        ap.error(f"{clash}: the sweep sets --policies, --budget and --out itself")
    args.budget_list, args.method_list, args.harness_args = args.budgets, args.methods, rest
    args.out = Path(args.out or default_out("sweep", args.domain))
    args.argv = argv
    return args


def check_harness_args(domain: str, calls: list[tuple[Path, list[str]]]) -> None:
    """Every planned call through its harness's own argument parser (exit 2 with its message if one is bad)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_sweep_{domain}", ROOT / "scripts" / HARNESS[domain])
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    for _, cmd in calls:
        try:
            harness.parse_args(harness_argv(cmd))
        except SystemExit:
            print(f"sweep: the arguments after -- do not suit scripts/{HARNESS[domain]} (its message above)",
                  file=sys.stderr)
            raise


def main(argv=None) -> int:
    args = parse_args(argv)
    calls = plan(args.domain, args.budget_list, args.method_list, not args.no_namm, args.out, args.harness_args,
                 args.nproc_per_node)
    check_harness_args(args.domain, calls)
    if args.dry_run:
        for _, cmd in calls:
            print(shlex.join(cmd), file=sys.stderr)
        return 0
    settings = {"domain": args.domain, "methods": args.method_list, "namm": not args.no_namm,
                "harness_args": args.harness_args}
    return run_cli(lambda: sweep(args, calls, settings))


def sweep(args, calls: list[tuple[Path, list[str]]], settings: dict) -> int:
    with open_run(args.out, settings, "scripts/sweep_budgets.py", args.argv):
        return run_calls(args, calls)


def run_calls(args, calls: list[tuple[Path, list[str]]]) -> int:
    """Each harness call in turn (a failed one is reported, the others still run), then the tables."""
    failed = []
    for sub, cmd in calls:
        print(shlex.join(cmd), file=sys.stderr)
        if subprocess.run(executable(cmd)).returncode != 0:
            failed.append(sub.name)
            print(f"sweep: {sub.name} failed; going on with the others", file=sys.stderr)
    from make_tables import make_tables

    done = [str(sub) for sub, _ in calls if sub.is_dir()]
    md, written, code = make_tables(done, args.out)
    print(md, end="")
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    if failed:
        print(f"sweep: failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or code else 0


if __name__ == "__main__":
    sys.exit(main())
