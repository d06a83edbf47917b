"""LongBench (THUDM/LongBench v1, or LongBench-E with --e) with a KV-cache policy: predictions and official scores.

    python scripts/run_longbench.py --data DIR --max-length 3500 --policies full,namm,h2o [--tasks hotpotqa,trec]
        [--limit N] [--e] [--model smollm2-135m | HF id | folder] [--namm PATH] [--budget F] [--delay N]
        [--out runs/longbench/<model>_<max-length>]

DIR is the official data: data.zip from the Hugging Face dataset THUDM/LongBench, unzipped, so that
DIR/narrativeqa.jsonl (or DIR/data/narrativeqa.jsonl) exists; LongBench-E reads DIR/<task>_e.jsonl.

Per task, sample and policy, as LongBench's pred.py does for a model without its own chat format: the task's
official prompt, middle-truncated to --max-length tokens (pred.py's config/model2maxlen.json value; special tokens
counted), tokenized with the tokenizer's special tokens, then greedy decoding of up to the task's
config/dataset2maxlen.json new tokens with the policy managing the KV cache (an eviction step every --delay tokens
while the prompt is read, the answer decoded into the pruned cache; --evict-during answer: steps also while
decoding, as evo-memory's runs do), stopping at the model's EOS (its generation_config) and, for samsum, at EOS or "\\n"
with neither allowed as the first token (pred.py's min_length). The prediction is the new tokens decoded without
special tokens, not stripped. --chat-template wraps the prompt of the tasks pred.py formats for chat models in the
tokenizer's chat template (pred.py has per-model formats instead; default: none, as for an unlisted model).

Writes to --out: pred/<policy>/<task>.jsonl (pred_e/ with --e), one line {"pred", "answers", "all_classes",
"length"} per sample as pred.py writes it (so LongBench's eval.py can read OUT/pred/<policy>/ as a model's folder),
appended as it goes; records.jsonl (cache fractions, budget, prompt tokens, seconds per sample); summary.json and
summary.md: per task (eval.py's score; with --e also scorer_e's 0-4k / 4-8k / 8k+ buckets), the six categories,
the 21-task mean and the mean of the category means. Rerunning the same command resumes: samples already in a
pred file are skipped (a torn last line is cut off); run.json refuses a rerun with other settings.

Budgets: baselines (h2o, l2, recency, snapkv, random) run, per sample, at the cache fraction NAMM kept after its
last eviction step on that sample when `namm` comes before them in --policies; otherwise at --budget (0.5 if not
given). An explicit --budget always wins.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from namm_transfer.cli import (UsageError, budget, check_device, check_model_path, default_out, int_in,  # noqa: E402
                               load_namm_arg, load_script, name_list, out_help, run_cli)
from namm_transfer.language import longbench as lb  # noqa: E402
from namm_transfer.records import (append_record, complete_lines, in_repo, read_records, write_json,  # noqa: E402
                                   write_text)

BASELINES = ("h2o", "l2", "recency", "snapkv", "random")
POLICY_NAMES = ("full", "namm") + BASELINES
TINY_RANDOM = "tiny-random"  # a 2-layer random Llama with a character-level tokenizer (tests, smoke runs)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRED_KEYS = ("pred", "answers", "all_classes", "length")
EVICT_DURING = ("prompt", "answer")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of the unzipped LongBench data.zip (DIR/<task>.jsonl "
                                                  "or DIR/data/<task>.jsonl)")
    ap.add_argument("--e", action="store_true", help="LongBench-E: files <task>_e.jsonl, its 13 tasks, scores "
                                                     "also by length (0-4k, 4-8k, 8k+)")
    ap.add_argument("--tasks", type=name_list(lb.TASKS), default=None,
                    help="comma-separated tasks (default: all 21; with --e its 13)")
    ap.add_argument("--limit", type=int_in(1), default=None, help="the first N samples of each task")
    ap.add_argument("--max-length", type=int_in(2), required=True,
                    help="prompt budget in tokens, pred.py's config/model2maxlen.json value for the model (e.g. "
                         "3500 for a 4k-context model, 7500 for 8k, 31500 for 32k)")
    ap.add_argument("--truncation", default="longbench", choices=lb.TRUNCATION,
                    help="longbench (pred.py, default) or namm (evo-memory: max-length minus the new tokens)")
    ap.add_argument("--chat-template", action="store_true",
                    help="wrap the prompts of the non-few-shot tasks in the tokenizer's chat template")
    ap.add_argument("--model", default="smollm2-135m",
                    help=f"HF id or folder; smollm2-135m (offline); tiny-<arch> / {TINY_RANDOM}: random test models")
    ap.add_argument("--policies", type=name_list(POLICY_NAMES), default="full,namm", help=", ".join(POLICY_NAMES))
    ap.add_argument("--namm", default=None, help="NAMM checkpoint folder or official ckpt.pt (default: the shipped "
                                                 "namm_transfer/checkpoints/namm-smollm2)")
    ap.add_argument("--budget", type=budget, default=None, help="baseline cache budget: a fraction in (0, 1] or "
                                                                "tokens >= 2 (default: NAMM's, else 0.5)")
    ap.add_argument("--delay", type=int_in(1), default=None, help="eviction period in tokens (default: NAMM's, 512)")
    ap.add_argument("--chunk", type=int_in(1), default=256, help="prefill chunk size in tokens")
    ap.add_argument("--evict-during", default="prompt", choices=EVICT_DURING,
                    help="prompt (default): eviction steps only while the prompt (context and question) is read, "
                         "the answer is decoded into the pruned cache; answer: steps also during decoding")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="default float32 on cpu, bfloat16 on cuda (pred.py's)")
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--out", default=None, help=out_help("longbench", "<model>_<max-length>[_e]"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.argv = argv  # as given (None: sys.argv[1:]); recorded in <out>/command.json
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


# --------------------------------------------------------------------------------------------------- data


def load_tasks(data: str, tasks: list[str] | None, e: bool, limit: int | None) -> dict[str, list[lb.LongBenchSample]]:
    """The samples of each task (first `limit`), every input problem a UsageError saying what to do."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {data}: no such folder. {lb.DOWNLOAD_HINT}")
    tasks = tasks or list(lb.TASKS_E if e else lb.TASKS)
    if e and set(tasks) - set(lb.TASKS_E):
        raise UsageError(f"--e: LongBench-E has no {sorted(set(tasks) - set(lb.TASKS_E))}; its tasks are "
                         f"{', '.join(lb.TASKS_E)}")
    out = {}
    for task in tasks:
        try:
            samples = lb.load_longbench(f"{task}_e" if e else task, root, limit)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(str(err)) from None
        if not samples:
            raise UsageError(f"{lb.longbench_path(f'{task}_e' if e else task, root)} holds no samples. "
                             f"{lb.DOWNLOAD_HINT}")
        out[task] = samples
    return out


# -------------------------------------------------------------------------------------------------- model


def load_model(name: str, device: str, dtype: torch.dtype):
    """(model, tokenizer, content hash or a note) for --model."""
    from namm_transfer.language.models import load_causal_lm, resolve_model_path, tiny_random_lm, tiny_tokenizer
    from namm_transfer.runs import model_hash

    if name == TINY_RANDOM:
        return tiny_random_lm("llama").to(device=device, dtype=dtype), tiny_tokenizer(), "generated (seed 0)"
    if name.startswith(("tiny-", "random-")):  # SmolLM2's tokenizer, random weights (as eval_language.py)
        return (*load_script("train_namm").load_model(name, device, dtype), "generated (seed 0)")
    check_model_path(name)
    try:
        model, tok = load_causal_lm(name, device=device, dtype=dtype)
    except OSError as err:
        raise UsageError(f"cannot load model {name!r}: {str(err).splitlines()[0]}\n(offline? download it first "
                         f"with `huggingface-cli download {name}`, or pass --model PATH)") from None
    return model, tok, model_hash(resolve_model_path(name))


@dataclass
class DecodeConfig:
    max_length: int
    truncation: str = "longbench"
    chat_template: bool = False
    chunk: int = 256
    evict_during: str = "prompt"  # "prompt": no eviction step after the prompt's last token; "answer": also decoding


@dataclass
class Prediction:
    text: str
    prompt_tokens: int
    new_tokens: int
    realised_fraction: float  # stored / seen tokens at the end (mean over layers)
    kept_fraction: float  # stored / seen right after the last eviction step (what baselines are matched to)
    seconds: float
    step_tokens: list[int]  # the token counts at which eviction steps ran (layer 0)


def prompt_ids(sample: lb.LongBenchSample, tok, cfg: DecodeConfig) -> list[int]:
    """pred.py's model input: the official prompt, middle-truncated, tokenized with special tokens (or, with the
    chat template on a task pred.py formats for chat, the templated text, which holds its own special tokens)."""
    prompt = lb.build_prompt(sample, tok, cfg.max_length, cfg.truncation)
    if cfg.chat_template and sample.task not in lb.NO_CHAT_TEMPLATE:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids
    return tok(prompt).input_ids


def stop_ids(model, tok, task: str) -> set[int]:
    """The tokens that end a prediction: pred.py's [eos, last token of "\\n"] for samsum, else the model's
    generation_config EOS (what model.generate stops at; the tokenizer's EOS if it has none)."""
    if task == "samsum":
        ids = [tok.eos_token_id, tok.encode("\n", add_special_tokens=False)[-1]]
    else:
        eos = model.generation_config.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else tok.eos_token_id]
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def predict(model, tok, ids: list[int], task: str, policy, chunk: int = 256,
            evict_during: str = "prompt") -> Prediction:
    """Greedy decoding of the task's max new tokens from the prompt `ids`, with `policy` managing the KV cache;
    its eviction steps run while the prompt is read (`evict_during="prompt"`) or also while decoding ("answer")."""
    if evict_during not in EVICT_DURING:
        raise ValueError(f"evict_during must be one of {EVICT_DURING}, got {evict_during!r}")
    from namm_transfer.adapters.causal_lm import greedy_decode, prefill
    from namm_transfer.attention import enable_memory_attention
    from namm_transfer.cache import MemoryCache

    enable_memory_attention(model)
    device = next(model.parameters()).device
    stops = stop_ids(model, tok, task)
    cache = MemoryCache(policy, evict_until=len(ids) if evict_during == "prompt" else None)
    start = time.perf_counter()
    logits, _, fractions = prefill(model, torch.tensor([ids], device=device), cache, chunk)
    if task == "samsum":  # pred.py's min_length=context_length + 1: the first new token is no stop token
        logits[:, sorted(stops)] = float("-inf")
    generated, _, _ = greedy_decode(model, cache, logits, lb.MAX_NEW_TOKENS[task], stops, device, fractions)
    text = tok.decode(generated[0], skip_special_tokens=True)
    return Prediction(text, len(ids), len(generated[0]), cache.realised_fraction(), cache.kept_fractions()[0],
                      time.perf_counter() - start, [r.tokens_seen for r in cache.log if r.layer == 0])


# ------------------------------------------------------------------------------------------ policies, files


def policy_for(name: str, args, namm, delay: int, ref: dict | None):
    """(policy, budget, budget source) for one sample; `ref`: NAMM's record on it (None: not run / not first)."""
    from namm_transfer.policies import make_policy

    if name == "full":
        return make_policy("full", delay=delay), None, None
    if name == "namm":
        return namm, None, None
    if args.budget is not None:
        value, source = args.budget, "--budget"
    elif ref is not None:
        value, source = min(max(float(ref["kept_fraction"]), 1e-3), 1.0), "NAMM's kept cache"
    else:
        value, source = 0.5, "default 0.5"
    return make_policy(name, budget=value, delay=delay), value, source


def pred_path(out: Path, policy: str, task: str, e: bool) -> Path:
    return out / ("pred_e" if e else "pred") / policy / f"{task}.jsonl"


def read_preds(path: Path) -> list[dict]:
    """The prediction lines of a pred file; a torn last line (a run killed mid-write) is cut off from the file, a
    malformed line is a UsageError. Lines end at "\n" only, as eval.py reads them: a prediction may hold U+2028 or
    U+0085, which json.dumps(ensure_ascii=False) leaves raw and str.splitlines would split at."""
    if not path.is_file():
        return []
    data = complete_lines(path)
    rows = []
    for i, raw in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{path}, line {i}: not a JSON line ({err}); remove it and the lines after it to run "
                             "those samples again") from None
        if not isinstance(row, dict) or not isinstance(row.get("pred"), str) or not isinstance(row.get("answers"),
                                                                                              list):
            raise UsageError(f"{path}, line {i}: not a LongBench prediction (needs a string 'pred' and a list "
                             "'answers'); remove it and the lines after it to run those samples again")
        rows.append(row)
    return rows


def check_resumable(rows: list[dict], samples: list[lb.LongBenchSample], path: Path) -> None:
    """The lines already in a pred file must be those of the first samples of this data, in order."""
    for i, (row, sample) in enumerate(zip(rows, samples), start=1):
        if row["answers"] != sample.answers or row.get("length") != sample.length:
            raise UsageError(f"{path}, line {i} does not belong to sample {i} of the data (answers or length "
                             "differ): the data changed since it was written; use another --out")


def pred_line(sample: lb.LongBenchSample, text: str) -> str:
    """One line as pred.py writes it."""
    row = {"pred": text, "answers": sample.answers, "all_classes": sample.all_classes, "length": sample.length}
    return json.dumps(row, ensure_ascii=False) + "\n"


def append_pred(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


# ------------------------------------------------------------------------------------------------ scoring


def score_task(task: str, rows: list[dict], e: bool) -> dict:
    """eval.py on one pred file's lines: the task score (all_classes of the last line, as eval.py passes it) and,
    for LongBench-E, scorer_e's length buckets."""
    preds, answers, classes = [r["pred"] for r in rows], [r["answers"] for r in rows], rows[-1]["all_classes"]
    out = {"score": lb.task_score(task, preds, answers, classes), "n": len(rows)}
    if e:
        out["buckets"] = lb.task_score_e(task, preds, answers, [r["length"] for r in rows], classes)
    return out


def sample_scores(task: str, rows: list[dict]) -> list[float]:
    """100 x each sample's eval.py score (the best over its gold answers; the task's all_classes from its last line)."""
    classes = rows[-1]["all_classes"]
    return [100.0 * lb.score_prediction(task, r["pred"], r["answers"], classes) for r in rows]


def paired_differences(scores: dict[str, dict[str, list[float]]], method: str) -> list[dict]:
    """`method` minus each other policy on the same samples: per task and over the mean of the tasks run (each task
    weighted 1 / its sample count, so the mean is the mean of task scores), with stratified paired bootstrap 95%
    intervals (each resample keeps every task's sample count)."""
    from namm_transfer.reporting.bootstrap import paired_difference_ci

    out = []
    tasks = list(scores[method])
    for other in (p for p in scores if p != method):
        for task in tasks:
            mean, lo, hi = paired_difference_ci(scores[method][task], scores[other][task])
            out.append({"method": method, "baseline": other, "task": task, "n": len(scores[method][task]),
                        "diff": mean, "low": lo, "high": hi})
        a, b, groups = [], [], []
        for task in tasks:
            w = sum(len(scores[method][t]) for t in tasks) / (len(scores[method][task]) * len(tasks))
            a += [w * x for x in scores[method][task]]
            b += [w * x for x in scores[other][task]]
            groups += [task] * len(scores[method][task])
        mean, lo, hi = paired_difference_ci(a, b, groups=groups)
        out.append({"method": method, "baseline": other, "task": "task mean", "n": len(a), "diff": mean, "low": lo,
                    "high": hi})
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise_policy(out: Path, policy: str, samples: dict[str, list], e: bool, recs: dict) -> dict:
    """Scores of one policy over this command's tasks and samples, with its cache fractions and timing."""
    per_task = {t: score_task(t, read_preds(pred_path(out, policy, t, e))[:len(s)], e) for t, s in samples.items()}
    mine = [r for (p, t, i), r in recs.items() if p == policy and t in samples and i < len(samples[t])]
    summary = lb.summarize({t: v["score"] for t, v in per_task.items()})
    return {**summary, "n": {t: v["n"] for t, v in per_task.items()},
            **({"length_buckets": {t: v["buckets"] for t, v in per_task.items()}} if e else {}),
            "budget": ", ".join(sorted({r["budget_source"] for r in mine if r.get("budget_source")})) or "-",
            "mean_budget": _mean([r["budget"] for r in mine if r.get("budget") is not None]),
            "realised_cache_pct": _mean([100 * r["realised_fraction"] for r in mine]),
            "kept_cache_pct": _mean([100 * r["kept_fraction"] for r in mine]),
            "seconds_per_sample": _mean([r["seconds"] for r in mine])}


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(policies: dict[str, dict], header: list[str]) -> str:
    """Scores (rows: tasks, categories, averages; columns: policies), then cache and timing, then length buckets."""
    names = list(policies)
    first = next(iter(policies.values()))
    lines = [*(f"> {h}" for h in header), "", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in first["tasks"]:
        lines.append(f"| {task} | " + " | ".join(_f(policies[p]["tasks"][task]) for p in names) + " |")
    for cat in lb.CATEGORIES:
        lines.append(f"| *{cat}* | " + " | ".join(_f(policies[p]["categories"][cat]) for p in names) + " |")
    lines.append("| **21-task mean** | " + " | ".join(_f(policies[p]["task_mean"]) for p in names) + " |")
    lines.append("| **category mean (Avg)** | " + " | ".join(_f(policies[p]["category_mean"]) for p in names) + " |")
    lines += ["", "| policy | budget | realised cache % | kept cache % | s/sample |", "|---|---|---|---|---|"]
    for p, s in policies.items():
        budget_text = s["budget"] + ("" if s["mean_budget"] is None else f" (mean {s['mean_budget']:.3g})")
        lines.append(f"| {p} | {budget_text} | {_f(s['realised_cache_pct'], '{:.1f}')} | "
                     f"{_f(s['kept_cache_pct'], '{:.1f}')} | {_f(s['seconds_per_sample'])} |")
    if "length_buckets" in first:
        lines += ["", "LongBench-E by length (eval.py scorer_e; '-' = no sample in that range)", "",
                  "| task | policy | " + " | ".join(lb.LENGTH_BUCKETS) + " |", "|---|---|" + "---|" * 3]
        for task in first["tasks"]:
            for p in names:
                row = policies[p]["length_buckets"][task]
                lines.append(f"| {task} | {p} | " + " | ".join(_f(row[b]) for b in lb.LENGTH_BUCKETS) + " |")
    lines += ["", "Scores: LongBench eval.py (100 x mean of the best metric over the gold answers, 2 decimals); a "
              "category or average is '-' until all its tasks are run."]
    return "\n".join(lines) + "\n"


def paired_markdown(paired: list[dict]) -> str:
    """The paired differences over the mean of the tasks run (per task: summary.json)."""
    rows = [r for r in paired if r["task"] == "task mean"]
    if not rows:
        return ""
    lines = ["", "Paired differences on the same samples, mean of the tasks run (score points; stratified bootstrap "
             "95% interval; an interval that holds 0 is a difference inside the noise; per task: summary.json)", "",
             "| comparison | samples | difference | 95% interval |", "|---|---|---|---|"]
    lines += [f"| {r['method']} - {r['baseline']} | {r['n']} | {r['diff']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] |"
              for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


def run(args) -> int:
    from namm_transfer.runs import content_hash, open_run

    torch.set_num_threads(args.threads)
    check_device(args.device)
    samples = load_tasks(args.data, args.tasks, args.e, args.limit)  # fail fast, before the model loads
    namm = load_namm_arg(args.namm, args.delay) if "namm" in args.policies else None
    delay = args.delay or (namm.delay if namm is not None else 512)
    model, tok, model_sha = load_model(args.model, args.device, DTYPES[args.dtype])
    route_attention(model)
    cfg = DecodeConfig(args.max_length, args.truncation, args.chat_template, args.chunk, args.evict_during)
    if cfg.chat_template and not getattr(tok, "chat_template", None):
        raise UsageError(f"--chat-template: the tokenizer of {args.model!r} has no chat template; drop the flag")
    notes = context_notes(model, cfg, samples)
    namm_path = in_repo(Path(namm.source).resolve()) if namm is not None else None
    settings = {"benchmark": "LongBench-E" if args.e else "LongBench", "model": in_repo(args.model),
                "model_hash": model_sha, "namm": namm_path, "namm_hash": content_hash(namm.source) if namm else None,
                "max_length": cfg.max_length, "truncation": cfg.truncation, "chat_template": cfg.chat_template,
                "delay": delay, "chunk": cfg.chunk, "budget": args.budget, "dtype": args.dtype,
                "evict_during": cfg.evict_during}
    tag = f"{Path(args.model.rstrip('/')).name}_{args.max_length}{'_e' if args.e else ''}"
    out = Path(args.out or default_out("longbench", tag))
    info = {"tasks": ",".join(samples), "limit": args.limit, "policies": ",".join(args.policies)}
    with open_run(out, settings, "scripts/run_longbench.py", args.argv, fillable=("namm", "namm_hash"), info=info):
        recs = generate_all(args, out, model, tok, cfg, namm, delay, samples)
        policies = {p: summarise_policy(out, p, samples, args.e, recs) for p in args.policies}
        scores = {p: {t: sample_scores(t, read_preds(pred_path(out, p, t, args.e))[:len(s)]) for t, s in samples.items()}
                  for p in args.policies}
        paired = [row for m in ("namm", "full") if m in scores and len(scores) > 1
                  for row in paired_differences(scores, m)]
        header = [f"{settings['benchmark']}, {sum(map(len, samples.values()))} samples in {len(samples)} tasks"
                  f"{f' (first {args.limit} each)' if args.limit else ''}; model {args.model}, {args.device}/"
                  f"{args.dtype}; --max-length {cfg.max_length} ({cfg.truncation} truncation"
                  f"{', chat template' if cfg.chat_template else ''}); eviction every {delay} tokens during the "
                  f"{cfg.evict_during}; NAMM "
                  f"{namm_path or '-'}", *notes]
        table = markdown(policies, header) + paired_markdown(paired)
        write_json(out / "summary.json", {"settings": settings, "run": info, "notes": notes,
                                          "samples": {t: len(s) for t, s in samples.items()}, "policies": policies,
                                          "paired": paired})
        write_text(out / "summary.md", table)
    print(table)
    print(f"wrote {out / ('pred_e' if args.e else 'pred')}/<policy>/<task>.jsonl, {out / 'summary.json'}, "
          f"{out / 'summary.md'}", file=sys.stderr)
    return 0


def route_attention(model) -> None:
    """Route the model's attention through the policy-managed cache; an unsupported family is a UsageError."""
    from namm_transfer.attention import enable_memory_attention
    from namm_transfer.cache import CaptureError

    try:
        enable_memory_attention(model)
    except CaptureError as err:
        raise UsageError(str(err)) from None


def context_notes(model, cfg: DecodeConfig, samples: dict) -> list[str]:
    """A warning when a truncated prompt plus its answer can exceed the model's trained positions."""
    longest = cfg.max_length + max(lb.MAX_NEW_TOKENS[t] for t in samples)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        note = (f"WARNING: --max-length {cfg.max_length} + up to {longest - cfg.max_length} new tokens exceeds the "
                f"model's {limit} positions")
        print(note, file=sys.stderr)
        return [note]
    return []


def generate_all(args, out: Path, model, tok, cfg: DecodeConfig, namm, delay: int, samples: dict) -> dict:
    """Run every (task, sample, policy) its pred file does not hold yet, sample by sample (a sample's policies
    together, NAMM before the baselines matched to it); returns the records by (policy, task, index)."""
    from tqdm import tqdm

    recs = {(r["policy"], r["task"], r["index"]): r for r in read_records(out / "records.jsonl")}
    done = {}
    for task, items in samples.items():
        for p in args.policies:
            path = pred_path(out, p, task, args.e)
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = read_preds(path)
            check_resumable(rows, items, path)
            done[(p, task)] = len(rows)
    todo = sum(max(0, len(items) - done[(p, t)]) for t, items in samples.items() for p in args.policies)
    print(f"{sum(map(len, samples.values()))} samples x {len(args.policies)} policies: {todo} to run, the rest "
          f"already in {out}", file=sys.stderr)
    with tqdm(total=todo, disable=args.no_progress, desc="longbench", unit="pred") as bar:
        for task, items in samples.items():
            bar.set_description(task)
            for i, sample in enumerate(items):
                pending = [p for p in args.policies if i >= done[(p, task)]]
                ids = prompt_ids(sample, tok, cfg) if pending else None
                for name in pending:
                    namm_first = "namm" in args.policies and args.policies.index("namm") < args.policies.index(name)
                    ref = recs.get(("namm", task, i)) if namm_first else None
                    policy, value, source = policy_for(name, args, namm, delay, ref)
                    pred = predict(model, tok, ids, task, policy, cfg.chunk, cfg.evict_during)
                    rec = {"policy": name, "task": task, "index": i, "id": sample.id, "budget": value,
                           "budget_source": source, **asdict(pred)}
                    rec.pop("text")
                    append_record(out / "records.jsonl", rec)  # before the pred line: a pred line has its record
                    append_pred(pred_path(out, name, task, args.e), pred_line(sample, pred.text))
                    recs[(name, task, i)] = rec
                    bar.update(1)
    return recs


if __name__ == "__main__":
    sys.exit(main())
