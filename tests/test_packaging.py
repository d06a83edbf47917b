"""What the package finds by path beside its modules (shipped NAMMs, the tiny video model, the native kernel's
source) is declared as package data, so an installed (non-editable) copy has it too."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_files_the_package_loads_by_path_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    needed = {"namm_transfer": ["checkpoints/*/config.json", "checkpoints/*/namm.safetensors", "csrc/*.c"],
              "video": ["checkpoints/llava-tiny-synth/*"]}
    for package, patterns in needed.items():
        files = [f for pattern in patterns for f in (ROOT / package).glob(pattern)
                 if f.suffix in (".json", ".safetensors", ".c", ".jinja")]
        assert files, (package, patterns)
        missing = [str(f.relative_to(ROOT)) for f in files
                   if not any(f.relative_to(ROOT / package).match(glob) for glob in data.get(package, []))]
        assert not missing, f"not declared as package data in pyproject.toml: {missing}"
