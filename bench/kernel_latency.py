"""The latency a researcher feels: a DP count cell through the Veil kernel (Jupyter protocol) versus
the same SDK call in this plain Python process, against one local executor on the demo data.

    python bench/kernel_latency.py [--repeats 40]

Target: the kernel adds under 20 ms (p50)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    bench_site,
    check_quiet,
    make_cohort,
    save,
    state_database,
    stats_ms,
    table,
    timed,
    workdir,
)
from jupyter_client.manager import start_new_kernel  # noqa: E402

from veil.kernel.study import load_study  # noqa: E402

SQL = "SELECT COUNT(*) AS n FROM patients"
EPSILON = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--patients", type=int, default=20_000, help="as in `veil demo`")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    check_quiet("kernel latency")
    root = workdir(args.keep, "kernel")
    cohort = make_cohort(root / "data", patients=args.patients)
    with state_database(root) as url, bench_site(cohort.site_config, url, {"patients": 10.0}) as site:
        (root / "north.token").write_text(site.token + "\n")
        (root / "study.toml").write_text(f'[study]\nproject = "bench"\n[sites.north]\nurl = "{site.url}"\n'
                                         'token_file = "north.token"\n')
        subprocess.run([sys.executable, "-m", "veil.cli", "kernel", "install", "--prefix", str(root / "prefix")],
                       check=True, capture_output=True)
        os.environ.update(JUPYTER_PATH=str(root / "prefix" / "share" / "jupyter"),
                          VEIL_STUDY=str(root / "study.toml"), IPYTHONDIR=str(root / "ipython"))

        dataset = load_study().sites["north"].datasets["patients"]
        sdk = [timed(lambda: dataset.sql(SQL).release(epsilon=EPSILON))[0] for _ in range(args.repeats + 1)][1:]

        manager, client = start_new_kernel(kernel_name="veil")
        try:
            client.execute_interactive("%veil mode live", timeout=60)
            cell = f"%%veil sql --site north --epsilon {EPSILON}\n{SQL}"
            kernel = []
            for _ in range(args.repeats + 1):
                seconds, reply = timed(lambda: client.execute_interactive(cell, timeout=60, output_hook=lambda m: None))
                assert reply["content"]["status"] == "ok", reply["content"]
                kernel.append(seconds)
            kernel = kernel[1:]
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)

    sdk_ms, kernel_ms = stats_ms(sdk), stats_ms(kernel)
    added = kernel_ms["p50"] - sdk_ms["p50"]
    print(table(["path", "n", "p50 ms", "p95 ms"],
                [["SDK call in plain Python", len(sdk), sdk_ms["p50"], sdk_ms["p95"]],
                 ["%%veil sql cell through the kernel", len(kernel), kernel_ms["p50"], kernel_ms["p95"]]]))
    print(f"the kernel adds {added:.1f} ms at p50 (target: under 20 ms): {'yes' if added < 20 else 'NO'}")
    print(f"results in {save('kernel_latency', {'sdk_ms': sdk_ms, 'kernel_ms': kernel_ms, 'added_ms': added})}")


if __name__ == "__main__":
    main()
