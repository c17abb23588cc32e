"""The build hook: building a wheel or sdist builds the lab extension's bundle (jlpm, JupyterLab's yarn)
when it is missing, and ships it with the kernelspec and the server extension's config as data files.
Everything else is in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXTENSION = ROOT / "extensions" / "veil-lab"
BUNDLE = EXTENSION / "veil_lab" / "labextension"


def build_bundle() -> None:
    """Build the lab extension's bundle in place unless it is there (a wheel or sdist ships it built)."""
    if (BUNDLE / "package.json").is_file() or not (EXTENSION / "package.json").is_file():
        return
    jlpm = shutil.which("jlpm") or shutil.which("jlpm", path=str(Path(sys.executable).parent))
    if jlpm is None or shutil.which("node") is None:
        sys.exit("building Veil's lab extension needs Node.js >= 20 and jlpm (pip install 'jupyterlab>=4.6'); "
                 f"or build it first: cd {EXTENSION} && jlpm install && jlpm build:prod")
    for step in (["install", "--immutable"], ["build:prod"]):
        subprocess.run([jlpm, *step], cwd=EXTENSION, check=True)


def relative(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def data_files() -> list[tuple[str, list[str]]]:
    """Jupyter finds each under sys.prefix: the kernelspec, the enabled server extension, the bundle."""
    files = [
        ("share/jupyter/kernels/veil", ["kernel/kernelspec/kernel.json", "kernel/kernelspec/logo-svg.svg"]),
        ("etc/jupyter/jupyter_server_config.d",
         relative([EXTENSION / "jupyter-config" / "server-config" / "veil_lab.json"])),
    ]
    for folder in sorted({p.parent for p in BUNDLE.rglob("*") if p.is_file()}):
        target = Path("share/jupyter/labextensions/veil-lab") / folder.relative_to(BUNDLE)
        files.append((str(target), relative(sorted(p for p in folder.iterdir() if p.is_file()))))
    return files


if {"bdist_wheel", "sdist"} & set(sys.argv[1:]):  # an editable install ships no data files: no build
    build_bundle()
setup(data_files=data_files())
