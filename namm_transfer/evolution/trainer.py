"""CMA-ES training of a NAMM on offline language tasks (curriculum, frozen normalisation, exact resume, DDP).

One generation: every member of the population is scored on the same samples (task score = teacher-forced
probability of the gold answer), fitness = mean over the stage's tasks of member score / full-cache score on
those samples (a ratio of means, as the reference). Normalisation statistics come from a generation-0 keep-all
pass and are frozen. The state is checkpointed atomically after every generation as data only
(state.safetensors + state.json, never pickle); a killed run resumes to the identical state, and a resume with
other search settings is refused with the differences listed. Every `val_every` generations the CMA-ES mean is
scored on a fixed validation set together with H2O and recency at its cache size (the curve that says whether
the search learns). Under torchrun, member groups and validation samples are sharded across ranks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..attention import enable_memory_attention
from ..checkpoints import save_namm
from ..features import RunningStats
from ..language.benchmark import future_attention_from_ids
from ..language.tasks import PROTOCOLS, make_split
from ..namm import NAMMConfig
from ..policies import FullCache, NAMMPolicy, make_policy
from ..records import write_text
from .cmaes import SepCMAES
from .fitness import EncodedSample, encode_sample, score_rows
from .subspace import embed, parameter_indices


@dataclass
class Stage:
    tasks: list[str]
    generations: int


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRAIN_PROTOCOLS = (*PROTOCOLS, "anywhere")  # eval_language.py's protocols, and eviction steps anywhere
# What members are ranked by: "answer-p" (the answer probability over the full cache's, per task: the reference's
# kind of fitness) or "oracle-mass" (the share of the oracle's attention mass that a member's cache still holds when
# the question is read: fitness.retained_mass; dense, so a member's rank repeats across prompts)
FITNESS_SIGNALS = ("answer-p", "oracle-mass")


def ranked_signal(fitness: str, score: torch.Tensor | None, mass: torch.Tensor | None, refs: list[float | None]
                  ) -> tuple[torch.Tensor, list[float]]:
    """What members are ranked by under `fitness`, as (values (members, samples), per-sample references) for
    `fitness_from_scores`: the answer probability over each sample's full-cache reference ("answer-p"), or the
    retained oracle mass, already a share, over 1 ("oracle-mass"). The one place the trainer, the replay test and
    training_report.py read a search's signal from."""
    if fitness not in FITNESS_SIGNALS:
        raise ValueError(f"unknown fitness signal {fitness!r}; known: {', '.join(FITNESS_SIGNALS)}")
    values = mass if fitness == "oracle-mass" else score
    if values is None:
        raise ValueError(f"a {fitness!r} search ranks by its members' "
                         f"{'retained oracle mass' if fitness == 'oracle-mass' else 'answer probability'}: not given")
    if fitness == "oracle-mass":
        return values, [1.0] * values.shape[-1]
    if any(r is None for r in refs):
        raise ValueError("an answer-p search needs every sample's full-cache reference")
    return values, list(refs)


def validation_mode(row: dict) -> tuple:
    """What a validation point's number depends on besides the NAMM: model dtype, protocol and prompt length
    (points are comparable, and paired by prompt, only within one mode). Rows from before a field existed carry
    its old value (float32, anywhere; tokens filled in from the run's settings on resume)."""
    return row.get("dtype", "float32"), row.get("protocol", "anywhere"), row.get("tokens")


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    out: str = "runs/namm-smollm2"
    stages: list[Stage] = field(default_factory=lambda: [Stage(["passkey"], 10)])
    tokens: int = 1024  # target prompt length
    # where eviction steps run on a prompt: "context-only" (while the context is read; the question and answer
    # are read into the pruned cache: eval_language.py's default protocol), "query-aware" (the question too), or
    # "anywhere" (every `delay` tokens, the answer included: how searches ran before this setting existed)
    protocol: str = "context-only"
    popsize: int = 8
    sigma0: float = 0.065
    elite_ratio: float = 0.5
    samples_per_task: int = 2  # per generation, shared by all members
    pool_per_task: int = 64  # training pool the samples are drawn from
    stats_samples_per_task: int = 2  # generation-0 keep-all pass that measures the normalisation
    member_batch: int = 0  # members per batched forward; 0 = all of a rank's members
    chunk: int = 128
    delay: int = 512
    share_prefix: bool = True
    style: str = "raw"
    seed: int = 0
    threads: int = 1
    # the model's dtype in the search ("float32", or "bfloat16": ~2.6x faster prefill on a CPU with AVX512-BF16)
    dtype: str = "float32"
    # Optional memory pressure (0 = the reference fitness): fitness -= cache_weight * max(0, cache - cache_target),
    # with cache = the member's realised cache fraction averaged over the generation's samples.
    cache_weight: float = 0.0
    cache_target: float = 1.0
    # Validation curve (does not change the search): every `val_every` generations (0 = never) the CMA-ES mean
    # is scored on `val_per_task` validation-split prompts per task, with `val_baselines` at its cache size.
    val_every: int = 10
    val_per_task: int = 8
    val_baselines: list[str] = field(default_factory=lambda: ["h2o", "recency"])
    # Which parameters evolve: named groups of the NAMM layout (e.g. ["w_score", "b_score", "b_out"], the scorer's
    # output head); [] = all 4,172. The others stay at the start vector.
    evolve: list[str] = field(default_factory=list)
    # Start vector and normalisation statistics: "" = zeros (keep-all) with statistics from a generation-0
    # keep-all pass; else another search's folder (its CMA-ES mean, float64) or a NAMM checkpoint folder, copied
    # into this search's state when it is created (the source may go on changing).
    init_from: str = ""
    fitness: str = "answer-p"  # FITNESS_SIGNALS; the hinge on the cache applies to either

    # settings that do not change what the search computes (may differ on resume)
    RUNTIME_FIELDS = ("out", "threads", "member_batch", "val_every", "val_per_task", "val_baselines")

    def __post_init__(self):
        problems = []
        if self.popsize < 2:
            problems.append(f"popsize {self.popsize}: CMA-ES needs at least 2 members (the reference uses 32)")
        if not 0 < self.elite_ratio < 1 or math.floor(self.popsize * self.elite_ratio) < 1:
            problems.append(f"elite ratio {self.elite_ratio}: must lie in (0, 1) and select at least one member")
        if not (self.sigma0 > 0 and math.isfinite(self.sigma0)):
            problems.append(f"sigma0 {self.sigma0}: must be a positive finite number")
        for name in ("tokens", "samples_per_task", "pool_per_task", "stats_samples_per_task", "chunk", "delay",
                     "threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)}: must be >= 1")
        if self.samples_per_task > self.pool_per_task:
            problems.append(f"samples per task {self.samples_per_task} > pool per task {self.pool_per_task}")
        if self.delay % 16:
            problems.append(f"delay {self.delay}: must be a multiple of the NAMM's STFT hop (16)")
        if self.protocol not in TRAIN_PROTOCOLS:
            problems.append(f"protocol {self.protocol!r}: one of {', '.join(TRAIN_PROTOCOLS)}")
        if self.fitness not in FITNESS_SIGNALS:
            problems.append(f"fitness {self.fitness!r}: one of {', '.join(FITNESS_SIGNALS)}")
        elif self.fitness == "oracle-mass" and self.protocol == "anywhere":
            problems.append("fitness 'oracle-mass' needs an eviction limit (protocol context-only or query-aware): "
                            "it scores what the cache holds when the question is read")
        if self.dtype not in MODEL_DTYPES:
            problems.append(f"dtype {self.dtype!r}: one of {', '.join(MODEL_DTYPES)}")
        if self.member_batch < 0 or self.val_every < 0 or self.val_per_task < 1:
            problems.append("member batch and val every must be >= 0, val per task >= 1")
        if not (self.cache_weight >= 0 and math.isfinite(self.cache_weight)) or not math.isfinite(self.cache_target):
            problems.append(f"cache weight {self.cache_weight} / target {self.cache_target}: finite, weight >= 0")
        try:
            parameter_indices(NAMMConfig(), self.evolve)
        except ValueError as err:
            problems.append(f"evolve: {err}")
        if not self.stages or any(s.generations < 1 or not s.tasks for s in self.stages):
            problems.append("stages: each needs tasks and >= 1 generation, e.g. passkey:10,passkey+kv_retrieval:20")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    @staticmethod
    def parse_stages(text: str) -> list[Stage]:
        """"passkey:10,passkey+kv_retrieval:20" -> stages."""
        stages = []
        for part in text.split(","):
            tasks, sep, gens = part.rpartition(":")
            if not sep or not tasks or not gens.isdigit():
                raise ValueError(f"stage {part!r}: expected TASK[+TASK...]:GENERATIONS, e.g. passkey+kv_retrieval:20")
            stages.append(Stage(tasks.split("+"), int(gens)))
        return stages

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"training settings carry unknown fields {unknown}")
        d = dict(d)
        d.setdefault("protocol", "anywhere")  # saved before the setting existed: eviction steps ran anywhere
        d["stages"] = [Stage(list(s["tasks"]), int(s["generations"])) for s in d.get("stages", [])]
        return cls(**d)


FIXED_AT_CREATION = ("evolve", "init_from", "fitness")  # what --change-settings cannot change: the search's space,
#                                                       start and what it ranks members by


def settings_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Search settings that differ between a saved run and a new command, those --change-settings may change (the
    fixed ones: `fixed_differences`). Extending the last stage is allowed."""
    diffs = []
    a, b = saved.to_dict(), new.to_dict()
    for key in a:
        if key in TrainConfig.RUNTIME_FIELDS or key == "stages" or key in FIXED_AT_CREATION:
            continue
        if a[key] != b[key]:
            diffs.append(f"{key}: {a[key]!r} (saved) != {b[key]!r} (now)")
    sa, sb = a["stages"], b["stages"]
    same_head = len(sa) == len(sb) and sa[:-1] == sb[:-1] and sa[-1]["tasks"] == sb[-1]["tasks"]
    if not same_head:
        diffs.append(f"stages: {sa} (saved) != {sb} (now); only the last stage's generations may change")
    return diffs


def fixed_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Differences in what no --change-settings may change (FIXED_AT_CREATION: space, start, fitness signal)."""
    a, b = saved.to_dict(), new.to_dict()
    return [f"{key}: {a.get(key)!r} (saved) != {b.get(key)!r} (now); fixed when a search is created: start a new "
            "--out folder" for key in FIXED_AT_CREATION if a.get(key) != b.get(key)]


# ------------------------------------------------------------------------------------------------ distributed
def bfloat16_is_native(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively: on CPUs through oneDNN's bf16 kernels (AVX512-BF16/AMX); elsewhere,
    e.g. AVX2, they are emulated (~5x slower than float32, other rounding). Accelerators: True."""
    if torch.device(device).type != "cpu":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def compute_platform(device: str | torch.device) -> str:
    """The kernels a generation's scores were computed with, recorded in every log and validation row: member
    scores replay to the last digit only on the same kind (bfloat16 rounds differently where it is emulated,
    ~0.003 on a score)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"torch {torch.__version__}, cuda {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return f"torch {torch.__version__}, {device.type}"
    return (f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()} "
            f"(bf16 {'native' if bfloat16_is_native(device) else 'emulated'})")


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def setup_distributed(device: str) -> None:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


# ------------------------------------------------------------------------------------------------------ state
def save_state(folder: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """state.safetensors (tensors) + state.json (the rest): data only. The JSON names the tensor file's hash
    of contents so a torn pair (one file from another save) is detected on load."""
    tmp = folder / "state.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / "state.safetensors")
    info = {**info, "tensors_sha256": hashlib.sha256((folder / "state.safetensors").read_bytes()).hexdigest()}
    write_text(folder / "state.json", json.dumps(info, indent=1))


def load_state(folder: Path, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Read <prefix>state.safetensors + <prefix>state.json (prefix "prev." = the state one generation back)."""
    try:
        info = json.loads((folder / f"{prefix}state.json").read_text())
        digest = hashlib.sha256((folder / f"{prefix}state.safetensors").read_bytes()).hexdigest()
        tensors = load_file(str(folder / f"{prefix}state.safetensors"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: unreadable training state ({err}); restore it from git "
                         f"(training/ is committed) or start a new --out folder") from err
    if info.get("tensors_sha256") != digest:
        raise ValueError(f"{folder}: state.json and state.safetensors come from different saves; restore both "
                         "from git or start a new --out folder")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{folder}/state.safetensors: tensor {k!r} holds NaN/inf")
    return tensors, info


def restore_es(es: SepCMAES, tensors: dict[str, torch.Tensor], info: dict) -> SepCMAES:
    """Load the CMA-ES part of a saved training state into `es`."""
    e = info["es"]
    es.load_state_dict({"mean": tensors["es_mean"], "sigma": e["sigma"], "diag_c": tensors["es_diag_c"],
                        "p_sigma": tensors["es_p_sigma"], "p_c": tensors["es_p_c"], "generation": e["generation"],
                        "rng": tensors["es_rng"], "y": tensors.get("es_y"), "popsize": e["popsize"], "dim": e["dim"]})
    return es


def search_space(cfg: TrainConfig, tensors: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(base (P,) float64, index) of a search: the flat positions its CMA-ES evolves (cfg.evolve) and every
    parameter's value outside them — the saved `base_params` of a state's tensors, else zeros (a search from
    keep-all). Full parameters of CMA-ES points: subspace.embed(coords, base, index)."""
    namm_cfg = NAMMConfig(delay=cfg.delay)
    base = (tensors or {}).get("base_params", torch.zeros(namm_cfg.num_params, dtype=torch.float64)).double()
    return base, parameter_indices(namm_cfg, cfg.evolve)


def new_es(cfg: TrainConfig) -> SepCMAES:
    """The CMA-ES a search with these settings starts with (its dimension: the evolved parameters)."""
    return SepCMAES(len(search_space(cfg)[1]), cfg.popsize, cfg.sigma0, cfg.elite_ratio, seed=cfg.seed)


def load_start(source: Path, namm_cfg: NAMMConfig) -> tuple[torch.Tensor, RunningStats, dict]:
    """(parameters (P,) float64, frozen normalisation statistics, provenance) of another search's folder (its
    CMA-ES mean, at full precision) or of a NAMM checkpoint folder. Refused unless its NAMM configuration equals
    `namm_cfg` (the delay included) and its statistics were measured."""
    if (source / "state.json").exists():
        tensors, info = load_state(source)
        cfg = TrainConfig.from_dict(info["config"])
        src_cfg = NAMMConfig(delay=cfg.delay)
        mean = tensors["es_mean"].double()
        base, index = search_space(cfg, tensors)
        if mean.numel() != len(index):
            raise ValueError(f"{source}: CMA-ES mean of {mean.numel()} numbers does not match its settings")
        params = embed(mean, base, index)
        stats = RunningStats(src_cfg.num_bins)
        stats.mean, stats.m2 = tensors["stats_mean"].double(), tensors["stats_m2"].double()
        stats.count, stats.frozen = info["stats"]["count"], info["stats"]["frozen"]
        digest = hashlib.sha256((source / "state.safetensors").read_bytes()).hexdigest()
        prov = {"from": str(source), "kind": "search state", "generation": info["es"]["generation"],
                "state_sha256": digest}
    elif (source / "namm.safetensors").exists():
        from ..checkpoints import load_namm
        policy = load_namm(source)
        src_cfg, params, stats = policy.config, policy.params[0].double(), policy.stats
        stats.frozen = True
        digest = hashlib.sha256((source / "namm.safetensors").read_bytes()).hexdigest()
        prov = {"from": str(source), "kind": "NAMM checkpoint", "namm_sha256": digest}
        meta = json.loads((source / "config.json").read_text()).get("meta", {})
        if "generation" in meta:
            prov["generation"] = meta["generation"]
    else:
        raise ValueError(f"--init-from {source}: neither a search folder (state.json) nor a NAMM checkpoint folder "
                         "(namm.safetensors + config.json); pass e.g. training/namm-c75 or training/namm-c75/namm")
    if src_cfg != namm_cfg:
        raise ValueError(f"{source}: its NAMM configuration {src_cfg.to_dict()} differs from this search's "
                         f"{namm_cfg.to_dict()}; start from a NAMM with the same configuration (e.g. --delay)")
    if not stats.frozen or stats.count < 1:
        raise ValueError(f"{source}: its normalisation statistics were never measured; start from a search that "
                         "ran its generation-0 pass, or from a saved NAMM")
    return params, stats, prov


def fitness_from_scores(score: torch.Tensor, frac: torch.Tensor, tasks: list[str], refs: list[float],
                        cache_weight: float = 0.0, cache_target: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitness, score ratio) of members from their scores (members, samples) and cache fractions on samples of
    the given tasks with full-cache references: ratio = mean over tasks of mean member score / mean full-cache
    score on that task's samples; fitness = ratio - cache_weight * max(0, mean cache - cache_target)."""
    per_task = []
    for t in sorted(set(tasks)):
        idx = [j for j, name in enumerate(tasks) if name == t]
        ref = sum(refs[j] for j in idx) / len(idx)
        per_task.append(score[:, idx].mean(1) / (ref + 1e-7))
    ratio = torch.stack(per_task).mean(0)
    return ratio - cache_weight * (frac.mean(1) - cache_target).clamp_min(0), ratio


def task_halves(tasks: list[str], rng: random.Random | None = None) -> list[list[int]]:
    """Two disjoint halves of the sample indices, each holding half of every task's samples (tasks in sorted order;
    the first half of each task's indices, or of a shuffled copy when `rng` is given)."""
    halves: list[list[int]] = [[], []]
    for t in sorted(set(tasks)):
        idx = [j for j, name in enumerate(tasks) if name == t]
        if rng is not None:
            rng.shuffle(idx)
        halves[0] += idx[: len(idx) // 2]
        halves[1] += idx[len(idx) // 2:]
    return halves


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = x.double()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ties
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


class Trainer:
    def __init__(self, cfg: TrainConfig, model, tokenizer, device: str = "cpu", log=print,
                 model_hash: str | None = None):
        self.cfg, self.model, self.tok, self.device, self.log = cfg, model, tokenizer, device, log
        self.model_hash = model_hash  # content hash of the model's files (checked on resume when both are known)
        self.platform = compute_platform(device)  # recorded in every log and validation row
        self.rank, self.world = world()
        self.out = Path(cfg.out)
        self.namm_cfg = NAMMConfig(delay=cfg.delay)
        # the evolved parameters' flat positions, and every other parameter's value (search_space)
        self.base, self.index = search_space(cfg)
        self.init_info: dict = {}  # where base came from (init_from)
        self.es = new_es(cfg)
        self.stats = RunningStats(self.namm_cfg.num_bins)
        self.refs: dict[str, float] = {}
        self.history: list[dict] = []
        self.validation: list[dict] = []
        self.settings_changes: list[dict] = []
        enable_memory_attention(model)
        self.tasks = sorted({t for s in cfg.stages for t in s.tasks})
        self.pool = {t: [encode_sample(s, tokenizer, cfg.style, cfg.tokens, cfg.protocol)
                         for s in make_split(t, "train", cfg.pool_per_task, cfg.tokens, tokenizer)]
                     for t in self.tasks}
        self._val: list[EncodedSample] | None = None
        self.total_generations = sum(s.generations for s in cfg.stages)

    # ---- checkpoint ---------------------------------------------------------------------------------
    def save(self) -> None:
        if self.rank:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        es = self.es.state_dict()
        tensors = {"es_mean": es["mean"], "es_diag_c": es["diag_c"], "es_p_sigma": es["p_sigma"],
                   "es_p_c": es["p_c"], "es_rng": es["rng"], "stats_mean": self.stats.mean,
                   "stats_m2": self.stats.m2}
        if es["y"] is not None:
            tensors["es_y"] = es["y"]
        if self.cfg.evolve or self.cfg.init_from:
            tensors["base_params"] = self.base
        info = {"format": "namm_transfer.train_state/1", "config": self.cfg.to_dict(), "model_hash": self.model_hash,
                "es": {"sigma": es["sigma"], "generation": es["generation"], "popsize": es["popsize"],
                       "dim": es["dim"]},
                "stats": {"count": self.stats.count, "frozen": self.stats.frozen}, "refs": self.refs,
                "history": self.history, "validation": self.validation, "settings_changes": self.settings_changes}
        if self.init_info:
            info["init"] = self.init_info
        save_state(self.out, tensors, info)
        write_text(self.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        write_text(self.out / "val.jsonl", "".join(json.dumps(r) + "\n" for r in self.validation))
        if self.history:
            plot_curve(self.out / "log.jsonl", self.out / "curve.png", self.out / "val.jsonl")
        save_namm(self.out / "namm", self.member_params(self.es.mean).float(), self.stats, self.namm_cfg,
                  meta={"generation": self.es.generation, "model": self.cfg.model, "sigma": self.es.sigma,
                        "variant": self.variant, "cache_target": self.cfg.cache_target,
                        **({"evolve": self.cfg.evolve} if self.cfg.evolve else {}),
                        **({"init_from": self.init_info} if self.init_info else {})})

    def member_params(self, coords: torch.Tensor) -> torch.Tensor:
        """Full NAMM parameters (float64) of CMA-ES points (R, k) or (k,): see subspace.embed."""
        return embed(coords.double(), self.base, self.index)

    def start_from(self, source: str) -> None:
        """A new search's start (init_from): the source's parameters become the base and the CMA-ES mean's
        start, its frozen normalisation statistics this search's."""
        params, stats, info = load_start(Path(source), self.namm_cfg)
        self.base = params
        self.es.mean = params[self.index].clone()
        self.stats = stats
        self.init_info = info

    @property
    def variant(self) -> str:
        """How result tables name this NAMM: 'namm-c50' for a search toward a 50% cache (hinge term on), else
        'namm'."""
        return f"namm-c{round(100 * self.cfg.cache_target)}" if self.cfg.cache_weight > 0 else "namm"

    def keep_previous(self) -> None:
        """Keep the state before the next generation as prev.state.* (lets a test replay the last generation
        from the committed state and check that it lands exactly on the saved one)."""
        if self.rank or not (self.out / "state.json").exists():
            return
        import shutil
        for name in ("state.safetensors", "state.json"):  # copies: the live state is never missing
            tmp = self.out / f"prev.{name}.tmp"
            shutil.copyfile(self.out / name, tmp)
            os.replace(tmp, self.out / f"prev.{name}")

    def try_resume(self, accept_changes: bool = False) -> bool:
        """Load <out>/state.*; refuse a run whose search settings differ unless `accept_changes` (then the
        change is recorded in the state's settings_changes)."""
        if not (self.out / "state.json").exists():
            if (self.out / "state.pt").exists():
                raise ValueError(f"{self.out}/state.pt is the old pickle format, which is no longer loaded (a "
                                 "pickle can run code); start a new --out folder")
            return False
        tensors, info = load_state(self.out)
        saved = TrainConfig.from_dict(info["config"])
        diffs = settings_differences(saved, self.cfg)
        if info.get("model_hash") and self.model_hash and info["model_hash"] != self.model_hash:
            diffs.append(f"model files: {info['model_hash']} (saved) != {self.model_hash} (now): the same name "
                         "now loads other weights")
        fixed = fixed_differences(saved, self.cfg)
        if fixed:
            raise ValueError(f"{self.out}: " + "; ".join(fixed))
        if diffs and not accept_changes:
            raise ValueError(f"{self.out} holds a run with other search settings:\n  " + "\n  ".join(diffs) +
                             "\nresume with the saved settings (pass only --out), use another --out, or pass "
                             "--change-settings to continue this search under the new settings (recorded)")
        restore_es(self.es, tensors, info)
        self.base = search_space(self.cfg, tensors)[0]
        self.init_info = info.get("init", {})
        self.stats.count, self.stats.frozen = info["stats"]["count"], info["stats"]["frozen"]
        self.stats.mean, self.stats.m2 = tensors["stats_mean"], tensors["stats_m2"]
        self.refs, self.history = info["refs"], info["history"]
        self.validation, self.settings_changes = info.get("validation", []), info.get("settings_changes", [])
        for row in self.validation:  # points from before these fields were recorded: the saved run's settings
            row.setdefault("protocol", saved.protocol)  # (neither changed in any run before they were recorded)
            row.setdefault("tokens", saved.tokens)
        self.model_hash = self.model_hash or info.get("model_hash")
        if saved.dtype != self.cfg.dtype:  # full-cache references were scored in the old dtype: score them again
            self.refs = {}
        if saved.sigma0 != self.cfg.sigma0:  # a deliberate restart of the step size (else the change would be
            diffs = [d + f"; step size restarted at {self.cfg.sigma0} (it was {self.es.sigma:.6g})"  # a no-op)
                     if d.startswith("sigma0:") else d for d in diffs]
            self.es.sigma = float(self.cfg.sigma0)
        if diffs:
            self.settings_changes.append({"generation": self.es.generation, "changes": diffs})
        return True

    # ---- generation 0: normalisation statistics + full-cache references ----------------------------
    def measure_stats(self) -> None:
        cfg = self.cfg
        samples = [s for t in cfg.stages[0].tasks for s in self.pool[t][:cfg.stats_samples_per_task]]
        bins = self.namm_cfg.num_bins
        per = torch.zeros(len(samples), 2 + 2 * bins, dtype=torch.float64)  # count, ref, mean, m2
        for i, sample in enumerate(samples):
            if i % self.world != self.rank:
                continue
            st = RunningStats(bins)
            policy = NAMMPolicy(None, self.namm_cfg, st, collect_stats=True)  # zeros = keep-all
            res = score_rows(self.model, sample, policy, 1, cfg.chunk, share_prefix=False)
            per[i, 0], per[i, 1] = st.count, float(res.score[0])
            per[i, 2:2 + bins], per[i, 2 + bins:] = st.mean, st.m2
        all_sum(per)
        for i, sample in enumerate(samples):  # merged in sample order on every rank: identical everywhere
            self.stats.merge(int(per[i, 0]), per[i, 2:2 + bins], per[i, 2 + bins:])
            self.refs[sample.key] = float(per[i, 1])
        self.stats.frozen = True

    # ---- one generation -------------------------------------------------------------------------------
    def stage_of(self, generation: int) -> Stage:
        g = generation
        for stage in self.cfg.stages:
            if g < stage.generations:
                return stage
            g -= stage.generations
        return self.cfg.stages[-1]

    def generation_samples(self, generation: int, tasks: list[str]) -> list[EncodedSample]:
        rng = random.Random(self.cfg.seed * 1_000_003 + generation)
        return [s for t in tasks for s in rng.sample(self.pool[t], self.cfg.samples_per_task)]

    def member_groups(self) -> list[list[int]]:
        p = self.cfg.popsize
        size = self.cfg.member_batch or -(-p // self.world)
        return [list(range(i, min(i + size, p))) for i in range(0, p, size)]

    def full_cache_refs(self, samples: list[EncodedSample]) -> None:
        """Full-cache answer probability of every sample not yet measured (sharded, then shared)."""
        missing = [s for s in samples if s.key not in self.refs]
        ref = torch.zeros(len(missing), dtype=torch.float64)
        for k, s in enumerate(missing):
            if k % self.world == self.rank:
                ref[k] = float(score_rows(self.model, s, FullCache(), 1, self.cfg.chunk).score[0])
        all_sum(ref)
        for k, s in enumerate(missing):
            self.refs[s.key] = float(ref[k])

    def evaluate(self, population: torch.Tensor, samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
        """Members' answer probability ("score"), realised cache ("frac") and, for an oracle-mass search, retained
        oracle mass ("mass"), each (members, samples)."""
        p, n = population.shape[0], len(samples)
        score = torch.zeros(p, n, dtype=torch.float64)
        frac = torch.zeros(p, n, dtype=torch.float64)
        mass = torch.zeros(p, n, dtype=torch.float64)
        with_mass = self.cfg.fitness == "oracle-mass"
        oracles = {}
        for gi, group in enumerate(self.member_groups()):
            if gi % self.world != self.rank:
                continue
            policy = NAMMPolicy(self.member_params(population[group]).float(), self.namm_cfg, self.stats)
            for j, sample in enumerate(samples):
                if with_mass and sample.key not in oracles:
                    oracles[sample.key] = future_attention_from_ids(self.model, sample.stream, sample.evict_until,
                                                                    self.cfg.chunk)
                res = score_rows(self.model, sample, policy, len(group), self.cfg.chunk, self.cfg.share_prefix,
                                 oracle=oracles.get(sample.key))
                score[group, j], frac[group, j] = res.score.double(), res.cache_fraction.double()
                if with_mass:
                    mass[group, j] = res.retained_mass.double()
        all_sum(score), all_sum(frac)
        if with_mass:
            all_sum(mass)
        self.full_cache_refs(samples)
        return {"score": score, "frac": frac, **({"mass": mass} if with_mass else {})}

    def selection_fitness(self, res: dict[str, torch.Tensor], samples: list[EncodedSample]) -> torch.Tensor:
        """What CMA-ES ranks members by (cfg.fitness): the answer probability's fitness (see `fitness`), or the
        retained oracle mass per task, with the same hinge on the cache."""
        values, refs = ranked_signal(self.cfg.fitness, res["score"], res.get("mass"),
                                     [self.refs.get(s.key) for s in samples])
        return fitness_from_scores(values, res["frac"], [s.task for s in samples], refs, self.cfg.cache_weight,
                                   self.cfg.cache_target)[0]

    def fitness(self, score: torch.Tensor, frac: torch.Tensor, samples: list[EncodedSample]):
        """(fitness, score ratio) per member, see fitness_from_scores."""
        return fitness_from_scores(score, frac, [s.task for s in samples], [self.refs[s.key] for s in samples],
                                   self.cfg.cache_weight, self.cfg.cache_target)

    def ranking_agreement(self, res: dict[str, torch.Tensor], samples: list[EncodedSample]) -> float:
        """Spearman correlation of the members' selection fitness on two disjoint halves of the generation's prompts
        (each half holds half of every task's samples): how repeatable the ranking is at half the prompts."""
        halves = task_halves([s.task for s in samples])
        if not halves[0] or not halves[1]:
            return float("nan")
        fit = [self.selection_fitness({k: v[:, h] for k, v in res.items()}, [samples[j] for j in h]) for h in halves]
        return spearman(fit[0], fit[1])

    # ---- validation curve -------------------------------------------------------------------------------
    def validation_samples(self) -> list[EncodedSample]:
        if self._val is None:
            self._val = [encode_sample(s, self.tok, self.cfg.style, self.cfg.tokens, self.cfg.protocol)
                         for t in self.tasks
                         for s in make_split(t, "validation", self.cfg.val_per_task, self.cfg.tokens, self.tok)]
        return self._val

    def validate(self) -> dict:
        """Score the CMA-ES mean on the validation prompts, and each baseline at the mean's realised cache on
        each prompt (same eviction delay). Ratios are to the full cache on the same prompts."""
        samples = self.validation_samples()
        self.full_cache_refs(samples)
        names = ["namm", *self.cfg.val_baselines]
        n = len(samples)
        score = torch.zeros(len(names), n, dtype=torch.float64)
        frac = torch.zeros(len(names), n, dtype=torch.float64)
        namm = NAMMPolicy(self.member_params(self.es.mean).float(), self.namm_cfg, self.stats)
        for j, sample in enumerate(samples):
            if j % self.world != self.rank:
                continue
            res = score_rows(self.model, sample, namm, 1, self.cfg.chunk, share_prefix=False)
            score[0, j], frac[0, j] = float(res.score[0]), float(res.cache_fraction[0])
            budget = min(max(float(res.kept_fraction[0]), 1e-3), 1.0)
            for i, name in enumerate(self.cfg.val_baselines, start=1):
                policy = make_policy(name, budget=budget, delay=self.cfg.delay)
                r = score_rows(self.model, sample, policy, 1, self.cfg.chunk, share_prefix=False)
                score[i, j], frac[i, j] = float(r.score[0]), float(r.cache_fraction[0])
        all_sum(score), all_sum(frac)
        row = {"generation": self.es.generation, "n": n, "tasks": self.tasks, **self.validation_settings(),
               "platform": self.platform}
        for i, name in enumerate(names):
            row[f"{name}_ratio"] = float(self.fitness(score[i:i + 1], frac[i:i + 1], samples)[1][0])
            row[f"{name}_cache"] = float(frac[i].mean())
            row[f"{name}_scores"] = [round(float(x), 6) for x in score[i]]
        return row

    def validation_settings(self) -> dict:
        """The settings a validation point records and is compared by (see validation_mode)."""
        return {"dtype": self.cfg.dtype, "protocol": self.cfg.protocol, "tokens": self.cfg.tokens}

    def maybe_validate(self, now: bool = False) -> None:
        """Validate the mean at multiples of val_every, again at a generation whose point was scored in another
        mode (the settings changed there), or `now` (any generation, once per mode)."""
        g = self.es.generation
        every = self.cfg.val_every
        if not (every or now) or g == 0:
            return
        mode = validation_mode(self.validation_settings())
        here = [validation_mode(r) for r in self.validation if r["generation"] == g]
        bridge = bool(here) and mode not in here  # dtype, protocol or length changed at a validation point:
        if mode in here or (not now and (not every or g % every) and not bridge):  # the new mode too
            return
        t0 = time.time()
        row = self.validate()
        row["seconds"] = time.time() - t0
        self.validation.append(row)
        self.save()
        base = ", ".join(f"{b} {row[f'{b}_ratio']:.3f}" for b in self.cfg.val_baselines)
        self.log(f"validation at generation {g} ({self.cfg.dtype}, {self.cfg.protocol}, ~{self.cfg.tokens} tokens): "
                 f"NAMM {row['namm_ratio']:.3f} of full at {100 * row['namm_cache']:.1f}% cache; {base} "
                 f"({row['seconds']:.0f}s)")

    # ---- loop ----------------------------------------------------------------------------------------------
    def train(self, max_generations: int | None = None, progress: bool = True, accept_changes: bool = False,
              more_generations: int | None = None, validate_now: bool = False) -> None:
        resumed = self.try_resume(accept_changes)
        if not resumed and self.cfg.init_from:
            self.start_from(self.cfg.init_from)
            self.save()
            self.log(f"new search from {self.cfg.init_from} (generation {self.init_info.get('generation')}); "
                     f"evolving {len(self.index)} of {self.namm_cfg.num_params} parameters"
                     + (f" ({', '.join(self.cfg.evolve)})" if self.cfg.evolve else ""))
        if not self.stats.frozen:
            t0 = time.time()
            self.measure_stats()
            self.save()
            self.log(f"generation-0 keep-all pass: normalisation from {self.stats.count} token-steps, "
                     f"{len(self.refs)} full-cache references ({time.time() - t0:.0f}s)")
        elif resumed:
            self.log(f"resumed at generation {self.es.generation} from {self.out}")
        end = self.total_generations if max_generations is None else min(self.total_generations, max_generations)
        if more_generations is not None:
            end = min(end, self.es.generation + more_generations)
        self.maybe_validate(now=validate_now)
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=min(self.es.generation, end), desc="NAMM CMA-ES", unit="gen")
        while self.es.generation < end:
            g = self.es.generation
            stage = self.stage_of(g)
            samples = self.generation_samples(g, stage.tasks)
            t0 = time.time()
            population = self.es.ask()
            res = self.evaluate(population, samples)
            fit = self.selection_fitness(res, samples)
            ratio = self.fitness(res["score"], res["frac"], samples)[1]  # answer probability over full, per task
            cache = res["frac"].mean(1)
            if not torch.isfinite(fit).all():
                raise FloatingPointError(f"generation {g}: non-finite fitness {fit.tolist()}; the state on disk "
                                         "is the last good generation")
            self.es.tell(fit)
            if not torch.isfinite(self.es.mean).all() or not math.isfinite(self.es.sigma):
                raise FloatingPointError(f"generation {g}: CMA-ES state became non-finite; not saved")
            best = int(fit.argmax())
            row = {"generation": g, "stage_tasks": stage.tasks, "fitness_max": float(fit.max()),
                   "score_ratio_mean": float(ratio.mean()), "score_ratio_best": float(ratio[best]),
                   "fitness_mean": float(fit.mean()), "fitness_min": float(fit.min()),
                   "cache_fraction_mean": float(res["frac"].mean()),
                   "cache_fraction_best": float(res["frac"][best].mean()),
                   "rank_agreement_halves": self.ranking_agreement(res, samples),
                   "sigma": self.es.sigma, "mean_norm": float(self.es.mean.norm()),
                   "samples": [s.key for s in samples],
                   "member_scores": [[round(float(x), 6) for x in r] for r in res["score"]],
                   "member_cache": [round(float(x), 5) for x in cache],
                   # full precision (JSON keeps a float64 exactly): the ranking CMA-ES used, which the rounded
                   # scores above cannot always recover (two members 1e-5 apart swap; tests/test_training_state.py)
                   "member_fitness": [float(x) for x in fit],
                   **({"member_mass": [[round(float(x), 6) for x in r] for r in res["mass"]]} if "mass" in res else {}),
                   "seconds": time.time() - t0, "platform": self.platform}
            self.history.append(row)
            self.keep_previous()
            self.save()
            self.maybe_validate()
            if bar is not None:
                bar.set_postfix(fit=f"{row['fitness_mean']:.3f}/{row['fitness_max']:.3f}",
                                cache=f"{row['cache_fraction_mean']:.2f}")
                bar.update(1)
        if bar is not None:
            bar.close()


def plot_curve(log_path: Path, png: Path, val_path: Path | None = None) -> None:
    """Training fitness (mean / best member), the validation curve (CMA-ES mean vs baselines at its cache) and
    realised cache per generation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    val = []
    if val_path is not None and val_path.exists():
        val = [json.loads(l) for l in val_path.read_text().splitlines() if l.strip()]
    g = [r["generation"] for r in rows]
    fig, ax = plt.subplots(1, 3 if val else 2, figsize=(13 if val else 9, 3.4))
    ratio = [r.get("score_ratio_mean", r["fitness_mean"]) for r in rows]
    ax[0].plot(g, ratio, label="score / full cache (population mean)")
    ax[0].plot(g, [r["fitness_max"] for r in rows], label="fitness (best member)")
    if any(r["fitness_mean"] != q for r, q in zip(rows, ratio)):
        ax[0].plot(g, [r["fitness_mean"] for r in rows], label="fitness (population mean)", alpha=0.6)
    ax[0].set_xlabel("generation"), ax[0].set_title("training (noisy: fresh prompts each generation)", fontsize=8)
    ax[0].legend(fontsize=7)
    if val:
        # a line joins points of one validation mode only (dtype / protocol / length): a gap where it changes
        gapped = []
        for prev, r in zip([None, *val], val):
            if prev is not None and validation_mode(r) != validation_mode(prev):
                gapped.append({"generation": r["generation"], "gap": True})  # NaN everywhere: breaks the lines
            gapped.append(r)
        val = gapped
        vg = [r["generation"] for r in val]
        names = [k.removesuffix("_ratio") for k in val[-1] if k.endswith("_ratio")]
        for name in names:
            ax[1].plot(vg, [r.get(f"{name}_ratio", float("nan")) for r in val], marker="o", ms=3,
                       label=("NAMM (CMA-ES mean)" if name == "namm" else f"{name} at NAMM's cache"))
        for r in val:
            if r.get("gap"):
                ax[1].axvline(r["generation"], color="grey", ls=":", lw=1)
        ax[1].set_xlabel("generation"), ax[1].set_ylabel("answer p / full cache")
        ax[1].set_title(f"validation ({val[-1]['n']} fixed prompts; dotted: dtype / protocol / length changed)",
                        fontsize=8)
        ax[1].legend(fontsize=7)
    ax[-1].plot(g, [100 * r["cache_fraction_mean"] for r in rows], label="population mean (training)")
    if val:
        ax[-1].plot(vg, [100 * r.get("namm_cache", float("nan")) for r in val], marker="o", ms=3,
                    label="CMA-ES mean (validation)")
    ax[-1].set_xlabel("generation"), ax[-1].set_ylabel("realised cache %"), ax[-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
