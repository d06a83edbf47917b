#!/usr/bin/env bash
# End of a working period: refresh the README's training table, stage training/ and check that what is staged
# is a consistent state (each state.json matches its state.safetensors, and the last generation replays exactly),
# then commit. The searches may keep running while this runs: a pair caught mid-save is re-staged.
set -euo pipefail
cd "$(dirname "$0")/.."
for attempt in 1 2 3 4 5; do
  git add training/namm-*/{state,prev.state}.{json,safetensors} training/namm-*/{log.jsonl,val.jsonl,curve.png} \
    training/namm-*/namm 2>/dev/null || true
  rm -rf runs/staged && mkdir -p runs/staged && git checkout-index -a --prefix=runs/staged/
  if .venv/bin/python - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "runs/staged")
from namm_transfer.evolution.trainer import load_state
for run in sorted(Path("runs/staged/training").glob("namm-*")):
    load_state(run), load_state(run, "prev.")
PY
  then
    # the README table is made from the staged state, so the two always agree
    (cd runs/staged && ../../.venv/bin/python scripts/training_report.py) > runs/staged-report.md
    # the block goes into the staged README (other uncommitted README edits stay unstaged) and the work tree's
    git show :README.md > runs/staged-README.md
    .venv/bin/python - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from training_report import write_readme
block = open("runs/staged-report.md").read()
write_readme(block, Path("runs/staged-README.md"))
write_readme(block, Path("README.md"))
PY
    git update-index --cacheinfo "100644,$(git hash-object -w runs/staged-README.md),README.md"
    git commit -q -m "${1:-training: search state at the end of a working period}" && git log --oneline | head -1
    rm -rf runs/staged runs/staged-report.md runs/staged-README.md
    exit 0
  fi
  echo "staged state caught mid-save; retrying"; sleep 5
done
echo "could not stage a consistent state"; exit 1
