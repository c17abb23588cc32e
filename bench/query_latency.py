"""Query latency on ~1M and ~10M encounter rows: Veil's HTTP release against plain Polars and a fresh
OpenDP Context per query, all measured in the same run.

    python bench/query_latency.py                 # 1M and 10M rows, 30 repeats
    python bench/query_latency.py --rows 1M       # quick run
    python bench/query_latency.py --rows 1M,10M --repeats 30 --context-repeats 5

For each size it synthesizes one site ('north', sites=1), grants the bench project epsilon 10 on
`encounters`, starts `veil executor serve` on 127.0.0.1 (LocalExecutor) and measures, per query
(count, mean, group-by):

* cold: the first HTTP release of the query on a fresh executor (uncached calibration; the very first
  request also pays the epsilon -> rho conversion and OpenDP's first use);
* warm HTTP: end-to-end `SiteClient.query(sql, epsilon=0.05)`, p50 and p95;
* in-process: `Site.query` on a Site opened in this process (same data, same state database): no HTTP;
* plain Polars: the same aggregation over `pl.scan_parquet` (non-private baseline);
* OpenDP Context: a fresh `dp.Context.compositor(...)` per query, truncating to 20 rows per patient,
  the same DP expression, `.release().collect()` (fewer repeats: it takes seconds);
* phases: where the in-process time goes (parse, plan, certify, ledger precheck, run = measurement and
  intervals, write transaction, other), timed inside the real `Site.query` by wrapping, in this
  process only, the functions it calls (see instrumented_site_query).

Each series is bounded by --repeats and by a time budget (--budget-s per size).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import opendp.prelude as dp  # noqa: E402
import polars as pl  # noqa: E402
from _common import (  # noqa: E402
    PROJECT,
    QUERIES,
    bench_site,
    check_quiet,
    label,
    make_cohort,
    now,
    parse_rows,
    ratio,
    save,
    state_database,
    stats_ms,
    table,
    timed,
    workdir,
)

from veil.executor.auth import Principal  # noqa: E402
from veil.executor.catalog import Dataset  # noqa: E402
from veil.executor.site import Site  # noqa: E402
from veil.kernel.client import SiteClient  # noqa: E402
from veil.query.accounting import rho_for_epsilon  # noqa: E402
from veil.wire import QueryRequest  # noqa: E402

dp.enable_features("contrib")

HB = "hemoglobin_g_dl"
GRANT_EPSILON = 10.0


# ---------------------------------------------------------------- baselines


def plain_polars(path: Path) -> dict[str, Callable[[], Any]]:
    """The same aggregations, non-private, over a lazy Parquet scan."""
    return {
        "count": lambda: pl.scan_parquet(path).select(pl.len().alias("n")).collect(),
        "mean": lambda: pl.scan_parquet(path).select(pl.col(HB).mean().alias("hb")).collect(),
        "group-by": lambda: pl.scan_parquet(path).group_by("department").agg(pl.len().alias("n")).collect(),
    }


def opendp_context(dataset: Dataset, rho: float) -> dict[str, Callable[[], dict[str, float]]]:
    """A fresh OpenDP Context per query (what a site would do without Veil's calibration): the unit is a
    patient with up to 20 rows, rows are truncated per patient, the DP expressions are Veil's."""
    k = dataset.max_rows_per_unit
    bounds = tuple(float(b) for b in dataset.column(HB).bounds)  # type: ignore[union-attr]
    departments = pl.LazyFrame({"department": list(dataset.column("department").categories or [])})

    def context(by: list[str]) -> dp.Context:
        margins = [dp.polars.Margin(by=[], max_length=dataset.max_rows)]
        if by:
            margins.append(dp.polars.Margin(by=by, max_length=dataset.max_rows))
        return dp.Context.compositor(
            data=pl.scan_parquet(dataset.path),
            privacy_unit=dp.unit_of(contributions=k, identifier=dataset.privacy_unit),
            privacy_loss=dp.loss_of(rho=rho),
            split_evenly_over=1,
            margins=margins,
        )

    def phased(by: list[str], query: Callable[[dp.Context], Any]) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            t0 = now()
            ctx = context(by)
            t1 = now()
            released = query(ctx).release()  # OpenDP's scale search happens here
            t2 = now()
            released.collect()
            t3 = now()
            return {"total": t3 - t0, "context": t1 - t0, "release": t2 - t1, "collect": t3 - t2}

        return go

    values = pl.col(HB).drop_nulls()
    return {
        "count": phased([], lambda c: c.query().truncate_per_group(k).select(dp.len(signed=True).alias("n"))),
        "mean": phased(
            [],
            lambda c: (
                c.query()
                .truncate_per_group(k)
                .select(
                    values.dp.sum(bounds).alias("hb__sum"), values.dp.count(signed=True).alias("hb__count")
                )
            ),
        ),
        "group-by": phased(
            ["department"],
            lambda c: (
                c.query()
                .truncate_per_group(k)
                .group_by("department")
                .agg(dp.len(signed=True).alias("n"))
                .with_keys(departments)
            ),
        ),
    }


# ---------------------------------------------------------------- phases of Site.query


TIMED = {"parse_sql": "parse", "build_plan": "plan", "certify": "certify", "run": "run"}
"""Names `Site.query` calls from veil.executor.site's namespace, and the phase each one is."""


class _LedgerProxy:
    """veil.executor.ledger with `check` timed (only the pre-check: charge() calls the real module)."""

    def __init__(self, real: Any, record: Callable[[str, float], None]) -> None:
        self._real, self._record = real, record

    def check(self, *args: Any, **kwargs: Any) -> Any:
        t0 = now()
        try:
            return self._real.check(*args, **kwargs)
        finally:
            self._record("precheck", now() - t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextmanager
def instrumented_site_query() -> Iterator[dict[str, float]]:
    """Time the phases of the real `Site.query` in this process: the functions it calls from its
    module's namespace (parse_sql, build_plan, certify, ledger.check, run, write) are wrapped with
    timers while the block runs, and restored after. Whatever the wrappers do not cover (auth, dataset
    lookup, caches, building the Release) is reported as "other". A function that `Site.query` does not
    call (e.g. planning on a prepared-query cache hit) shows 0."""
    import veil.executor.site as site_module

    acc: dict[str, float] = {}

    def record(phase: str, seconds: float) -> None:
        acc[phase] = acc.get(phase, 0.0) + seconds

    def timer(fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                record(phase, now() - t0)

        return wrapped

    saved = {
        name: getattr(site_module, name) for name in [*TIMED, "write", "ledger"] if hasattr(site_module, name)
    }
    real_write = saved.get("write")

    @contextmanager
    def timed_write(*args: Any, **kwargs: Any) -> Iterator[Any]:
        t0 = now()
        try:
            with real_write(*args, **kwargs) as conn:  # type: ignore[misc]
                yield conn
        finally:
            record("write tx", now() - t0)

    try:
        for name, phase in TIMED.items():
            if name in saved:
                setattr(site_module, name, timer(saved[name], phase))
        if real_write is not None:
            site_module.write = timed_write
        if "ledger" in saved:
            site_module.ledger = _LedgerProxy(saved["ledger"], record)
        yield acc
    finally:
        for name, value in saved.items():
            setattr(site_module, name, value)


def phases(site: Site, who: Principal, sql: str, epsilon: float) -> dict[str, float]:
    """Seconds per phase of one real in-process `Site.query` (see instrumented_site_query)."""
    with instrumented_site_query() as acc:
        t0 = now()
        site.query(who, QueryRequest(sql=sql, epsilon=epsilon))
        total = now() - t0
    out = {
        phase: acc.get(phase, 0.0) for phase in ["parse", "plan", "certify", "precheck", "run", "write tx"]
    }
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


# ---------------------------------------------------------------- one size


def run_size(rows: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    name = label(rows)
    print(f"\n=== {name} rows ===", flush=True)
    cohort = make_cohort(root / name, target_rows=rows, seed=args.seed)
    print(
        f"synthesized {cohort.rows:,} encounter rows ({cohort.patients:,} nominal patients) "
        f"in {cohort.seconds:.1f} s",
        flush=True,
    )
    result: dict[str, Any] = {"rows": cohort.rows, "generate_s": cohort.seconds}
    with (
        state_database(root) as url,
        bench_site(cohort.site_config, url, {"encounters": GRANT_EPSILON}, serve=False) as site,
    ):
        t_start, _ = timed(site.start)
        result["executor_start_s"] = t_start
        print(f"executor on {site.url} (pid {site.pid}) answered /health after {t_start:.1f} s", flush=True)
        client = SiteClient("north", site.url, site.token, timeout=300)
        try:
            # Cold: first release of each query on a fresh executor.
            cold, costs = {}, {}
            for q, sql in QUERIES.items():
                seconds, release = timed(client.query, sql, epsilon=args.epsilon)
                cold[q], costs[q] = seconds, release.cost.rho
            print("cold HTTP (ms): " + ", ".join(f"{q} {s * 1000:.0f}" for q, s in cold.items()), flush=True)

            result["site_open_s"], inproc = timed(Site.open, cohort.site_config, url)
            who = Principal("bench_researcher", "researcher", PROJECT)
            cold_in = {}
            for q, sql in QUERIES.items():
                cold_in[q] = timed(inproc.query, who, QueryRequest(sql=sql, epsilon=args.epsilon))[0]
            plain = plain_polars(cohort.encounters)
            for fn in plain.values():
                fn()  # warm the page cache and Polars

            # Warm series, interleaved so that every variant sees the same machine state.
            samples: dict[str, dict[str, list[float]]] = {
                q: {"http": [], "inproc": [], "plain": []} for q in QUERIES
            }
            deadline = now() + args.budget_s * 0.5
            for r in range(args.repeats):
                for q, sql in QUERIES.items():
                    samples[q]["http"].append(timed(client.query, sql, epsilon=args.epsilon)[0])
                    samples[q]["inproc"].append(
                        timed(inproc.query, who, QueryRequest(sql=sql, epsilon=args.epsilon))[0]
                    )
                    samples[q]["plain"].append(timed(plain[q])[0])
                if now() > deadline and r + 1 >= 5:
                    print(f"warm series stopped by the time budget after {r + 1} repeats", flush=True)
                    break

            # Phases of the in-process path (a few repeats).
            # They mirror Site.query's steps; if the product's internals change shape, say so and go on.
            phase: dict[str, dict[str, float]] = {}
            try:
                for q, sql in QUERIES.items():
                    runs = [phases(inproc, who, sql, args.epsilon) for _ in range(args.phase_repeats)]
                    phase[q] = {k: stats_ms([r[k] for r in runs])["p50"] for k in runs[0]}
            except Exception as exc:  # noqa: BLE001
                print(f"phases unavailable ({type(exc).__name__}: {exc}); update phases() to Site.query")
                phase = {}

            # Fresh OpenDP Context per query.
            rho = rho_for_epsilon(args.epsilon, site.catalog.reporting_delta)
            ctx_runs: dict[str, list[dict[str, float]]] = {q: [] for q in QUERIES}
            contexts = opendp_context(site.catalog.dataset("encounters"), rho)
            deadline = now() + args.budget_s * 0.5
            for r in range(args.context_repeats):
                for q in QUERIES:
                    ctx_runs[q].append(contexts[q]())
                if now() > deadline and r + 1 >= 2:
                    print(
                        f"OpenDP Context series stopped by the time budget after {r + 1} repeats", flush=True
                    )
                    break
        finally:
            client.close()

    # ------------------------------------------------------------ report
    out_rows, ctx_rows, phase_rows = [], [], []
    for q in QUERIES:
        http, inp, pln = (stats_ms(samples[q][k]) for k in ("http", "inproc", "plain"))
        ctx = stats_ms([r["total"] for r in ctx_runs[q]])
        overhead = http["p50"] - pln["p50"]
        result[q] = {
            "cold_http_ms": cold[q] * 1000,
            "cold_inproc_ms": cold_in[q] * 1000,
            "http": http,
            "inproc": inp,
            "plain": pln,
            "context": ctx,
            "charged_rho": costs[q],
            "http_over_plain": ratio(http["p50"], pln["p50"]),
            "overhead_ms": overhead,
            "http_minus_inproc_ms": http["p50"] - inp["p50"],
            "speedup_vs_context": ratio(ctx["p50"], http["p50"]),
            "context_phases_ms": {
                k: stats_ms([r[k] for r in ctx_runs[q]])["p50"] for k in ("context", "release", "collect")
            },
            "phases_ms": phase.get(q),
        }
        out_rows.append(
            [
                q,
                cold[q] * 1000,
                http["p50"],
                http["p95"],
                inp["p50"],
                pln["p50"],
                pln["p95"],
                f"{ratio(http['p50'], pln['p50']):,.1f}x",
                overhead,
                http["p50"] - inp["p50"],
                f"{ratio(ctx['p50'], http['p50']):,.1f}x",
            ]
        )
        cp = result[q]["context_phases_ms"]
        ctx_rows.append([q, ctx["n"], ctx["p50"], ctx["p95"], cp["context"], cp["release"], cp["collect"]])
        if q in phase:
            phase_rows.append([q, *phase[q].values(), inp["p50"]])
    n = stats_ms(samples["count"]["http"])["n"]
    print(f"\n{name} rows ({cohort.rows:,}), epsilon {args.epsilon} per query, {n} warm repeats; times in ms")
    print(
        table(
            [
                "query",
                "cold HTTP",
                "HTTP p50",
                "HTTP p95",
                "in-proc p50",
                "Polars p50",
                "Polars p95",
                "HTTP/Polars",
                "overhead (HTTP-Polars)",
                "HTTP-in-proc",
                "speedup vs Context",
            ],
            out_rows,
        )
    )
    print(
        "\nfresh OpenDP Context per query (ms; context = construction, release = scale search, "
        "collect = run with per-patient truncation)"
    )
    print(table(["query", "n", "p50", "p95", "context", "release", "collect"], ctx_rows))
    print(
        "\nphases of in-process Site.query, p50 ms over --phase-repeats calls (run = OpenDP measurement on "
        "the scan + intervals; other = auth, lookups, caches, the Release; total vs the warm series' p50)"
    )
    if phase:
        header = ["query", *next(iter(phase.values())).keys(), "warm Site.query p50"]
        print(table(header, phase_rows), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1M,10M", help="comma-separated sizes, e.g. 1M or 1M,10M")
    parser.add_argument(
        "--repeats", type=int, default=30, help="warm repeats per query (HTTP, in-process, Polars)"
    )
    parser.add_argument(
        "--context-repeats", type=int, default=5, help="repeats of the fresh OpenDP Context baseline"
    )
    parser.add_argument("--phase-repeats", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=0.05, help="per-query epsilon (grant: epsilon 10)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=100.0,
        help="time budget per size for the warm and Context series (half each)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = parser.parse_args(argv)
    load_before = check_quiet("before")
    sizes = [parse_rows(s) for s in args.rows.split(",") if s.strip()]
    root = workdir(args.keep, "latency")
    started = time.perf_counter()
    results = {label(rows): run_size(rows, args, root) for rows in sizes}

    print("\n=== summary (p50 ms) ===")
    summary = []
    for size, r in results.items():
        for q in QUERIES:
            x = r[q]
            target = "" if size != "1M" else ("yes" if x["overhead_ms"] < 100 else "NO")
            summary.append(
                [
                    size,
                    q,
                    x["cold_http_ms"],
                    x["http"]["p50"],
                    x["plain"]["p50"],
                    f"{x['http_over_plain']:,.1f}x",
                    x["overhead_ms"],
                    target,
                    x["context"]["p50"],
                    f"{x['speedup_vs_context']:,.1f}x",
                ]
            )
    print(
        table(
            [
                "rows",
                "query",
                "cold",
                "HTTP",
                "Polars",
                "HTTP/Polars",
                "overhead",
                "< 100 ms @1M",
                "Context",
                "speedup",
            ],
            summary,
        )
    )
    load = {"before": load_before, "after": check_quiet("after")}
    path = save(f"query_latency_{'_'.join(results)}", {"results": results, "loadavg": load})
    print(f"\ntotal {time.perf_counter() - started:.0f} s; results in {path}")
    if args.keep:
        print(f"data kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
