#!/usr/bin/env bash
# Continue the two language-NAMM searches (cache targets 0.5 and 0.75), round-robin, at low priority, one core.
# Start it at the beginning of every working period, in the background:
#     nohup training/run.sh > runs/training.log 2>&1 &
# Each call of train_namm.py resumes its folder exactly (state saved every generation); the folders' small state
# is committed at the end of the period so a fresh clone continues from it. First call creates a folder with
# the settings below; later calls pass only --out (the saved settings are the run's settings). Changes made since
# with --change-settings are recorded in each state's settings_changes (both searches: bfloat16 from generation
# 30; from generations 85 / 74 eviction steps only while the context is read, on ~1024-token prompts:
# --protocol context-only --tokens 1024, the protocol and length eval_language.py tests with; namm-c75 only: --cache-target
# 0.72 from generation 80, to settle below the goal's 75% cache, and 0.74 from generation 111 (at 0.72 it settled at
# 66-69%), and 0.75 from generation 145 (at 0.74 its members settled at 0.70: README, "Where each search's cache
# settles"); namm-c50 only: --cache-weight 2.0 from generation 151 (at 1.0 its 0.5 target did not bind); both:
# float32 from generations 121 / 106 on a machine without native bfloat16, as DTYPE below picks).
# namm-c75-head (from 2026-12-03): a third search that starts at namm-c75's CMA-ES mean (generation 149) and evolves
# only the scorer's output head (w_score, b_score, b_out: 76 of 4,172 parameters; the rest stay at that mean), under
# namm-c75's settings of that time; README, "A head-only search". Paused from 2026-12-04 (not in the default RUNS;
# RUNS=training/namm-c75-head resumes it).
# namm-c75-mass (from 2026-12-04): starts at namm-c75's CMA-ES mean (generation 181) and ranks members by the
# retained oracle mass (--fitness oracle-mass: dense, its ranking repeats across prompts) under namm-c75's settings;
# validation (every 5 generations) still scores the answer probability; README, "Ranking by the oracle's mass".
# Paused from 2026-12-04 at generation 60 (no validation gain over its start; README, "namm-c75-mass after 60
# generations"); RUNS=training/namm-c75-mass resumes it.
set -uo pipefail
cd "$(dirname "$0")/.."
STEP=${STEP:-2}           # generations per run per turn
# Model dtype: bfloat16 where the CPU runs it natively (oneDNN: AVX512-BF16 / AMX; there a generation takes half
# the float32 time), float32 elsewhere (on AVX2, bfloat16 is emulated: a SmolLM2 forward measured 5x slower than
# float32). A switch is a recorded settings change (--change-settings; the full-cache references are rescored).
DTYPE=${DTYPE:-$(.venv/bin/python -c "from namm_transfer.evolution.trainer import bfloat16_is_native
print('bfloat16' if bfloat16_is_native() else 'float32')")}
NICE=${NICE:-19}
# nice orders processes only inside one scheduler autogroup, and every session (setsid, a new terminal) is its own
# group, so a niced search would still take an equal share from an evaluation started elsewhere: lower the whole
# group too (Linux with autogroups; elsewhere nothing to do).
[ -w /proc/self/autogroup ] && { echo "$NICE" > /proc/self/autogroup; } 2>/dev/null || true
COMMON="--stages passkey+kv_retrieval+passage_retrieval:1000 --tokens 768 --delay 256 --chunk 128 \
  --popsize 16 --samples-per-task 2 --pool-per-task 64 --stats-samples-per-task 4 --cache-weight 1.0 \
  --val-every 10 --val-per-task 8 --threads 1"
declare -A CREATE=(
  [training/namm-c50]="$COMMON --cache-target 0.5 --seed 0"
  [training/namm-c75]="$COMMON --cache-target 0.75 --seed 1"
  [training/namm-c75-head]="$COMMON --tokens 1024 --protocol context-only --cache-target 0.75 --cache-weight 3.0 \
    --seed 2 --init-from training/namm-c75 --evolve w_score,b_score,b_out --val-every 5"
  [training/namm-c75-mass]="$COMMON --tokens 1024 --protocol context-only --cache-target 0.75 --cache-weight 3.0 \
    --seed 3 --init-from training/namm-c75 --fitness oracle-mass --val-every 5"
)
RUNS=${RUNS:-"training/namm-c50 training/namm-c75"}
# Run from a snapshot of the committed code, so edits in the work tree never reach a running search.
# (SNAP: another folder for a second loop, e.g. one loop per folder when both cores are free:
#     RUNS=training/namm-c50 SNAP=runs/train-code-c50 nohup training/run.sh > runs/training-c50.log 2>&1 &
#     RUNS=training/namm-c75 SNAP=runs/train-code-c75 nohup training/run.sh > runs/training-c75.log 2>&1 &
#  never two loops on the same folder)
SNAP=${SNAP:-runs/train-code}
rm -rf "$SNAP" && mkdir -p "$SNAP" && git archive HEAD namm_transfer scripts | tar -x -C "$SNAP" || exit 1
echo "training code: $(git rev-parse --short HEAD); dtype $DTYPE"
while true; do
  for d in $RUNS; do
    extra=""
    [ -f "$d/state.json" ] && extra="--dtype $DTYPE --change-settings" || extra="${CREATE[$d]} --dtype $DTYPE"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 nice -n "$NICE" .venv/bin/python "$SNAP/scripts/train_namm.py" --out "$d" $extra \
      --more-generations "$STEP" || { echo "train_namm.py failed for $d"; exit 1; }
  done
done
