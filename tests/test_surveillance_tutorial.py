"""Tutorial 6 (notebooks/06-surveillance.ipynb) runs top to bottom on the `veil` kernel against the demo's three
executors, as `veil demo --headless` runs it: the standing query is filed and approved at each site, charged once,
the closed weeks are released, and the outbreak the demo injected at north and central from week 30 is flagged
there. A second run files nothing again and charges nothing more."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from demo_sites import demo_kernel_sites

from veil.demo import DEMO_OUTBREAKS, NOTEBOOKS, PROJECT, prepare
from veil.executor.catalog import load_catalog
from veil.executor.store import open_store
from veil.tutorials import run_notebooks

TUTORIAL = "06-surveillance.ipynb"
PROBE = """import json as _json
print("PROBE" + _json.dumps({
    "flagged": s.alarms().filter(pl.col("window").is_between(30, 31))["region"].unique().to_list(),
    "regions": s.table["region"].unique().to_list(),
    "released": {site: i.windows_released for site, i in infos().items()},
    "closed": closed_weeks(),
    "rho": {site: i.rho for site, i in infos().items()}}))"""
"""Appended to the test's copy of the tutorial: what it found, read back from its output."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo's data and configs (3,000 patients per site, as `veil demo --headless` is tested), its executors
    running, the `veil` kernelspec installed and the environment the kernel reads; yields the demo's root."""
    root = tmp_path_factory.mktemp("surveillance-tutorial")
    configs = prepare(root / "demo", patients=3000, reset=False)
    with demo_kernel_sites(root, configs):
        yield root / "demo"


def run_tutorial(demo: Path, name: str) -> dict:
    """Run a copy of the tutorial with the probe appended (as `veil demo --headless` runs it); what the probe saw."""
    work = demo / name
    work.mkdir()
    shutil.copy(NOTEBOOKS / TUTORIAL, work / TUTORIAL)
    nb = nbformat.read(work / TUTORIAL, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    nbformat.write(nb, work / TUTORIAL)
    assert run_notebooks([work / TUTORIAL], timeout=600) == 0
    executed = nbformat.read(work / TUTORIAL, as_version=4)
    printed = "".join(o.get("text", "") for o in executed.cells[-1].outputs)
    return json.loads(printed.split("PROBE", 1)[1])


def standing_charges(demo: Path) -> dict[str, list[tuple[str, float]]]:
    """Each site's audit entries of action `standing` (the up-front charges): (project, rho)."""
    out = {}
    for config in sorted(demo.glob("*/site.toml")):
        engine = open_store(load_catalog(config).database_url)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT project, rho FROM audit WHERE action = 'standing'").all()
        engine.dispose()
        out[config.parent.name] = [(r[0], r[1]) for r in rows]
    return out


def test_tutorial_6_files_the_standing_query_and_flags_the_injected_outbreak(demo: Path) -> None:
    found = run_tutorial(demo, "first")
    assert found["closed"] >= 31 and all(n == found["closed"] for n in found["released"].values()), found
    outbreak_sites = {site for site, week, _ in DEMO_OUTBREAKS if week == 30}
    assert outbreak_sites == {"north", "central"}
    hit = [r for r in found["regions"] if r.split("_")[0] in outbreak_sites]
    quiet = [r for r in found["regions"] if r.split("_")[0] not in outbreak_sites]
    assert len(hit) == 11 and len(quiet) == 4
    # each region's rise is several times the rule's margin: flagged in week 30 or 31 (missed in < 1% of runs)
    assert len(set(found["flagged"]) & set(hit)) >= len(hit) - 1, found["flagged"]
    # valley had no outbreak: a region is flagged there by noise or the season in about 2.5% of runs
    assert len(set(found["flagged"]) & set(quiet)) <= 1, found["flagged"]
    charges = standing_charges(demo)
    assert all(len(c) == 1 and c[0][0] == PROJECT and c[0][1] == pytest.approx(found["rho"][site])
               for site, c in charges.items()), charges

    again = run_tutorial(demo, "second")  # the query is standing: nothing is filed or charged again
    assert again["released"] == found["released"] and standing_charges(demo) == charges
