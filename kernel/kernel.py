"""The Veil Jupyter kernel: IPython with the study preloaded, the kernel guard on, budget events on a comm.

The kernel never holds raw rows: `study` talks to the sites' executors, and the guard keeps this
process out of the folders those executors serve when they run on the same machine.

Start-up is as quick as IPython's own: the kernel reads the study config with tomllib (for its banner and
the guard, which is on from the start) and answers `kernel_info` without importing the SDK (Polars,
httpx, pydantic, sqlglot). The SDK loads on first use, before the first cell's code runs (or when a
completion or inspection first looks into `study`): `study` becomes the loaded study, in mock mode, and
the `%veil` magics are registered.
"""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from comm.base_comm import BaseComm
from ipykernel.ipkernel import IPythonKernel

from veil import __version__
from veil.kernel.config import StudyConfig, read_study_config
from veil.kernel.errors import VeilConfigError
from veil.kernel.guard import install_guard

if TYPE_CHECKING:
    from veil.kernel.study import Study

COMM_TARGET = "veil"


class MissingStudy:
    """Stands in for `study` when the config is missing or invalid (or the SDK failed to load): any public
    attribute raises that error.

    So `study.sites` in a notebook says exactly what is missing and how to fix it.
    """

    def __init__(self, error: Exception) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # IPython's display and completion probes stay quiet
            raise AttributeError(name)
        raise self._error.with_traceback(None)

    def __repr__(self) -> str:
        return f"<study not loaded: {self._error}>"


class StudyOnFirstUse:
    """`study` in the namespace until the SDK has loaded: a public attribute loads it and answers from the
    loaded study. Only completions and inspections before the first cell see this; a cell sees the study."""

    def __init__(self, kernel: VeilKernel) -> None:
        self._kernel = kernel

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # IPython's display and completion probes load nothing
            raise AttributeError(name)
        return getattr(self._kernel.study, name)

    def __dir__(self) -> list[str]:
        return dir(self._kernel.study)

    def __repr__(self) -> str:
        return repr(self._kernel.study)


class VeilKernel(IPythonKernel):
    """IPython kernel with `study` in the namespace, the guard installed and a "veil" comm target."""

    implementation = "veil"
    implementation_version = __version__
    language_info = IPythonKernel.language_info  # plain Python, as IPython reports it

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._comms: dict[str, BaseComm] = {}
        self._comms_lock = threading.Lock()  # comm handlers run on another thread than cells (ipykernel 7)
        self._announced_mode = "mock"  # every study starts in mock mode; what the comms were last told
        self._config = self._read_config()
        self._study: Study | MissingStudy | None = None  # until the SDK has loaded (`_load_sdk`)
        self._loading_lock = threading.Lock()  # cells, completions and subshells may each be first
        self.shell.push({"study": self._config if isinstance(self._config, MissingStudy) else StudyOnFirstUse(self)})
        self.comm_manager.register_target(COMM_TARGET, self._comm_opened)

    @property
    def study(self) -> Study | MissingStudy:
        """The study in mock mode (or its stand-in if the config fails); the SDK loads on first use."""
        if self._study is None:
            self._load_sdk()
        assert self._study is not None
        return self._study

    @property
    def mode(self) -> str:
        """The study's mode, 'mock' or 'live' ('mock' until the SDK has loaded: every study starts so)."""
        study = self._study
        if study is None or isinstance(study, MissingStudy):
            return "mock"
        try:
            mode = study.mode
        except Exception:  # a study without sites has no mode of its own
            return "mock"
        return mode if mode in ("mock", "live") else "mock"

    @property
    def _study_name(self) -> str | None:
        return self._config.name if isinstance(self._config, StudyConfig) else None

    @property
    def banner(self) -> str:  # type: ignore[override]
        name = self._study_name or "none loaded (see `study`)"
        return (f"Veil {__version__} (private data): every live answer is a DP release. Study: {name}.\n"
                + (super().banner or ""))

    async def do_history(self, hist_access_type: str, output: bool, raw: bool, session: int = 0, start: int = 0,
                         stop: int | None = None, n: int | None = None, pattern: str | None = None,
                         unique: bool = False) -> dict[str, Any]:
        """IPython's history, with the current session named by its number (IPython's range says 0)."""
        reply = super().do_history(hist_access_type, output, raw, session, start, stop, n, pattern, unique)
        current = self.shell.history_manager.session_number
        reply["history"] = [(s or current, *rest) for s, *rest in reply["history"]]
        return reply

    async def do_execute(self, code: str, silent: bool, store_history: bool = True,
                         user_expressions: dict[str, Any] | None = None, allow_stdin: bool = False, *,
                         cell_meta: dict[str, Any] | None = None, cell_id: str | None = None) -> dict[str, Any]:
        """IPython's, with the SDK loaded before the first cell runs. An interrupt while it loads, or an
        error in loading it, ends that cell with that error instead of running it."""
        if self._study is None:
            try:
                self._load_sdk()
            except (Exception, KeyboardInterrupt):
                return self._error_reply(code, store_history)
        try:
            return await super().do_execute(code, silent, store_history, user_expressions, allow_stdin,
                                            cell_meta=cell_meta, cell_id=cell_id)
        finally:  # a site's mode set directly (`study.sites['x'].mode = 'live'`) is announced too
            self.send_mode_event(self.mode)

    def _read_config(self) -> StudyConfig | MissingStudy:
        """The study config (tomllib only), with the guard on its executors' folders; a stand-in if the
        config fails."""
        try:
            config = read_study_config()
        except VeilConfigError as exc:
            return MissingStudy(exc)
        install_guard(config.guards)
        return config

    def _load_sdk(self) -> None:
        """Load the SDK once: the study (from the config read at start) into the namespace, the magics
        registered. An interrupt (SIGINT) meanwhile waits until it is done, so that no module is left half
        imported (at most about half a second), then raises KeyboardInterrupt. The first caller raises what
        went wrong in the loading; later ones find the study's stand-in saying it."""
        interrupted = False

        def defer(signum: int, frame: Any) -> None:
            nonlocal interrupted
            interrupted = True

        on_main = threading.current_thread() is threading.main_thread()  # only there do signals arrive
        previous = signal.signal(signal.SIGINT, defer) if on_main else None
        try:
            with self._loading_lock:
                if self._study is None:
                    study, register, error = self._load()
                    self._study = study
                    if isinstance(self.shell.user_ns.get("study"), StudyOnFirstUse):
                        self.shell.user_ns["study"] = study
                    if register is not None:
                        register(self.shell, self)
                    if error is not None:
                        raise error
        finally:
            if on_main:
                signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if interrupted:
            raise KeyboardInterrupt

    def _load(self) -> tuple[Study | MissingStudy, Any, Exception | None]:
        """The study in mock mode and the magics' `register` (when that module exists), or a stand-in and the
        error. Warnings of the imports go to the kernel's log, as they did when the kernel loaded the SDK at
        start, not into the first cell's output."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                if isinstance(self._config, MissingStudy):
                    study: Study | MissingStudy = self._config
                else:
                    from veil.kernel.study import Study

                    study = Study.from_config(self._config)
                    study.mode = "mock"  # a notebook spends budget only after `%veil mode live`
                    study.on_mode = self.send_mode_event
                register = (importlib.import_module("veil.kernel.magics").register
                            if importlib.util.find_spec("veil.kernel.magics") is not None else None)
        except Exception as exc:  # said on first use: by the cell that loaded, then by `study`
            return MissingStudy(exc), None, exc
        for w in caught:
            self.log.warning("%s", warnings.formatwarning(w.message, w.category, w.filename, w.lineno).rstrip())
        return study, register, None

    def _error_reply(self, code: str, store_history: bool) -> dict[str, Any]:
        """The reply to a cell that did not run because of the exception being handled, shown as IPython
        shows a cell's error (an interrupt without the loading's frames)."""
        shell = self.shell
        if store_history:  # the cell counts, as one that IPython interrupted
            shell.history_manager.store_inputs(shell.execution_count, code, code)
            shell.execution_count += 1
        error = sys.exc_info()[1]
        assert error is not None
        if isinstance(error, KeyboardInterrupt):
            shell.showtraceback((KeyboardInterrupt, error, None))
        else:
            shell.showtraceback()
        return {"status": "error", "ename": type(error).__name__, "evalue": str(error),
                "traceback": shell._last_traceback or [], "execution_count": shell.execution_count - 1,
                "user_expressions": {}, "payload": [],
                "engine_info": {"engine_uuid": self.ident, "engine_id": self.int_id, "method": "execute"}}

    def _comm_opened(self, comm: BaseComm, msg: dict[str, Any]) -> None:
        """A frontend (the lab extension) opened a "veil" comm: keep it and acknowledge."""
        with self._comms_lock:
            self._comms[comm.comm_id] = comm
        comm.on_close(lambda _msg: self._comm_closed(comm.comm_id))
        comm.send({"type": "ready", "version": __version__, "study": self._study_name, "mode": self.mode})

    def _comm_closed(self, comm_id: str) -> None:
        with self._comms_lock:
            self._comms.pop(comm_id, None)

    def send_budget_event(self, payload: dict[str, Any]) -> None:
        """Send `{"type": "budget", **payload}` on every open "veil" comm (the lab extension listens)."""
        with self._comms_lock:
            comms = list(self._comms.values())
        for comm in comms:
            comm.send({**payload, "type": "budget"})

    def send_mode_event(self, mode: str) -> None:
        """Send `{"type": "mode", "mode": mode}` on every open "veil" comm when the mode differs from the one
        last announced (the lab shows MOCK or LIVE)."""
        with self._comms_lock:
            if mode == self._announced_mode:
                return
            self._announced_mode = mode
            comms = list(self._comms.values())
        for comm in comms:
            comm.send({"type": "mode", "mode": mode})
