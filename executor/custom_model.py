"""Custom architectures from researcher source, rebuilt from checked parts: the source never sees data.

Why not simply run the researcher's `nn.Module` on the private rows? DP-SGD bounds only what flows
through clipped, noised per-sample gradients. A forward pass run on private data inside that boundary
could copy raw rows into buffers or parameters (which are released with the weights), or mix patients
across a batch (a batch mean, a batch norm), so that one patient's gradient depends on others and the
clipping bound no longer holds. So the source is executed only in `veil.executor.sandbox`, a child
process that receives no data (the source and two integers), runs in a new network namespace where the
system allows it, with memory, CPU, file-size and file-count limits, an empty working folder, a minimal
environment and an audit hook that refuses network, process creation, ctypes, file writes and reads
outside the Python installation. It returns only the `torch.fx` graph of `Net(inputs, outputs)`:
operations and layer settings, never tensor values. `veil.models.graph` treats that description as
untrusted, checks it against allow-lists (per-row operations only, the batch dimension never moved, merged, reduced
or indexed) and builds a fresh `GraphModule` from layers it constructs itself; nothing the source
created is kept. The audit hook acts at the Python level only: native code inside torch can still open
files this process may read. So an executor registers its data and state directories (`hide`), and the
sandbox then runs in its own mount namespace where each is covered by an empty tmpfs; a system that
cannot make that namespace refuses custom models (fail closed). The process boundary, the namespaces,
the limits and these checks do not depend on the hook. And only source that the dataset's reviewers
approved in an application ever runs at a site.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from veil.errors import QueryError
from veil.models.graph import CODE, HINT, MAX_WIDTH, rebuild

MAX_SOURCE = 200_000
MEMORY_LIMIT = 3 * 1024**3
"""Address space of the sandbox: importing torch needs 1-2 GiB of it."""
OUTPUT_LIMIT = 16 * 1024**2
OPEN_FILES = 256
SANDBOX_HINT = (
    "The model source may only define the network: it runs without data, network, processes, native code "
    "or file writes, with 3 GiB of memory. Build layers with the sizes Net(inputs, outputs) is given."
)


# ---------------------------------------------------------------- public API


def source_digest(source: str) -> str:
    """The SHA-256 (hex) of the UTF-8 source: what an application approves and the trace cache keys on."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def build_custom(source: str, inputs: int, outputs: int, timeout: float = 60.0) -> nn.Module:
    """A fresh, untrained module for `class Net` in `source`, taking (batch, inputs) to (batch, outputs).

    The source is traced in the sandbox (cached per source digest and sizes), the graph is checked and
    rebuilt from new layers, and the result is checked for Opacus, size, output shape and per-row
    independence. Any problem is a `QueryError` with code `bad_model_source`."""
    if not isinstance(source, str) or not source.strip():
        raise QueryError(CODE, "the model source is empty", "give Python source that defines class Net(nn.Module)")
    if len(source) > MAX_SOURCE:
        raise QueryError(CODE, f"the model source has {len(source):,} characters; at most {MAX_SOURCE:,} are allowed")
    for label, value in (("inputs", inputs), ("outputs", outputs)):
        if type(value) is not int or not 1 <= value <= MAX_WIDTH:
            raise QueryError(CODE, f"{label} must be an integer from 1 to {MAX_WIDTH:,}, not {value!r}")
    module = rebuild(traced_graph(source, inputs, outputs, timeout), inputs, outputs)
    from veil.executor.models import validate_module  # (it imports this module lazily)

    try:
        validate_module(module)
    except QueryError as exc:
        raise QueryError(CODE, exc.message, exc.hint) from None
    return module


def traced_graph(source: str, inputs: int, outputs: int, timeout: float = 60.0) -> dict[str, Any]:
    """The sandbox's description of `Net(inputs, outputs)`'s traced graph (cached per source digest and
    sizes): what `veil.models.graph.rebuild` checks and rebuilds, and what trained weights carry."""
    return dict(json.loads(_traced(_Job(source_digest(source), inputs, outputs, source, float(timeout)))))


# ---------------------------------------------------------------- the sandbox run


@dataclass(frozen=True)
class _Job:
    """One trace request; equal (and cached alike) when the digest and sizes are."""

    digest: str
    inputs: int
    outputs: int
    source: str = field(compare=False, repr=False)
    timeout: float = field(compare=False)


@functools.lru_cache(maxsize=64)
def _traced(job: _Job) -> str:
    """The sandbox's description of the traced graph as JSON text; errors raise and are not cached."""
    answer = _run_sandbox(job)
    if not isinstance(answer, dict):
        raise QueryError(CODE, "the sandbox gave an answer that is not a graph description", SANDBOX_HINT)
    if "error" in answer:
        raise _sandbox_refusal(str(answer.get("stage")), str(answer["error"]))
    return json.dumps(answer)


_HIDDEN: set[str] = set()
MOUNT_SCRIPT = ('while [ "$1" != "--" ]; do mount -t tmpfs -o size=4k,mode=000 veil-hidden "$1" || exit 97; '
                'shift; done; shift; exec "$@"')
"""Run in the sandbox's mount namespace before Python starts: cover each hidden directory, then exec."""


def hide(paths: Sequence[str | Path]) -> None:
    """Directories a sandbox must never see (a site's data, catalog and state): from now on every sandbox
    runs in its own mount namespace with each of them covered by an empty tmpfs, or not at all."""
    _HIDDEN.update(str(Path(p).resolve()) for p in paths)


def _command() -> list[str]:
    """The sandbox's command line: jailed in new network (and, with hidden paths, mount) namespaces."""
    python = [sys.executable, "-I", "-B", "-m", "veil.executor.sandbox"]
    if not _HIDDEN:
        return [*_jail(), *python]
    jail = _mount_jail()
    if not jail:
        raise QueryError(CODE, "this site cannot hide its data from custom model code: that needs unshare with "
                         "network and mount namespaces (an executor run as root, or user namespaces enabled)",
                         "train with a declarative ModelSpec instead, or ask the site's operators")
    outermost = [h for h in sorted(_HIDDEN) if not any(Path(h).is_relative_to(o) and h != o for o in _HIDDEN)]
    return [*jail, "sh", "-c", MOUNT_SCRIPT, "sh", *outermost, "--", *python]


@functools.cache
def _mount_jail() -> tuple[str, ...]:
    """The unshare prefix for new network and mount namespaces in which tmpfs can be mounted, or ()."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    with tempfile.TemporaryDirectory(prefix="veil-probe-") as probe_dir:
        for flags in (("--net", "--mount"), ("--net", "--mount", "--map-root-user")):
            try:
                probe = subprocess.run([unshare, *flags, "sh", "-c", MOUNT_SCRIPT, "sh", probe_dir, "--", "true"],
                                       capture_output=True, timeout=30, env=_environment())
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0:
                return (unshare, *flags)
    return ()


@functools.cache
def _jail() -> tuple[str, ...]:
    """The command prefix that runs the sandbox in a new network namespace, or () where none works."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None
    )
    if unshare is None:
        return ()
    for flags in (("--net",), ("--net", "--map-root-user")):
        try:
            probe = subprocess.run(
                [unshare, *flags, sys.executable, "-I", "-c", "pass"],
                capture_output=True, timeout=30, env=_environment(), cwd=tempfile.gettempdir(),
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return (unshare, *flags)
    return ()


def _environment() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _limits(cpu_seconds: int) -> Callable[[], None]:
    """The resource limits the child sets on itself between fork and exec (never above current hard limits)."""
    wanted = [
        (resource.RLIMIT_AS, MEMORY_LIMIT),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, OUTPUT_LIMIT),
        (resource.RLIMIT_NOFILE, OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ]
    settings = []
    for kind, value in wanted:
        _, hard = resource.getrlimit(kind)
        cap = value if hard == resource.RLIM_INFINITY else min(value, hard)
        soft = cap - 1 if kind == resource.RLIMIT_CPU and cap > 1 else cap
        settings.append((kind, (soft, cap)))

    def apply() -> None:
        for kind, pair in settings:
            resource.setrlimit(kind, pair)

    return apply


def _run_sandbox(job: _Job) -> Any:
    """Run the sandbox on the job (no data: the source and two sizes) and parse what it printed."""
    request = json.dumps({"source": job.source, "inputs": job.inputs, "outputs": job.outputs})
    command = _command()
    with tempfile.TemporaryDirectory(prefix="veil-sandbox-") as tmp:
        root = Path(tmp)
        (root / "work").mkdir()
        (root / "request.json").write_text(request, encoding="utf-8")
        with (
            open(root / "request.json", "rb") as stdin,
            open(root / "stdout", "wb") as stdout,
            open(root / "stderr", "wb") as stderr,
        ):
            returncode = _wait(command, job.timeout, stdin, stdout, stderr, root / "work")
        text = (root / "stdout").read_bytes()[:OUTPUT_LIMIT].decode("utf-8", "replace").strip()
    if returncode == _TIMED_OUT or not text:
        _crash(returncode, job.timeout)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        if returncode != 0:
            _crash(returncode, job.timeout)
        raise QueryError(CODE, "the sandbox gave an answer that is not valid JSON", SANDBOX_HINT) from None


def _wait(command: list[str], timeout: float, stdin: Any, stdout: Any, stderr: Any, cwd: Path) -> int:
    """Run the command with limits; on timeout kill its whole process group. Returns the exit status."""
    proc = subprocess.Popen(
        command, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=_environment(),
        preexec_fn=_limits(max(2, math.ceil(timeout) + 5)), close_fds=True, start_new_session=True,
    )
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return _TIMED_OUT
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also whatever the child started, if it managed to
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


_TIMED_OUT = -(10**6)


def _crash(returncode: int, timeout: float) -> None:
    """Refuse a run that gave no answer, saying why as far as the exit status tells."""
    if returncode == _TIMED_OUT:
        raise QueryError(
            CODE,
            f"the model source did not finish within {timeout:g} s in the sandbox",
            "Net's source, constructor and forward must be quick to run once without data: no long loops, "
            "no waiting, no large computations",
        )
    if returncode < 0:
        sig = -returncode
        why = {
            signal.SIGXCPU: "it used up its CPU time",
            signal.SIGKILL: "it was killed, having used up its memory (3 GiB) or CPU time",
            signal.SIGXFSZ: "its output was too large",
            signal.SIGSEGV: "it crashed (segmentation fault), perhaps out of memory",
            signal.SIGABRT: "it aborted, perhaps out of memory",
        }.get(sig, f"it was stopped by signal {_signal_name(sig)}")
        raise QueryError(CODE, f"the sandbox gave no answer: {why}", SANDBOX_HINT)
    if returncode != 0:
        raise QueryError(CODE, f"the sandbox exited with status {returncode} and gave no answer", SANDBOX_HINT)
    raise QueryError(CODE, "the sandbox exited without an answer", SANDBOX_HINT)


def _sandbox_refusal(stage: str, detail: str) -> QueryError:
    detail = detail[:1000]
    memory = "allocate" in detail or "MemoryError" in detail
    hint = SANDBOX_HINT if memory or stage == "refused" else None
    messages = {
        "syntax": ("the model source has a syntax error: ", "fix the source; it must define class Net(nn.Module)"),
        "exec": ("running the model source failed: ", "the source may only import nothing and define Net; "
                 "torch, nn (torch.nn) and F (torch.nn.functional) are already there"),
        "net": ("", "define class Net(nn.Module) with __init__(self, inputs, outputs) and forward(self, x)"),
        "construct": ("Net(inputs, outputs) failed: ", "Net's constructor takes (inputs: int, outputs: int): the "
                      "width of the encoded input and the number of outputs"),
        "trace": ("torch.fx could not trace Net: ", "forward must not branch on tensor values or call code that "
                  "torch.fx cannot trace; " + HINT),
        "encode": ("the traced graph holds a value the site cannot check: ", HINT),
        "refused": ("the sandbox refused the model source: ", SANDBOX_HINT),
    }
    prefix, default_hint = messages.get(stage, ("the sandbox refused the model source: ", SANDBOX_HINT))
    return QueryError(CODE, prefix + detail, hint or default_hint)


def _signal_name(number: int) -> str:
    """SIGTERM for 15; the bare number for a signal Python has no name for."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
