"""The jailed child of `custom_model`: run a researcher's model source and describe its traced graph.

It reads {"source", "inputs", "outputs"} as JSON on stdin (no data ever), imports torch, then installs an
audit hook that refuses network, process creation, ctypes, file writes and deletions, and reads outside
the Python installation; only then it runs the source, builds `Net(inputs, outputs)`, traces it with
`torch.fx.symbolic_trace` and prints the graph (nodes and module configurations, no tensor values) as
JSON on stdout, or {"error", "stage"}. The parent treats everything printed here as untrusted.

Run as `python -I -m veil.executor.sandbox`.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sys
import traceback
import types
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

SOURCE_NAME = "<model source>"
MAX_ERROR = 800
REFUSED_EVENTS = (
    "socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.system", "os.kill",
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.chflags", "os.lchflags",
    "os.link", "os.symlink", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "os.chdir",
    "os.chroot", "ctypes.", "resource.setrlimit", "resource.prlimit", "signal.pthread_kill", "shutil.",
    "pty.", "gc.get_", "syslog.", "sqlite3.", "dbm.", "fcntl.", "mmap.", "webbrowser.",
)
"""Audit events refused outright (prefixes): network, processes, native code, changes to files."""
REFUSED_IMPORTS = ("_posixsubprocess", "_ctypes", "ctypes", "_socket", "socket", "_sqlite3", "sqlite3")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

FUNCTIONS: dict[Any, str] = {
    torch.relu: "torch.relu", torch.tanh: "torch.tanh", torch.sigmoid: "torch.sigmoid",
    torch.cat: "torch.cat", torch.flatten: "torch.flatten",
    operator.add: "operator.add", operator.sub: "operator.sub", operator.mul: "operator.mul",
    operator.truediv: "operator.truediv", operator.neg: "operator.neg", operator.getitem: "operator.getitem",
    F.relu: "torch.nn.functional.relu", F.gelu: "torch.nn.functional.gelu", F.silu: "torch.nn.functional.silu",
    F.elu: "torch.nn.functional.elu", F.leaky_relu: "torch.nn.functional.leaky_relu",
    F.tanh: "torch.nn.functional.tanh", F.sigmoid: "torch.nn.functional.sigmoid",
    F.dropout: "torch.nn.functional.dropout", F.one_hot: "torch.nn.functional.one_hot",
}
"""Canonical names of the callables the parent may allow; any other target is named by its qualified name."""
MODULES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "scale_grad_by_freq", "sparse"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.Dropout: ("p",),
    nn.LeakyReLU: ("negative_slope",),
    nn.ELU: ("alpha",),
    nn.GELU: ("approximate",),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.ReLU: (), nn.SiLU: (), nn.Tanh: (), nn.Sigmoid: (), nn.Identity: (),
}
"""Constructor settings reported per module type (never weights); other types are reported by name only."""


class Refused(Exception):
    """Something in the traced graph cannot be described as JSON."""


def main() -> None:
    """Read the request, jail this process, describe the model and print the answer on stdout."""
    request = json.loads(sys.stdin.read())
    exit_now = os._exit  # bound before the source runs, which could rebind os._exit
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the source prints goes to stderr, not into the answer
    sys.dont_write_bytecode = True
    try:
        code = _compile(str(request["source"]))  # before the hook: error messages read no files after it
        _disarm()
        sys.addaudithook(_make_hook(out.fileno(), _read_roots()))
        answer = describe(code, int(request["inputs"]), int(request["outputs"]))
    except _Stage as exc:
        answer = {"error": exc.message, "stage": exc.stage}
    out.write(json.dumps(answer, allow_nan=False))
    out.flush()
    exit_now(0)  # no atexit handlers or threads the source may have left


class _Stage(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage, self.message = stage, message[:MAX_ERROR]


def _compile(source: str) -> types.CodeType:
    try:
        return compile(source, SOURCE_NAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise _Stage("syntax", f"{getattr(exc, 'msg', exc)}{where}") from None


def describe(code: types.CodeType, inputs: int, outputs: int) -> dict[str, Any]:
    """Run the compiled source, build and trace `Net(inputs, outputs)`, and describe the graph."""
    namespace: dict[str, Any] = {"__name__": "veil_model_source", "torch": torch, "nn": nn, "F": F}
    _run("exec", lambda: exec(code, namespace))
    net = namespace.get("Net")
    if not (isinstance(net, type) and issubclass(net, nn.Module)):
        raise _Stage("net", "the source must define a class Net(nn.Module)")
    model = _run("construct", lambda: net(inputs, outputs))
    traced = _run("trace", lambda: torch.fx.symbolic_trace(model))
    try:
        return _graph(traced)
    except Refused as exc:
        raise _Stage("encode", str(exc)) from None


def _run(stage: str, step: Any) -> Any:
    try:
        return step()
    except BaseException as exc:  # the source may raise anything, SystemExit included
        raise _Stage(stage, _explain(exc)) from None


def _explain(exc: BaseException) -> str:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == SOURCE_NAME]
    where = f" (line {lines[-1]})" if lines else ""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR] + where


def _graph(traced: torch.fx.GraphModule) -> dict[str, Any]:
    nodes = [_node(n) for n in traced.graph.nodes]
    modules = {
        str(n.target): _module(traced.get_submodule(str(n.target)))
        for n in traced.graph.nodes
        if n.op == "call_module"
    }
    return {"nodes": nodes, "modules": modules}


def _node(node: torch.fx.Node) -> dict[str, Any]:
    try:
        return {
            "op": node.op,
            "name": node.name,
            "target": _target(node),
            "args": [_value(a) for a in node.args],
            "kwargs": {str(k): _value(v) for k, v in node.kwargs.items()},
        }
    except Refused as exc:
        raise Refused(f"node {node.name!r}: {exc}") from None


def _target(node: torch.fx.Node) -> str:
    if node.op != "call_function":
        return str(node.target)
    try:
        known = FUNCTIONS.get(node.target)
    except TypeError:  # unhashable target
        known = None
    if known is not None:
        return known
    name = getattr(node.target, "__name__", None)
    for namespace, prefix in ((torch, "torch"), (F, "torch.nn.functional"), (operator, "operator"),
                              (torch.Tensor, "torch.Tensor"), (math, "math")):
        if isinstance(name, str) and getattr(namespace, name, None) is node.target:
            return f"{prefix}.{name}"
    module = getattr(node.target, "__module__", None) or type(node.target).__module__
    return f"{module}.{getattr(node.target, '__qualname__', name) or repr(node.target)[:100]}"


def _value(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, slice):
        return {"slice": [_value(value.start), _value(value.stop), _value(value.step)]}
    if isinstance(value, tuple):
        return {"tuple": [_value(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_value(v) for v in value]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise Refused(f"constant {value} is not finite")
        return value
    raise Refused(f"constants of type {type(value).__name__} are not supported (only int, float, bool, str, None)")


def _module(module: nn.Module) -> dict[str, Any]:
    kind = type(module)
    if kind not in MODULES:
        return {"type": f"{kind.__module__}.{kind.__qualname__}", "config": {}}
    config = {field: _config_value(getattr(module, field)) for field in MODULES[kind]}
    if kind in (nn.Linear, nn.LayerNorm):
        config["bias"] = getattr(module, "bias", None) is not None
    return {"type": kind.__name__, "config": config}


def _config_value(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_config_value(v) for v in value]
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise Refused(f"module setting of type {type(value).__name__} is not supported")


def _read_roots() -> tuple[str, ...]:
    """Folders the source may read from (lazy imports): the Python installation and the virtual env."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return tuple(os.path.realpath(r).rstrip("/") + "/" for r in roots) + tuple(r.rstrip("/") + "/" for r in roots)


def _disarm() -> None:
    """Drop the few process and signal primitives that raise no audit event."""
    sys.modules.pop("_posixsubprocess", None)
    for module_name, attr in (("subprocess", "_fork_exec"), ("os", "pidfd_open"), ("posix", "pidfd_open"),
                              ("signal", "pidfd_send_signal"), ("_signal", "pidfd_send_signal")):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            delattr(module, attr)


def _make_hook(out_fd: int, roots: tuple[str, ...]) -> Any:
    """The audit hook. Everything it uses is bound as a default argument (changing a function's defaults
    is itself an audited event, refused for this module's functions), so the source cannot rebind it.
    A refused event ends the process at once with an error answer, whatever the source catches."""

    def hook(
        event: str,
        args: tuple[Any, ...],
        _type: Any = type,
        _str: Any = str,
        _int: Any = int,
        _len: Any = len,
        _function: Any = types.FunctionType,
        _code: Any = types.CodeType,
        _prefixes: tuple[str, ...] = REFUSED_EVENTS,
        _imports: tuple[str, ...] = REFUSED_IMPORTS,
        _roots: tuple[str, ...] = roots,
        _write_flags: int = WRITE_FLAGS,
        _file: str = __file__,
        _fd: int = out_fd,
        _dumps: Any = json.dumps,
        _write: Any = os.write,
        _exit: Any = os._exit,
    ) -> None:
        reason = None
        if _str.startswith(event, _prefixes):
            reason = "not allowed in the sandbox"
        elif event == "import":
            if _len(args) > 0 and args[0] in _imports:
                reason = "this module is not available in the sandbox"
        elif event == "object.__setattr__":
            if _len(args) > 1 and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                if _type(args[0]) is _function and _type(args[0].__code__) is _code:
                    if args[0].__code__.co_filename == _file:
                        reason = "the sandbox's own functions cannot be changed"
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode):
                reason = "files cannot be written"
            elif _type(flags) is _int and flags & _write_flags:
                reason = "files cannot be written"
            elif _type(path) is not _int:
                if _type(path) is not _str or "/.." in path or not _str.startswith(path, _roots):
                    reason = "only the Python installation can be read"
        elif event == "os.listdir" or event == "os.scandir":
            path = args[0] if _len(args) > 0 else None
            if path is not None and _type(path) is not _int:
                if _type(path) is not _str or "/.." in path or not _str.startswith(path + "/", _roots):
                    reason = "only the Python installation can be listed"
        if reason is not None:
            _write(_fd, _dumps({"error": event + ": " + reason, "stage": "refused"}).encode())
            _exit(0)

    return hook


if __name__ == "__main__":
    main()
