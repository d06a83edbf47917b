"""Scale-out of the evaluation harnesses (eval_language, run_dt, run_video) on torch.distributed.

    torchrun --nproc-per-node 8 scripts/run_video.py --dataset longvideobench --data-root /data --device cuda ...

    world = distributed.init(args.device)             # rank / size from torchrun's environment; 1 process without it
    with distributed.open_run(world, out, settings, "scripts/x.py", argv):   # rank 0 checks + locks for all ranks
        records = RankRecords(out / "records.jsonl", world, key=lambda r: (r["policy"], r["id"]))
        done = records.load()                          # every rank: all that is recorded, by any earlier run
        for unit in world.shard([u for u in units if u not in done]):
            records.add(run(unit))                     # this rank's journal, flushed per record
        done = records.merge(order)                    # rank 0: records.jsonl as one process writes it
        if world.main: write the summary from done

Each rank loads its own model (on CUDA, the GPU of its local rank) and runs a round-robin share of the work still to
do. What must run together stays one unit (eval_language: a batch of samples with all its policies, since baselines
run at NAMM's cache on the same sample; run_video: a sample with all its policies). Rank 0 alone checks the
settings and holds the folder lock for all ranks. Each rank appends its records to its own journal,
<out>/records.rank<r>.jsonl; records travel between ranks through collectives (no shared disk needed for that),
and at the end rank 0 writes records.jsonl — the records it held at the start, then everything added since in the
order one process runs the work — removes the journals and writes the summary, so the files equal a 1-process
run's (timings aside). Resume reads records.jsonl and every journal: a run killed with any number of ranks goes
on with any other number, one process included. The process group is gloo on CPU and nccl on CUDA.
"""
from __future__ import annotations

import atexit
import json
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator

from .cli import UsageError
from .records import append_record, drop_records, read_records, write_text

# Ranks wait for the slowest one at each exchange; NCCL's default of 10 minutes would end long evaluations there.
TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, units: list) -> list:
        """This rank's share of `units` (round robin, so every rank gets a mix of the list)."""
        return list(units[self.rank::self.size])

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (every rank must call it)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, work: Callable[[], object], mine: bool = True):
        """`work()` on the ranks where `mine` is true, then wait for all; a UsageError raised on any rank is raised
        on every rank, so all stop with its message instead of waiting for a rank that left."""
        if self.size == 1:
            return work() if mine else None
        result = error = None
        if mine:
            try:
                result = work()
            except UsageError as err:
                error = str(err)
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise UsageError(errors[0])
        return result

    def in_turn(self, work: Callable[[], object]):
        """`work()` on rank 0 first, then on the first rank of every other node, then on the rest: what it writes to
        a cache (a generated dataset) is written by one process per disk, and read by the others."""
        result = None
        for mine in (self.main, self.local_rank == 0 and not self.main, self.local_rank != 0):
            out = self.agree(work, mine)
            result = out if mine else result
        return result


def init(device: str = "cpu") -> World:
    """The World of this process from torchrun's RANK / WORLD_SIZE / LOCAL_RANK. With more than one rank: the
    process group is started once per process (gloo on CPU, nccl on CUDA) and on CUDA the GPU of the local rank
    becomes this process's device, so "cuda" means it."""
    env = os.environ
    world = World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    if world.size == 1:
        return world
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {world.local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                             "visible): start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return world


@contextmanager
def open_run(world: World, out: str | os.PathLike, settings: dict, script: str, argv: list[str] | None,
             **kwargs) -> Iterator[Path]:
    """`runs.open_run` (settings check, record, lock) taken by rank 0 alone and held for all ranks, which wait for
    it; a refusal is raised on every rank."""
    from .runs import open_run as open_one

    with ExitStack() as stack:
        world.agree(lambda: stack.enter_context(open_one(out, settings, script, argv, **kwargs)), world.main)
        yield Path(out)


class RankRecords:
    """The records file of a result folder (JSONL, one record per work item, `key(record)` naming the item) written
    by one rank or several: each rank appends to its own journal (one process: to the file itself)."""

    def __init__(self, path: str | os.PathLike, world: World, key: Callable[[dict], Hashable],
                 fields: dict[str, type | tuple[type, ...]] | None = None):
        self.path, self.world, self.key, self.fields = Path(path), world, key, fields or {}
        self.own = self.path if world.size == 1 else self.path.with_name(
            f"{self.path.stem}.rank{world.rank}{self.path.suffix}")
        self.done: dict = {}
        self.base: list[dict] = []  # rank 0: the file as the run found it
        self.journals: list[Path] = []  # rank 0: the journals it found (of a killed run)
        self.unsent: list[dict] = []

    def journal_paths(self) -> list[Path]:
        """<stem>.rank<r><suffix> beside the file, by rank."""
        name = re.compile(re.escape(self.path.stem) + r"\.rank(\d+)" + re.escape(self.path.suffix))
        found = ((name.fullmatch(p.name), p) for p in self.path.parent.glob(f"{self.path.stem}.rank*"))
        return [p for m, p in sorted((int(m[1]), p) for m, p in found if m)]

    def drop(self, drop: Callable[[dict], bool]) -> int:
        """Remove the records `drop` selects from the file and every journal (rank 0); returns how many."""
        n = sum(drop_records(p, drop) for p in [self.path, *self.journal_paths()]) if self.world.main else 0
        return self.world.broadcast(n)

    def load(self) -> dict:
        """{key: record} of all that is recorded (the file, then the journals of a killed run), the same on every
        rank: rank 0 reads and sends it, so all ranks agree on what is left to do."""
        rows = None
        if self.world.main:
            self.base, self.journals = read_records(self.path), self.journal_paths()
            rows = [self.base, [r for p in self.journals for r in read_records(p)]]
        base, journaled = self.world.broadcast(rows)
        self.done = {self.checked_key(r): r for r in base}
        for r in journaled:
            self.done.setdefault(self.checked_key(r), r)
        return self.done

    def checked_key(self, row: dict) -> Hashable:
        """`key(row)` of a record read back; a record without the fields that name its work item, or with a
        `fields` entry missing or of another type, is a UsageError saying how to go on."""
        try:
            key = self.key(row)
            bad = next((k for k, kind in self.fields.items() if not isinstance(row.get(k), kind)), None)
        except (KeyError, TypeError, IndexError) as err:
            bad = f"{type(err).__name__}: {err}"
        if bad is not None:
            raise UsageError(f"{self.path} (or a rank journal beside it): the record {json.dumps(row)[:120]} is not "
                             f"one this script writes (field {bad}); remove that line (the run resumes without it) "
                             "or use another --out")
        return key

    def add(self, row: dict) -> None:
        """One result: in `done` and appended to this rank's journal at once (a kill loses at most this record)."""
        append_record(self.own, row)
        self.done[self.key(row)] = row
        self.unsent.append(row)

    def sync(self) -> dict:
        """Every rank's records since the last sync into `done` on every rank (all ranks call it)."""
        for rows in self.world.gather(self.unsent):
            for r in rows:
                self.done[self.key(r)] = r
        self.unsent = []
        return self.done

    def merge(self, order: Iterable[Hashable]) -> dict:
        """End of the run (all ranks call it): sync; rank 0 writes the file as one process writes it — the records
        it held at the start, then all added since (by this run or a killed run's journals) in `order`, the keys in
        the order one process runs them (others last) — and the journals are removed. Returns {key: record} in the
        file's order (rank 0; the others get their `done`)."""
        self.sync()
        journals = []
        if self.world.main:
            base = {self.key(r) for r in self.base}
            added = [r for k, r in self.done.items() if k not in base]
            if self.world.size > 1 or self.journals:  # else the file already is base + added, appended in order
                rank = {k: i for i, k in enumerate(order)}
                added.sort(key=lambda r: rank.get(self.key(r), len(rank)))
                write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.base + added))
            self.done, journals = {self.key(r): r for r in self.base + added}, self.journals
        self.world.agree(lambda: None)  # the file is written before any journal goes
        for p in journals + ([self.own] if self.own != self.path else []):
            p.unlink(missing_ok=True)
        return self.done
