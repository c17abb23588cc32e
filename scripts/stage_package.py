"""Copy the `veil` package into a folder in its installed layout (veil/executor from executor/, ...).

The repository maps folders onto packages (`[tool.setuptools.package-dir]`), so tools that resolve
imports by folder (import-linter's grimp, mypy) cannot see `veil.executor` or `veil.kernel` in the
checkout itself. Staged this way they check exactly the modules a wheel installs.

    python scripts/stage_package.py DEST
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_dir(package: str, mapping: dict[str, str]) -> Path:
    """The folder a package's modules come from: its own mapping, or its parent's plus its name."""
    if package in mapping:
        return ROOT / mapping[package]
    parent, _, name = package.rpartition(".")
    return source_dir(parent, mapping) / name if parent else ROOT / package


def stage(dest: Path) -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = config.get("package-dir", {})
    for package in config["packages"]:
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in source_dir(package, mapping).glob("*.py"):
            shutil.copy2(module, target / module.name)
    return list(config["packages"])


if __name__ == "__main__":
    print("staged:", ", ".join(stage(Path(sys.argv[1]))))
