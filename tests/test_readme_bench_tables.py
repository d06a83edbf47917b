"""The core-benchmark tables in README.md are the ones bench_core wrote into results/bench_core (issue 20)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_readme_shows_the_committed_benchmark_tables():
    readme = (ROOT / "README.md").read_text()
    for name in ("bench_core.md", "e2e.md", "e2e-c50.md", "e2e-pooled.md"):
        lines = table_lines((ROOT / "results" / "bench_core" / name).read_text())
        assert len(lines) >= 3, name
        assert "\n".join(lines) in readme, f"README's table differs from results/bench_core/{name}"
