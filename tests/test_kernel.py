"""The Veil kernel over the Jupyter protocol: jupyter_kernel_test's suite, `study`, the guard, the comm.

The kernelspec is installed with `veil kernel install --prefix TMP` and found through JUPYTER_PATH; the
study config names sites at unreachable dummy URLs (nothing here needs an executor).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jupyter_kernel_test
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from kernel_protocol import comm_msgs, execute, iopub_until_idle

import veil

TIMEOUT = 30
STUDY = """\
[study]
name = "rare_peds_test"
project = "rare_peds"
[sites.north]
url = "http://127.0.0.1:9"
token_file = "north.token"
guard_paths = ["{served}"]
[sites.south]
url = "http://127.0.0.1:9"
token_file = "tokens/south.token"
"""


@pytest.fixture(scope="module", autouse=True)
def veil_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The kernelspec in a temp prefix and a study config, in the environment kernels start with."""
    root = tmp_path_factory.mktemp("veil-kernel")
    done = subprocess.run([sys.executable, "-m", "veil.cli", "kernel", "install", "--prefix", str(root / "prefix")],
                          capture_output=True, text=True, check=True)
    spec_dir = root / "prefix" / "share" / "jupyter" / "kernels" / "veil"
    assert str(spec_dir) in done.stdout and (spec_dir / "kernel.json").is_file()
    served = root / "served"
    served.mkdir()
    (served / "secret.parquet").write_bytes(b"PAR1 rows only an executor may read")
    (root / "tokens").mkdir()
    (root / "north.token").write_text("veil_00000000000000aa_fake\n")
    (root / "tokens" / "south.token").write_text("veil_00000000000000bb_fake\n")
    (root / "study.toml").write_text(STUDY.format(served=served))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "prefix" / "share" / "jupyter"))
        mp.setenv("VEIL_STUDY", str(root / "study.toml"))
        mp.setenv("IPYTHONDIR", str(root / "ipython"))  # the kernels' history stays out of ~/.ipython
        yield root


class VeilKernelTests(jupyter_kernel_test.KernelTests):
    """The standard protocol suite, run against kernel `veil`."""

    kernel_name = "veil"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('oops', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}, {"text": "stud", "matches": {"study"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "print?"
    code_generate_error = "raise"
    code_execute_result = [{"code": "1+2+3", "result": "6"}, {"code": "[n * n for n in range(1, 4)]",
                                                             "result": "[1, 4, 9]"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>veil</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math(r'\\frac{1}{2}'))", "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "range", "search")
    code_inspect_sample = "print"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


class VeilIopubWelcomeTests(jupyter_kernel_test.IopubWelcomeTests):
    """ipykernel 7 greets each iopub subscriber (JEP 65); the Veil kernel keeps that."""

    kernel_name = "veil"
    support_iopub_welcome = True

    def test_recv_iopub_welcome_msg(self) -> None:
        """The welcome arrives, and nothing but output a kernel flushed while the client subscribed comes before it
        (ipykernel's iopub thread greets on the subscription event, and a stream flushed at that moment can win
        the race: seen once under CI load)."""
        self.kc.start_channels()
        while True:
            msg = self.kc.get_iopub_msg(timeout=30)
            if msg["header"]["msg_type"] == "stream":
                continue
            self.assertEqual(msg["header"]["msg_type"], "iopub_welcome")
            self.assertEqual(msg["content"]["subscription"], "")  # empty topic: subscribed to all
            break


def stdout(outputs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


@pytest.fixture(scope="class")
def kernel(veil_env: Path) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km, kc = start_new_kernel(kernel_name="veil", startup_timeout=TIMEOUT)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


class TestVeilKernel:
    """One kernel for these (they share its state): the study, the guard, the comm."""

    def test_spec_and_info(self, veil_env: Path, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        km, kc = kernel
        assert Path(km.kernel_spec.resource_dir) == veil_env / "prefix" / "share" / "jupyter" / "kernels" / "veil"
        assert km.kernel_spec.display_name == "Veil (private data)"
        assert "env" not in km.kernel_spec.to_dict() or not km.kernel_spec.env
        kc.kernel_info()
        info = kc.get_shell_msg(timeout=TIMEOUT)["content"]
        assert info["implementation"] == "veil" and info["implementation_version"] == veil.__version__
        assert info["language_info"]["name"] == "python"
        assert "Veil" in info["banner"] and "rare_peds_test" in info["banner"]

    def test_study_in_namespace(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        reply, out = execute(kernel[1], "print(study.name, study.project, sorted(study.sites))")
        assert reply["status"] == "ok"
        assert stdout(out).strip() == "rare_peds_test rare_peds ['north', 'south']"

    def test_magics_registered(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        reply, out = execute(kernel[1], "ip = get_ipython(); print(ip.find_line_magic('veil') is not None, "
                                        "ip.find_cell_magic('veil') is not None)")
        assert reply["status"] == "ok" and stdout(out).strip() == "True True"

    def test_magic_usage(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        """`%veil?` pages the usage IPython's magic_arguments builds; a wrong argument says which one."""
        reply, _ = execute(kernel[1], "%veil?")
        assert reply["status"] == "ok", reply
        page = reply["payload"][0]["data"]["text/plain"]
        assert "%veil [--site SITE]" in page and "{datasets,budget,mode,sql,cost}" in page and "--epsilon" in page
        reply, _ = execute(kernel[1], "%veil mode maybe")
        assert reply["status"] == "error" and reply["ename"] == "UsageError"
        assert "invalid choice: 'maybe'" in reply["evalue"]
        reply, _ = execute(kernel[1], "%veil sql --all")
        assert reply["status"] == "error" and "is a cell magic" in reply["evalue"]

    def test_veil_alone_mode_and_the_safe_default(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        """`%veil` prints its help, `%veil mode` says which mode is on, and `%%veil sql` in a study of several
        sites without --site or --all spends nowhere: it asks where."""
        reply, out = execute(kernel[1], "%veil")
        assert reply["status"] == "ok" and "%veil mode [mock|live]" in stdout(out) and "--accuracy" in stdout(out)
        reply, out = execute(kernel[1], "%veil mode")
        assert reply["status"] == "ok" and stdout(out).startswith("Veil mode: MOCK")
        reply, _ = execute(kernel[1], "%%veil sql\nSELECT COUNT(*) AS n FROM patients")
        assert reply["status"] == "error" and reply["ename"] == "UsageError"
        assert "this study has 2 sites (north, south): say where with --site" in reply["evalue"]

    def test_a_veil_error_is_one_line_unless_verbose(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        """A refusal reads as one line with what to do; `%xmode Verbose` brings the traceback back."""
        raising = "%%veil sql --site north\nSELECT MAX(age) FROM patients"
        reply, out = execute(kernel[1], raising)
        assert reply["status"] == "error" and reply["ename"] == "QueryError"
        assert len(reply["traceback"]) == 1, reply["traceback"]
        line = reply["traceback"][0]
        assert "QueryError [" in line and "MAX" in line and "What to do:" in line, line
        execute(kernel[1], "%xmode Verbose")
        try:
            reply, _ = execute(kernel[1], raising)
            assert reply["status"] == "error" and len(reply["traceback"]) > 1
        finally:
            execute(kernel[1], "%xmode Context")

    def test_guard_refuses_served_files(self, veil_env: Path, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        secret = veil_env / "served" / "secret.parquet"
        alias = veil_env / "alias"
        for code in (f"open({str(secret)!r}, 'rb').read()",
                     f"import pathlib; pathlib.Path({str(secret)!r}).read_bytes()",
                     f"import os; os.listdir({str(secret.parent)!r})",
                     f"import os; os.symlink({str(secret.parent)!r}, {str(alias)!r}); open({str(alias / 'secret.parquet')!r})",
                     f"import os; os.link({str(secret)!r}, {str(veil_env / 'copy.parquet')!r})",
                     f"import sqlite3; sqlite3.connect({str(secret.parent / 'veil.db')!r})",
                     f"import sqlite3; sqlite3.connect('file:{secret.parent / 'veil.db'}?mode=ro', uri=True)"):
            reply, _ = execute(kernel[1], code)
            assert reply["status"] == "error", code
            assert reply["ename"] == "PermissionError", (code, reply["ename"], reply["evalue"])
            assert reply["evalue"].startswith("Veil: ") and "executor serves" in reply["evalue"]
            assert "the kernel guard" in reply["evalue"]
        assert not (veil_env / "copy.parquet").exists()

    def test_guard_allows_other_files(self, veil_env: Path, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        notes = veil_env / "notes.txt"
        reply, out = execute(kernel[1], f"p = {str(notes)!r}\nopen(p, 'w').write('mine')\nprint(open(p).read())")
        assert reply["status"] == "ok" and stdout(out).strip() == "mine"

    def test_comm_budget_event(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        kc = kernel[1]
        comm_id = uuid.uuid4().hex
        opened = kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "veil", "data": {}})
        kc.shell_channel.send(opened)
        ack = comm_msgs(iopub_until_idle(kc, opened["header"]["msg_id"]), comm_id)
        assert ack == [{"type": "ready", "version": veil.__version__, "study": "rare_peds_test", "mode": "mock"}]

        code = "get_ipython().kernel.send_budget_event({'site': 'north', 'remaining': 1.0})"
        reply, out = execute(kc, code)
        assert reply["status"] == "ok"
        assert comm_msgs(out, comm_id) == [{"type": "budget", "site": "north", "remaining": 1.0}]
        for cell, events in [("%veil mode live", [{"type": "mode", "mode": "live"}]),
                             ("%veil mode live", []),  # no change, no event
                             ("study.mode = 'mock'", [{"type": "mode", "mode": "mock"}]),
                             ("%%veil cost\n1 + 1", [])]:  # its rehearsal in mock mode does not flash in the lab
            reply, out = execute(kc, cell)
            assert reply["status"] == "ok" and comm_msgs(out, comm_id) == events, cell

        closed = kc.session.msg("comm_close", {"comm_id": comm_id, "data": {}})
        kc.shell_channel.send(closed)
        iopub_until_idle(kc, closed["header"]["msg_id"])
        reply, out = execute(kc, code)
        assert reply["status"] == "ok" and not [m for m in out if m["msg_type"] == "comm_msg"]

    def test_comm_on_a_subshell(self, kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
        """JupyterLab 4.6 sends comm messages on a kernel subshell: another thread than the cells."""
        kc = kernel[1]
        kc.control_channel.send(kc.session.msg("create_subshell_request", {}))
        subshell_id = kc.get_control_msg(timeout=TIMEOUT)["content"]["subshell_id"]
        comm_id = uuid.uuid4().hex
        opened = kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "veil", "data": {}})
        opened["header"]["subshell_id"] = subshell_id
        kc.shell_channel.send(opened)
        assert comm_msgs(iopub_until_idle(kc, opened["header"]["msg_id"]), comm_id)[0]["type"] == "ready"
        _, out = execute(kc, "get_ipython().kernel.send_budget_event({'site': 'south', 'spent': 0.5})")
        assert comm_msgs(out, comm_id) == [{"type": "budget", "site": "south", "spent": 0.5}]


def test_missing_config_still_starts(veil_env: Path) -> None:
    """Without a study config the kernel starts, and `study.sites` says what is missing and how to fix it."""
    missing = veil_env / "nowhere" / "study.toml"
    km, kc = start_new_kernel(kernel_name="veil", startup_timeout=TIMEOUT, env={**os.environ, "VEIL_STUDY": str(missing)})
    try:
        reply, _ = execute(kc, "study.sites")
        assert reply["status"] == "error" and reply["ename"] == "VeilConfigError"
        assert str(missing) in reply["evalue"] and "VEIL_STUDY" in reply["evalue"]
        reply, out = execute(kc, "print(repr(study)); print(hasattr(study, '_repr_html_'))")
        assert reply["status"] == "ok" and "study not loaded" in stdout(out)
        reply, _ = execute(kc, f"open({str(veil_env / 'served' / 'secret.parquet')!r}).close()")
        assert reply["status"] == "ok"  # no study, so no guard paths known
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_install_cli_choices(tmp_path: Path) -> None:
    from veil.cli import parser
    from veil.kernel.install import install_kernelspec

    with pytest.raises(SystemExit):
        parser().parse_args(["kernel", "install", "--user", "--prefix", str(tmp_path)])
    with pytest.raises(ValueError):
        install_kernelspec(user=True, prefix=str(tmp_path))
    where = Path(install_kernelspec(prefix=str(tmp_path)))
    assert sorted(p.name for p in where.iterdir()) == ["kernel.json", "logo-svg.svg"]



def test_interrupt_right_after_start(veil_env: Path) -> None:
    """A cell started as soon as the kernel answers kernel_info can be interrupted, as with python3. The
    interrupt lands while the SDK loads for the first cell (the kernel answers kernel_info before): the cell
    ends with KeyboardInterrupt once the SDK has loaded (no module is left half imported), and the next cell
    has the study and the magics."""
    km, kc = start_new_kernel(kernel_name="veil", startup_timeout=TIMEOUT)
    try:
        # stop_on_error=False: else ipykernel aborts the requests that reach it before it has posted its
        # "stop aborting" marker, and `1 + 1` sent at once could come back "aborted" (python3's race too)
        msg_id = kc.execute("import time; time.sleep(60)", stop_on_error=False)
        while True:  # the cell is running once its execute_input is out
            msg = kc.get_iopub_msg(timeout=TIMEOUT)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                break
        # ipykernel publishes execute_input just before it calls do_execute: a SIGINT in between is caught by
        # its dispatcher and the cell gets no reply (python3's race too, seen under load). A moment later the
        # interrupt lands while the SDK loads (about 0.5 s, longer under load) or in the cell.
        time.sleep(0.2)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:  # late kernel_info replies from the start
            reply = kc.get_shell_msg(timeout=10)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        after, _ = execute(kc, "1 + 1")
        assert after["status"] == "ok"
        after, out = execute(kc, "print(type(study).__name__, study.mode, get_ipython().find_cell_magic('veil') is not None)")
        assert after["status"] == "ok" and stdout(out).strip() == "Study mock True"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_start_up_leaves_the_sdk_unloaded(veil_env: Path) -> None:
    """What the kernel does before its first reply (import its modules, read the study config for the
    banner and the guard) imports none of the SDK's libraries: they load on first use."""
    code = ("import sys, veil.kernel.__main__, veil.kernel.kernel\n"
            "from veil.kernel.config import read_study_config\n"
            "assert read_study_config().name == 'rare_peds_test'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('polars', 'httpx', 'opendp', 'pydantic', "
            "'pydantic_core', 'sqlglot', 'numpy', 'pyarrow', 'tqdm')\n"
            "             or m in ('veil.wire', 'veil.sql', 'veil.kernel.sdk', 'veil.kernel.study', 'veil.kernel.magics')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_study_completes_before_the_first_cell(veil_env: Path) -> None:
    """Completing `study.` before any cell ran loads the study (first use) and completes its attributes."""
    km, kc = start_new_kernel(kernel_name="veil", startup_timeout=TIMEOUT)
    try:
        kc.complete("study.si", 8)
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["status"] == "ok" and "sites" in {m.rsplit(".", 1)[-1] for m in reply["content"]["matches"]}
        reply, out = execute(kc, "print(type(study).__name__, sorted(study.sites))")
        assert reply["status"] == "ok" and stdout(out).strip() == "Study ['north', 'south']"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
