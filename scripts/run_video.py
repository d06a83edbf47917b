"""Zero-shot NAMM transfer to Llava-Next-Video: video QA accuracy vs KV-cache size, NAMM vs baselines.

    python scripts/run_video.py --dataset longvideobench --data-root /data --frames 32 --policies full,namm,h2o,l2
    python scripts/run_video.py --dataset mlvu --data-root /data --device cuda --dtype float16 --limit 200
    python scripts/run_video.py --dataset synthetic --limit 8          # offline smoke run, tiny model
    torchrun --nproc-per-node 8 scripts/run_video.py --dataset mlvu --data-root /data --device cuda   # 8 GPUs

Writes to --out (default <checkout>/runs/video/<dataset>_<model>_<frames>f): records.jsonl (one line per (policy,
sample), flushed as it goes; rerunning the same command skips pairs already there), summary.json and summary.md
(accuracy overall / per duration group / per category, MLVU M-Avg, realised cache %, video tokens kept %, peak
memory, seconds per sample, unparsed and error counts). A sample that could not be run (undecodable video,
malformed annotation entry, CUDA out of memory) is recorded as an error and scored wrong; --retry-errors runs those
again. run.json records the settings (with content hashes of the model, NAMM and annotations): a rerun into the
same --out with other settings is refused, and a lock stops two runs writing one folder.

Budgets: baselines (h2o, l2, recency, snapkv, random) run, per sample, at the realised cache fraction NAMM reached
on that sample when `namm` comes before them in --policies; otherwise at --budget (0.5 if not given). An explicit
--budget always wins. All policies share one eviction period (--delay).

Protocols are the official evaluators' (video/prompts.py names each source and version): LongVideoBench as
lmms-eval's longvideobench_val_v (--subtitles: longvideobench_val_i, subtitles interleaved with the frames, each
frame its own one-frame video), MLVU as the MLVU authors' choice_bench.py / test_bench.py (system text, "Question:
... Options: (A) ...", reply opened with "Best Option: (", the letter before the first ")" scored). Frames: --frame-
sampling lmms-eval (default) takes --frames uniform indices even from a shorter video (frames repeat), unique never
repeats a frame. Test splits (longvideobench --split test, mlvu --split test without its ground-truth file) have no
answers: the summary shows no accuracy and the run writes the file the benchmark scores, per policy:
submission_<policy>.json ({id: letter} for LongVideoBench, [{question_id, question_type, option}] for MLVU).

Eviction steps run while the video is being read (--evict-during video, the default): the policies decide which
video tokens to keep, and the question that follows is read into the pruned cache and kept whole (with 7B-class
models the text after the video is usually shorter than one eviction period anyway). --evict-during prompt keeps
evicting through the question. Realised cache % always counts every token, text included.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.cli import (UsageError, budget, check_device, check_model_path, default_out, int_in,  # noqa: E402
                               load_namm_arg, name_list, out_help, run_cli)

BASELINES = ("h2o", "l2", "recency", "snapkv", "random")
POLICY_NAMES = ("full", "namm") + BASELINES
TINY_RANDOM = "tiny-random"
TINY_DELAY = 64  # tiny models see 4 video tokens per frame: evict every 64 tokens so eviction happens at all
SETTINGS = ("dataset", "split", "data_root", "data_hash", "model", "model_hash", "namm", "namm_hash", "frames",
            "chunk", "delay", "budget", "seed", "dtype", "evict_during", "frame_sampling", "subtitles")
LEGACY_SETTINGS = {"frame_sampling": "unique", "subtitles": False}  # what runs recorded before these flags used
SPLITS = {"longvideobench": ("val", "validation", "test"), "mlvu": ("dev", "test"), "synthetic": ("train", "val", "test")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=["longvideobench", "mlvu", "synthetic"])
    ap.add_argument("--data-root", default=None, help="dataset folder (required for longvideobench and mlvu; "
                                                      "synthetic: generated if omitted)")
    ap.add_argument("--allow-outside-paths", action="store_true",
                    help="let annotation paths (video_path, subtitles) point outside the dataset folder")
    ap.add_argument("--split", default=None, help="longvideobench: val|test (default val); mlvu: dev|test (default "
                                                  "dev); synthetic: train|val|test (default test)")
    ap.add_argument("--model", default=None,
                    help=f"Hub id or folder; '{TINY_RANDOM}' = a fresh random tiny model. Default: the trained tiny "
                         "model for synthetic (random tiny if absent), else llava-hf/LLaVA-NeXT-Video-7B-hf")
    ap.add_argument("--frames", type=int_in(1), default=32)
    ap.add_argument("--frame-sampling", default="lmms-eval", choices=["lmms-eval", "unique"],
                    help="lmms-eval (default): linspace(0, n-1, --frames) like lmms-eval's Llava wrapper, frames "
                         "repeat when a video is shorter; unique: at most one copy of each frame")
    ap.add_argument("--subtitles", action="store_true",
                    help="longvideobench: interleave the subtitles with the frames (lmms-eval longvideobench_val_i; "
                         "needs the subtitles/ folder)")
    ap.add_argument("--policies", type=name_list(POLICY_NAMES), default="full,namm", help=", ".join(POLICY_NAMES))
    ap.add_argument("--budget", type=budget, default=None, help="baseline cache fraction in (0, 1] (or tokens >= 2)")
    ap.add_argument("--namm", default=None, help="NAMM checkpoint folder or official ckpt.pt")
    ap.add_argument("--delay", type=int_in(1), default=None, help="eviction period in tokens (default: NAMM's, "
                                                                  f"512; {TINY_DELAY} on tiny models)")
    ap.add_argument("--chunk", type=int_in(1), default=128, help="prefill chunk size")
    ap.add_argument("--evict-during", default="video", choices=["video", "prompt"],
                    help="video (default): eviction steps only while the video is read, so policies decide over "
                         "video tokens and the question after it is kept; prompt: all through the prompt")
    ap.add_argument("--limit", type=int_in(1), default=None, help="run the first N samples")
    ap.add_argument("--retry-errors", action="store_true",
                    help="run again the (policy, sample) pairs recorded as errors (e.g. a video fixed since)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default float32 on cpu, float16 on cuda")
    ap.add_argument("--out", default=None, help=out_help("video", "<dataset>_<model>_<frames>f"))
    ap.add_argument("--seed", type=int_in(0), default=0)
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--cache-dir", default=os.environ.get("NAMM_TRANSFER_CACHE",
                                                          str(Path.home() / ".cache" / "namm_transfer")))
    ap.add_argument("--synthetic-samples", type=int_in(1), default=16, help="size of a generated synthetic split")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = argv  # as given (None: sys.argv[1:]); recorded in <out>/command.json
    args.policy_list = args.policies
    if args.data_root is None and args.dataset != "synthetic":
        ap.error(f"--dataset {args.dataset} needs --data-root: the folder holding the benchmark (see the "
                 "loader's message for the layout), or use --dataset synthetic to run offline")
    if args.split is not None and args.split not in SPLITS[args.dataset]:
        ap.error(f"--split {args.split}: {args.dataset} has {', '.join(SPLITS[args.dataset])}")
    if args.subtitles and args.dataset != "longvideobench":
        ap.error(f"--subtitles: only LongVideoBench has subtitles, not {args.dataset}")
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    return args


# ------------------------------------------------------------------------------------------------ setup


def load_samples(args, notes: list[str]):
    from video.datasets import DatasetNotFoundError, load_dataset
    from video.synthetic import generate_split

    args.split = args.split or {"longvideobench": "val", "mlvu": "dev", "synthetic": "test"}[args.dataset]
    if args.dataset == "synthetic" and args.data_root is None:
        split = args.split
        root = Path(args.cache_dir) / f"video-synthetic-{split}-seed{args.seed}-n{args.synthetic_samples}"
        if not (root / f"lvb_{split}.json").is_file():
            try:
                generate_split(root, split, num_samples=args.synthetic_samples, seed=args.seed)
            except OSError as err:  # a file in the way, no permission, disk full
                raise UsageError(f"--cache-dir {args.cache_dir}: cannot write the synthetic split in {root} "
                                 f"({err.strerror or err}); pass a folder that can be written") from None
            notes.append(f"generated a synthetic {split} split ({args.synthetic_samples} videos) in {root}")
        args.data_root = str(root)
    try:
        samples = load_dataset(args.dataset, args.data_root, args.split, allow_outside=args.allow_outside_paths)
    except (DatasetNotFoundError, ValueError) as err:  # not found, unreadable annotations, duplicate ids
        raise UsageError(str(err)) from None
    if not samples:
        raise UsageError(f"--data-root {args.data_root}: the {args.dataset} {args.split} annotations hold no samples; "
                         "check that the annotation file lists the benchmark's entries")
    missing = [s.id for s in samples if args.subtitles and s.problem is None and s.subtitle_path is None]
    if missing:
        raise UsageError(f"--subtitles: {len(missing)} sample(s) have no subtitle file (e.g. {missing[:3]}); "
                         "unpack subtitles.tar next to the annotations, or drop --subtitles")
    return samples


def data_hash(samples, root: str) -> str:
    """Content hash of the loaded annotations (paths relative to the data root, so a moved copy hashes alike)."""
    from dataclasses import asdict

    from namm_transfer.runs import json_hash

    rel = lambda p: p and os.path.relpath(p, root)  # noqa: E731
    return json_hash([{**asdict(s), "video_path": rel(s.video_path), "subtitle_path": rel(s.subtitle_path)}
                      for s in samples])


def load_model(args, notes: list[str]):
    import torch
    from video.pipeline import DEFAULT_MODEL, DTYPES, TINY_SYNTH_MODEL, load_video_model
    from namm_transfer.records import in_repo
    from video.tiny_model import build_tiny_llava_next_video

    name = args.model
    if name is None:
        if args.dataset != "synthetic":
            name = DEFAULT_MODEL
        elif (TINY_SYNTH_MODEL / "config.json").is_file():
            name = str(TINY_SYNTH_MODEL)
        else:
            name = TINY_RANDOM
            notes.append(f"no trained tiny model at {TINY_SYNTH_MODEL} (build it: scripts/train_video_model.py "
                         "--ship)")
    args.model, args.model_source = in_repo(name), name  # recorded relative inside this checkout; loaded as given
    dtype = DTYPES[args.dtype]
    if name == TINY_RANDOM:
        notes.append("WARNING: a freshly built RANDOM tiny Llava-Next-Video: its answers are noise, this run only "
                     "checks the pipeline.")
        model, processor = build_tiny_llava_next_video(seed=args.seed)
        return model.to(device=args.device, dtype=dtype), processor
    check_model_path(name)
    try:
        return load_video_model(name, args.device, dtype)
    except OSError as err:
        raise UsageError(f"cannot load model {name!r}: {err}\n(offline? download it first with "
                         f"`huggingface-cli download {name}`, or pass --model PATH)") from None
    except ValueError as err:  # another kind of model
        raise UsageError(f"--model {name}: {str(err).splitlines()[0]}") from None
    except torch.OutOfMemoryError as err:
        raise UsageError(f"model {name!r} does not fit on {args.device}: {err}") from None


def is_tiny(model) -> bool:
    return model.config.text_config.hidden_size <= 256


def load_namm_policy(args, delay: int | None = None):
    return load_namm_arg(args.namm, delay)


def resolve_delay(args, model, namm, notes: list[str]) -> int:
    if args.delay is not None:
        return args.delay
    if is_tiny(model):
        notes.append(f"tiny model: eviction every {TINY_DELAY} tokens (--delay to change)")
        return TINY_DELAY
    return namm.config.delay if namm is not None else 512


# ------------------------------------------------------------------------------------------------ summary


def summarise(records: list[dict], policies: list[str], dataset: str) -> dict:
    from video.scoring import QARecord, accuracy_table

    names = [f.name for f in fields(QARecord)]
    out = {}
    for policy in policies:
        rs = [r for r in records if r["policy"] == policy]
        if not rs:
            continue
        ok = [r for r in rs if r.get("error") is None]
        table = accuracy_table([QARecord(**{k: r.get(k) for k in names}) for r in rs])
        mean = lambda key: sum(r[key] for r in ok) / len(ok) if ok else None  # noqa: E731
        budgets = sorted({r.get("budget_source") for r in rs if r.get("budget_source")})
        out[policy] = {
            **table,
            "headline": table["category_mean"] if dataset == "mlvu" else table["overall"],
            "budget_source": ", ".join(budgets) or "-",
            "mean_budget": _mean([r["budget"] for r in ok if r.get("budget") is not None]),
            "realised_cache_pct": None if not ok else 100 * mean("realised_fraction"),
            "video_kept_pct": None if not ok else 100 * mean("video_kept_fraction"),
            "peak_kv_mib": None if not ok else mean("peak_kv_bytes") / 2 ** 20,
            "peak_cache_mib": None if not ok else mean("peak_cache_bytes") / 2 ** 20,
            "peak_memory_mib": None if not ok else max(r["peak_memory_bytes"] for r in ok) / 2 ** 20,
            "seconds_per_sample": mean("seconds"),
        }
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(summary: dict, dataset: str, header: list[str]) -> str:
    acc = "M-Avg %" if dataset == "mlvu" else "accuracy %"
    lines = [*(f"> {h}" for h in header), "",
             f"| policy | budget | n | {acc} | realised cache % | video tokens kept % | peak KV MiB | "
             "peak cache MiB | peak memory MiB | s/sample | unparsed | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, s in summary.items():
        budget = s["budget_source"] + ("" if s["mean_budget"] is None else f" (mean {s['mean_budget']:.3g})")
        headline = None if s["headline"] is None else 100 * s["headline"]
        lines.append(f"| {p} | {budget} | {s['n']} | {_f(headline)} | "
                     f"{_f(s['realised_cache_pct'])} | {_f(s['video_kept_pct'])} | "
                     f"{_f(s['peak_kv_mib'], '{:.2f}')} | {_f(s['peak_cache_mib'], '{:.2f}')} | "
                     f"{_f(s['peak_memory_mib'], '{:.0f}')} | "
                     f"{_f(s['seconds_per_sample'], '{:.2f}')} | {s['n_unparsed']} | {s['n_errors']} |")
    lines += ["", "peak KV: keys + values (mean over samples); peak cache: + positions, policy state and buffered "
              "attention rows; peak memory: max over samples of CUDA max allocated (CPU: process peak RSS)."]
    for key, title in (("by_duration_group", "duration group"), ("by_category", "category")):
        cols = sorted({str(c) for s in summary.values() for c in s[key]}, key=lambda c: (len(c), c))
        if not cols:
            continue
        lines += ["", f"Accuracy % by {title}" + (" (M-Avg = their mean)" if dataset == "mlvu" and key == "by_category"
                                                   else ""), "",
                  "| policy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for p, s in summary.items():
            vals = {str(k): v for k, v in s[key].items()}
            lines.append(f"| {p} | " + " | ".join(_f(None if c not in vals else 100 * vals[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def policy_for(name: str, args, namm, delay: int, sample_id: str, done: dict) -> tuple:
    """(policy, budget, budget_source) for one sample."""
    from namm_transfer.policies import make_policy

    if name == "full":
        return make_policy("full", delay=delay), None, None
    if name == "namm":
        return namm, None, None
    kw = {"seed": args.seed} if name == "random" else {}
    budget, source = args.budget, "--budget"
    namm_first = "namm" in args.policy_list and args.policy_list.index("namm") < args.policy_list.index(name)
    if budget is None:
        ref = done.get(("namm", sample_id)) if namm_first else None
        if ref is not None and ref.get("error") is None:
            budget, source = min(max(float(ref["step_fraction"]), 1e-3), 1.0), "NAMM's realised cache"
        else:
            budget, source = 0.5, "default 0.5"
    if budget > 1:
        budget = int(budget)
    return make_policy(name, budget=budget, delay=delay, **kw), budget, source


def write_submissions(out: Path, records: list[dict], dataset: str, policies: list[str]) -> list[str]:
    """submission_<policy>.json per policy in the benchmark's format (video.scoring); returns the file names."""
    from namm_transfer.records import write_json
    from video.scoring import lvb_submission, mlvu_test_submission

    make = mlvu_test_submission if dataset == "mlvu" else lvb_submission
    names = []
    for policy in policies:
        rs = sorted((r for r in records if r["policy"] == policy), key=lambda r: r["sample_index"])
        if rs:
            names.append(f"submission_{policy}.json")
            write_json(out / names[-1], make(rs))
    return names


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from namm_transfer import distributed
    from namm_transfer.records import in_repo, write_json, write_text
    from namm_transfer.runs import content_hash, model_hash
    from video.datasets import SampleError
    from video.decoding import VideoDecodeError
    from video.pipeline import error_record, prepare_inputs, run_policy

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    check_device(args.device)
    world = distributed.init(args.device)  # under torchrun: this rank's share of the samples, its own GPU
    notes: list[str] = []
    all_samples = world.in_turn(lambda: load_samples(args, notes))  # fail fast (data, NAMM) before the model
    samples = all_samples[: args.limit]
    namm = load_namm_policy(args) if "namm" in args.policy_list else None
    model, processor = load_model(args, notes)
    args.delay = resolve_delay(args, model, namm, notes)
    if namm is not None and namm.delay != args.delay:
        namm = load_namm_policy(args, args.delay)
    if namm is not None:
        args.namm = in_repo(Path(namm.source).resolve())
        notes.append(f"NAMM: {args.namm}")
    args.namm_hash = content_hash(namm.source) if namm is not None else None
    args.model_hash = f"generated (seed {args.seed})" if args.model == TINY_RANDOM else model_hash(args.model_source)
    args.data_hash = data_hash(all_samples, args.data_root)
    for n in notes if world.main else []:  # one copy, not one per rank
        print(("\n!!! " + n + "\n") if n.startswith("WARNING") else f"note: {n}", file=sys.stderr)

    model_tag = Path(args.model.rstrip("/")).name
    out = Path(args.out or default_out("video", f"{args.dataset}_{model_tag}_{args.frames}f"))
    settings = {k: getattr(args, k) for k in SETTINGS}
    with distributed.open_run(world, out, settings, "scripts/run_video.py", args.argv, fillable=("namm", "namm_hash"),
                              legacy=LEGACY_SETTINGS):
        path = out / "records.jsonl"
        journal = distributed.RankRecords(path, world, key=lambda r: (r["policy"], r["id"]))
        ids = {s.id for s in samples}
        if args.retry_errors:
            n = journal.drop(lambda r: bool(r.get("error")) and r["id"] in ids and r["policy"] in args.policy_list)
            if world.main:
                print(f"--retry-errors: {n} error record(s) dropped, to be run again", file=sys.stderr)
        done = journal.load()
        todo = [(i, s) for i, s in enumerate(samples) if any((p, s.id) not in done for p in args.policy_list)]
        n_todo = sum((p, s.id) not in done for _, s in todo for p in args.policy_list)
        if world.main:
            print(f"{len(samples)} samples x {len(args.policy_list)} policies: {n_todo} to run, "
                  f"{len(samples) * len(args.policy_list) - n_todo} already in {path}"
                  + (f"; {world.size} ranks" if world.size > 1 else ""), file=sys.stderr)

        mine = world.shard(todo)  # a sample's policies stay together: baselines use NAMM's cache on that sample
        n_mine = sum((p, s.id) not in done for _, s in mine for p in args.policy_list)
        with tqdm(total=n_mine, disable=args.no_progress or not world.main, desc="video QA") as bar:
            for index, sample in mine:
                try:
                    inputs, failure = prepare_inputs(sample, processor, args.frames, sampling=args.frame_sampling,
                                                     subtitles=args.subtitles), None
                except (VideoDecodeError, SampleError) as err:
                    inputs, failure = None, err
                for name in args.policy_list:
                    if (name, sample.id) in done:
                        continue
                    policy, budget, source = policy_for(name, args, namm, args.delay, sample.id, done)
                    if failure is not None:
                        rec = error_record(sample, failure)
                    else:
                        rec = run_policy(model, processor, sample, inputs, policy, index, args.seed, args.chunk,
                                         args.evict_during)
                    rec = {"policy": name, "sample_index": index, "budget": budget, "budget_source": source, **rec}
                    journal.add(rec)
                    bar.update(1)
                    if rec.get("error"):
                        tqdm.write(f"{sample.id} [{name}]: {rec['error']}", file=sys.stderr)
        # one process's order: sample by sample, policies in --policies order
        done = journal.merge((p, s.id) for s in samples for p in args.policy_list)
        if not world.main:
            return 0

        records = [r for (p, i), r in done.items() if i in ids and p in args.policy_list]
        n_errors = sum(bool(r.get("error")) for r in records)
        if n_errors:
            notes.append(f"{n_errors} (policy, sample) pair(s) recorded as errors (scored wrong); rerun with "
                         "--retry-errors to run them again")
        summary = summarise(records, args.policy_list, args.dataset)
        header = [f"{args.dataset} ({args.split}), {len(samples)} samples, {args.frames} frames, "
                  f"model {args.model}, {args.device}/{args.dtype}, delay {args.delay}, chunk {args.chunk}, "
                  f"eviction during the {args.evict_during}", *notes]
        if any(p in BASELINES for p in args.policy_list):
            header.append("baseline budgets: " + "; ".join(f"{p}: {s['budget_source']}" for p, s in summary.items()
                                                            if p in BASELINES))
        if all(s.answer is None for s in samples):
            header.append("answers withheld: no accuracy; submission files: " +
                          ", ".join(write_submissions(out, records, args.dataset, args.policy_list)))
        table = markdown(summary, args.dataset, header)
        write_json(out / "summary.json", {"settings": settings, "notes": notes, "policies": summary})
        write_text(out / "summary.md", table)
    print(table)
    if n_errors:
        print(f"note: {notes[-1]}", file=sys.stderr)
    print(f"wrote {path}, {out / 'summary.json'}, {out / 'summary.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
