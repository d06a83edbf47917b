"""How far the committed language-NAMM searches (training/namm-*) are: a markdown block for the README.

    python scripts/training_report.py                 # print the block
    python scripts/training_report.py --write-readme  # replace the block between the README's markers

Per search: generations done, population, prompts per generation, cache target, sigma, compute spent, the
ranking agreement of members between the two halves of each generation's prompts (Spearman; how repeatable a
generation's ranking is), the latest validation point (CMA-ES mean vs H2O / recency at its cache size), and how the
CMA-ES mean's answer probability on the fixed validation prompts changed since the previous validation point (paired
by prompt, bootstrap 95% interval): the question the curve answers, whether the search is still learning.
tests/test_training_state.py checks that the README block equals this output.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from namm_transfer.evolution.agreement import cache_slope, hinge_settle_point, split_half_agreement  # noqa: E402
from namm_transfer.evolution.cmaes import SepCMAES, random_selection_mean_drift, random_selection_path_norm  # noqa: E402
from namm_transfer.evolution.trainer import (TrainConfig, fitness_from_scores, ranked_signal, search_space,  # noqa: E402
                                             validation_mode)
from namm_transfer.reporting.bootstrap import paired_difference_ci  # noqa: E402
BEGIN, END = "<!-- training report: begin -->", "<!-- training report: end -->"


def summarise_run(folder: Path) -> dict:
    info = json.loads((folder / "state.json").read_text())
    cfg, hist, val = info["config"], info["history"], info.get("validation", [])
    agree = [r["rank_agreement_halves"] for r in hist
             if isinstance(r.get("rank_agreement_halves"), (int, float)) and math.isfinite(r["rank_agreement_halves"])]
    tasks = sorted({t for s in cfg["stages"] for t in s["tasks"]})
    return {"name": folder.name, "generations": info["es"]["generation"], "popsize": cfg["popsize"],
            "prompts": cfg["samples_per_task"] * len(tasks), "tokens": cfg["tokens"], "delay": cfg["delay"],
            "dtype": cfg.get("dtype", "float32"), "protocol": cfg.get("protocol", "anywhere"),
            "target": cfg["cache_target"], "weight": cfg["cache_weight"],
            "sigma": info["es"]["sigma"],
            "hours": sum(r.get("seconds", 0) for r in hist + val) / 3600,
            "agreement": sum(agree) / len(agree) if agree else None, "n_agree": len(agree),
            "last_val": val[-1] if val else None, "n_val": len(val), "trend": validation_trend(val),
            "changes": len(info.get("settings_changes", [])),
            "signal": "" if cfg.get("fitness", "answer-p") == "answer-p" else f"; ranked by {cfg['fitness']}"}


def selection_check(folder: Path) -> str:
    """How far the CMA-ES mean (from its start: zeros, or the --init-from mean of the evolved groups) and the
    step-size path p_sigma have moved, each against what the same generations would give if the ranking of members
    carried no information (ratio 1 = indistinguishable from selection at random at the level of the whole
    parameter vector; > 1 = consistent direction)."""
    info = json.loads((folder / "state.json").read_text())
    cfg, es_info, hist = info["config"], info["es"], info["history"]
    tensors = load_file(str(folder / "state.safetensors"))
    gens = es_info["generation"]
    es = SepCMAES(es_info["dim"], es_info["popsize"], cfg["sigma0"], cfg["elite_ratio"])
    sigmas = [cfg["sigma0"]] + [r["sigma"] for r in hist[:gens - 1]]
    base, index = search_space(TrainConfig.from_dict(cfg), tensors)  # zeros, or the --init-from start
    start = base[index]
    drift = float((tensors["es_mean"] - start).norm())
    drift0 = random_selection_mean_drift(sigmas, float(tensors["es_diag_c"].sum()), es.mu_eff)
    path, path0 = float(tensors["es_p_sigma"].norm()), random_selection_path_norm(es.dim, es.c_sigma, gens)
    return (f"- training/{folder.name} after {gens} generations: the mean has moved {drift:.2f} from its "
            f"{'start' if 'base_params' in tensors else 'zero start'}, "
            f"{drift0:.2f} if the ranking were noise ({drift / drift0:.3f}x); |p_sigma| {path:.2f} against "
            f"{path0:.2f} ({path / path0:.3f}x); a search whose ranking is noise gives 1 +- {1 / math.sqrt(2 * es.dim):.3f} "
            f"(one sd) for both")


def rescorable_generations(info: dict) -> list[dict]:
    """The logged generations whose member scores, caches and prompts are recorded and whose prompts all have
    full-cache references (so their fitness can be computed again from the log)."""
    refs = info.get("refs", {})
    return [r for r in info["history"] if r.get("member_scores") and r.get("member_cache") and r.get("samples")
            and all(k in refs for k in r["samples"])]


def matched_cache_check(folder: Path, last: int = 20) -> str:
    """How repeatable the ranking of members was over the last `last` logged generations whose prompts all have
    full-cache references: split-half rank agreement of the fitness, of the score ratio, and of the score ratio at
    matched cache (residual after a line on each member's cache; the log keeps each member's cache averaged over
    the generation's prompts, so both halves use that average); the fitness with the cache target and weight each
    generation ran with (settings_at). Mean +- standard error over generations. A search ranked by the retained
    oracle mass (--fitness oracle-mass) also gets the same three for that mass (its fitness is the mass's)."""
    info = json.loads((folder / "state.json").read_text())
    refs, segments = info.get("refs", {}), settings_segments(info)
    rows = rescorable_generations(info)
    rows = [r for r in rows if len(r["samples"]) == len(rows[-1]["samples"])][-last:] if rows else []  # one size
    by_mass = info["config"].get("fitness", "answer-p") == "oracle-mass"
    stats = {"fitness": [], "ratio": [], "matched_cache": []}
    mass_stats = {"fitness": [], "ratio": [], "matched_cache": []}
    for r in rows:
        tasks = [k.split("/")[0] for k in r["samples"]]
        if any(tasks.count(t) < 2 for t in tasks):
            continue
        score = torch.tensor(r["member_scores"], dtype=torch.float64)
        frac = torch.tensor(r["member_cache"], dtype=torch.float64)[:, None].expand_as(score)
        target, weight = settings_at(segments, r["generation"])
        values, sample_refs = ranked_signal("answer-p", score, None, [refs[k] for k in r["samples"]])
        a = split_half_agreement(values, frac, tasks, sample_refs, weight, target, splits=20)
        m = {}
        if by_mass and r.get("member_mass"):
            mass, ones = ranked_signal("oracle-mass", None, torch.tensor(r["member_mass"], dtype=torch.float64), [])
            m = split_half_agreement(mass, frac, tasks, ones, weight, target, splits=20)
        for acc, res in ((stats, a), (mass_stats, m)):
            for k in acc:
                if k in res and math.isfinite(res[k]):
                    acc[k].append(res[k])
    if not stats["ratio"]:
        return f"- training/{folder.name}: no logged generation with member scores and references"

    def mean_se(v):
        m = sum(v) / len(v)
        sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else float("nan")
        return f"{m:.2f} +- {sd / math.sqrt(len(v)):.2f}"
    first, final = rows[0]["generation"], rows[-1]["generation"]
    line = (f"- training/{folder.name}, {len(stats['ratio'])} generations ({first}-{final}), halves of "
            f"{len(rows[-1]['samples']) // 2} prompts: ")
    if by_mass:
        line += (f"answer p: fitness {mean_se(stats['fitness'])}, score ratio {mean_se(stats['ratio'])}, at matched "
                 f"cache {mean_se(stats['matched_cache'])}; retained oracle mass (what it ranks by): "
                 + (f"fitness {mean_se(mass_stats['fitness'])}, mass {mean_se(mass_stats['ratio'])}, at matched cache "
                    f"{mean_se(mass_stats['matched_cache'])}" if mass_stats["ratio"] else "not logged"))
        return line
    return (line + f"fitness {mean_se(stats['fitness'])}, score ratio {mean_se(stats['ratio'])}, score ratio at "
            f"matched cache {mean_se(stats['matched_cache'])}")


def cache_setting_change(line: str) -> tuple[str, float, float] | None:
    """('cache_target' | 'cache_weight', saved, now) of a recorded settings change line, else None."""
    name, _, rest = line.partition(": ")
    if name not in ("cache_target", "cache_weight"):
        return None
    saved, now = rest.split(" (saved) != ")
    return name, float(saved), float(now.removesuffix(" (now)"))


def settings_segments(info: dict) -> list[tuple[int, int, float, float]]:
    """(first generation, last generation, cache target, cache weight) of each stretch of a search between recorded
    settings changes (any change starts a stretch: the trade-off moves with the protocol, length or prompt count)."""
    changes = info.get("settings_changes", [])
    parsed = [[c for c in map(cache_setting_change, ch["changes"]) if c] for ch in changes]
    value = {"cache_target": info["config"]["cache_target"], "cache_weight": info["config"]["cache_weight"]}
    for found in reversed(parsed):  # walk back from the current settings to the first ones
        for name, saved, _ in found:
            value[name] = saved
    starts = [0] + [c["generation"] for c in changes]
    ends = [g - 1 for g in starts[1:]] + [info["es"]["generation"] - 1]
    segments = []
    for found, first, last in zip([[]] + parsed, starts, ends):
        for name, _, now in found:
            value[name] = now
        segments.append((first, last, value["cache_target"], value["cache_weight"]))
    return segments


def settings_at(segments: list[tuple[int, int, float, float]], generation: int) -> tuple[float, float]:
    """(cache target, cache weight) the search ran `generation` with, from its settings_segments."""
    for first, last, target, weight in segments:
        if first <= generation <= last:
            return target, weight
    raise ValueError(f"generation {generation} is not in the search's history")


def operating_point_check(folder: Path, last: int = 30, stretches: int = 2, min_generations: int = 10) -> list[str]:
    """Where the members' cache settles against the cache target, in the last `stretches` stretches of unchanged
    settings with at least `min_generations` logged generations (their last `last`): the members' mean cache, its
    spread within a generation, the share above the target, the score ratio gained per unit of cache across members
    (least-squares slope per generation, mean +- standard error), and the cache where the hinge balances that slope
    (agreement.hinge_settle_point)."""
    info = json.loads((folder / "state.json").read_text())
    refs = info.get("refs", {})
    by_gen = {r["generation"]: r for r in rescorable_generations(info)}
    out = []
    for first, final, target, weight in settings_segments(info):
        rows = [by_gen[g] for g in range(first, final + 1) if g in by_gen][-last:]
        if len(rows) < min_generations:
            continue
        caches, spreads, above, slopes = [], [], [], []
        for r in rows:
            score = torch.tensor(r["member_scores"], dtype=torch.float64)
            cache = torch.tensor(r["member_cache"], dtype=torch.float64)
            tasks = [k.split("/")[0] for k in r["samples"]]
            _, ratio = fitness_from_scores(score, cache[:, None].expand_as(score), tasks,
                                           [refs[k] for k in r["samples"]], weight, target)
            caches.append(float(cache.mean()))
            spreads.append(float(cache.std()))
            above.append(float((cache > target).double().mean()))
            slopes.append(cache_slope(ratio, cache))
        n = len(rows)
        slopes = [x for x in slopes if math.isfinite(x)]  # a generation whose members all kept the same cache
        slope = sum(slopes) / len(slopes)
        se = (sum((x - slope) ** 2 for x in slopes) / (len(slopes) - 1)) ** 0.5 / math.sqrt(len(slopes))
        spread = sum(spreads) / n
        settle = hinge_settle_point(target, weight, slope, spread)
        where = (f"the hinge balances it at {settle:.3f}" if math.isfinite(settle) else
                 "the slope reaches the weight: the target does not bind" if settle > 0 else "no balance point")
        out.append(f"- training/{folder.name}, generations {rows[0]['generation']}-{rows[-1]['generation']} (target "
                   f"{target}, weight {weight}): members keep {sum(caches) / n:.3f} of the cache (sd {spread:.3f} within "
                   f"a generation, {100 * sum(above) / n:.0f}% above the target); score ratio per unit of cache "
                   f"{slope:.2f} +- {se:.2f}; {where}")
    return out[-stretches:] or [f"- training/{folder.name}: no stretch of {min_generations} logged generations yet"]


def validation_trend(val: list[dict]) -> str:
    """'+0.054 [+0.004, +0.112] (gen 10 -> 20, float32)': the mean change of NAMM's answer probability over the
    validation prompts between the last two validation points scored in the same mode (model dtype, eviction
    protocol, prompt length: same prompts, paired), with its bootstrap 95% interval: the latest point's mode, or,
    right after a switch, the previous mode's last two points."""
    pts = [v for v in val if isinstance(v.get("namm_scores"), list)]
    for mode in dict.fromkeys(validation_mode(v) for v in reversed(pts)):  # the most recent mode first
        same = [v for v in pts if validation_mode(v) == mode]
        if len(same) >= 2 and len(same[-1]["namm_scores"]) == len(same[-2]["namm_scores"]):
            mean, lo, hi = paired_difference_ci(same[-1]["namm_scores"], same[-2]["namm_scores"])
            return (f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] (gen {same[-2]['generation']} -> {same[-1]['generation']}, "
                    f"{mode_label(mode)})")
    return "-"


def baseline_gaps(v: dict) -> str:
    """'NAMM - h2o +0.128 [+0.011, +0.247], ...': NAMM's answer probability minus each baseline's at NAMM's cache
    on the same validation prompts of one point (paired by prompt, bootstrap 95% interval)."""
    names = [k.removesuffix("_scores") for k in v if k.endswith("_scores") and k != "namm_scores"]
    gaps = [f"NAMM - {n} {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            for n in names for m, lo, hi in [paired_difference_ci(v["namm_scores"], v[f"{n}_scores"])]]
    return ", ".join(gaps) or "-"


def fork_comparison(folder: Path, root: Path = ROOT) -> list[str]:
    """For a search started from another search's mean (--init-from a training folder): its last validation point
    against the source's first point at or after the fork and the source's latest point (its last point before the
    fork when it has none after), each scored in the same
    mode on the same prompts (paired by prompt; mean difference of NAMM's answer probability with its bootstrap
    95% interval, and both caches). [] for a search that started from zeros or from a checkpoint file."""
    info = json.loads((folder / "state.json").read_text())
    init = info.get("init", {})
    src = root / init.get("from", "")
    if init.get("kind") != "search state" or not (src / "state.json").exists():
        return []
    pts = [v for v in info.get("validation", []) if isinstance(v.get("namm_scores"), list)]
    if not pts:
        return [f"- training/{folder.name} (from {init['from']} at generation {init['generation']}): no validation "
                "point yet"]
    own = pts[-1]
    same = [v for v in json.loads((src / "state.json").read_text()).get("validation", [])
            if isinstance(v.get("namm_scores"), list) and validation_mode(v) == validation_mode(own)
            and v.get("tasks") == own.get("tasks") and len(v["namm_scores"]) == len(own["namm_scores"])]
    after = [v for v in same if v["generation"] >= init["generation"]]
    picks = [("first point after the fork", after[0])] if after else []
    if after and after[-1] is not after[0]:
        picks.append(("latest point", after[-1]))
    before = [v for v in same if v["generation"] < init["generation"]]
    if not picks and before:  # the source stopped at the fork: its nearest point before it
        picks.append(("last point before the fork", before[-1]))
    if not picks:
        return [f"- training/{folder.name} gen {own['generation']}: {init['from']} has no validation point in the "
                f"same mode ({mode_label(validation_mode(own))})"]
    lines = []
    for label, v in picks:
        mean, lo, hi = paired_difference_ci(own["namm_scores"], v["namm_scores"])
        lines.append(f"- training/{folder.name} gen {own['generation']} ({own['namm_ratio']:.3f} of full @ "
                     f"{100 * own['namm_cache']:.1f}%) - {init['from']} gen {v['generation']} ({label}; "
                     f"{v['namm_ratio']:.3f} @ {100 * v['namm_cache']:.1f}%): answer p {mean:+.3f} [{lo:+.3f}, "
                     f"{hi:+.3f}] ({len(own['namm_scores'])} prompts, {mode_label(validation_mode(own))})")
    return lines


def mode_label(mode: tuple) -> str:
    """'bfloat16' for the points of the searches' first settings; the protocol and length when they were recorded
    ('bfloat16, context-only, ~1024 tokens')."""
    dtype, protocol, tokens = mode
    return dtype if protocol == "anywhere" else f"{dtype}, {protocol}, ~{tokens} tokens"


def report(root: Path = ROOT) -> str:
    runs = sorted(p for p in (root / "training").glob("namm-*") if (p / "state.json").exists())
    lines = ["| search | generations | population x prompts | cache target | sigma | compute h | "
             "rank agreement (halves) | validation: NAMM / full @ cache | H2O / full | recency / full | "
             "NAMM answer p since previous validation |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    last_points = []
    for run in runs:
        r = summarise_run(run)
        protocol = "" if r["protocol"] == "anywhere" else f", {r['protocol']}"
        agree = f"{r['agreement']:.2f} (mean of {r['n_agree']})" if r["agreement"] is not None else "-"
        v = r["last_val"]
        if v and isinstance(v.get("namm_scores"), list):
            last_points.append((run.name, v))
        if v:
            val = (f"{v['namm_ratio']:.3f} @ {100 * v['namm_cache']:.1f}% (gen {v['generation']}, {v['n']} prompts)",
                   f"{v.get('h2o_ratio', float('nan')):.3f}", f"{v.get('recency_ratio', float('nan')):.3f}")
        else:
            val = ("not yet", "-", "-")
        lines.append(f"| training/{r['name']} | {r['generations']} | {r['popsize']} x {r['prompts']} "
                     f"(~{r['tokens']} tokens, delay {r['delay']}, {r['dtype']}{protocol}) | "
                     f"{r['target']} (weight {r['weight']}{r['signal']}) | "
                     f"{r['sigma']:.4f} | {r['hours']:.1f} | {agree} | {val[0]} | {val[1]} | {val[2]} | {r['trend']} |")
    if not runs:
        lines.append("| (none) | | | | | | | | | | |")
    else:
        lines += ["", "Selection check (`selection_check` in `scripts/training_report.py`):"]
        lines += [selection_check(run) for run in runs]
        lines += ["", "Split-half rank agreement of the members, from the logs (`matched_cache_check`):"]
        lines += [matched_cache_check(run) for run in runs]
        lines += ["", "Where the cache settles against the target, from the logs (`operating_point_check`):"]
        lines += [line for run in runs for line in operating_point_check(run)]
        lines += ["", "Last validation point, paired by prompt (`baseline_gaps`):"]
        lines += [f"- training/{name} gen {v['generation']}: {baseline_gaps(v)}" for name, v in last_points]
        forks = [line for run in runs for line in fork_comparison(run, root)]
        if forks:
            lines += ["", "Searches started from another search's mean, against it (`fork_comparison`):"]
            lines += forks
    return "\n".join(lines) + "\n"


def write_readme(block: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"error: {readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    block = report()
    if args.write_readme:
        write_readme(block)
    print(block, end="")


if __name__ == "__main__":
    main()
