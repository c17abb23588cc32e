"""Mock mode runs in the researcher's process on the shared query core alone: no executor code, no
database, no child process, and none of OpenDP's process-wide switches beyond the library's "contrib"."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import multiprocessing, sys
    import veil.kernel, veil.kernel.kernel, veil.kernel.magics
    from veil.kernel.mock import MockSite
    from veil.wire import ColumnInfo, DatasetInfo, Pricing, QuerySpec, Aggregate
    info = DatasetInfo(name="visits", title="Visits", description="", level="L2", privacy_unit="patient_id",
                       max_rows_per_unit=3, max_rows=10_000,
                       columns=[ColumnInfo(name="patient_id", dtype="Int64"),
                                ColumnInfo(name="age", dtype="Int64", bounds=(0, 100)),
                                ColumnInfo(name="ward", dtype="String", categories=["a", "b"])],
                       pricing=Pricing(reporting_delta=1e-6, max_epsilon_per_release=1.0, min_group_threshold=10))
    site = MockSite("north", [info])
    spec = QuerySpec(dataset="visits", aggregates=[Aggregate(fn="count"), Aggregate(fn="mean", column="age")],
                     group_by=["ward"])
    release = site.query(spec, epsilon=0.5)
    assert [r["ward"] for r in release.rows] == ["a", "b"], release.rows
    assert abs(release.cost.epsilon - 0.5) < 1e-6 and release.cost.epsilon_delta == 1e-6
    try:
        site.query(spec, epsilon=2.0)
    except Exception as exc:
        assert getattr(exc, "code", None) == "epsilon_above_level", exc
    else:
        raise AssertionError("the level's ceiling was not applied in mock mode")
    from opendp.mod import GLOBAL_FEATURES
    heavy = sorted(m for m in ("torch", "flwr", "fastapi", "uvicorn", "sqlalchemy", "opacus", "ray", "jax")
                   if m in sys.modules)
    print("executor:", sorted(m for m in sys.modules if m.startswith("veil.executor")))
    print("heavy:", heavy)
    print("children:", multiprocessing.active_children())
    print("features:", sorted(GLOBAL_FEATURES))
''')


def test_mock_mode_needs_no_executor_database_child_or_switch() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    assert lines["executor"] == "[]"
    assert lines["heavy"] == "[]"
    assert lines["children"] == "[]"
    assert lines["features"] == "['contrib']"
