"""README, "Set up your own site": the walkthrough runs as written, and its reference tables match the code.

The walkthrough's blocks marked `walkthrough` (```sh walkthrough, ```toml walkthrough FILE, ```python
walkthrough) are taken from the README itself and run in order as a user would: each command a real process in
a fresh directory (`veil` as this environment's `python -m veil.cli`; a command ending in `&` in the background),
each TOML block written to its file, and the Python blocks as the cells of a notebook on the real `veil` kernel,
whose last cell must be a live DP release. Only the port changes: 8700 becomes a free one.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

from veil.local import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
sys.path.insert(0, str(REPO / "scripts"))
import catalog_reference  # noqa: E402

BLOCK = re.compile(r"^```(sh|toml|python) walkthrough(?: (\S+))?\n(.*?)^```$", re.M | re.S)
PORT = "8700"


def section() -> str:
    text = README.read_text()
    start = text.index("## Set up your own site\n")
    return text[start:text.index("\n## ", start + 1)]


def blocks() -> list[tuple[str, str | None, str]]:
    """The walkthrough's blocks in order: (kind, file name for TOML, text)."""
    found = [(m[1], m[2], m[3]) for m in BLOCK.finditer(section())]
    assert [k for k, _, _ in found].count("sh") >= 3 and any(k == "python" for k, _, _ in found), found
    return found


def test_the_reference_tables_match_the_code() -> None:
    """The keys the catalog and the study config read are the keys described, and the README shows them."""
    assert catalog_reference.problems() == []
    current = catalog_reference.in_readme(README.read_text())
    assert current is not None, "README.md lost the markers of the generated reference"
    assert current == catalog_reference.reference(), "run: python scripts/catalog_reference.py --write"
    assert current in section(), "the reference belongs to 'Set up your own site'"


def todo_keys(raw: object, where: str = "") -> dict[str, object]:
    """Every dotted key of a parsed TOML document with its value."""
    if isinstance(raw, dict):
        return {k: v for key, value in raw.items()
                for k, v in todo_keys(value, f"{where}.{key}" if where else key).items()}
    return {where: raw}


def commands(script: str) -> Iterator[tuple[list[str], bool]]:
    """Each command line of a shell block, split as the shell would (comments dropped), and whether it ends in &."""
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        background = words[-1] == "&"
        words = words[:-1] if background else words
        assert words[0] == "veil", f"the walkthrough runs veil commands only: {line}"
        yield [sys.executable, "-m", "veil.cli", *words[1:]], background


@pytest.mark.timeout(900)
def test_the_walkthrough_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
    servers: list[subprocess.Popen[bytes]] = []
    cells: list[str] = []
    try:
        for kind, name, text in blocks():
            text = text.replace(PORT, port)
            if kind == "sh":
                for argv, background in commands(text):
                    if background:
                        log = open(tmp_path / f"background-{len(servers)}.log", "wb")
                        servers.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log,
                                                        stderr=subprocess.STDOUT, start_new_session=True))
                        _wait_for(f"http://127.0.0.1:{port}/health", servers[-1], tmp_path)
                        continue
                    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
                    assert done.returncode == 0, f"{shlex.join(argv[2:])}:\n{done.stdout}{done.stderr}"
            elif kind == "toml":
                assert name, "a TOML block of the walkthrough names its file"
                target = tmp_path / name
                declared = tomllib.loads(text)
                if target.exists():  # the steward completes the draft: every TODO answered, nothing else changed
                    _completes(tomllib.loads(target.read_text()), declared)
                target.write_text(text)
            else:
                cells.append(text.rstrip("\n"))
        release = _run_cells(cells, tmp_path, monkeypatch)
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
    assert "Veil result" in release and "receipt" in release and "MOCK" not in release, release
    assert "3004249" in release  # systolic blood pressure, one of the public concepts, has its row


def _wait_for(url: str, server: subprocess.Popen[bytes], where: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, (where / "background-0.log").read_text()[-3000:]
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"nothing answered on {url}")


def _completes(draft: dict, declared: dict) -> None:
    """`declared` answers every TODO of `draft` (a bound may be left out) and keeps what the draft knew."""
    before, after = todo_keys(draft), todo_keys(declared)
    for key, value in before.items():
        todo = isinstance(value, str) and value.startswith("TODO")
        if todo and not key.endswith(".bounds"):
            assert key in after and not str(after[key]).startswith("TODO"), f"the walkthrough leaves {key} undeclared"
        if not todo and not key.endswith(".nullable"):  # nullable: the draft proposes true, the steward decides
            assert after.get(key) == value, f"{key}: the draft says {value!r}, the walkthrough {after.get(key)!r}"


def _run_cells(cells: list[str], where: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cells on the `veil` kernel with the walkthrough's study.toml; the last cell's output as text."""
    for variable in [k for k in os.environ if k.startswith("VEIL_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("VEIL_STUDY", str(where / "study.toml"))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, kernel_name="veil", timeout=300, resources={"metadata": {"path": str(where)}}).execute()
    outputs = nb.cells[-1].outputs
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
