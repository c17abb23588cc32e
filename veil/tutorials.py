"""Run tutorial notebooks top to bottom on the `veil` kernel and say how each went.

    python -m veil.tutorials notebooks/*.ipynb      (needs a running study: $VEIL_STUDY)

`veil demo --headless` runs the demo's copy this way; Binder's emulation test runs the repository's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def run_notebooks(paths: Sequence[Path], timeout: int = 900, save: bool = True) -> int:
    """Execute each notebook in order (outputs written back when `save`); print one line per notebook
    and return how many failed."""
    failures = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        try:
            NotebookClient(nb, kernel_name="veil", timeout=timeout,
                           resources={"metadata": {"path": str(path.parent)}}).execute()
            print(f"ok    {path.name} ({time.perf_counter() - started:.0f} s)", flush=True)
        except CellExecutionError as exc:
            failures += 1
            print(f"FAIL  {path.name}: {str(exc).strip().splitlines()[-1]}", flush=True)
        if save:
            nbformat.write(nb, path)
    print(f"{failures} of {len(paths)} tutorials failed" if failures else f"all {len(paths)} tutorials ran without "
          "an error", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--no-save", action="store_true", help="leave the notebook files as they are")
    args = parser.parse_args(argv)
    return 1 if run_notebooks(sorted(args.notebooks), args.timeout, not args.no_save) else 0


if __name__ == "__main__":
    sys.exit(main())
