"""Peak memory of the executor process serving ~10M encounter rows, against the dataset's in-memory size.

    python bench/memory.py                      # 10M rows
    python bench/memory.py --rows 1M            # quick run

The executor (`veil executor serve` via LocalExecutor) scans Parquet lazily; it should never hold the
dataset in memory. This script samples the executor's /proc/<pid>/status (VmRSS every few ms, and
VmHWM, the kernel's peak-RSS mark) during a burst of count / mean / group-by releases from
--concurrency clients. VmHWM is reset (clear_refs) after startup, so the startup peak (Site.open's
per-patient bound check over the whole file) and the burst peak are reported separately.

Only after the executor has stopped is the dataset loaded, in a subprocess, to measure its in-memory
size (`pl.read_parquet(path).estimated_size()`) and that subprocess's own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    QUERIES,
    bench_site,
    check_quiet,
    label,
    make_cohort,
    mib,
    now,
    parse_rows,
    proc_status,
    ratio,
    reset_peak_rss,
    save,
    state_database,
    stats_ms,
    table,
    timed,
    workdir,
)

from veil.kernel.client import SiteClient  # noqa: E402

LOAD = """
import json, sys, polars as pl
df = pl.read_parquet(sys.argv[1])
size = df.estimated_size()
status = dict(l.split(':', 1) for l in open('/proc/self/status'))
print(json.dumps({'estimated_size': size, 'rows': df.height, 'columns': df.width,
                  'VmHWM': int(status['VmHWM'].split()[0]) * 1024}))
"""


class Sampler(threading.Thread):
    """Polls a process's VmRSS; keeps the maximum and a short series."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.max_rss, self.samples = 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = proc_status(self.pid).get("VmRSS", 0)
            except OSError:
                return
            self.max_rss, self.samples = max(self.max_rss, rss), self.samples + 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def burst(
    url: str, token: str, requests: int, concurrency: int, epsilon: float, time_limit: float
) -> dict[str, list[float]]:
    """`requests` releases cycling count, mean, group-by from `concurrency` clients."""
    names = list(QUERIES)
    latencies: dict[str, list[float]] = {q: [] for q in names}
    lock = threading.Lock()
    deadline = now() + time_limit

    def worker(index: int) -> None:
        client = SiteClient("north", url, token, timeout=300)
        try:
            for i in range(index, requests, concurrency):
                if now() > deadline:
                    return
                q = names[i % len(names)]
                seconds, _ = timed(client.query, QUERIES[q], epsilon=epsilon)
                with lock:
                    latencies[q].append(seconds)
        finally:
            client.close()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10M")
    parser.add_argument("--requests", type=int, default=60, help="releases in the burst")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--interval-ms", type=float, default=5.0, help="VmRSS sampling interval")
    parser.add_argument("--time-limit", type=float, default=150.0, help="seconds for the burst")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    load_before = check_quiet("before")

    rows = parse_rows(args.rows)
    root = workdir(args.keep, "memory")
    cohort = make_cohort(root / label(rows), target_rows=rows, seed=args.seed)
    print(
        f"synthesized {cohort.rows:,} encounter rows in {cohort.seconds:.1f} s "
        f"({mib(cohort.encounters.stat().st_size)} of Parquet)",
        flush=True,
    )

    with (
        state_database(root) as url,
        bench_site(cohort.site_config, url, {"encounters": 10.0}, serve=False) as site,
    ):
        start_s, _ = timed(site.start)
        pid = site.pid
        startup = proc_status(pid)
        print(
            f"executor pid {pid} up in {start_s:.1f} s: RSS {mib(startup['VmRSS'])}, "
            f"startup peak {mib(startup['VmHWM'])}",
            flush=True,
        )
        reset = reset_peak_rss(pid)
        sampler = Sampler(pid, args.interval_ms / 1000)
        sampler.start()
        t0 = now()
        latencies = burst(
            site.url, site.token, args.requests, args.concurrency, args.epsilon, args.time_limit
        )
        burst_s = now() - t0
        sampler.stop()
        after = proc_status(pid)
    burst_peak = after["VmHWM"] if reset else max(after["VmHWM"], sampler.max_rss)
    done = sum(len(v) for v in latencies.values())
    print(
        f"burst: {done} releases from {args.concurrency} clients in {burst_s:.1f} s; "
        f"{sampler.samples} RSS samples",
        flush=True,
    )

    # Only now, with the executor gone, load the dataset (in a subprocess) to size it.
    loaded = json.loads(
        subprocess.run(
            [sys.executable, "-c", LOAD, str(cohort.encounters)], check=True, capture_output=True, text=True
        ).stdout
    )
    in_memory = loaded["estimated_size"]

    result: dict[str, Any] = {
        "rows": cohort.rows,
        "parquet_bytes": cohort.encounters.stat().st_size,
        "in_memory_bytes": in_memory,
        "loader_peak_rss_bytes": loaded["VmHWM"],
        "executor_start_s": start_s,
        "executor_idle_rss_bytes": startup["VmRSS"],
        "executor_startup_peak_bytes": startup["VmHWM"],
        "burst_peak_bytes": burst_peak,
        "burst_peak_is_vmhwm": reset,
        "max_sampled_rss_bytes": sampler.max_rss,
        "rss_after_burst_bytes": after["VmRSS"],
        "burst_releases": done,
        "burst_s": burst_s,
        "concurrency": args.concurrency,
        "latency_ms": {q: stats_ms(v) for q, v in latencies.items()},
        "burst_peak_over_in_memory": ratio(burst_peak, in_memory),
        "startup_peak_over_in_memory": ratio(startup["VmHWM"], in_memory),
    }
    whole_peak = max(startup["VmHWM"], burst_peak)
    print(f"\n{label(rows)} rows ({cohort.rows:,}), {done} releases, {args.concurrency} concurrent clients")
    print(
        table(
            ["figure", "value", "/ in-memory size"],
            [
                [
                    "dataset: Parquet file",
                    mib(result["parquet_bytes"]),
                    f"{ratio(result['parquet_bytes'], in_memory):.2f}",
                ],
                ["dataset: in memory (estimated_size)", mib(in_memory), "1.00"],
                [
                    "loading it (pl.read_parquet): process peak RSS",
                    mib(loaded["VmHWM"]),
                    f"{ratio(loaded['VmHWM'], in_memory):.2f}",
                ],
                [
                    "executor: RSS idle after startup",
                    mib(startup["VmRSS"]),
                    f"{ratio(startup['VmRSS'], in_memory):.2f}",
                ],
                [
                    "executor: peak RSS during startup (bound check)",
                    mib(startup["VmHWM"]),
                    f"{ratio(startup['VmHWM'], in_memory):.2f}",
                ],
                [
                    f"executor: peak RSS during the burst ({'VmHWM' if reset else 'sampled'})",
                    mib(burst_peak),
                    f"{ratio(burst_peak, in_memory):.2f}",
                ],
                [
                    "executor: max sampled VmRSS during the burst",
                    mib(sampler.max_rss),
                    f"{ratio(sampler.max_rss, in_memory):.2f}",
                ],
                [
                    "executor: burst peak minus idle RSS",
                    mib(burst_peak - startup["VmRSS"]),
                    f"{ratio(burst_peak - startup['VmRSS'], in_memory):.2f}",
                ],
                [
                    "executor: RSS after the burst",
                    mib(after["VmRSS"]),
                    f"{ratio(after['VmRSS'], in_memory):.2f}",
                ],
            ],
        )
    )
    print(
        "\nburst latency (ms): "
        + ", ".join(
            f"{q} p50 {s['p50']:,.0f} / p95 {s['p95']:,.0f} (n={s['n']})"
            for q, s in result["latency_ms"].items()
        )
    )
    marginal = burst_peak - startup["VmRSS"]
    print(
        f"executor peak (startup and burst) {mib(whole_peak)} = {ratio(whole_peak, in_memory):.2f}x the in-memory "
        f"dataset: under it: {'yes' if whole_peak < in_memory else 'NO'}; well under (< 0.5x): "
        f"{'yes' if whole_peak < 0.5 * in_memory else 'NO'}. Serving the burst added {mib(marginal)} "
        f"({ratio(marginal, in_memory):.2f}x) over the idle executor."
    )
    result["loadavg"] = {"before": load_before, "after": check_quiet("after")}
    print(f"results in {save(f'memory_{label(rows)}_c{args.concurrency}', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
