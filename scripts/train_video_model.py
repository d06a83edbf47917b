"""Train the small Llava-Next-Video that `run_video.py --dataset synthetic` uses, offline on synthetic QA.

    # the shipped model (the defaults: 6,800 steps, 55 min of training steps on this machine's CPU; resumes):
    python scripts/train_video_model.py --out runs/video-one --ship
    python scripts/train_video_model.py --size tiny --text-steps 2 --reader-steps 2 --vision-steps 2 \
        --joint-steps 2 --batch-size 4 --val-samples 4 --out /tmp/v                                # smoke

Four stages in one run (text, reader, vision, joint; see video/training.py). Writes to --out (default
<checkout>/runs/video-model): log.jsonl (one line per step: stage, losses, validation every --eval-every steps and at
each stage's end), curve.png, checkpoint.pt (model, optimiser, RNG state, every --checkpoint-every steps: rerunning
the same command resumes exactly, after --stop-after or a kill; log lines after the checkpoint are redone, not
repeated), run.json (the settings: a rerun with others is refused; a lock stops two runs in one folder) and model/
(save_pretrained: LlavaNextVideoForConditionalGeneration + LlavaNextVideoProcessor); --ship copies model/ and
curve.png to video/checkpoints/llava-tiny-synth. Checkpoints (and --init-from) are loaded as data only.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from namm_transfer.cli import UsageError, default_out, float_in, int_in, out_help, run_cli  # noqa: E402
from video.pipeline import TINY_SYNTH_MODEL  # noqa: E402
from video.tiny_model import SMALL, TINY  # noqa: E402
from video.training import REPLY_STYLES, STAGES, VideoTrainConfig, train  # noqa: E402

SIZES = {"small": SMALL, "tiny": TINY}


def parse_args(argv=None) -> argparse.Namespace:
    d = VideoTrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(default_out("video-model")), help=out_help("video-model"))
    for stage in STAGES:
        ap.add_argument(f"--{stage}-steps", type=int_in(0), default=getattr(d, f"{stage}_steps"))
        ap.add_argument(f"--{stage}-lr", type=float_in(0, lo_open=True), default=getattr(d, f"{stage}_lr"))
    ap.add_argument("--batch-size", type=int_in(2), default=d.batch_size,
                    help="text and reader batch; vision and joint use half")
    ap.add_argument("--short-share", type=float_in(0, 1), default=d.short_share,
                    help="reader stage: share of evidence-clip batches")
    ap.add_argument("--pointer-weight", type=float_in(0), default=d.pointer_weight,
                    help="answer-pointer loss weight (0 = off)")
    ap.add_argument("--letter-weight", type=float_in(0), default=d.letter_weight,
                    help="option-letter loss weight (0 = off)")
    ap.add_argument("--code-weight", type=float_in(0), default=d.code_weight,
                    help="joint stage: code-matching loss weight")
    ap.add_argument("--frames", type=int_in(1), default=d.frames, help="frames per video (use run_video.py's --frames)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int_in(0), default=d.seed)
    ap.add_argument("--val-samples", type=int_in(1), default=d.val_samples)
    ap.add_argument("--eval-every", type=int_in(1), default=d.eval_every)
    ap.add_argument("--checkpoint-every", type=int_in(1), default=d.checkpoint_every)
    ap.add_argument("--workers", type=int_in(0), default=d.workers, help="data processes (0 = in the training process)")
    ap.add_argument("--reply", choices=REPLY_STYLES, default=d.reply,
                    help="target reply: ' 3 red B' (what was read, then the letter), ' red B' (the right option's "
                         "text, then its letter) or 'B'")
    ap.add_argument("--init-from", default=None, help="checkpoint.pt of another run: start from its weights")
    ap.add_argument("--stop-after", type=int_in(1), default=None,
                    help="end this call after this many steps in all; rerunning continues exactly")
    ap.add_argument("--ship", action="store_true", help=f"copy the trained model to {TINY_SYNTH_MODEL}")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if sum(getattr(a, f"{stage}_steps") for stage in STAGES) == 0:
        ap.error("all --*-steps are 0: give at least one stage a step")
    if a.init_from is not None and not Path(a.init_from).is_file():
        ap.error(f"--init-from {a.init_from}: no such file (a checkpoint.pt of another run)")
    a.argv = argv
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    return run_cli(lambda: run(a))


def run(a) -> int:
    cfg = VideoTrainConfig(out=a.out, **{f"{s}_{k}": getattr(a, f"{s}_{k}") for s in STAGES for k in ("steps", "lr")},
                           batch_size=a.batch_size, short_share=a.short_share, pointer_weight=a.pointer_weight,
                           letter_weight=a.letter_weight, code_weight=a.code_weight, frames=a.frames,
                           seed=a.seed, size=SIZES[a.size], val_samples=a.val_samples, eval_every=a.eval_every,
                           checkpoint_every=a.checkpoint_every, workers=a.workers, reply=a.reply,
                           stop_after=a.stop_after, init_from=a.init_from)
    try:
        final = train(cfg, progress=not a.no_progress, argv=a.argv)
    except ValueError as err:  # an unreadable checkpoint or --init-from
        raise UsageError(str(err)) from None
    print(f"model: {final}\ncurve: {Path(a.out) / 'curve.png'}")
    if a.ship:
        shutil.rmtree(TINY_SYNTH_MODEL, ignore_errors=True)
        shutil.copytree(final, TINY_SYNTH_MODEL)
        shutil.copy(Path(a.out) / "curve.png", TINY_SYNTH_MODEL / "curve.png")
        print(f"shipped to {TINY_SYNTH_MODEL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
