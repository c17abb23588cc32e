"""Notebooks run top to bottom on the `veil` kernel (nbclient) against three real executors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from kernel_protocol import comm_msgs, execute, iopub_until_idle
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import Deployment, veil_kernel
from veil.local import free_port

COUNT_SQL = "SELECT department, COUNT(*) AS n FROM encounters GROUP BY department"


@pytest.fixture(scope="module")
def kernel_env(sites: dict[str, Deployment], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The kernelspec installed in a temp prefix, and a study config for the three sites."""
    with veil_kernel(tmp_path_factory.mktemp("notebooks"), sites) as root:
        yield root


def run(cells: list[str], path: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    try:
        NotebookClient(nb, kernel_name="veil", timeout=180).execute()
    finally:
        nbformat.write(nb, path)
    return nb


def spent(sites: dict[str, Deployment]) -> dict[str, float]:
    return {name: sum(g.rho_spent for g in d.client().grants()) for name, d in sites.items()}


def test_mock_then_cost_then_live_with_provenance(kernel_env: Path, sites: dict[str, Deployment]) -> None:
    before = spent(sites)
    nb = run([
        "study.mode",
        f"%%veil sql --all --epsilon 0.4\n{COUNT_SQL}",  # the kernel starts in mock mode
        f"%%veil cost\n%%veil sql --all --epsilon 0.4\n{COUNT_SQL}",
    ], kernel_env / "mock.ipynb")
    assert "'mock'" in nb.cells[0].outputs[0]["data"]["text/plain"]
    assert "MOCK" in json.dumps(nb.cells[1].outputs)
    assert spent(sites) == before  # mock and cost runs spent nothing
    predicted = next(o for o in nb.cells[2].outputs if "veil" in o.get("metadata", {}))["metadata"]["veil"]["cost_rho"]

    nb = run(["%veil mode live", f"%%veil sql --all --epsilon 0.4\n{COUNT_SQL}", "%veil budget"],
             kernel_env / "live.ipynb")
    after = spent(sites)
    assert {s: after[s] - before[s] for s in after} == pytest.approx(predicted, rel=1e-9)
    recorded = nb.cells[1].outputs[0]["metadata"]["veil"]["releases"]
    assert {r["site"] for r in recorded} == set(sites) and all(len(r["receipt"]) == 64 for r in recorded)
    check = subprocess.run([sys.executable, "-m", "veil.cli", "receipts", "verify", str(kernel_env / "live.ipynb")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "all 3 recorded releases are confirmed" in check.stdout, check.stdout

    forged = json.loads((kernel_env / "live.ipynb").read_text())
    forged["cells"][1]["outputs"][0]["metadata"]["veil"]["releases"][0]["receipt"] = "ab" * 32
    (kernel_env / "forged.ipynb").write_text(json.dumps(forged))
    bad = subprocess.run([sys.executable, "-m", "veil.cli", "receipts", "verify", str(kernel_env / "forged.ipynb")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "does not know receipt abababab" in bad.stdout


def test_accuracy_on_request_in_magics(kernel_env: Path, sites: dict[str, Deployment]) -> None:
    before = spent(sites)
    sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
    nb = run([f"%%veil cost\n%%veil sql --all --accuracy 30\n{sql}",
              "%veil mode live", f"%%veil sql --site north --accuracy 25\n{sql}"], kernel_env / "accuracy.ipynb")
    cost = json.dumps(nb.cells[0].outputs)
    assert "half_widths" in cost and "17 (95%)" in cost  # 30 over three sites: each at most 30/sqrt(3)
    assert "rho should be" not in cost  # no library warning in the researcher's notebook
    assert spent(sites)["north"] > before["north"] and spent(sites)["central"] == before["central"]
    assert "site north" in nb.cells[2].outputs[0]["data"]["text/html"]


def test_a_refused_cell_fails_the_run(kernel_env: Path, sites: dict[str, Deployment]) -> None:
    before = spent(sites)
    with pytest.raises(CellExecutionError, match="row_level_output"):
        run(["%veil mode live", "%%veil sql --site north --epsilon 0.1\nSELECT * FROM patients"],
            kernel_env / "refused.ipynb")
    with pytest.raises(CellExecutionError, match="VeilPolicyError.*epsilon_above_level"):
        run(["%veil mode live", "study.sites['north'].datasets['patients'].sql("
             "'SELECT COUNT(*) FROM patients').release(rho=5.0)"], kernel_env / "budget.ipynb")
    assert spent(sites) == before


def test_jupyterlab_offers_the_veil_kernel(kernel_env: Path) -> None:
    """A JupyterLab server lists "Veil (private data)" and starts it with `study` loaded."""
    port = free_port()
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                            "--allow-root", "--IdentityProvider.token=t0ken", f"--notebook-dir={kernel_env}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base, headers = f"http://127.0.0.1:{port}", {"Authorization": "token t0ken"}
        for _ in range(300):
            try:
                specs = httpx.get(f"{base}/api/kernelspecs", headers=headers, timeout=2).json()
                break
            except (httpx.HTTPError, ValueError):
                time.sleep(0.2)
        assert specs["kernelspecs"]["veil"]["spec"]["display_name"] == "Veil (private data)"
        kernel = httpx.post(f"{base}/api/kernels", headers=headers, json={"name": "veil"}, timeout=60).json()
        assert kernel["name"] == "veil"
        httpx.delete(f"{base}/api/kernels/{kernel['id']}", headers=headers, timeout=60)
    finally:
        lab.terminate()
        lab.wait(timeout=30)


def test_a_live_release_sends_a_budget_event_on_the_comm(kernel_env: Path) -> None:
    manager, client = start_new_kernel(kernel_name="veil", startup_timeout=60)
    try:
        comm_id = uuid.uuid4().hex
        opened = client.session.msg("comm_open", {"comm_id": comm_id, "target_name": "veil", "data": {}})
        client.shell_channel.send(opened)
        iopub_until_idle(client, opened["header"]["msg_id"])
        _, mock_out = execute(client, f"%%veil sql --site north --epsilon 0.1\n{COUNT_SQL}")
        assert comm_msgs(mock_out, comm_id) == []  # mock releases spend nothing and announce nothing
        execute(client, "%veil mode live")
        reply, out = execute(client, f"%%veil sql --site north --epsilon 0.1\n{COUNT_SQL}")
        assert reply["status"] == "ok"
        [event] = comm_msgs(out, comm_id)
        assert event["type"] == "budget" and event["site"] == "north" and len(event["receipt"]) == 64
        assert event["cost"]["epsilon"] == pytest.approx(0.1, rel=1e-6)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
