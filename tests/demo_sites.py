"""The demo's three executors running for a kernel-driven test, with the `veil` kernelspec installed and the
environment the kernel reads (shared by the tutorial tests that run notebooks on the real kernel)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from veil.demo import _point_configs, environment
from veil.local import LocalExecutor


@contextlib.contextmanager
def demo_kernel_sites(root: Path, configs: list[Path]) -> Iterator[dict[str, LocalExecutor]]:
    """Install the kernelspec under `root`/prefix, start the executors of `configs` (the demo's, prepared under
    `root`/demo), point the demo's study at them and set the kernel's environment while the block runs."""
    subprocess.run([sys.executable, "-m", "veil.cli", "kernel", "install", "--prefix", str(root / "prefix")],
                   check=True, capture_output=True)
    with contextlib.ExitStack() as stack:
        executors = {c.parent.name: stack.enter_context(LocalExecutor(c)) for c in configs}
        _point_configs(root / "demo", {site: e.url for site, e in executors.items()})
        with pytest.MonkeyPatch.context() as mp:
            for name, value in environment(root / "demo").items():
                mp.setenv(name, value)
            mp.setenv("JUPYTER_PATH", str(root / "prefix" / "share" / "jupyter"))
            mp.setenv("IPYTHONDIR", str(root / "ipython"))
            yield executors
