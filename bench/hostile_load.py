"""An honest researcher's release latency while an attacker sends the worst request of each class at the
site's rate limit ([1/9] hostile input).

    python bench/hostile_load.py [--seconds 20] [--rate 600]

One site (~2,000 patients) with `[limits] requests_per_minute = --rate`. Phase 1 (quiet): the honest
client sends a `COUNT(*)` release every 0.2 s for `--seconds` seconds. Phase 2 (attack): the same,
while attacker threads (one researcher token of another project, and anonymous clients) send, in a
round robin at the token's rate limit: an IN list of the largest allowed length, one over it, 5,000
nested parentheses, 3,000 chained NOTs, an epsilon of 1e-20, a slow grouped query with five statistics
on every (department, icd10) group, a 2 MiB anonymous body to a weights path, ids beyond int64, an
unparseable body and an unknown route; anonymous requests add up to the anonymous limit. Reported: the
honest p50/p95 in both phases, their ratio (target: p50 at most 2x quiet) and failed honest requests
(target: zero), the attacker's outcomes by status, and the audit entries the attack added.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from _common import (  # noqa: E402
    bench_site,
    check_quiet,
    make_cohort,
    percentile,
    ratio,
    save,
    state_database,
    table,
    workdir,
)

from veil import limits  # noqa: E402
from veil.executor import audit  # noqa: E402

HONEST = {"sql": "SELECT COUNT(*) AS n FROM encounters", "epsilon": 0.01}
SLOW = ("SELECT department, icd10, COUNT(*) AS n, AVG(crp_mg_l) AS crp, MEDIAN(crp_mg_l) AS m, "
        "SUM(hemoglobin_g_dl) AS h, QUANTILE_CONT(wbc_10e9_l, 0.9) AS w FROM encounters GROUP BY department, icd10")


def attacks() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(class, method, path, httpx keyword arguments) of the worst request of each class."""
    ids = ", ".join(str(i) for i in range(limits.MAX_IN_VALUES))
    over = ", ".join(str(i) for i in range(2500))
    return [
        ("in-list (allowed)", "POST", "/query",
         {"json": {"sql": f"SELECT COUNT(*) FROM patients WHERE patient_id IN ({ids})", "epsilon": 0.01}}),
        ("in-list (too long)", "POST", "/query",
         {"json": {"sql": f"SELECT COUNT(*) FROM patients WHERE patient_id IN ({over})", "epsilon": 0.01}}),
        ("deep parentheses", "POST", "/query",
         {"json": {"sql": "SELECT COUNT(*) FROM patients WHERE " + "(" * 5000 + "age < 5" + ")" * 5000,
                   "epsilon": 0.01}}),
        ("chained NOT", "POST", "/query",
         {"json": {"sql": "SELECT COUNT(*) FROM patients WHERE " + "NOT " * 3000 + "age < 5", "epsilon": 0.01}}),
        ("tiny epsilon", "POST", "/query", {"json": {"sql": "SELECT COUNT(*) FROM patients", "epsilon": 1e-20}}),
        ("slow query", "POST", "/query", {"json": {"sql": SLOW, "epsilon": 0.01}}),
        ("id beyond int64", "GET", f"/jobs/{2**64}", {}),
        ("unparseable body", "POST", "/query", {"content": b"{not json"}),
        ("unknown route", "GET", "/no/such/route", {}),
    ]


def honest_run(url: str, token: str, seconds: float, per_second: float = 5.0) -> tuple[list[float], int]:
    """An honest researcher: one release every 1/per_second s (within any sane rate limit), timed."""
    latencies, failed = [], 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            response = client.post("/query", json=HONEST)
            latencies.append(time.perf_counter() - start)
            failed += response.status_code != 200
            time.sleep(max(0.0, 1.0 / per_second - (time.perf_counter() - start)))
    return latencies, failed


def attacker(url: str, token: str, per_minute: int, stop: threading.Event, outcomes: Counter[str]) -> None:
    gap = 60.0 / per_minute
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client, \
            httpx.Client(base_url=url, timeout=120) as anonymous:
        for name, method, path, kwargs in itertools.cycle(attacks()):
            if stop.is_set():
                return
            start = time.monotonic()
            try:
                status = client.request(method, path, **kwargs).status_code
                anon = anonymous.post("/jobs/1/round", content=b"x" * (2 * 1024 * 1024)).status_code
                outcomes[f"{name}: {status}"] += 1
                outcomes[f"anonymous 2 MiB body: {anon}"] += 1
            except httpx.HTTPError as exc:
                outcomes[f"{name}: {type(exc).__name__}"] += 1
            time.sleep(max(0.0, gap - (time.monotonic() - start)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rate", type=int, default=600, help="the site's requests_per_minute per token")
    parser.add_argument("--attackers", type=int, default=4, help="attacker threads (one token between them)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    check_quiet("before")
    root = workdir(args.keep, "hostile")
    cohort = make_cohort(root / "data", patients=2000)
    config = cohort.site_config
    config.write_text(config.read_text() + f"\n[limits]\nrequests_per_minute = {args.rate}\n"
                      "anonymous_per_minute = 600\naudit_window_seconds = 10\n")
    with state_database(root) as url, bench_site(config, url, {"encounters": 1000.0}) as site:
        attacker_token = site.token_for("attacker")
        site.grant("patients", 1000.0, project="attacker")
        site.grant("encounters", 1000.0, project="attacker")
        honest_run(site.url, site.token, 2.0)  # warm-up: workers up, queries prepared
        quiet, quiet_failed = honest_run(site.url, site.token, args.seconds)
        before = audit.count_entries(site.engine)
        stop, outcomes = threading.Event(), Counter[str]()
        threads = [threading.Thread(target=attacker, args=(site.url, attacker_token, args.rate // args.attackers,
                                                           stop, outcomes)) for _ in range(args.attackers)]
        for t in threads:
            t.start()
        attacked, attacked_failed = honest_run(site.url, site.token, args.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        time.sleep(11)  # one refusal window, so the counted refusals are written
        added = audit.count_entries(site.engine) - before
        verified = audit.verify(site.engine).ok
    q50, a50 = percentile(quiet, 50) * 1000, percentile(attacked, 50) * 1000
    rows = [["quiet", len(quiet), f"{q50:.1f}", f"{percentile(quiet, 95) * 1000:.1f}", quiet_failed],
            ["under attack", len(attacked), f"{a50:.1f}", f"{percentile(attacked, 95) * 1000:.1f}", attacked_failed]]
    print(table(["honest researcher", "releases", "p50 ms", "p95 ms", "failed"], rows))
    print(f"p50 under attack / quiet: {ratio(a50, q50):.2f}x (target <= 2x); failed honest requests: "
          f"{attacked_failed} (target 0)")
    print(table(["attack request: status", "count"], [[k, v] for k, v in sorted(outcomes.items())]))
    print(f"audit entries added during the attack: {added} for {sum(outcomes.values())} attack requests; "
          f"audit verifies: {verified}")
    save("hostile_load", {"quiet_ms": quiet, "attacked_ms": attacked, "ratio_p50": ratio(a50, q50),
                          "failed": attacked_failed, "outcomes": dict(outcomes), "audit_added": added})
    check_quiet("after")
    return 0 if attacked_failed == 0 and verified else 1


if __name__ == "__main__":
    sys.exit(main())
