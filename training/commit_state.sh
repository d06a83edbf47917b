#!/usr/bin/env bash
# End of a working period: commit the searches' state (training/namm-*) with the README's training table made
# from exactly that state. Works beside other people's uncommitted or staged work: the commit is built in a
# private index from HEAD + training/ + the refreshed README block, and nothing else. A state pair caught
# mid-save (the searches may keep running) is detected by its content hash and staged again.
set -euo pipefail
cd "$(dirname "$0")/.."
MSG=${1:-"training: search state at the end of a working period"}
export GIT_INDEX_FILE="$PWD/runs/commit-state.index"
mkdir -p runs
for attempt in 1 2 3 4 5; do
  rm -f "$GIT_INDEX_FILE"; git read-tree HEAD
  git add -f training/namm-*/{state,prev.state}.{json,safetensors} training/namm-*/{log.jsonl,val.jsonl,curve.png} \
    training/namm-*/namm
  rm -rf runs/staged && mkdir -p runs/staged && git checkout-index -a --prefix=runs/staged/
  if (cd runs/staged && ../../.venv/bin/python -c "
from pathlib import Path
from namm_transfer.evolution.trainer import load_state
for run in sorted(Path('training').glob('namm-*')):
    load_state(run), load_state(run, 'prev.')
"); then
    (cd runs/staged && ../../.venv/bin/python scripts/training_report.py --write-readme > /dev/null)
    git update-index --cacheinfo "100644,$(git hash-object -w runs/staged/README.md),README.md"
    tree=$(git write-tree)
    commit=$(git commit-tree "$tree" -p HEAD -m "$MSG")
    git update-ref HEAD "$commit"
    unset GIT_INDEX_FILE
    git reset -q -- training README.md  # the shared index follows the new HEAD for these paths
    # the work tree's README gets the same block (other README edits there stay as they are)
    .venv/bin/python -c "
import sys; sys.path.insert(0, 'scripts')
from training_report import BEGIN, END, write_readme
text = open('runs/staged/README.md').read()
write_readme(text.split(BEGIN, 1)[1].split(END, 1)[0].lstrip('\n'))
"
    rm -rf runs/staged runs/commit-state.index
    git log --oneline | head -1
    exit 0
  fi
  echo "staged state caught mid-save; retrying"; sleep 5
done
echo "could not stage a consistent state"; exit 1
