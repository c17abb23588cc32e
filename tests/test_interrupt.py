"""Interrupting releases: a site charges a query only while its client still wants it.

Three real executors. At the HTTP level: a cancel that comes first leaves a tombstone that refuses the
request; a cancel that comes after the charge gets the release back; a retry with the same request id is
the same release, charged once. In a real `veil` kernel: a three-site cell with one site frozen (SIGSTOP:
a site that accepts connections and answers nothing) is interrupted; the two sites that released are kept,
shown and announced, the frozen one is charged nothing once it wakes, and every audit chain verifies.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from kernel_protocol import TIMEOUT, execute, iopub_until_idle

from conftest import Deployment, veil_kernel
from veil.executor import audit

QUERY = {"sql": "SELECT COUNT(*) AS n FROM patients", "epsilon": 0.05}


def new_id() -> str:
    return uuid.uuid4().hex


def test_a_cancel_that_comes_first_refuses_the_request(sites: dict[str, Deployment]) -> None:
    d = sites["north"]
    before = d.spent("patients")
    request_id = new_id()
    with d.http() as http:
        cancel = http.post(f"/query/{request_id}/cancel")
        assert cancel.status_code == 200 and cancel.json()["outcome"] == "cancelled"
        late = http.post("/query", json={**QUERY, "request_id": request_id})
    assert late.status_code == 409 and late.json()["code"] == "request_cancelled"
    assert "nothing was charged" in late.json()["message"] and late.json()["receipt"]
    assert d.spent("patients") == before
    assert audit.verify(d.engine).ok


def test_a_cancel_after_the_charge_returns_the_release_and_a_retry_is_charged_once(
        sites: dict[str, Deployment]) -> None:
    d = sites["north"]
    request_id = new_id()
    with d.http() as http:
        released = http.post("/query", json={**QUERY, "request_id": request_id}).json()
        charged = d.spent("patients")
        cancel = http.post(f"/query/{request_id}/cancel").json()
        retry = http.post("/query", json={**QUERY, "request_id": request_id}).json()
        other = httpx.post(f"{d.url}/query/{request_id}/cancel",
                           headers={"Authorization": f"Bearer {d.tokens['outsider']}"}).json()
    assert cancel["outcome"] == "released" and cancel["release"]["receipt"] == released["receipt"]
    assert retry["receipt"] == released["receipt"] and d.spent("patients") == charged
    assert other["outcome"] == "cancelled"  # another project's id space: study1's release is not theirs
    grant = released["grant"]  # the grant just after this release, as the site computed it
    assert grant["epsilon_granted"] == 20.0 and grant["rho_granted"] - grant["rho"] == pytest.approx(charged["rho"])


def test_a_request_refused_before_its_charge_may_be_sent_again_with_its_id(sites: dict[str, Deployment]) -> None:
    d, request_id = sites["north"], new_id()
    with d.http() as http:
        refused = http.post("/query", json={"sql": "SELECT COUNT(*) FROM patients WHERE nonesuch = 1",
                                            "epsilon": 0.05, "request_id": request_id})
        assert refused.status_code == 400, refused.text
        spent = d.spent("patients")["rho"]
        again = http.post("/query", json={**QUERY, "request_id": request_id})
        assert again.status_code == 200, again.text
        retry = http.post("/query", json={**QUERY, "request_id": request_id})
    assert retry.json()["receipt"] == again.json()["receipt"]
    assert d.spent("patients")["rho"] == spent + again.json()["cost"]["rho"]  # charged once


def test_request_ids_are_checked(sites: dict[str, Deployment]) -> None:
    with sites["north"].http() as http:
        assert http.post("/query", json={**QUERY, "request_id": "short"}).status_code == 422
        assert http.post("/query/not%20an%20id!/cancel").status_code == 422


@pytest.fixture
def live_kernel(sites: dict[str, Deployment], tmp_path: Path) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    with veil_kernel(tmp_path, sites):
        km, kc = start_new_kernel(kernel_name="veil", startup_timeout=TIMEOUT)
    try:
        reply, _ = execute(kc, "%veil mode live")
        assert reply["status"] == "ok"
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_interrupting_a_cell_while_a_site_hangs(sites: dict[str, Deployment],
                                                live_kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
    km, kc = live_kernel
    reply, _ = execute(kc, "ds = study.dataset('patients')")  # the sites' metadata, before one freezes
    assert reply["status"] == "ok"
    frozen = sites["valley"]
    before = {name: d.spent("patients")["rho"] for name, d in sites.items()}
    process = frozen.executor.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        msg_id = kc.execute("r = ds.sql('SELECT COUNT(*) AS n FROM patients').release(epsilon=0.05)")
        deadline = time.monotonic() + 60
        while any(sites[n].spent("patients")["rho"] == before[n] for n in ("north", "central")):
            assert time.monotonic() < deadline, "north and central never released"
            time.sleep(0.1)
        time.sleep(0.3)
        started = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=TIMEOUT)
        answered = time.monotonic() - started
        outputs = iopub_until_idle(kc, msg_id)
    finally:
        process.send_signal(signal.SIGCONT)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "VeilInterrupted"
    assert answered < 10, f"the interrupt took {answered:.1f} s"
    shown = [o["content"]["metadata"]["veil"]["releases"][0]["site"] for o in outputs
             if o["msg_type"] == "display_data" and "veil" in o["content"]["metadata"]]
    assert shown == ["north", "central"]  # the completed releases are displayed (and recorded) above the error
    error = next(o["content"] for o in outputs if o["msg_type"] == "error")
    assert len(error["traceback"]) == 1 and "site 'valley' did not confirm the cancel" in error["traceback"][0]
    for name in ("north", "central"):
        assert sites[name].spent("patients")["rho"] > before[name]
    time.sleep(3)  # the site wakes up, finds the request's client gone, and charges nothing
    assert frozen.spent("patients")["rho"] == before["valley"]
    for d in sites.values():
        assert audit.verify(d.engine).ok
    reply, outputs = execute(kc, "print(study.sites['valley'].budget()[0].dataset)")
    assert reply["status"] == "ok"  # the kernel and the woken site carry on
