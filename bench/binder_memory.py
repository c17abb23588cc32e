"""Memory of a Binder session: the demo's executors, JupyterLab and a `veil` kernel, summed over processes.

    bash binder/start python bench/binder_memory.py --tutorials notebooks/*.ipynb  # a Binder session, emulated
    python bench/binder_memory.py --user        # beside a running demo (VEIL_STUDY set): all my processes
    python bench/binder_memory.py --user --snapshot   # in a Binder session's terminal: what it takes now

Binder gives a session about 2 GB of memory in all. This script starts JupyterLab (as Binder does after
binder/start), asks it for a kernel "Veil (private data)", runs tutorial 1's code cells in that kernel and
calls the lab extension's server routes once, then reads every process under `--root` (default: this
process and its children; `--user`: every process of this user, as in a Binder container) from /proc:
PSS from /proc/PID/smaps_rollup (a page shared by N processes, like a forkserver's with its query
workers, counts 1/N in each: the sum is what the processes take together) and RSS (which counts shared
pages once per process, so its sum overstates). With `--tutorials`, it then runs those notebooks
(nbclient, each on its own `veil` kernel, as a student opening them one by one while tutorial 1's kernel
stays up) and samples the total every half second for the peak. This script's own process is left out
of every figure (JupyterLab and the kernels it starts are counted).

binder/start starts the demo in the background and then `exec`s its command, so run under it this
script is the demo's parent and the default root covers the whole session. The demo keeps running after
this script ends (on Binder, the container ends it): stop it with `kill` on the `veil demo` process, which
stops its executors. Prints a table and writes JSON with `--json`; `--max-mib` fails (exit 2) when the
PSS total after tutorial 1 is above it. On a 2-core machine it takes about a minute, plus the tutorials.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


# ---- /proc ---------------------------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def pids_under(root: int) -> list[int]:
    """`root` and all its descendants (by parent PID, so new sessions and process groups are included)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(int(entry))
            if parent is not None:
                children[parent].append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pids_of_user() -> list[int]:
    uid = os.getuid()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _uid(int(e)) == uid]


def _uid(pid: int) -> int | None:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def memory(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) in bytes; PSS falls back to RSS where smaps_rollup is not readable; None if gone."""
    rss = 0
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    if not rss:
        return None  # gone, or a kernel thread
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024, rss
    return rss, rss


def cmdline(pid: int) -> list[str]:
    return [a for a in _read(f"/proc/{pid}/cmdline").split("\0") if a]


def classify(pids: list[int]) -> list[dict[str, Any]]:
    """Each process with its role: executor (per site), its forkserver, resource tracker and query workers,
    the demo, JupyterLab, kernels, anything else."""
    args = {pid: cmdline(pid) for pid in pids}
    parents = {pid: _ppid(pid) for pid in pids}
    site_of: dict[int, str] = {}
    for pid, a in args.items():
        if "executor" in a and "serve" in a and "--site-config" in a:
            site_of[pid] = Path(a[a.index("--site-config") + 1]).parent.name

    def site(pid: int | None) -> str | None:
        while pid is not None and pid in parents:
            if pid in site_of:
                return site_of[pid]
            pid = parents[pid]
        return None

    rows = []
    for pid in pids:
        if pid == os.getpid():
            continue  # this script is the measurement, not part of a Binder session
        sizes = memory(pid)
        if sizes is None:
            continue
        a, text = args[pid], " ".join(args[pid])
        where = site(pid)
        if pid in site_of:
            role = "executor"
        elif "multiprocessing.forkserver" in text:
            role = "query worker" if "multiprocessing.forkserver" in " ".join(args.get(parents[pid] or 0, [])) \
                else "forkserver"
        elif "multiprocessing.resource_tracker" in text:
            role = "resource tracker"
        elif where is not None:
            role = "executor child"
        elif "demo" in a and any(x.endswith("veil") or x == "veil.cli" for x in a):
            role = "veil demo"
        elif any("jupyter-lab" in x or x == "jupyterlab" or "jupyter_lab" in x for x in a):
            role = "JupyterLab"
        elif "-f" in a and any("veil.kernel" in x or "ipykernel" in x for x in a):
            role = "kernel"
        else:
            role = "other: " + (Path(a[0]).name if a else "?") + (" " + a[1][:40] if len(a) > 1 else "")
        rows.append({"pid": pid, "site": where, "role": role, "pss": sizes[0], "rss": sizes[1]})
    return rows


def group(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """PSS, RSS and process count per group: each site's executor tree, JupyterLab, kernels, the rest."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"pss": 0, "rss": 0, "processes": 0})
    for r in rows:
        name = f"executor {r['site']} ({r['role']})" if r["site"] else r["role"]
        g = groups[name]
        g["pss"] += r["pss"]
        g["rss"] += r["rss"]
        g["processes"] += 1
    return dict(sorted(groups.items()))


def snapshot(root: int | None) -> dict[str, Any]:
    rows = classify(pids_of_user() if root is None else pids_under(root))
    sites: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["site"]:
            sites[r["site"]] += r["pss"]
    return {"pss": sum(r["pss"] for r in rows), "rss": sum(r["rss"] for r in rows), "processes": len(rows),
            "per_site_pss": dict(sorted(sites.items())), "groups": group(rows), "rows": rows}


def table(snap: dict[str, Any]) -> str:
    lines = [f"{'group':44s} {'procs':>5s} {'PSS MiB':>8s} {'RSS MiB':>8s}"]
    for name, g in snap["groups"].items():
        lines.append(f"{name:44s} {g['processes']:5d} {g['pss'] / MIB:8.0f} {g['rss'] / MIB:8.0f}")
    for site, pss in snap["per_site_pss"].items():
        lines.append(f"{'= executor ' + site + ', whole tree':44s} {'':5s} {pss / MIB:8.0f}")
    lines.append(f"{'TOTAL':44s} {snap['processes']:5d} {snap['pss'] / MIB:8.0f} {snap['rss'] / MIB:8.0f}")
    return "\n".join(lines)


# ---- JupyterLab and a kernel in it -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_lab(root_dir: Path, runtime: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(runtime / "jupyterlab.log", "wb")  # noqa: SIM115 (kept open for the server's life)
    lab = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if lab.poll() is not None:
            raise RuntimeError(f"JupyterLab exited: {(runtime / 'jupyterlab.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/status", headers={"Authorization": f"token {token}"}, timeout=2).status_code == 200:
                return lab, url, token
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    lab.terminate()
    raise RuntimeError("JupyterLab did not answer within 180 s")


def run_in_lab_kernel(url: str, token: str, runtime: Path, notebook: Path) -> str:
    """Start a `veil` kernel through JupyterLab's REST API (as opening the notebook does) and run the
    notebook's code cells in it; return the kernel's id (it keeps running)."""
    import nbformat
    from jupyter_client.blocking.client import BlockingKernelClient

    headers = {"Authorization": f"token {token}"}
    kernel = httpx.post(f"{url}/api/kernels", json={"name": "veil", "path": str(notebook.parent)},
                        headers=headers, timeout=120).raise_for_status().json()
    connection = runtime / f"kernel-{kernel['id']}.json"
    for _ in range(600):
        if connection.exists():
            break
        time.sleep(0.1)
    client = BlockingKernelClient()
    client.load_connection_file(str(connection))
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        client.execute_interactive(f"import os; os.chdir({str(notebook.parent)!r})", timeout=60,
                                   output_hook=lambda _: None)
        for index, cell in enumerate(nbformat.read(notebook, as_version=4).cells):
            if cell.cell_type != "code":
                continue
            reply = client.execute_interactive(cell.source, timeout=600, output_hook=lambda _: None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"{notebook.name} cell {index} failed: {reply['content'].get('ename')}: "
                                   f"{reply['content'].get('evalue')}")
    finally:
        client.stop_channels()
    for route in ("budget", "datasets", "steward/budgets"):  # the extension's panels ask these on their own
        httpx.get(f"{url}/veil/api/{route}", headers=headers, timeout=120)
    return str(kernel["id"])


class Sampler(threading.Thread):
    """The PSS total every `interval` seconds; `peak` keeps the largest snapshot."""

    def __init__(self, root: int | None, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.peak = root, interval, {"pss": 0}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            snap = snapshot(self.root)
            if snap["pss"] > self.peak["pss"]:
                self.peak = snap
            self.halt.wait(self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--root", type=int, help="measure this process and its descendants (default: this one)")
    scope.add_argument("--user", action="store_true", help="measure every process of this user")
    parser.add_argument("--notebook", type=Path, default=REPO / "notebooks" / "01-getting-started.ipynb",
                        help="run in the lab's kernel before measuring (default: tutorial 1)")
    parser.add_argument("--tutorials", type=Path, nargs="*", default=[],
                        help="then run these notebooks (nbclient) and report the peak total")
    parser.add_argument("--snapshot", action="store_true",
                        help="only measure what runs now (no JupyterLab, no tutorial): in a Binder terminal, with --user")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before the snapshot")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--max-mib", type=float, help="exit 2 when the PSS total after tutorial 1 is above this")
    args = parser.parse_args(argv)
    root = None if args.user else (args.root or os.getpid())
    if args.snapshot:
        now = snapshot(root)
        print(f"now: {now['pss'] / MIB:.0f} MiB PSS in {now['processes']} processes\n" + table(now), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"snapshot": now}, indent=1))
        return 0
    if not os.environ.get("VEIL_STUDY"):
        parser.error("no running demo: run under binder/start, or set VEIL_STUDY (veil demo --serve prints it)")

    result: dict[str, Any] = {}
    failures = 0
    with tempfile.TemporaryDirectory(prefix="veil-binder-memory-") as tmp:
        runtime = Path(tmp)
        before = snapshot(root)
        print(f"before JupyterLab: {before['pss'] / MIB:.0f} MiB PSS in {before['processes']} processes\n"
              + table(before), flush=True)
        lab, url, token = start_lab(args.notebook.resolve().parent, runtime)
        try:
            started = time.perf_counter()
            run_in_lab_kernel(url, token, runtime, args.notebook.resolve())
            print(f"\n{args.notebook.name} ran in JupyterLab's veil kernel ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            time.sleep(args.settle)
            steady = snapshot(root)
            print(f"\nafter {args.notebook.name}, its kernel still up: {steady['pss'] / MIB:.0f} MiB PSS "
                  f"({steady['rss'] / MIB:.0f} MiB RSS summed)\n" + table(steady), flush=True)
            result = {"before_lab": before, "after_tutorial_1": steady}
            if args.tutorials:
                from veil.tutorials import run_notebooks

                sampler = Sampler(root)
                sampler.start()
                try:
                    failures = run_notebooks(sorted(args.tutorials), save=False)
                finally:
                    sampler.halt.set()
                    sampler.join()
                peak = sampler.peak
                print(f"\npeak while running {len(args.tutorials)} tutorials: {peak['pss'] / MIB:.0f} MiB PSS\n"
                      + table(peak), flush=True)
                result["peak_tutorials"] = peak
        finally:
            lab.terminate()
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    total = result["after_tutorial_1"]["pss"] / MIB
    if args.max_mib is not None and total > args.max_mib:
        print(f"FAIL: {total:.0f} MiB PSS after tutorial 1, above {args.max_mib:.0f} MiB", flush=True)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
