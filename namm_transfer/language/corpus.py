"""Offline filler prose: the Python language reference that ships with CPython (`pydoc_data.topics`, PSF license).

Paragraphs are whitespace-flattened; grammar blocks (`::=`), doctest/code blocks, headings and short fragments
are dropped. The text depends on the Python version, so `corpus_fingerprint()` is recorded with every sample.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*[.,;:]?$")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"”][.!?])\s+(?=[A-Z\"“(])")


@dataclass(frozen=True)
class Paragraph:
    topic: str
    index: int  # position of the paragraph within its topic (after filtering)
    text: str


def _is_prose(raw: str) -> bool:
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    if not lines or "::=" in raw or any(ln.lstrip().startswith((">>>", "...", "$ ", "%")) for ln in lines):
        return False
    if len(lines) > 1 and set(lines[1].strip()) <= set("*=-^~"):  # a heading with its underline
        return False
    words = raw.split()
    if len(words) < 12 or not raw.rstrip().endswith((".", ":", ")")):
        return False
    return sum(bool(_WORD.match(w)) for w in words) / len(words) >= 0.75  # code blocks are mostly symbols


@lru_cache(maxsize=1)
def paragraphs() -> tuple[Paragraph, ...]:
    """All prose paragraphs, in sorted-topic order (deterministic for a given Python version)."""
    from pydoc_data.topics import topics
    out = []
    for topic in sorted(topics):
        kept = [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[topic]) if _is_prose(p)]
        out.extend(Paragraph(topic, i, t) for i, t in enumerate(kept))
    return tuple(out)


@lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """Short hash of the filtered corpus; equal fingerprints mean identical samples for equal seeds."""
    h = hashlib.sha256("\n\n".join(p.text for p in paragraphs()).encode())
    return h.hexdigest()[:12]


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at '. ' followed by a capital letter (good enough for reference prose)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
