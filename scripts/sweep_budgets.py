"""Budget sweep: the baselines at several cache budgets, NAMM once, then score vs realised cache % plots.

    python scripts/sweep_budgets.py --domain language --budgets 0.25,0.5,0.75 -- --model smollm2-135m --n 8 --delay 512
    python scripts/sweep_budgets.py --domain video --budgets 0.1,0.25,0.5 -- --dataset synthetic --limit 8
    python scripts/sweep_budgets.py --domain dt --budgets 0.05,0.1,0.25 -- --episodes 5

Runs the domain's harness (scripts/eval_language.py, run_video.py, run_dt.py) into sub-folders of --out:
  namm/          --policies full,namm           (NAMM's cache size is emergent: one point per sweep)
  budget-<b>/    --policies <methods> --budget b (dt: --rollout kv)
Arguments after `--` go to every harness call unchanged (not --policies, --budget or --out: the sweep sets
them). Each sub-folder gets command.json with the exact argv, so the table names the command. Reruns resume
(the harnesses skip what their records already hold). Then scripts/make_tables.py writes <out>/table.md,
table.csv and sweep_*.png.

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

from namm_transfer.records import record_command  # noqa: E402

HARNESS = {"language": "eval_language.py", "video": "run_video.py", "dt": "run_dt.py"}
OWNED_FLAGS = ("--policies", "--budget", "--out")


def budget_tag(b: float) -> str:
    return f"budget-{b:g}"


def plan(domain: str, budgets: list[float], methods: list[str], namm: bool, out: Path,
         harness_args: list[str]) -> list[tuple[Path, list[str]]]:
    """[(sub-folder, argv)] of every harness call, NAMM first."""
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
    return [(sub, ["python", script, *flags, *harness_args, "--out", str(sub)]) for sub, flags in calls]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--domain", required=True, choices=sorted(HARNESS))
    ap.add_argument("--budgets", required=True, help="comma-separated fractions in (0, 1] (or token counts > 1)")
    ap.add_argument("--methods", default="h2o,l2,recency", help="baselines to sweep")
    ap.add_argument("--no-namm", action="store_true", help="skip the NAMM (and full-cache) reference run")
    ap.add_argument("--out", default=None, help="default runs/sweep/<domain>")
    ap.add_argument("--dry-run", action="store_true", help="print the harness commands, run nothing")
    args, rest = ap.parse_known_args(argv)
    rest = rest[1:] if rest[:1] == ["--"] else rest
    clash = [a for a in rest if a.split("=")[0] in OWNED_FLAGS]
    if clash:
        ap.error(f"{clash}: the sweep sets --policies, --budget and --out itself")
    try:
        args.budget_list = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets {args.budgets!r}: expected numbers such as 0.25,0.5,0.75")
    if not args.budget_list or any(b <= 0 for b in args.budget_list):
        ap.error("--budgets: give positive fractions (or token counts)")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.harness_args = rest
    args.out = Path(args.out or ROOT / "runs" / "sweep" / args.domain)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    calls = plan(args.domain, args.budget_list, args.method_list, not args.no_namm, args.out, args.harness_args)
    failed = []
    for sub, cmd in calls:
        print(shlex.join(cmd), file=sys.stderr)
        if args.dry_run:
            continue
        sub.mkdir(parents=True, exist_ok=True)
        record_command(sub, cmd[1], cmd[2:])
        if subprocess.run([sys.executable, *cmd[1:]]).returncode != 0:
            failed.append(sub.name)
            print(f"sweep: {sub.name} failed; going on with the others", file=sys.stderr)
    if args.dry_run:
        return 0
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
