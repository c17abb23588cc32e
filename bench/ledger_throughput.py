"""Ledger throughput under concurrency: 64 clients race for one grant that affords exactly N releases.

    python bench/ledger_throughput.py                                   # SQLite (default)
    python bench/ledger_throughput.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres

With a PostgreSQL URL a fresh database is created on that server for the run and dropped afterwards.

A tiny dataset (one site, ~2,000 patients, ~10k encounter rows) keeps the data cheap, so the ledger
and the request path are what is measured. Every request is `COUNT(*)` at a fixed `rho` (1e-4). One
warm-up release (charged to another project) gives the charged rho `c` (OpenDP's certified loss, at
most the requested rho); the bench grant is then sized so that exactly `--affordable` releases fit,
by replaying the ledger's own float arithmetic (`spent + c <= total`, `spent = spent + c`).

Then `--requests` requests (1,500) are sent by `--clients` (64) concurrent clients (asyncio, one
httpx.AsyncClient each) to an executor with `--workers` processes (default 1), bounded by
`--time-limit` seconds. Reported: charged releases per second, refusals, latency, executor CPU, and
the zero-overspend proof (successes == affordable, rho_spent <= rho_total, spent == the sum of
charges, audit.verify(engine).ok); the exit status is 1 if any check fails. Baselines in the same
run, each on a fresh database of the same backend: a bare durable commit (the backend's floor), the
raw ledger write transaction (charge + audit append) in-process on 1 and 64 threads, and in-process
`Site.query` on 1 thread; and, on the same executor after the race, one HTTP client sending releases
one at a time (the HTTP path without concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from _common import (  # noqa: E402
    PROJECT,
    QUERIES,
    backend_of,
    bench_site,
    check_quiet,
    cpu_by_role,
    fmt,
    make_cohort,
    now,
    save,
    state_database,
    stats_ms,
    table,
    workdir,
)

from veil.executor import audit, ledger  # noqa: E402
from veil.executor.auth import Principal  # noqa: E402
from veil.executor.catalog import load_catalog  # noqa: E402
from veil.executor.site import Site  # noqa: E402
from veil.executor.store import caps, open_store, write  # noqa: E402
from veil.query.accounting import epsilon_of  # noqa: E402
from veil.wire import QueryRequest  # noqa: E402

SQL = QUERIES["count"]


def affordable_count(spent: float, total: float, charge: float) -> int:
    """How many charges of `charge` the ledger accepts, replaying its float arithmetic exactly."""
    n = 0
    while spent + charge <= total:
        spent = spent + charge
        n += 1
    return n


# ---------------------------------------------------------------- the race


async def race(
    url: str, token: str, rho: float, clients: int, requests: int, time_limit: float
) -> dict[str, Any]:
    """`requests` POST /query from `clients` concurrent clients; stop issuing at `time_limit`."""
    issued = 0
    outcomes: list[tuple[int, str, float, float, float, str]] = []  # status, code, start, end, rho, receipt
    body = {"sql": SQL, "rho": rho}
    start = now()
    deadline = start + time_limit

    async def client() -> None:
        nonlocal issued
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=max(30.0, time_limit),
            limits=limits,
        ) as http:
            while issued < requests and now() < deadline:
                issued += 1
                t0 = now()
                try:
                    response = await http.post("/query", json=body)
                    payload = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    outcomes.append((0, type(exc).__name__, t0, now(), 0.0, ""))
                    continue
                t1 = now()
                if response.status_code == 200:
                    outcomes.append((200, "released", t0, t1, payload["cost"]["rho"], payload["receipt"]))
                else:
                    outcomes.append((response.status_code, payload.get("code", "?"), t0, t1, 0.0, ""))

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"outcomes": outcomes, "start": start, "end": now(), "issued": issued}


# ---------------------------------------------------------------- baselines


def raw_ledger(
    site_config: Path, url: str, charge: float, threads: int, limit: int, seconds: float
) -> dict[str, Any]:
    """Write transactions like a release's (ledger.charge + audit.append) in-process, on `threads` threads."""
    catalog = load_catalog(site_config)
    engine = open_store(url)
    dataset = catalog.dataset("encounters")
    with write(engine) as conn:
        ledger.set_grant(conn, catalog, PROJECT, dataset, 10.0, by="bench_steward")
    ledger.sync_caps(engine, catalog)
    done = 0
    lock = threading.Lock()
    latencies: list[float] = []
    deadline = now() + seconds

    def worker() -> None:
        nonlocal done
        while True:
            with lock:
                if done >= limit or now() > deadline:
                    return
                done += 1
            t0 = now()
            with write(engine) as conn:
                ledger.charge(conn, catalog, PROJECT, dataset, charge, 0.0)
                audit.append(
                    conn,
                    principal="bench_researcher",
                    role="researcher",
                    action="query",
                    decision="released",
                    project=PROJECT,
                    dataset=dataset.name,
                    query=SQL,
                    rho=charge,
                    delta=0.0,
                    result_digest="0" * 64,
                )
            t1 = now()
            with lock:
                latencies.append(t1 - t0)

    start = now()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = now() - start
    ok = audit.verify(engine).ok
    engine.dispose()
    return {
        "threads": threads,
        "tx": len(latencies),
        "wall_s": wall,
        "tx_per_s": len(latencies) / wall,
        "latency_ms": stats_ms(latencies),
        "verify_ok": ok,
    }


def sequential_http(url: str, token: str, rho: float, pid: int, count: int, seconds: float) -> dict[str, Any]:
    """Releases from one client, one at a time: the HTTP path without concurrency (and executor CPU each)."""
    latencies: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        http.post("/query", json={"sql": SQL, "rho": rho}).raise_for_status()
        before = cpu_by_role(pid)
        deadline = now() + seconds
        start = now()
        while len(latencies) < count and now() < deadline:
            t0 = now()
            http.post("/query", json={"sql": SQL, "rho": rho}).raise_for_status()
            latencies.append(now() - t0)
        wall = now() - start
        roles = cpu_by_role(pid)
        roles.subtract(before)
    n = max(1, len(latencies))
    return {
        "releases": len(latencies),
        "wall_s": wall,
        "per_s": len(latencies) / wall,
        "latency_ms": stats_ms(latencies),
        "server_cpu_ms_per_release": 1000 * sum(roles.values()) / n,
        "server_cpu_ms_per_release_by_role": {role: 1000 * cpu / n for role, cpu in roles.items()},
    }


def bare_commits(url: str, limit: int, seconds: float) -> dict[str, Any]:
    """The backend's floor: one-row UPDATE + durable COMMIT per transaction, same engine settings, 1 thread."""
    engine = open_store(url)
    with write(engine) as conn:
        conn.execute(
            caps.insert().values(
                dataset="bare", epsilon=1.0, delta=0.0, rho_total=1.0, rho_spent=0.0, delta_spent=0.0
            )
        )
    latencies: list[float] = []
    deadline = now() + seconds
    start = now()
    while len(latencies) < limit and now() < deadline:
        t0 = now()
        with engine.begin() as conn:
            conn.execute(
                caps.update().where(caps.c.dataset == "bare").values(rho_spent=caps.c.rho_spent + 1e-9)
            )
        latencies.append(now() - t0)
    wall = now() - start
    engine.dispose()
    return {
        "tx": len(latencies),
        "wall_s": wall,
        "tx_per_s": len(latencies) / wall,
        "latency_ms": stats_ms(latencies),
    }


def inprocess_queries(site_config: Path, url: str, rho: float, count: int, seconds: float) -> dict[str, Any]:
    """Sequential in-process `Site.query` releases (no HTTP, no concurrency) on the same tiny dataset."""
    site = Site.open(site_config, url)
    with write(site.engine) as conn:
        ledger.set_grant(
            conn, site.catalog, PROJECT, site.catalog.dataset("encounters"), 10.0, by="bench_steward"
        )
    who = Principal("bench_researcher", "researcher", PROJECT)
    request = QueryRequest(sql=SQL, rho=rho)
    site.query(who, request)  # warm: calibration cache
    latencies = []
    deadline = now() + seconds
    start = now()
    while len(latencies) < count and now() < deadline:
        t0 = now()
        site.query(who, request)
        latencies.append(now() - t0)
    wall = now() - start
    site.engine.dispose()
    return {
        "releases": len(latencies),
        "wall_s": wall,
        "per_s": len(latencies) / wall,
        "latency_ms": stats_ms(latencies),
    }


# ---------------------------------------------------------------- main


def baseline_row(label: str, n: int, per_s: float, latency_ms: dict, http_rate: float) -> list:
    """One row of the baseline table: the path, its rate and latency, and HTTP's rate as a share of it."""
    return [label, n, per_s, latency_ms["p50"], latency_ms["p95"], f"{100 * http_rate / per_s:.0f}%"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL server URL (a fresh database is created and dropped); default SQLite",
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=1, help="executor worker processes (uvicorn --workers)"
    )
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--affordable", type=int, default=1000, help="releases the grant affords")
    parser.add_argument("--rho", type=float, default=1e-4, help="requested rho per release")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds to keep issuing requests")
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--query-workers", type=int, default=None,
                        help="[limits] query_workers per executor process (default: the site's, 2); one principal "
                             "holds at most query_workers - 1 at a time, and every client here is one principal")
    parser.add_argument("--raw-tx", type=int, default=2000, help="transactions per raw-ledger baseline")
    parser.add_argument("--baseline-s", type=float, default=15.0, help="time cap per baseline")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    load_before = check_quiet("before")

    root = workdir(args.keep, "ledger")
    cohort = make_cohort(root / "data", patients=args.patients, seed=3)
    # The race measures the release path, not the per-token rate limit (600 a minute by default).
    config = cohort.site_config
    pool = f"query_workers = {args.query_workers}\n" if args.query_workers else ""
    config.write_text(config.read_text() + f"\n[limits]\nrequests_per_minute = 1000000\n{pool}")
    backend = backend_of(args.database_url or "sqlite")
    print(f"dataset: {cohort.rows:,} encounter rows; state database: {backend}", flush=True)
    result: dict[str, Any] = {
        "backend": backend,
        "rows": cohort.rows,
        "clients": args.clients,
        "workers": args.workers,
        "requests": args.requests,
        "requested_rho": args.rho,
    }

    with (
        state_database(root, args.database_url) as url,
        bench_site(cohort.site_config, url, {"encounters": 1.0}, workers=args.workers) as site,
    ):
        # Warm-up (calibration cache, connections) on another project; it gives the charged rho.
        site.grant("encounters", 3.0, project="warmup")  # also pays for the sequential HTTP baseline
        warm = httpx.post(
            f"{site.url}/query",
            json={"sql": SQL, "rho": args.rho},
            timeout=120,
            headers={"Authorization": f"Bearer {site.token_for('warmup')}"},
        )
        warm.raise_for_status()
        charge = float(warm.json()["cost"]["rho"])

        # Size the grant: exactly `affordable` charges of `charge` fit (half a charge of slack).
        reporting_delta = site.catalog.reporting_delta
        site.grant("encounters", epsilon_of((args.affordable + 0.5) * charge, reporting_delta))
        grant = site.grant_row("encounters")
        with site.engine.connect() as conn:
            cap = dict(conn.execute(caps.select().where(caps.c.dataset == "encounters")).mappings().one())
        affordable = min(
            affordable_count(grant["rho_spent"], grant["rho_total"], charge),
            affordable_count(cap["rho_spent"], cap["rho_total"], charge),
        )
        print(
            f"charged rho per release {charge!r} (requested {args.rho}); grant rho_total "
            f"{grant['rho_total']!r} -> affordable {affordable}",
            flush=True,
        )

        roles_before, cpu_bench = cpu_by_role(site.pid), time.process_time()
        run = asyncio.run(race(site.url, site.token, args.rho, args.clients, args.requests, args.time_limit))
        roles = cpu_by_role(site.pid)
        roles.subtract(roles_before)
        cpu_server, cpu_bench = sum(roles.values()), time.process_time() - cpu_bench

        outcomes = run["outcomes"]
        wall = run["end"] - run["start"]
        released = [o for o in outcomes if o[0] == 200]
        codes = Counter(f"{o[0]} {o[1]}" for o in outcomes if o[0] != 200)
        last_release = max((o[3] for o in released), default=run["start"]) - run["start"]
        after = site.grant_row("encounters")
        verification = audit.verify(site.engine)
        charges = [o[4] for o in released]
        replay = grant["rho_spent"]
        for c in charges:
            replay = replay + c
        checks = {
            "successes == affordable": len(released) == affordable,
            "every release charged the same rho": all(c == charge for c in charges),
            "receipts unique": len({o[5] for o in released}) == len(released),
            "rho_spent <= rho_total": after["rho_spent"] <= after["rho_total"],
            "rho_spent == sum of charges": after["rho_spent"] == replay,
            "audit.verify(engine).ok": verification.ok,
            "no transport errors": not any(o[0] == 0 for o in outcomes),
        }
        latency = stats_ms([o[3] - o[2] for o in outcomes])
        result["http"] = {
            "issued": run["issued"],
            "answered": len(outcomes),
            "released": len(released),
            "affordable": affordable,
            "refused": dict(codes),
            "wall_s": wall,
            "until_last_release_s": last_release,
            "releases_per_s": len(released) / wall,
            "releases_per_s_while_affordable": len(released) / last_release if last_release else 0.0,
            "requests_per_s": len(outcomes) / wall,
            "latency_ms": latency,
            "server_cpu_s": cpu_server,
            "bench_cpu_s": cpu_bench,
            "server_cpu_ms_per_request": 1000 * cpu_server / max(1, len(outcomes)),
            "server_cpu_s_by_role": dict(roles),
            "rho_total": after["rho_total"],
            "rho_spent": after["rho_spent"],
            "charge": charge,
            "audit_entries": verification.entries,
            "audit_problems": verification.problems[:5],
            "checks": checks,
        }
        # Baseline on the same executor, after the race: one client, sequential (warm-up project's grant).
        result["http_sequential"] = sequential_http(
            site.url, site.token_for("warmup"), args.rho, site.pid, 300, args.baseline_s
        )
        site.stop()

    # Baselines, each on its own fresh state database of the same backend.
    with state_database(root, args.database_url) as url:
        bare = bare_commits(url, args.raw_tx, args.baseline_s)
    with state_database(root, args.database_url) as url:
        raw1 = raw_ledger(cohort.site_config, url, charge, 1, args.raw_tx, args.baseline_s)
    with state_database(root, args.database_url) as url:
        raw64 = raw_ledger(cohort.site_config, url, charge, args.clients, args.raw_tx, args.baseline_s)
    with state_database(root, args.database_url) as url:
        inproc = inprocess_queries(cohort.site_config, url, args.rho, 300, args.baseline_s)
    result.update(
        {
            "bare_commit_1_thread": bare,
            "raw_ledger_1_thread": raw1,
            f"raw_ledger_{args.clients}_threads": raw64,
            "inprocess_query": inproc,
        }
    )

    h = result["http"]
    print(
        f"\n{args.clients} clients, {h['answered']} requests answered in {h['wall_s']:.1f} s "
        f"({backend}, {cohort.rows:,} rows, {args.workers} executor worker(s), {os.cpu_count()} CPUs)"
    )
    print(
        table(
            ["figure", "value"],
            [
                ["charged releases", f"{h['released']} (affordable {affordable})"],
                ["refused", ", ".join(f"{k}: {v}" for k, v in codes.items()) or "0"],
                ["releases/s over the whole run", h["releases_per_s"]],
                ["releases/s until the grant was spent", h["releases_per_s_while_affordable"]],
                ["requests/s (releases + refusals)", h["requests_per_s"]],
                ["request latency p50 / p95 (ms)", f"{fmt(latency['p50'])} / {fmt(latency['p95'])}"],
                ["executor CPU per request (ms)", h["server_cpu_ms_per_request"]],
                ["executor CPU use (cores busy, all workers)", h["server_cpu_s"] / h["wall_s"]],
                ["... of which (cores busy)", ", ".join(f"{role} {cpu / h['wall_s']:.2f}"
                                                      for role, cpu in h["server_cpu_s_by_role"].items())],
                ["bench (client) CPU (s) / executor CPU (s)", f"{fmt(cpu_bench)} / {fmt(cpu_server)}"],
                ["grant rho_spent / rho_total", f"{h['rho_spent']!r} / {h['rho_total']!r}"],
                [
                    "target >= 500 releases/s (SQLite)",
                    ("yes" if h["releases_per_s_while_affordable"] >= 500 else "NO")
                    if backend == "sqlite"
                    else "n/a (the target is for SQLite)",
                ],
            ],
        )
    )
    print("\nzero overspend:")
    for k, v in checks.items():
        print(f"  [{'ok' if v else 'FAILED'}] {k}")
    print("\nbaselines (same backend; all but the first in-process, no HTTP)")
    http_rate = h["releases_per_s_while_affordable"]
    seq = result["http_sequential"]
    print(
        table(
            ["path", "n", "per second", "p50 ms", "p95 ms", "HTTP releases/s as a share"],
            [
                baseline_row(f"HTTP, 1 client, sequential (executor CPU {seq['server_cpu_ms_per_release']:.1f} ms: "
                             + ", ".join(f"{role} {ms:.1f}" for role, ms in
                                         seq["server_cpu_ms_per_release_by_role"].items()) + ")",
                             seq["releases"], seq["per_s"], seq["latency_ms"], http_rate),
                baseline_row("bare durable commit (1-row UPDATE), 1 thread", bare["tx"], bare["tx_per_s"],
                             bare["latency_ms"], http_rate),
                baseline_row("raw ledger tx (charge + audit), 1 thread", raw1["tx"], raw1["tx_per_s"],
                             raw1["latency_ms"], http_rate),
                baseline_row(f"raw ledger tx, {args.clients} threads", raw64["tx"], raw64["tx_per_s"],
                             raw64["latency_ms"], http_rate),
                baseline_row("Site.query in-process, 1 thread", inproc["releases"], inproc["per_s"],
                             inproc["latency_ms"], http_rate),
            ],
        )
    )
    result["loadavg"] = {"before": load_before, "after": check_quiet("after")}
    path = save(f"ledger_throughput_{backend}_w{args.workers}", result)
    print(f"\nresults in {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
