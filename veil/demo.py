"""`veil demo`: a complete multi-center study on this machine, in one command.

Three synthetic hospitals (two tertiary, one community) get their data, a state database each and an
executor on loopback; a researcher (project rare_peds), a class project for the privacy tutorial and two
data stewards get tokens, kept in files; the study and steward configs are written; a round of DP
queries shows each site answering. Then JupyterLab opens on the tutorials (`--no-browser` prints its
URL), or the tutorials run headless and their outcome is printed (`--headless`), or the demo stops there
(`--no-lab`, or `--serve` to keep only the executors up). Ctrl-C stops everything. A second run reuses
the state; `--reset` starts afresh. Each site also serves an OMOP CDM (tutorial 5), beside its own data, and
emergency visits for syndromic surveillance (tutorial 6: weekly series from 40 weeks before the first run, with
an outbreak of influenza-like illness at north and central from week 30, DEMO_OUTBREAKS).

`VEIL_DEMO_QUERY_WORKERS=N` sets each site's `[limits] query_workers` (in its site.toml, kept for later
runs) before the executors start: binder/start sets 1, so that three executors, JupyterLab and a kernel
fit in Binder's memory. Unset, the site configs are left as they are (two workers per site by default).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import tomli_w

from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilRefusal
from veil.local import LocalExecutor
from veil.query.estimates import cell_text
from veil.wire import Release

if TYPE_CHECKING:
    from veil.executor.surveillance_data import VisitsSpec

PROJECT, CLASS_PROJECT = "rare_peds", "privacy_class"
STEWARDS = {"ana": "data_center", "ben": "data_committee"}
"""The demo's two stewards and their offices (an L3 application needs one approval from each)."""
GRANTS = {PROJECT: {"encounters": (4.0, ("query",)), "presentations": (8.0, ("query", "training")),
                   "condition_occurrence": (3.0, ("query",)), "cohort_features": (6.0, ("query", "training"))},
          CLASS_PROJECT: {"encounters": (1.0, ("query",))}}
"""project -> dataset -> (epsilon, uses). The OMOP tables (tutorial 5): `person` is L1 (the default grant)."""
TRAINING_DELTA = 1e-4
"""The delta budget of a grant that allows training (DP-SGD's (epsilon, delta), 1e-5 by default per model)."""
QUERIES = [
    ("SELECT sex, COUNT(*) AS patients FROM patients GROUP BY sex", 0.1),
    ("SELECT department, COUNT(*) AS encounters, AVG(crp_mg_l) AS mean_crp FROM encounters "
     "WHERE encounter_date >= DATE '2020-01-01' GROUP BY department", 0.2),
]
"""The probe a demo run makes at each site: small, so that many runs leave the tutorials their budget."""
QUERY_WORKERS_ENV = "VEIL_DEMO_QUERY_WORKERS"
"""Query worker processes per executor, when set (see the module's docstring)."""
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
"""The tutorials, in a source checkout (Binder and `pip install -e .` have one)."""


class DemoError(Exception):
    """A demo that cannot start: the message says why and what to do."""


@dataclass(frozen=True)
class DemoSite:
    name: str
    config: Path
    executor: LocalExecutor
    client: SiteClient


DEMO_OUTBREAKS = (("north", 30, 3.0), ("central", 30, 3.0))
"""The demo's injected ILI outbreaks (tutorial 6): (site, first week, factor), for OUTBREAK_WEEKS weeks each."""


def surveillance_visits() -> VisitsSpec:
    """The demo's emergency visits (tutorial 6): 52 weeks from the Monday 40 weeks before this week's,
    with DEMO_OUTBREAKS at north and central; valley has none."""
    from veil.executor.surveillance_data import Outbreak, VisitsSpec, default_start

    return VisitsSpec(default_start(), outbreaks=tuple(Outbreak(*o) for o in DEMO_OUTBREAKS))


def prepare(root: Path, patients: int, reset: bool) -> list[Path]:
    """The demo's data, tokens, grants and configs under `root` (made once; `reset` starts afresh)."""
    from veil.executor.synth import synthesize

    if reset and root.exists():
        shutil.rmtree(root)
    configs = sorted(root.glob("*/site.toml"))
    if root.exists() and any(root.iterdir()) and not (configs and (root / "study.toml").exists()):
        raise DemoError(f"{root} holds something that is not a complete Veil demo: run again with --reset "
                        "(it deletes that directory), or choose another --dir")
    if not configs:
        print(f"synthesizing 3 hospitals x ~{patients:,} patients into {root}/ ...", flush=True)
        configs = synthesize(root, sites=3, patients=patients, seed=7, tutorial=True, visits=surveillance_visits())
        _add_omop(root, configs, max(500, patients // 2))
        for config in configs:
            _declare_sharing(config)
            _declare_standing_checks(config)
            _tokens_and_grants(config)
        _configs(root, [c.parent.name for c in configs])
    return configs


def _add_omop(root: Path, configs: list[Path], persons: int) -> None:
    """Each demo site also serves an OMOP CDM (tutorial 5): the same three hospitals' CDM tables are
    synthesized, their Parquet files moved beside the site's catalog and their datasets added to it."""
    from veil.executor.omop import synthesize_omop

    staging = root / ".omop"
    synthesize_omop(staging, persons=persons, seed=7)
    for config in configs:
        cdm = staging / config.parent.name
        data = tomllib.loads(config.read_text())
        for name, dataset in tomllib.loads((cdm / "site.toml").read_text())["datasets"].items():
            if name in data["datasets"]:
                raise DemoError(f"the OMOP table {name} clashes with a demo dataset of the same name")
            shutil.move(cdm / dataset["path"], config.parent / dataset["path"])  # paths relative to site.toml
            data["datasets"][name] = dataset
        _write_toml(config, data)
    shutil.rmtree(staging)


DEMO_SHARING = {"patients": "open"}
"""The demo's sharing models (README, "Sharing models"): its L1 patients are open, so that a steward can publish
their statistics sheet; every other dataset stays controlled (the tutorials query them all)."""


def _declare_sharing(config: Path) -> None:
    """Write DEMO_SHARING into a site's catalog."""
    data = tomllib.loads(config.read_text())
    for name, sharing in DEMO_SHARING.items():
        data["datasets"][name]["sharing"] = sharing
    _write_toml(config, data)


STANDING_CHECK_SECONDS = 5
"""How often a demo site releases its standing queries' due windows (60 s by default): tutorial 6 files one, and
the weeks already closed are released within seconds of its approval."""


def _declare_standing_checks(config: Path) -> None:
    """Write STANDING_CHECK_SECONDS into a site's catalog."""
    data = tomllib.loads(config.read_text())
    data["site"]["standing_check_seconds"] = STANDING_CHECK_SECONDS
    _write_toml(config, data)


def _tokens_and_grants(config: Path) -> None:
    """A site's tokens (files beside its catalog) and the grants its stewards made for the demo."""
    from veil.executor import ledger
    from veil.executor.auth import create_token
    from veil.executor.catalog import load_catalog
    from veil.executor.store import open_store, write

    catalog = load_catalog(config)
    engine = open_store(catalog.database_url)
    ledger.sync_caps(engine, catalog)
    files = {"researcher": create_token(engine, "dr_demo", "researcher", PROJECT),
             "class": create_token(engine, "student", "researcher", CLASS_PROJECT)}
    for name, office in STEWARDS.items():
        files[f"steward_{name}"] = create_token(engine, f"steward_{name}", "steward", None, office)
    with write(engine) as conn:
        for project, grants in GRANTS.items():
            for dataset, (epsilon, uses) in grants.items():
                ledger.set_grant(conn, catalog, project, catalog.dataset(dataset), epsilon, by="steward_ana",
                                 uses=uses, delta=TRAINING_DELTA if "training" in uses else None)
    engine.dispose()
    for name, token in files.items():
        path = config.parent / f"{name}.token"
        path.write_text(token + "\n")
        path.chmod(0o600)


def _configs(root: Path, sites: list[str]) -> None:
    """study.toml (rare_peds), class.toml (the privacy tutorial) and steward.toml (the lab's desk)."""
    for file, name, project, token in (("study.toml", "rare_peds_demo", PROJECT, "researcher"),
                                       ("class.toml", "privacy_class", CLASS_PROJECT, "class")):
        _write_toml(root / file, {
            "study": {"name": name, "project": project, "default_epsilon": 0.2},
            "sites": {site: {"url": "http://127.0.0.1:0", "token_file": f"{site}/{token}.token",
                             "guard_paths": [str((root / site).resolve())]} for site in sites},
        })
    _write_toml(root / "steward.toml", {"sites": {
        site: {"url": "http://127.0.0.1:0", "token_file": f"{site}/steward_ana.token"} for site in sites}})


def set_query_workers(configs: list[Path], workers: str | None) -> None:
    """Write `[limits] query_workers = workers` into each site.toml (`workers` from the environment:
    None leaves them as they are)."""
    if workers is None or not workers.strip():
        return
    try:
        count = int(workers)
    except ValueError:
        count = 0
    if not 1 <= count <= 64:
        raise DemoError(f"{QUERY_WORKERS_ENV}={workers!r}: give a number of query workers per site, 1 to 64")
    for config in configs:
        data = tomllib.loads(config.read_text())
        if data.get("limits", {}).get("query_workers") != count:
            data.setdefault("limits", {})["query_workers"] = count
            _write_toml(config, data)


def _point_configs(root: Path, urls: dict[str, str]) -> None:
    """Write the executors' current URLs into the demo's configs (their ports change between runs)."""
    for file in ("study.toml", "class.toml", "steward.toml"):
        path = root / file
        config = tomllib.loads(path.read_text())
        for site, url in urls.items():
            if site in config.get("sites", {}):
                config["sites"][site]["url"] = url
        _write_toml(path, config)


def _write_toml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(tomli_w.dumps(data))


def environment(root: Path) -> dict[str, str]:
    """What the kernel and the Jupyter server need to find the demo's study."""
    return {"VEIL_STUDY": str((root / "study.toml").resolve()), "VEIL_STEWARD": str((root / "steward.toml").resolve()),
            "VEIL_DEMO_DIR": str(root.resolve())}


def format_release(release: Release) -> pl.DataFrame:
    """A release as a table: each statistic as 'estimate [lower, upper]'."""
    columns: dict[str, list[str]] = {key: [str(r[key]) for r in release.rows] for key in release.group_by}
    for stat in release.statistics:
        columns[stat.name] = [cell_text(r, stat.name, digits=1) for r in release.rows]
    return pl.DataFrame(columns)


def probe(sites: list[DemoSite]) -> None:
    """One round of DP queries at every site: each executor answers, each release printed."""
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_fmt_str_lengths(40)
    for sql, epsilon in QUERIES:
        print(f"\n=== {sql}\n    epsilon={epsilon} per site, 95% intervals")
        for site in sites:
            try:
                release = site.client.query(sql=sql, epsilon=epsilon)
            except VeilRefusal as exc:
                print(f"--- {site.name}: refused: {exc}")
                continue
            print(f"--- {site.name}: cost epsilon={release.cost.epsilon:.3f} (rho={release.cost.rho:.4g}), "
                  f"receipt {release.receipt[:16]}")
            print(format_release(release))


def _jupyter_ready() -> None:
    """Refuse early, with what to do, when JupyterLab or the built extension is missing."""
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None and shutil.which("jupyter-lab") is None:
        raise DemoError("JupyterLab is not installed here: pip install 'veil[lab]' (or run scripts/setup.sh)")
    labext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "veil-lab"
    if not labext.exists():
        print(f"note: the Veil lab extension is not in {labext.parent} (scripts/setup.sh builds it); JupyterLab "
              "opens without the budget bar and the panels", flush=True)


def _kernelspec() -> None:
    """Install the `veil` kernelspec into this environment if Jupyter does not know it yet."""
    from jupyter_client.kernelspec import KernelSpecManager

    from veil.kernel.install import install_kernelspec

    if "veil" not in KernelSpecManager().find_kernel_specs():
        print(f"installing the 'veil' kernel into {install_kernelspec(sys_prefix=True)}", flush=True)


def _free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(f"port {port} is in use (another JupyterLab?): pass --port with a free one") from None


def tutorials(root: Path, source: Path = NOTEBOOKS) -> Path:
    """The demo's copy of the tutorial notebooks (made once, so that runs never touch the originals)."""
    target = root / "notebooks"
    if not target.exists():
        if not source.is_dir():
            raise DemoError(f"no tutorials at {source}: run the demo from a Veil source checkout")
        shutil.copytree(source, target)
    return target


def run_headless(root: Path, env: dict[str, str], timeout: int = 900) -> int:
    """Execute every tutorial on the `veil` kernel; print each outcome; 0 when all pass."""
    from veil.tutorials import run_notebooks

    os.environ.update(env)
    return 1 if run_notebooks(sorted(tutorials(root).glob("*.ipynb")), timeout) else 0


def run_lab(root: Path, env: dict[str, str], port: int, browser: bool) -> int:
    """JupyterLab on the tutorials until Ctrl-C (it stops with the executors)."""
    command = [sys.executable, "-m", "jupyterlab", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.root_dir={tutorials(root)}"] + ([] if browser else ["--no-browser"])
    if os.geteuid() == 0:
        command.append("--allow-root")
    lab = subprocess.Popen(command, env={**os.environ, **env})
    print(f"JupyterLab starts on http://127.0.0.1:{port}/lab (its token is in the log above); Ctrl-C stops "
          "JupyterLab and the executors", flush=True)
    try:
        return lab.wait()
    except KeyboardInterrupt:
        lab.terminate()
        lab.wait(timeout=30)
        return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_demo(root: Path, patients: int = 20_000, reset: bool = False, lab: str = "none", port: int = 8888,
             serve: bool = False) -> int:
    """The demo: state prepared, executors up, one round of queries; then `lab` is 'browser',
    'no-browser', 'headless' or 'none' (`serve` keeps the executors up until Ctrl-C)."""
    if lab in ("browser", "no-browser", "headless"):
        _jupyter_ready()
    if lab in ("browser", "no-browser"):
        _free(port)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated demo stops its executors as Ctrl-C does
    configs = prepare(root, patients, reset)
    set_query_workers(configs, os.environ.get(QUERY_WORKERS_ENV))
    with ExitStack() as stack:
        sites = []
        for config in configs:
            executor = stack.enter_context(LocalExecutor(config))
            token = (config.parent / "researcher.token").read_text().strip()
            client = stack.enter_context(SiteClient(config.parent.name, executor.url, token))
            sites.append(DemoSite(config.parent.name, config, executor, client))
            print(f"site {client.name:8s} serving on {executor.url} (OpenAPI at {executor.url}/openapi.json)")
        _point_configs(root, {s.name: s.executor.url for s in sites})
        probe(sites)
        env = environment(root)
        if lab != "none":
            _kernelspec()
        if lab == "headless":
            return run_headless(root, env)
        if lab in ("browser", "no-browser"):
            return run_lab(root, env, port, browser=lab == "browser")
        if serve:
            print("\nexecutors keep running; in another terminal:\n  " + " ".join(f"{k}={v}" for k, v in env.items())
                  + " jupyter lab   # kernel 'Veil (private data)'\nCtrl-C stops them.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("\nstopping the executors")
    print(f"\nexecutors stopped; audit logs: veil audit verify --site-config {configs[0]}")
    return 0
