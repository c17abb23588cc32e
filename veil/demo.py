"""The embedded default: three synthetic hospitals, their executors on loopback, DP queries, releases printed."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import polars as pl

from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilRefusal
from veil.local import LocalExecutor
from veil.wire import Release

PROJECT = "rare_peds"
QUERIES = [
    ("SELECT sex, COUNT(*) AS patients FROM patients GROUP BY sex", 0.5),
    ("SELECT rare_disease, COUNT(*) AS patients, AVG(age) AS mean_age FROM patients GROUP BY rare_disease", 1.0),
    ("SELECT department, COUNT(*) AS encounters, AVG(crp_mg_l) AS mean_crp FROM encounters "
     "WHERE encounter_date >= DATE '2020-01-01' GROUP BY department", 1.0),
    ("SELECT MEDIAN(length_of_stay_days) AS median_stay, AVG(hemoglobin_g_dl) AS mean_hb FROM encounters", 0.5),
]


def _prepare_site(config: Path) -> str:
    """Create the demo researcher's token and the steward's grant on the L2 dataset (once)."""
    from veil.executor import ledger
    from veil.executor.auth import create_token
    from veil.executor.catalog import load_catalog
    from veil.executor.store import open_store, write

    token_file = config.parent / "researcher.token"
    if not token_file.exists():
        catalog = load_catalog(config)
        engine = open_store(catalog.database_url)
        token = create_token(engine, "dr_demo", "researcher", PROJECT)
        with write(engine) as conn:
            ledger.set_grant(conn, catalog, PROJECT, catalog.dataset("encounters"), 4.0, by="demo_steward")
        engine.dispose()
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
    return token_file.read_text().strip()


def _cell(row: dict, name: str) -> str:
    estimate, lower, upper = row[name], row[f"{name}_lower"], row[f"{name}_upper"]
    if estimate is None:
        return "n/a"
    return f"{estimate:,.1f}" + (f" [{lower:,.1f}, {upper:,.1f}]" if lower is not None else "")


def format_release(release: Release) -> pl.DataFrame:
    """A release as a table: each statistic as 'estimate [lower, upper]'."""
    columns: dict[str, list[str]] = {key: [str(r[key]) for r in release.rows] for key in release.group_by}
    for stat in release.statistics:
        columns[stat.name] = [_cell(r, stat.name) for r in release.rows]
    return pl.DataFrame(columns)


def write_study(root: Path, urls: dict[str, str]) -> Path:
    """The researcher's study config for the demo sites (tokens stay in their files)."""
    lines = ["[study]", 'name = "rare_peds_demo"', f'project = "{PROJECT}"']
    for name, url in urls.items():
        lines += [f"[sites.{name}]", f'url = "{url}"', f'token_file = "{name}/researcher.token"',
                  f'guard_paths = ["{(root / name).resolve()}"]']
    path = root / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve_until_interrupted(study: Path) -> None:
    """Keep the executors up for JupyterLab until Ctrl-C."""
    print(f"\nexecutors keep running. In another terminal:\n  veil kernel install --sys-prefix\n"
          f"  VEIL_STUDY={study.resolve()} jupyter lab   # pick the kernel 'Veil (private data)'\n"
          "Ctrl-C stops the executors.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping the executors")


def run_demo(root: Path, patients: int = 20_000, reset: bool = False, serve: bool = False) -> int:
    """Synthesize (or reuse) three sites, serve them, run the demo queries, print the releases;
    with `serve`, keep the executors up for notebooks until Ctrl-C."""
    from veil.executor.synth import synthesize

    if reset and root.exists():
        shutil.rmtree(root)
    configs = sorted(root.glob("*/site.toml"))
    if not configs:
        print(f"synthesizing 3 sites x ~{patients:,} patients into {root}/ ...", flush=True)
        configs = synthesize(root, sites=3, patients=patients, seed=7)
    tokens = {config.parent.name: _prepare_site(config) for config in configs}
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_fmt_str_lengths(40)
    with ExitStack() as stack:
        clients, urls = {}, {}
        for config in configs:
            executor = stack.enter_context(LocalExecutor(config))
            client = SiteClient(config.parent.name, executor.url, tokens[config.parent.name])
            stack.callback(client.close)
            clients[client.name] = client
            urls[client.name] = executor.url
            print(f"site {client.name:8s} serving on {executor.url} (OpenAPI at {executor.url}/openapi.json)")
        for sql, epsilon in QUERIES:
            print(f"\n=== {sql}\n    epsilon={epsilon} per site, 95% intervals")
            for name, client in clients.items():
                try:
                    release = client.query(sql=sql, epsilon=epsilon)
                except VeilRefusal as exc:
                    print(f"--- {name}: refused: {exc}")
                    continue
                print(f"--- {name}: cost epsilon={release.cost.epsilon:.3f} (rho={release.cost.rho:.4g}), "
                      f"receipt {release.receipt[:16]}")
                print(format_release(release))
        study = write_study(root, urls)
        print("\n=== budgets after the demo (project rare_peds)")
        for name, client in clients.items():
            for g in client.grants():
                print(f"{name:8s} {g.dataset:11s} granted eps={g.epsilon:<4} spent eps={g.epsilon_spent:.3f} "
                      f"remaining rho={g.rho_remaining:.4g}")
        if serve:
            serve_until_interrupted(study)
    print(f"\nexecutors stopped; audit logs: veil audit verify --site-config {configs[0]}")
    return 0
