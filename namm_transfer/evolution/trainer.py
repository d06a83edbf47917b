"""CMA-ES training of a NAMM on offline language tasks (curriculum, frozen normalisation, exact resume, DDP).

One generation: every member of the population is scored on the same samples (task score = teacher-forced
probability of the gold answer), fitness = mean over the stage's tasks of member score / full-cache score on
those samples (a ratio of means, as the reference). Normalisation statistics come from a generation-0 keep-all
pass and are frozen. The state is checkpointed atomically after every generation; a killed run resumes to the
identical state. Under torchrun, member groups are sharded across ranks and results all-reduced.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..attention import enable_memory_attention
from ..checkpoints import save_namm
from ..features import RunningStats
from ..namm import NAMMConfig
from ..policies import FullCache, NAMMPolicy
from .cmaes import SepCMAES
from .fitness import EncodedSample, encode_sample, score_rows


@dataclass
class Stage:
    tasks: list[str]
    generations: int


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    out: str = "runs/namm-smollm2"
    stages: list[Stage] = field(default_factory=lambda: [Stage(["passkey"], 10)])
    tokens: int = 1024  # target prompt length
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
    # Optional memory pressure (0 = the reference fitness): fitness -= cache_weight * max(0, cache - cache_target),
    # with cache = the member's realised cache fraction averaged over the generation's samples.
    cache_weight: float = 0.0
    cache_target: float = 1.0

    @staticmethod
    def parse_stages(text: str) -> list[Stage]:
        """"passkey:10,passkey+kv_retrieval:20" -> stages."""
        stages = []
        for part in text.split(","):
            tasks, gens = part.rsplit(":", 1)
            stages.append(Stage(tasks.split("+"), int(gens)))
        return stages


# ------------------------------------------------------------------------------------------------ distributed
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
def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: TrainConfig, model, tokenizer, device: str = "cpu", log=print):
        self.cfg, self.model, self.tok, self.device, self.log = cfg, model, tokenizer, device, log
        self.rank, self.world = world()
        self.out = Path(cfg.out)
        self.namm_cfg = NAMMConfig(delay=cfg.delay)
        self.es = SepCMAES(self.namm_cfg.num_params, cfg.popsize, cfg.sigma0, cfg.elite_ratio, seed=cfg.seed)
        self.stats = RunningStats(self.namm_cfg.num_bins)
        self.refs: dict[str, float] = {}
        self.history: list[dict] = []
        enable_memory_attention(model)
        from ..language.tasks import make_split
        tasks = sorted({t for s in cfg.stages for t in s.tasks})
        self.pool = {t: [encode_sample(s, tokenizer, cfg.style, cfg.tokens)
                         for s in make_split(t, "train", cfg.pool_per_task, cfg.tokens, tokenizer)] for t in tasks}
        self.total_generations = sum(s.generations for s in cfg.stages)

    # ---- checkpoint ---------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "state.pt"

    def save(self) -> None:
        if self.rank:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save({"es": self.es.state_dict(), "stats": {"count": self.stats.count, "mean": self.stats.mean,
                     "m2": self.stats.m2, "frozen": self.stats.frozen}, "refs": self.refs,
                     "history": self.history, "config": asdict(self.cfg)}, self.ckpt_path)
        tmp = self.out / "log.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.out / "log.jsonl")
        if self.history:
            plot_curve(self.out / "log.jsonl", self.out / "curve.png")
        save_namm(self.out / "namm", self.es.mean.float(), self.stats, self.namm_cfg,
                  meta={"generation": self.es.generation, "model": self.cfg.model, "sigma": self.es.sigma})

    def try_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, weights_only=False)
        self.es.load_state_dict(state["es"])
        st = state["stats"]
        self.stats.count, self.stats.mean, self.stats.m2, self.stats.frozen = st["count"], st["mean"], st["m2"], \
            st["frozen"]
        self.refs, self.history = state["refs"], state["history"]
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

    def evaluate(self, population: torch.Tensor, samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
        p, n = population.shape[0], len(samples)
        score = torch.zeros(p, n, dtype=torch.float64)
        frac = torch.zeros(p, n, dtype=torch.float64)
        for gi, group in enumerate(self.member_groups()):
            if gi % self.world != self.rank:
                continue
            policy = NAMMPolicy(population[group].float(), self.namm_cfg, self.stats)
            for j, sample in enumerate(samples):
                res = score_rows(self.model, sample, policy, len(group), self.cfg.chunk, self.cfg.share_prefix)
                score[group, j], frac[group, j] = res.score.double(), res.cache_fraction.double()
        missing = [j for j, s in enumerate(samples) if s.key not in self.refs]
        ref = torch.zeros(n, dtype=torch.float64)
        for k, j in enumerate(missing):
            if k % self.world == self.rank:
                ref[j] = float(score_rows(self.model, samples[j], FullCache(), 1, self.cfg.chunk).score[0])
        all_sum(score), all_sum(frac), all_sum(ref)
        for j in missing:
            self.refs[samples[j].key] = float(ref[j])
        return {"score": score, "frac": frac}

    def fitness(self, score: torch.Tensor, samples: list[EncodedSample]) -> torch.Tensor:
        tasks = sorted({s.task for s in samples})
        per_task = []
        for t in tasks:
            idx = [j for j, s in enumerate(samples) if s.task == t]
            ref = sum(self.refs[samples[j].key] for j in idx) / len(idx)
            per_task.append(score[:, idx].mean(1) / (ref + 1e-7))
        return torch.stack(per_task).mean(0)

    # ---- loop ----------------------------------------------------------------------------------------------
    def train(self, max_generations: int | None = None, progress: bool = True) -> None:
        resumed = self.try_resume()
        if not self.stats.frozen:
            t0 = time.time()
            self.measure_stats()
            self.save()
            self.log(f"generation-0 keep-all pass: normalisation from {self.stats.count} token-steps, "
                     f"{len(self.refs)} full-cache references ({time.time() - t0:.0f}s)")
        elif resumed:
            self.log(f"resumed at generation {self.es.generation} from {self.ckpt_path}")
        end = self.total_generations if max_generations is None else min(self.total_generations, max_generations)
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=self.es.generation, desc="NAMM CMA-ES", unit="gen")
        while self.es.generation < end:
            g = self.es.generation
            stage = self.stage_of(g)
            samples = self.generation_samples(g, stage.tasks)
            t0 = time.time()
            population = self.es.ask()
            res = self.evaluate(population, samples)
            ratio = self.fitness(res["score"], samples)
            cache = res["frac"].mean(1)
            fit = ratio - self.cfg.cache_weight * (cache - self.cfg.cache_target).clamp_min(0)
            self.es.tell(fit)
            row = {"generation": g, "stage_tasks": stage.tasks, "fitness_max": float(fit.max()),
                   "score_ratio_mean": float(ratio.mean()), "score_ratio_best": float(ratio[int(fit.argmax())]),
                   "fitness_mean": float(fit.mean()), "fitness_min": float(fit.min()),
                   "cache_fraction_mean": float(res["frac"].mean()),
                   "cache_fraction_best": float(res["frac"][int(fit.argmax())].mean()),
                   "sigma": self.es.sigma, "mean_norm": float(self.es.mean.norm()),
                   "samples": [s.key for s in samples], "seconds": time.time() - t0}
            self.history.append(row)
            self.save()
            if bar is not None:
                bar.set_postfix(fit=f"{row['fitness_mean']:.3f}/{row['fitness_max']:.3f}",
                                cache=f"{row['cache_fraction_mean']:.2f}")
                bar.update(1)
        if bar is not None:
            bar.close()


def plot_curve(log_path: Path, png: Path) -> None:
    """Fitness (mean / best member) and mean realised cache fraction per generation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    g = [r["generation"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ratio = [r.get("score_ratio_mean", r["fitness_mean"]) for r in rows]
    ax[0].plot(g, ratio, label="score / full cache (population mean)")
    ax[0].plot(g, [r["fitness_max"] for r in rows], label="fitness (best member)")
    if any(r["fitness_mean"] != q for r, q in zip(rows, ratio)):
        ax[0].plot(g, [r["fitness_mean"] for r in rows], label="fitness (population mean)", alpha=0.6)
    ax[0].set_xlabel("generation"), ax[0].legend(fontsize=7)
    ax[1].plot(g, [100 * r["cache_fraction_mean"] for r in rows])
    ax[1].set_xlabel("generation"), ax[1].set_ylabel("realised cache % (population mean)")
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
