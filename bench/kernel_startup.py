"""How long a notebook waits for its kernel: from starting the kernel process to its first
`kernel_info` reply, for the `veil` kernel (a study configured, mock mode) beside IPython's own
`python3` kernel, started the same way in this script; then how long each kernel's first cell (`1`)
takes, which for veil includes loading its SDK (it loads on first use).

    python bench/kernel_startup.py [--repeats 5]

Target ([3/9]): the veil kernel's first reply within 0.3 s of python3's (median)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import check_quiet, save, table  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402


def first_reply_seconds(kernel_name: str) -> tuple[float, float]:
    """Start one kernel; seconds until it answers kernel_info, then seconds its first cell takes; shut it
    down."""
    manager = KernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)  # sends kernel_info until the first reply
        replied = time.perf_counter()
        msg_id = client.execute("1")
        while client.get_shell_msg(timeout=120)["parent_header"].get("msg_id") != msg_id:
            pass
        return replied - started, time.perf_counter() - replied
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    check_quiet("before")
    with tempfile.TemporaryDirectory(prefix="veil-startup-") as tmp:
        root = Path(tmp)
        (root / "north.token").write_text("not-a-real-token\n")
        (root / "study.toml").write_text('[study]\nproject = "bench"\n[sites.north]\n'
                                         'url = "http://127.0.0.1:9"\ntoken_file = "north.token"\n')
        subprocess.run([sys.executable, "-m", "veil.cli", "kernel", "install", "--prefix", str(root / "prefix")],
                       check=True, capture_output=True)
        os.environ.update(JUPYTER_PATH=str(root / "prefix" / "share" / "jupyter"),
                          VEIL_STUDY=str(root / "study.toml"), IPYTHONDIR=str(root / "ipython"))
        seconds: dict[str, list[float]] = {"python3": [], "veil": []}
        first_cell: dict[str, list[float]] = {"python3": [], "veil": []}
        for _ in range(args.repeats):  # interleaved, so that drifting load hits both alike
            for name, runs in seconds.items():
                reply, cell = first_reply_seconds(name)
                runs.append(reply)
                first_cell[name].append(cell)
    check_quiet("after")
    medians = {name: statistics.median(runs) for name, runs in seconds.items()}
    cell_medians = {name: statistics.median(runs) for name, runs in first_cell.items()}
    added = medians["veil"] - medians["python3"]
    print(table(["kernel", "runs", "first reply: median s", "min s", "max s", "first cell: median s"],
                [[name, len(runs), f"{medians[name]:.3f}", f"{min(runs):.3f}", f"{max(runs):.3f}",
                  f"{cell_medians[name]:.3f}"] for name, runs in seconds.items()]))
    print(f"veil / python3: {medians['veil'] / medians['python3']:.2f}x; the veil kernel adds {added:.3f} s "
          f"(target: at most 0.3 s): {'yes' if added <= 0.3 else 'NO'}")
    saved = save("kernel_startup", {"seconds": seconds, "median": medians, "added": added,
                                    "first_cell": first_cell, "first_cell_median": cell_medians})
    print(f"results in {saved}")


if __name__ == "__main__":
    main()
