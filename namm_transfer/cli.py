"""Argument checking shared by the scripts: argparse types that state the valid range, one error type for what a
user can fix (printed as `error: ...`, exit code 2, no traceback), and the default output folder.

    ap.add_argument("--frames", type=int_in(1), default=32)          # "--frames 0" -> exit 2, "an integer >= 1"
    ap.add_argument("--budget", type=budget, default=None)           # (0, 1] fraction or a whole token count
    ap.add_argument("--policies", type=name_list(POLICY_NAMES))      # known, unique, comma-separated
    return run_cli(lambda: run(args))                                # UsageError -> message + exit code 2
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = REPO_ROOT / "runs"
OUT_HELP = "default: {} (every script writes under <checkout>/runs/ unless --out is given)"


def load_script(name: str):
    """scripts/<name>.py as a module, to call its functions in this process. Registered in sys.modules (as
    `_namm_script_<name>`; a later call loads it afresh) so that dataclasses defined in it resolve their annotations."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_namm_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    spec.loader.exec_module(module)
    return module


class UsageError(Exception):
    """Something the user can fix (an argument, a file, a folder); scripts print it and exit with code 2."""


def run_cli(work: Callable[[], int | None]) -> int:
    """Run `work`; a UsageError is printed as `error: ...` on stderr and becomes exit code 2."""
    try:
        return work() or 0
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def default_out(*parts: str) -> Path:
    """<checkout>/runs/<parts>: the one default output location of every script."""
    return RUNS.joinpath(*parts)


def out_help(*parts: str) -> str:
    return OUT_HELP.format(Path("runs", *parts))


# ----------------------------------------------------------------------------------------- argparse types


def _bad(text: str, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r} is not {expected}")


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (hi None = no upper bound)."""
    expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _bad(text, expected) from None
        if value < lo or (hi is not None and value > hi):
            raise _bad(text, expected)
        return value

    parse.__name__ = "int"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in the given range ((lo, hi) when open; None = unbounded on that side)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = "a finite number" + (f" {' and '.join(parts)}" if parts else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _bad(text, expected) from None
        if (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
                or (hi is not None and (value >= hi if hi_open else value > hi))):
            raise _bad(text, expected)
        return value

    parse.__name__ = "float"
    return parse


BUDGET = "a cache budget: a fraction in (0, 1] of the tokens seen, or a whole number of tokens >= 2"


def budget(text: str) -> float | int:
    """A budget as every policy reads it: float in (0, 1] = fraction, whole number >= 2 = tokens kept."""
    try:
        value = float(text)
    except ValueError:
        raise _bad(text, BUDGET) from None
    if 0 < value <= 1:
        return value
    if value >= 2 and value.is_integer():
        return int(value)
    raise _bad(text, BUDGET)


def name_list(choices: Iterable[str], allow_empty: bool = False) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of `choices`, none repeated."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if unknown or repeated or (not names and not allow_empty):
            what = f"unknown {unknown}" if unknown else f"repeated {repeated}" if repeated else "empty"
            raise argparse.ArgumentTypeError(f"{text!r}: {what}; give comma-separated names from {', '.join(choices)}")
        return names

    parse.__name__ = "list"
    return parse


def number_list(item: Callable[[str], float | int], what: str) -> Callable[[str], list]:
    """Comma-separated values parsed by `item` (an argparse type above), non-empty, none repeated."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r}: give one or more comma-separated {what}")
        values = [item(p) for p in parts]
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: a value is repeated; give each of the {what} once")
        return values

    parse.__name__ = "list"
    return parse


# ------------------------------------------------------------------------------------------ shared loaders


def load_namm_arg(path: str | None, delay: int | None = None, flag: str = "--namm"):
    """The NAMMPolicy a script's --namm names (None = the shipped one); every loading problem (missing, broken,
    non-finite, pickled code, a delay it cannot use) becomes a UsageError naming the file."""
    from .checkpoints import DEFAULT_NAMM, load_namm

    try:
        return load_namm(path or DEFAULT_NAMM, **({} if delay is None else {"delay": delay}))
    except FileNotFoundError as err:
        hint = "" if path else ("\nThe shipped language NAMM is not in this checkout: train one with "
                                "scripts/train_namm.py and pass --namm PATH, or drop namm from --policies.")
        raise UsageError(f"--policies namm: {err}{hint}") from None
    except ValueError as err:
        raise UsageError(f"{flag} {path or DEFAULT_NAMM}: {err}") from None


def check_model_path(name: str, flag: str = "--model") -> None:
    """UsageError for a model name that is a path (absolute, ./ ../ ~, or more than one '/') to no existing
    folder: the Hub would only say the repo id is malformed. A Hub id owner/name is left to the loader."""
    import os

    if (name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)) \
            and not Path(name).exists():
        raise UsageError(f"{flag} {name}: no such folder; pass a folder holding the model (config.json and its "
                         "weights, as save_pretrained writes) or a Hugging Face Hub id owner/name")


def check_device(device: str) -> None:
    """UsageError for --device cuda without a CUDA device."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
