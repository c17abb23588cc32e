"""A custom model's checked graph, rebuilt from layers Veil constructs: shared by both roles.

A site traces a researcher's `Net` in its sandbox (`veil.executor.custom_model`), which answers with a
JSON description of the `torch.fx` graph: operations and layer settings, never tensor values. This module
treats that description as untrusted: it checks it against allow-lists (per-row operations only, the batch
dimension never moved, merged, reduced or indexed), builds a fresh `GraphModule` from layers it constructs
itself, and checks the result's size, output shape and per-row independence (`rebuild`). The site stores
the checked description with the trained weights, so the researcher's side rebuilds the same module from it
without running any source (`veil.models.build`). Needs torch (`veil[train]`).
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from veil.errors import QueryError
from veil.limits import MAX_PARAMETERS

CODE = "bad_model_source"
MAX_WIDTH = 1_000_000
MAX_NODES = 2_000
MAX_ROW_ELEMENTS = 1_000_000
"""At most this many values per patient in one intermediate tensor..."""
MAX_ROW_ACTIVATIONS = 4_000_000
"""...and in all of them together (they bound the memory a training batch needs)."""
MAX_CLASSES = 100_000
SHAPE_BATCH = 7
"""Batch size of the shape check: odd, so that it is unlikely to equal a layer width by accident."""
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
PART = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}|[0-9]{1,6}")
RESERVED = frozenset(dir(torch.fx.GraphModule)) | {"training", "graph", "code", "meta"}
HINT = (
    "Build Net from nn.Linear, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.Dropout, nn.ReLU, nn.LeakyReLU, "
    "nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity and nn.Flatten(start_dim>=1); in forward use "
    "+ - * / and negation, column slices such as x[:, 2:5], torch.cat(..., dim=1), torch.flatten(x, 1), "
    "torch.relu/tanh/sigmoid, F.relu/gelu/silu/elu/leaky_relu/tanh/sigmoid/dropout, "
    "F.one_hot(codes, num_classes=n), and x.long(), .float(), .relu(), .tanh(), .sigmoid(), .flatten(1), "
    ".unsqueeze(1), .squeeze(1). Every operation must act on each row (patient) on its own."
)
REDUCTIONS = frozenset(
    "sum mean nanmean nansum max min amax amin aminmax argmax argmin std var std_mean var_mean prod norm median "
    "nanmedian mode logsumexp cumsum cumprod cummax cummin all any count_nonzero softmax log_softmax "
    "batch_norm instance_norm dist cdist unique sort topk kthvalue quantile".split()
)
RESHAPES = frozenset(
    "view view_as reshape reshape_as transpose permute t T mT swapaxes swapdims movedim moveaxis expand "
    "expand_as repeat repeat_interleave unflatten narrow split chunk unbind roll flip gather scatter "
    "index_select masked_select take stack".split()
)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()



def rebuild(answer: Mapping[str, Any], inputs: int, outputs: int) -> torch.fx.GraphModule:
    """A fresh, untrained module from a traced graph's description, taking (batch, inputs) to
    (batch, outputs); any problem is a `QueryError` with code `bad_model_source`."""
    for label, value in (("inputs", inputs), ("outputs", outputs)):
        if type(value) is not int or not 1 <= value <= MAX_WIDTH:
            raise QueryError(CODE, f"{label} must be an integer from 1 to {MAX_WIDTH:,}, not {value!r}")
    plan = _plan(answer)
    _check_size(plan)
    _check_shapes(_instantiate(plan, torch.device("meta")), inputs, outputs)
    module = _instantiate(plan, torch.device("cpu"))
    _check_module(module, inputs, outputs)
    return module


class _Ref:
    """A reference to an earlier node of the sandbox's graph."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass
class _Plan:
    """The checked graph (not yet bound to modules) and how to construct each of its layers."""

    graph: torch.fx.Graph
    factories: dict[str, Callable[[], nn.Module]]
    parameters: int


def _refuse(message: str, hint: str | None = HINT) -> QueryError:
    return QueryError(CODE, message, hint)


def _plan(answer: Any) -> _Plan:
    """Check the sandbox's graph description node by node and turn it into a new fx graph."""
    if not isinstance(answer, dict) or not isinstance(answer.get("nodes"), list):
        raise _refuse("the sandbox's graph description is malformed")
    nodes, modules = answer["nodes"], answer.get("modules")
    if not isinstance(modules, dict):
        raise _refuse("the sandbox's graph description has no module list")
    if len(nodes) > MAX_NODES:
        raise _refuse(f"the traced graph has {len(nodes):,} operations; at most {MAX_NODES:,} are allowed")
    builder = _Builder(modules)
    for raw in nodes:
        builder.add(raw)
    return builder.finish()


class _Builder:
    """Rebuilds the graph from allowed parts, one described node at a time."""

    def __init__(self, modules: Mapping[str, Any]) -> None:
        self.described = modules
        self.graph = torch.fx.Graph()
        self.env: dict[str, torch.fx.Node] = {}
        self.factories: dict[str, Callable[[], nn.Module]] = {}
        self.parameters = 0
        self.placeholders = 0
        self.outputs = 0

    def add(self, raw: Any) -> None:
        if not isinstance(raw, dict) or set(raw) != {"op", "name", "target", "args", "kwargs"}:
            raise _refuse("the sandbox's graph description has a malformed node")
        name, op, target = raw["name"], raw["op"], raw["target"]
        if not (isinstance(name, str) and NAME.fullmatch(name)) or name in self.env:
            raise _refuse(f"the traced graph has an invalid or repeated node name {str(name)[:100]!r}")
        if not isinstance(target, str) or not isinstance(raw["args"], list) or not isinstance(raw["kwargs"], dict):
            raise _refuse(f"node {name!r}: malformed description")
        args = tuple(_decode(a, name) for a in raw["args"])
        kwargs = {str(k): _decode(v, name) for k, v in raw["kwargs"].items()}
        handler = {
            "placeholder": self._placeholder,
            "call_module": self._call_module,
            "call_function": self._call_function,
            "call_method": self._call_method,
            "output": self._output,
        }.get(op)
        if op == "get_attr":
            raise _refuse(
                f"node {name!r}: forward reads the attribute self.{target} directly (a parameter, buffer or "
                "tensor constant); only calls of allowed layers may hold parameters, and no buffers are allowed",
                "create parameters through layers such as nn.Linear and call them; do not register buffers or "
                "keep tensors on the module",
            )
        if handler is None:
            raise _refuse(f"node {name!r}: operation kind {str(op)[:40]!r} is not allowed")
        self.env[name] = handler(name, target, args, kwargs)

    def finish(self) -> _Plan:
        if self.placeholders != 1:
            raise _refuse("forward must take exactly one input x", "define forward(self, x)")
        if self.outputs != 1:
            raise _refuse("the traced graph has no output", "forward must return one tensor")
        self.graph.lint()
        return _Plan(self.graph, self.factories, self.parameters)

    # -- node kinds

    def _placeholder(self, name: str, target: str, args: tuple, kwargs: dict) -> torch.fx.Node:
        self.placeholders += 1
        if self.placeholders > 1 or args or kwargs:
            raise _refuse(
                f"forward takes more than one input (node {name!r}): it must take exactly one tensor x",
                "define forward(self, x) with no other arguments",
            )
        return self.graph.placeholder(name)

    def _output(self, name: str, target: str, args: tuple, kwargs: dict) -> torch.fx.Node:
        self.outputs += 1
        if len(args) != 1 or kwargs or not isinstance(args[0], _Ref):
            raise _refuse("forward must return exactly one tensor (not a tuple, list or dict)")
        return self.graph.output(self._node(args[0], name))

    def _call_module(self, name: str, target: str, args: tuple, kwargs: dict) -> torch.fx.Node:
        if target not in self.factories:
            self._add_module(name, target)
        if len(args) != 1 or kwargs or not isinstance(args[0], _Ref):
            raise _refuse(f"node {name!r}: layer {target!r} must be called with exactly one tensor")
        return self.graph.create_node("call_module", target, (self._node(args[0], name),), {}, name=name)

    def _call_function(self, name: str, target: str, args: tuple, kwargs: dict) -> torch.fx.Node:
        rule = FUNCTIONS.get(target)
        if rule is None:
            raise _refuse(f"node {name!r}: {target} is not allowed: {_why_not(target)}")
        if target == "torch.nn.functional.dropout":
            return self._functional_dropout(name, _Call(self, name, target, rule.params, args, kwargs))
        call = _Call(self, name, target, rule.params, args, kwargs)
        new_args, new_kwargs = rule.check(call)
        return self.graph.create_node("call_function", rule.function, new_args, new_kwargs, name=name)

    def _call_method(self, name: str, target: str, args: tuple, kwargs: dict) -> torch.fx.Node:
        rule = METHODS.get(target)
        if rule is None:
            raise _refuse(f"node {name!r}: the tensor method .{target}() is not allowed: {_why_not(target)}")
        call = _Call(self, name, f".{target}()", rule.params, args, kwargs)
        new_args, new_kwargs = rule.check(call)
        return self.graph.create_node("call_method", target, new_args, new_kwargs, name=name)

    def _functional_dropout(self, name: str, call: _Call) -> torch.fx.Node:
        """F.dropout becomes an nn.Dropout layer, so that it follows train() and eval(); with
        training=False it does nothing and is left out."""
        x, p = call.tensor("input"), call.number("p", 0.0, 1.0)
        call.not_inplace()
        if not call.flag("training"):
            return x
        target = f"_functional_dropout_{len(self.factories)}"
        self.factories[target] = functools.partial(nn.Dropout, p)
        return self.graph.create_node("call_module", target, (x,), {}, name=name)

    # -- helpers

    def _node(self, ref: _Ref, where: str) -> torch.fx.Node:
        node = self.env.get(ref.name)
        if node is None:
            raise _refuse(f"node {where!r}: refers to {ref.name!r}, which is not an earlier node")
        return node

    def _add_module(self, name: str, target: str) -> None:
        parts = target.split(".")
        bad = [p for p in parts if not PART.fullmatch(p) or p in RESERVED]
        if not parts or bad:
            raise _refuse(
                f"node {name!r}: layer path {target[:100]!r} is not allowed ({', '.join(map(repr, bad[:3]))}: "
                "names must be plain identifiers or indices that do not clash with nn.Module attributes)",
                "rename the layer attribute",
            )
        for other in self.factories:
            if other.startswith(target + ".") or target.startswith(other + "."):
                raise _refuse(f"node {name!r}: layer {target!r} is both a layer and a container of layers")
        described = self.described.get(target)
        if not isinstance(described, dict) or not isinstance(described.get("config"), dict):
            raise _refuse(f"node {name!r}: the sandbox did not describe layer {target!r}")
        kind = str(described.get("type"))
        rule = LAYERS.get(kind)
        if rule is None:
            raise _refuse(f"node {name!r}: layer {target!r} is a {kind.rsplit('.', 1)[-1]}, which is not allowed: "
                          f"{_why_not_layer(kind)}")
        factory, parameters = rule(_Config(name, target, kind, described["config"]))
        self.factories[target] = factory
        self.parameters += parameters


def _decode(value: Any, where: str, depth: int = 0) -> Any:
    """A JSON-encoded argument as a Python value, with node references as `_Ref`."""
    if depth > 8:
        raise _refuse(f"node {where!r}: arguments are nested too deeply")
    if value is None or type(value) in (bool, str):
        return value
    if type(value) is int:
        if abs(value) > 2**40:
            raise _refuse(f"node {where!r}: integer constant {value} is too large")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise _refuse(f"node {where!r}: constants must be finite numbers")
        return value
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind == "node" and isinstance(inner, str):
            return _Ref(inner)
        if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
            parts = [_decode(v, where, depth + 1) for v in inner]
            if any(p is not None and type(p) is not int for p in parts):
                raise _refuse(f"node {where!r}: slice bounds must be integers or empty")
            return slice(*parts)
        if kind in ("tuple", "list") and isinstance(inner, list) and len(inner) <= 1024:
            items = [_decode(v, where, depth + 1) for v in inner]
            return tuple(items) if kind == "tuple" else items
        if kind == "ellipsis" and inner is True:
            return Ellipsis
    raise _refuse(f"node {where!r}: argument {str(value)[:80]} is not a supported constant")


def _why_not(target: str) -> str:
    base = target.rsplit(".", 1)[-1]
    if base.endswith("_") and not base.startswith("__"):
        return "in-place operations are not allowed (they overwrite tensors autograd and Opacus still need)"
    if base in REDUCTIONS:
        return "reductions and batch statistics mix patients of a batch"
    if base in RESHAPES:
        return "it can move, merge or pick along the batch dimension and so mix patients"
    return "it is not on the allow-list of per-row operations"


def _why_not_layer(kind: str) -> str:
    base = kind.rsplit(".", 1)[-1]
    if "BatchNorm" in base or "InstanceNorm" in base:
        return "it normalizes with statistics of the batch, which mixes patients; use nn.LayerNorm or nn.GroupNorm"
    return "it is not on the allow-list of layers"


# ---------------------------------------------------------------- argument rules


class _Call:
    """The arguments of one call, bound to named parameters and checked one at a time."""

    def __init__(self, builder: _Builder, node: str, label: str, params: Sequence[tuple[str, Any]],
                 args: tuple, kwargs: dict) -> None:
        self.builder, self.node, self.label = builder, node, label
        names = [p for p, _ in params]
        if len(args) > len(params):
            raise self.error(f"takes at most {len(params)} arguments, not {len(args)}")
        unknown = sorted(set(kwargs) - set(names[len(args):]))
        if unknown:
            raise self.error(f"unexpected argument(s) {', '.join(unknown)}")
        self.values = dict(params) | dict(zip(names, args)) | kwargs

    def error(self, problem: str, hint: str | None = HINT) -> QueryError:
        return _refuse(f"node {self.node!r}: {self.label} {problem}", hint)

    def _get(self, key: str) -> Any:
        value = self.values[key]
        if value is REQUIRED:
            raise self.error(f"needs {key} to be given")
        return value

    def tensor(self, key: str) -> torch.fx.Node:
        value = self._get(key)
        if not isinstance(value, _Ref):
            raise self.error(f"needs a tensor computed from x as {key}")
        return self.builder._node(value, self.node)

    def operand(self, key: str) -> torch.fx.Node | int | float:
        value = self._get(key)
        if isinstance(value, _Ref):
            return self.builder._node(value, self.node)
        if type(value) in (int, float):
            return value
        raise self.error(f"needs a tensor or a number as {key}, not {type(value).__name__}")

    def integer(self, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(key)
        if type(value) is not int or (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum
        ):
            bounds = f" from {minimum}" if minimum is not None else ""
            bounds += f" up to {maximum}" if maximum is not None else ""
            raise self.error(f"needs {key} to be an integer{bounds}, not {value!r}")
        return value

    def dim(self, key: str) -> int:
        value = self.integer(key)
        if value == 0:
            raise self.error(f"may not use {key}=0: dimension 0 is the batch (one row per patient)",
                             f"use {key}=1 or higher")
        return value

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self._get(key)
        if type(value) not in (int, float) or (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum
        ):
            raise self.error(f"needs {key} to be a number in range, not {value!r}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if type(value) is not bool:
            raise self.error(f"needs {key} to be True or False, not {value!r}")
        return value

    def choice(self, key: str, options: Sequence[str]) -> str:
        value = self._get(key)
        if value not in options:
            raise self.error(f"needs {key} to be one of {', '.join(map(repr, options))}, not {value!r}")
        return value

    def not_inplace(self) -> None:
        if self.values.get("inplace") not in (False, None):
            raise self.error("may not run in place (inplace=True)", "leave inplace at its default, False")

    def index(self, key: str) -> tuple:
        value = self._get(key)
        full = slice(None, None, None)
        if isinstance(value, slice) and value == full:
            value = (full,)
        if not isinstance(value, tuple) or not value or value[0] != full:
            raise self.error(
                f"index {_show_index(value)} is not allowed: indexing must keep the batch dimension whole "
                "(start with ':'); picking or slicing rows would select or mix patients",
                "select columns only, e.g. x[:, 3] or x[:, 2:5]",
            )
        for item in value[1:]:
            if isinstance(item, _Ref | list):
                raise self.error("may not index with a tensor or a list: that can gather values across patients",
                                 "use integers and slices, e.g. x[:, 2:5]")
            if isinstance(item, slice) and item.step is not None and item.step < 1:
                raise self.error("needs positive slice steps")
            if not (item is None or item is Ellipsis or type(item) is int or isinstance(item, slice)):
                raise self.error(f"may not index with {item!r}")
        return value


def _show_index(value: Any) -> str:
    def one(v: Any) -> str:
        if isinstance(v, slice):
            return ":".join("" if p is None else str(p) for p in (v.start, v.stop)) + (
                f":{v.step}" if v.step is not None else "")
        if isinstance(v, _Ref):
            return f"<tensor {v.name}>"
        return "..." if v is Ellipsis else repr(v)

    return "[" + (", ".join(one(v) for v in value) if isinstance(value, tuple) else one(value)) + "]"


@dataclass(frozen=True)
class _Rule:
    """An allowed call: the real callable (or method name), its parameters and the check of its arguments."""

    function: Any
    params: tuple[tuple[str, Any], ...]
    check: Callable[[_Call], tuple[tuple, dict]]


def _unary(call: _Call) -> tuple[tuple, dict]:
    call.not_inplace()
    return (call.tensor("input"),), {}


def _binary(call: _Call) -> tuple[tuple, dict]:
    a, b = call.operand("a"), call.operand("b")
    if not isinstance(a, torch.fx.Node) and not isinstance(b, torch.fx.Node):
        raise call.error("needs at least one tensor")
    return (a, b), {}


def _cat(call: _Call) -> tuple[tuple, dict]:
    tensors = call._get("tensors")
    if not isinstance(tensors, list | tuple) or not tensors or not all(isinstance(t, _Ref) for t in tensors):
        raise call.error("needs a list of tensors")
    return ([call.builder._node(t, call.node) for t in tensors],), {"dim": call.dim("dim")}


def _flatten(call: _Call) -> tuple[tuple, dict]:
    x = call.tensor("input")
    start = call.integer("start_dim")
    if start == 0:
        raise call.error("may not flatten from dimension 0, the batch", "use start_dim=1")
    return (x, start, call.integer("end_dim")), {}


def _getitem(call: _Call) -> tuple[tuple, dict]:
    return (call.tensor("a"), call.index("b")), {}


def _gelu(call: _Call) -> tuple[tuple, dict]:
    return (call.tensor("input"),), {"approximate": call.choice("approximate", ("none", "tanh"))}


def _elu(call: _Call) -> tuple[tuple, dict]:
    call.not_inplace()
    return (call.tensor("input"), call.number("alpha", -1e6, 1e6)), {}


def _leaky_relu(call: _Call) -> tuple[tuple, dict]:
    call.not_inplace()
    return (call.tensor("input"), call.number("negative_slope", -1e6, 1e6)), {}


def _one_hot(call: _Call) -> tuple[tuple, dict]:
    if call.values["num_classes"] in (REQUIRED, -1):
        raise call.error("needs num_classes to be given", "write F.one_hot(codes, num_classes=n)")
    return (call.tensor("input"),), {"num_classes": call.integer("num_classes", 1, MAX_CLASSES)}


def _dim_method(call: _Call) -> tuple[tuple, dict]:
    return (call.tensor("input"), call.dim("dim")), {}


X = (("input", REQUIRED),)
INPLACE = (("inplace", False),)
FUNCTIONS: dict[str, _Rule] = {
    "torch.relu": _Rule(torch.relu, X, _unary),
    "torch.tanh": _Rule(torch.tanh, X, _unary),
    "torch.sigmoid": _Rule(torch.sigmoid, X, _unary),
    "torch.cat": _Rule(torch.cat, (("tensors", REQUIRED), ("dim", REQUIRED)), _cat),
    "torch.flatten": _Rule(torch.flatten, (*X, ("start_dim", 0), ("end_dim", -1)), _flatten),
    "operator.add": _Rule(operator.add, (("a", REQUIRED), ("b", REQUIRED)), _binary),
    "operator.sub": _Rule(operator.sub, (("a", REQUIRED), ("b", REQUIRED)), _binary),
    "operator.mul": _Rule(operator.mul, (("a", REQUIRED), ("b", REQUIRED)), _binary),
    "operator.truediv": _Rule(operator.truediv, (("a", REQUIRED), ("b", REQUIRED)), _binary),
    "operator.neg": _Rule(operator.neg, (("a", REQUIRED),), lambda call: ((call.tensor("a"),), {})),
    "operator.getitem": _Rule(operator.getitem, (("a", REQUIRED), ("b", REQUIRED)), _getitem),
    "torch.nn.functional.relu": _Rule(F.relu, (*X, *INPLACE), _unary),
    "torch.nn.functional.gelu": _Rule(F.gelu, (*X, ("approximate", "none")), _gelu),
    "torch.nn.functional.silu": _Rule(F.silu, (*X, *INPLACE), _unary),
    "torch.nn.functional.elu": _Rule(F.elu, (*X, ("alpha", 1.0), *INPLACE), _elu),
    "torch.nn.functional.leaky_relu": _Rule(F.leaky_relu, (*X, ("negative_slope", 0.01), *INPLACE), _leaky_relu),
    "torch.nn.functional.tanh": _Rule(F.tanh, X, _unary),
    "torch.nn.functional.sigmoid": _Rule(F.sigmoid, X, _unary),
    "torch.nn.functional.dropout": _Rule(F.dropout, (*X, ("p", 0.5), ("training", True), *INPLACE), _unary),
    "torch.nn.functional.one_hot": _Rule(F.one_hot, (*X, ("num_classes", -1)), _one_hot),
}
"""Allowed call_function targets, by the canonical name the sandbox reports, and the real callables."""
METHODS: dict[str, _Rule] = {
    "long": _Rule("long", X, _unary),
    "float": _Rule("float", X, _unary),
    "relu": _Rule("relu", X, _unary),
    "tanh": _Rule("tanh", X, _unary),
    "sigmoid": _Rule("sigmoid", X, _unary),
    "flatten": _Rule("flatten", (*X, ("start_dim", 0), ("end_dim", -1)), _flatten),
    "unsqueeze": _Rule("unsqueeze", (*X, ("dim", REQUIRED)), _dim_method),
    "squeeze": _Rule("squeeze", (*X, ("dim", REQUIRED)), _dim_method),
}
"""Allowed call_method targets."""


# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Config:
    """A layer's settings as the sandbox described them, read with checks."""

    node: str
    target: str
    kind: str
    values: Mapping[str, Any]

    def error(self, problem: str, hint: str | None = HINT) -> QueryError:
        return _refuse(f"node {self.node!r}: layer {self.target!r} ({self.kind}) {problem}", hint)

    def get(self, key: str) -> Any:
        if key not in self.values:
            raise self.error(f"has no setting {key} in the sandbox's description")
        return self.values[key]

    def integer(self, key: str, minimum: int = 1) -> int:
        value = self.get(key)
        if type(value) is not int or not minimum <= value <= 10**9:
            raise self.error(f"needs {key} to be an integer of at least {minimum}, not {value!r}")
        return value

    def number(self, key: str, minimum: float, maximum: float) -> float:
        value = self.get(key)
        if type(value) not in (int, float) or not minimum <= value <= maximum:
            raise self.error(f"needs {key} between {minimum:g} and {maximum:g}, not {value!r}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if type(value) is not bool:
            raise self.error(f"needs {key} to be True or False, not {value!r}")
        return value

    def choice(self, key: str, options: Sequence[str]) -> str:
        value = self.get(key)
        if value not in options:
            raise self.error(f"needs {key} to be one of {', '.join(map(repr, options))}, not {value!r}")
        return value


_Layer = tuple[Callable[[], nn.Module], int]


def _linear(c: _Config) -> _Layer:
    i, o, bias = c.integer("in_features"), c.integer("out_features"), c.flag("bias")
    return functools.partial(nn.Linear, i, o, bias=bias), i * o + (o if bias else 0)


def _embedding(c: _Config) -> _Layer:
    n, d = c.integer("num_embeddings"), c.integer("embedding_dim")
    padding = c.get("padding_idx")
    if padding is not None and (type(padding) is not int or not -n <= padding < n):
        raise c.error(f"has an invalid padding_idx {padding!r}")
    if c.get("max_norm") is not None:
        raise c.error("may not use max_norm: it rewrites the weights in place during the forward pass",
                      "leave max_norm unset")
    if c.get("scale_grad_by_freq") is not False:
        raise c.error("may not use scale_grad_by_freq: it scales gradients by counts over the whole batch",
                      "leave scale_grad_by_freq=False")
    if c.get("sparse") is not False:
        raise c.error("may not use sparse gradients: Opacus needs dense ones", "leave sparse=False")
    return functools.partial(nn.Embedding, n, d, padding_idx=padding), n * d


def _layer_norm(c: _Config) -> _Layer:
    shape = c.get("normalized_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or any(
        type(s) is not int or not 1 <= s <= 10**9 for s in shape
    ):
        raise c.error(f"has an invalid normalized_shape {shape!r}")
    eps, affine, bias = c.number("eps", 0.0, 1.0), c.flag("elementwise_affine"), c.flag("bias")
    size = math.prod(shape)
    return (
        functools.partial(nn.LayerNorm, tuple(shape), eps=eps, elementwise_affine=affine, bias=bias),
        size * (1 + bias) if affine else 0,
    )


def _group_norm(c: _Config) -> _Layer:
    groups, channels = c.integer("num_groups"), c.integer("num_channels")
    if channels % groups:
        raise c.error(f"needs num_channels ({channels}) divisible by num_groups ({groups})")
    eps, affine = c.number("eps", 0.0, 1.0), c.flag("affine")
    return functools.partial(nn.GroupNorm, groups, channels, eps=eps, affine=affine), 2 * channels if affine else 0


def _flatten_layer(c: _Config) -> _Layer:
    start, end = c.get("start_dim"), c.get("end_dim")
    if type(start) is not int or type(end) is not int or start < 1:
        raise c.error(f"must flatten from start_dim >= 1 (dimension 0 is the batch), not {start!r}",
                      "use nn.Flatten(start_dim=1)")
    return functools.partial(nn.Flatten, start, end), 0


LAYERS: dict[str, Callable[[_Config], _Layer]] = {
    "Linear": _linear,
    "Embedding": _embedding,
    "LayerNorm": _layer_norm,
    "GroupNorm": _group_norm,
    "Dropout": lambda c: (functools.partial(nn.Dropout, c.number("p", 0.0, 1.0)), 0),
    "LeakyReLU": lambda c: (functools.partial(nn.LeakyReLU, c.number("negative_slope", -1e6, 1e6)), 0),
    "ELU": lambda c: (functools.partial(nn.ELU, c.number("alpha", -1e6, 1e6)), 0),
    "GELU": lambda c: (functools.partial(nn.GELU, c.choice("approximate", ("none", "tanh"))), 0),
    "Flatten": _flatten_layer,
    "ReLU": lambda c: (nn.ReLU, 0),
    "SiLU": lambda c: (nn.SiLU, 0),
    "Tanh": lambda c: (nn.Tanh, 0),
    "Sigmoid": lambda c: (nn.Sigmoid, 0),
    "Identity": lambda c: (nn.Identity, 0),
}
"""Allowed layer types (exact torch.nn classes, by name) and how to construct a fresh one from settings."""


# ---------------------------------------------------------------- checking the rebuilt module


def _instantiate(plan: _Plan, device: torch.device) -> torch.fx.GraphModule:
    """A GraphModule over fresh layers on `device` (meta: shapes only, no memory)."""
    with device:
        layers = {target: factory() for target, factory in plan.factories.items()}
    graph = torch.fx.Graph()  # each module gets its own copy of the graph, so shape metadata stays apart
    graph.output(graph.graph_copy(plan.graph, {}))
    return torch.fx.GraphModule(layers, graph, class_name="CustomNet")


def _check_size(plan: _Plan) -> None:
    if plan.parameters > MAX_PARAMETERS:
        raise _refuse(f"the model has {plan.parameters:,} parameters; at most {MAX_PARAMETERS:,} are allowed",
                      "use fewer or narrower layers, or smaller embeddings")


def _check_shapes(module: torch.fx.GraphModule, inputs: int, outputs: int) -> None:
    """Run the graph on meta tensors (shapes only, no memory) and check, before each operation, that it
    does not work along the batch dimension, and after it, that the batch stays first and sizes fit."""
    module.eval()
    _Shapes(module).run(torch.empty(SHAPE_BATCH, inputs, device="meta"))
    output = next(n for n in module.graph.nodes if n.op == "output")
    shape = _shape(output.args[0])
    if shape != (SHAPE_BATCH, outputs):
        raise _refuse(
            f"forward returns shape {_rows(shape)} for an input of shape (batch, {inputs}); "
            f"it must return (batch, {outputs})",
            f"end with a layer of {outputs} outputs, e.g. nn.Linear(width, outputs)",
        )


class _Shapes(torch.fx.Interpreter):
    """Records each node's result shape in `node.meta["shape"]`, checking as it goes."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.extra_traceback = False
        self.total = 0

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "output":
            return super().run_node(n)
        _check_dims(n, self.module)
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 -- a failing layer or operation is the researcher's to fix
            raise _refuse(f"node {n.name!r} fails on a test input: "
                          f"{_first_line(exc)}") from None
        shape = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        n.meta["shape"] = shape
        if not shape or shape[0] != SHAPE_BATCH:
            raise _refuse(f"node {n.name!r}: its result has shape {_rows(shape)}: the first dimension must stay "
                          "the batch, one row per patient")
        per_row = math.prod(shape[1:])
        self.total += per_row
        if per_row > MAX_ROW_ELEMENTS or self.total > MAX_ROW_ACTIVATIONS:
            raise _refuse(f"node {n.name!r}: the intermediate tensors are too large ({per_row:,} values per row "
                          f"here, {self.total:,} so far; at most {MAX_ROW_ELEMENTS:,} and {MAX_ROW_ACTIVATIONS:,})",
                          "use narrower layers")
        return result


def _check_dims(node: torch.fx.Node, module: torch.nn.Module) -> None:
    """Dimensions an operation works along, resolved against its input's rank: never the batch (0)."""
    label = node.name

    def refuse(problem: str) -> QueryError:
        return _refuse(f"node {label!r}: {problem}", HINT)

    first = node.args[0] if node.args else None
    rank = _rank(first, label) if isinstance(first, torch.fx.Node) else 0
    if node.target is torch.cat:
        ranks = {_rank(t, label) for t in first}
        rank = ranks.pop()
        if ranks:
            raise refuse("torch.cat needs tensors of the same number of dimensions")
        if _resolve(node.kwargs["dim"], rank) < 1:
            raise refuse(f"torch.cat along dim={node.kwargs['dim']} joins along the batch dimension")
    elif node.target in (torch.flatten, "flatten") and _resolve(node.args[1], rank) < 1:
        raise refuse(f"flatten from start_dim={node.args[1]} would merge the batch dimension")
    elif node.target == "unsqueeze" and _resolve(node.args[1], rank + 1) < 1:
        raise refuse(f"unsqueeze({node.args[1]}) would put a new dimension before the batch")
    elif node.target == "squeeze" and _resolve(node.args[1], rank) < 1:
        raise refuse(f"squeeze({node.args[1]}) would remove the batch dimension")
    elif node.target in (operator.add, operator.sub, operator.mul, operator.truediv):
        ranks = {_rank(a, label) for a in node.args if isinstance(a, torch.fx.Node)}
        if len(ranks) > 1:
            raise refuse("both tensors of an arithmetic operation must have the same number of dimensions "
                         "(broadcasting across ranks could line rows up against columns); use unsqueeze")
    elif node.op == "call_module":
        layer = module.get_submodule(str(node.target))
        if isinstance(layer, nn.Linear | nn.GroupNorm) and rank < 2:
            raise refuse(f"{type(layer).__name__} needs an input of shape (batch, features), "
                         "not a single column; use x[:, i:i+1] or unsqueeze(1)")
        if isinstance(layer, nn.LayerNorm) and rank <= len(layer.normalized_shape):
            raise refuse("LayerNorm would normalize across the batch dimension; it must normalize each row")
        if isinstance(layer, nn.Flatten) and _resolve(layer.start_dim, rank) < 1:
            raise refuse("nn.Flatten would merge the batch dimension")


def _resolve(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _rank(node: torch.fx.Node, label: str) -> int:
    shape = _shape(node)
    if shape is None:
        raise _refuse(f"node {label!r}: its input {node.name!r} is not a tensor")
    return len(shape)


def _shape(node: Any) -> tuple[int, ...] | None:
    return node.meta.get("shape") if isinstance(node, torch.fx.Node) else None


def _rows(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "(not a tensor)"
    return "(" + ", ".join("batch" if i == 0 and s == SHAPE_BATCH else str(s) for i, s in enumerate(shape)) + ")"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _check_module(module: torch.fx.GraphModule, inputs: int, outputs: int) -> None:
    """Its size is allowed, it maps (2, inputs) to (2, outputs), and each output row depends on its own
    input row only. (A site also checks that Opacus can train it: `veil.executor.custom_model`.)"""
    size = sum(p.numel() for p in module.parameters())
    if size > MAX_PARAMETERS:
        raise _refuse(f"the model has {size:,} parameters; at most {MAX_PARAMETERS:,} are allowed")
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, inputs))
            if tuple(out.shape) != (2, outputs):
                raise _refuse(f"forward returns shape {tuple(out.shape)} for 2 rows; it must return (2, {outputs})")
            generator = torch.Generator().manual_seed(0)
            x = torch.rand(4, inputs, generator=generator)
            changed = x.clone()
            changed[0] = torch.rand(inputs, generator=generator)
            same = torch.allclose(module(x)[1:], module(changed)[1:], rtol=1e-5, atol=1e-6, equal_nan=True)
    except QueryError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a failing forward pass is the researcher's to fix
        raise _refuse(f"the model fails on a test input: {_first_line(exc)}") from None
    finally:
        module.train()
    if not same:
        raise _refuse("changing one row of the input changed the outputs of other rows: the model mixes patients",
                      HINT)
