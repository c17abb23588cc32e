"""The kernel guard: an audit hook that keeps the kernel process out of the folders executors serve.

When an executor runs on the researcher's machine (the demo, Binder), its raw data sits on the same
disk. The guard makes Python-level file access to such a path (`open()`, `pathlib`, `os.listdir()`,
links and renames) fail with an explanation. It is a guardrail against mistakes, not a sandbox: file
I/O done in native code (Polars' and PyArrow's readers, ctypes, C extensions) and other processes
(`subprocess`, `!cat`) raise no audit event and are not stopped; see the README, "the kernel guard".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# audit event -> positions of its path arguments (Python 3.11 audit events table)
_EVENTS: dict[str, tuple[int, ...]] = {
    "open": (0,),
    "os.listdir": (0,),
    "os.scandir": (0,),
    "os.link": (0, 1),
    "os.rename": (0, 1),
    "os.symlink": (1,),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "sqlite3.connect": (0,),  # a site's SQLite state database is in its folder too
}


def _message(path: str) -> str:
    return (f"Veil: {path} holds data an executor serves; the kernel never reads it directly. "
            "Query it through `study` instead (see README, 'the kernel guard').")


def guarded_prefix(path: str, prefixes: tuple[str, ...]) -> str | None:
    """The resolved `path` if it is one of `prefixes` (resolved directories) or lies under one, else None.

    `os.path.realpath` only calls `os.lstat`, `os.readlink` and `os.getcwd`, which raise no audit
    event, so this is safe to call from inside the hook.
    """
    resolved = os.path.realpath(path)
    for prefix in prefixes:
        if resolved == prefix or resolved.startswith(prefix + os.sep):
            return resolved
    return None


def install_guard(paths: Iterable[Path | str]) -> None:
    """Refuse, in this process, every open/list/link/rename/change of a path under one of `paths`.

    Audit hooks cannot be removed, so call this once, with the full list (an empty list does nothing).
    """
    prefixes = tuple(sorted({os.path.realpath(os.fspath(p)) for p in paths}))
    if not prefixes:
        return

    def hook(event: str, args: tuple[Any, ...]) -> None:
        positions = _EVENTS.get(event)
        if positions is None:
            return
        for i in positions:
            target = args[i] if i < len(args) else None
            if target is None and event in ("os.listdir", "os.scandir"):
                target = "."
            if event == "sqlite3.connect" and isinstance(target, str) and target.startswith("file:"):
                target = target[len("file:"):].split("?", 1)[0]  # a URI filename names the same file
            if isinstance(target, bytes):
                target = os.fsdecode(target)
            elif isinstance(target, os.PathLike):
                target = os.fspath(target)
                target = os.fsdecode(target) if isinstance(target, bytes) else target
            if isinstance(target, str) and guarded_prefix(target, prefixes) is not None:
                raise PermissionError(_message(target))

    sys.addaudithook(hook)
