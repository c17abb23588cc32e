"""The Veil Jupyter kernel: IPython with the study preloaded, the kernel guard on, budget events on a comm.

The kernel never holds raw rows: `study` talks to the sites' executors, and the guard keeps this
process out of the folders those executors serve when they run on the same machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import Any

from comm.base_comm import BaseComm
from ipykernel.ipkernel import IPythonKernel

from veil import __version__
from veil.kernel.errors import VeilConfigError
from veil.kernel.guard import install_guard
from veil.kernel.study import Study, load_study

COMM_TARGET = "veil"


class MissingStudy:
    """Stands in for `study` when the config is missing or invalid: any public attribute raises that error.

    So `study.sites` in a notebook says exactly what is missing and how to fix it.
    """

    def __init__(self, error: VeilConfigError) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # IPython's display and completion probes stay quiet
            raise AttributeError(name)
        raise self._error.with_traceback(None)

    def __repr__(self) -> str:
        return f"<study not loaded: {self._error}>"


class VeilKernel(IPythonKernel):
    """IPython kernel with `study` in the namespace, the guard installed and a "veil" comm target."""

    implementation = "veil"
    implementation_version = __version__
    language_info = IPythonKernel.language_info  # plain Python, as IPython reports it

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._comms: dict[str, BaseComm] = {}
        self._comms_lock = threading.Lock()  # comm handlers run on another thread than cells (ipykernel 7)
        self.study: Study | MissingStudy = self._load_study()
        self.shell.push({"study": self.study})
        self.comm_manager.register_target(COMM_TARGET, self._comm_opened)
        self._register_magics()

    @property
    def banner(self) -> str:  # type: ignore[override]
        name = self.study.name if isinstance(self.study, Study) else "none loaded (see `study`)"
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

    def _load_study(self) -> Study | MissingStudy:
        """The configured study in mock mode, with the guard on its executors' folders; a stand-in if the
        config fails."""
        try:
            study = load_study()
        except VeilConfigError as exc:
            return MissingStudy(exc)
        install_guard(study.guarded_paths())
        study.mode = "mock"  # a notebook spends budget only after `%veil mode live`
        return study

    def _register_magics(self) -> None:
        """Register the SDK's magics (`veil.kernel.magics.register(shell, kernel)`) when that module exists."""
        if importlib.util.find_spec("veil.kernel.magics") is not None:
            importlib.import_module("veil.kernel.magics").register(self.shell, self)

    def _comm_opened(self, comm: BaseComm, msg: dict[str, Any]) -> None:
        """A frontend (the lab extension) opened a "veil" comm: keep it and acknowledge."""
        with self._comms_lock:
            self._comms[comm.comm_id] = comm
        comm.on_close(lambda _msg: self._comm_closed(comm.comm_id))
        study = self.study.name if isinstance(self.study, Study) else None
        comm.send({"type": "ready", "version": __version__, "study": study})

    def _comm_closed(self, comm_id: str) -> None:
        with self._comms_lock:
            self._comms.pop(comm_id, None)

    def send_budget_event(self, payload: dict[str, Any]) -> None:
        """Send `{"type": "budget", **payload}` on every open "veil" comm (the lab extension listens)."""
        with self._comms_lock:
            comms = list(self._comms.values())
        for comm in comms:
            comm.send({**payload, "type": "budget"})
