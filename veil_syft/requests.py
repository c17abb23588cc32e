"""What a syft job asks of Veil, read statically from its files: the submitted code is never run.

A job is accepted only in one of two forms:

- a declared request, `veil_request.json` (or `.toml`) in the job's code folder:
  `{"kind": "query", "sql": "SELECT COUNT(*) FROM encounters", "epsilon": 0.5}` (optional: `confidence`,
  `delta`, `accuracy` instead of `epsilon`), or a DP-SGD training job:
  `{"kind": "training", "dataset": "patients", "features": ["age"], "label": "sex", "epsilon": 2.0,
  "delta": 1e-5, "epochs": 10, "batch_size": 64, "learning_rate": 0.5}` (optional: `optimizer`,
  `max_grad_norm`, `model` as the executor's ModelSpec, `holdout`, `evaluation_epsilon`), checked in full
  by the executor;
- a Python script that only uses the Veil SDK, in the shape the tutorials use, with literal arguments:
  `study.dataset("encounters").sql("SELECT ...").release(epsilon=0.5)` (assignments of those calls, `print`
  and `import veil` allowed; nothing else: no files, no other modules, no other calls).

Anything else raises `NotAVeilRequest` with a message that says what is accepted.
"""

from __future__ import annotations

import ast
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCEPTED = ("the bridge accepts only a Veil query or training request: a veil_request.json in the job folder "
            '({"kind": "query", "sql": "SELECT COUNT(*) FROM <dataset>", "epsilon": 0.5}, or {"kind": "training", '
            '"dataset": ..., "features": [...], "label": ..., "epsilon": ..., "delta": ..., "epochs": ..., '
            '"batch_size": ..., "learning_rate": ...}) or a script that only calls the Veil SDK, e.g. '
            'study.dataset("<dataset>").sql("SELECT ...").release(epsilon=0.5); submitted code is never run and only '
            "DP releases leave the site")
REQUEST_FILES = ("veil_request.json", "veil_request.toml")
LOSS_KEYS = ("epsilon", "rho", "accuracy")
OPTIONAL_KEYS = ("confidence", "delta")
TRAIN_KEYS = ("epsilon", "delta", "epochs", "batch_size", "learning_rate")  # the executor's TrainSpec requires these
TRAIN_OPTIONAL = ("optimizer", "max_grad_norm", "weight_decay")
JOB_OPTIONAL = ("model", "holdout", "evaluation_epsilon")


class NotAVeilRequest(Exception):
    """The job is not a Veil request the bridge can run; the message says why and what is accepted."""

    def __init__(self, why: str, code: str = "not_a_veil_request") -> None:
        super().__init__(f"{why}; {ACCEPTED}")
        self.code = code


@dataclass(frozen=True)
class VeilRequest:
    """One DP query: SQL and the privacy loss (epsilon, rho or accuracy), as the executor's QueryRequest takes it."""

    sql: str
    loss: dict[str, float]
    source: str  # which file declared it
    purpose: str | None = None  # for the Veil application the bridge files when the project has no grant

    def body(self, request_id: str) -> dict[str, Any]:
        return {"sql": self.sql, **self.loss, "request_id": request_id}


@dataclass(frozen=True)
class TrainingRequest:
    """One DP-SGD job at the site, as the executor's TrainRequest takes it (the executor checks it in full)."""

    dataset: str
    features: tuple[str, ...]
    label: str
    train: dict[str, Any]
    options: dict[str, Any]  # model, holdout, evaluation_epsilon, where given
    source: str
    purpose: str | None = None

    @property
    def epsilon(self) -> float:
        return float(self.train["epsilon"])

    def body(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "features": list(self.features), "label": self.label, "train": self.train,
                **self.options}


def _training(data: dict[str, Any], source: str) -> TrainingRequest:
    unknown = set(data) - {"kind", "dataset", "features", "label", "purpose", *TRAIN_KEYS, *TRAIN_OPTIONAL,
                           *JOB_OPTIONAL}
    if unknown:
        raise NotAVeilRequest(f"{source} has keys the bridge does not know for training: {sorted(unknown)}")
    missing = [k for k in ("dataset", "features", "label", *TRAIN_KEYS) if k not in data]
    if missing:
        raise NotAVeilRequest(f"{source} asks for training without {', '.join(missing)}")
    features = data["features"]
    if not (isinstance(data["dataset"], str) and isinstance(data["label"], str) and isinstance(features, list)
            and features and all(isinstance(f, str) for f in features)):
        raise NotAVeilRequest(f"{source}: 'dataset' and 'label' must be names and 'features' a list of names")
    purpose = data.get("purpose")
    if purpose is not None and not isinstance(purpose, str):
        raise NotAVeilRequest(f"{source}: 'purpose' must be text")
    train = {k: data[k] for k in (*TRAIN_KEYS, *TRAIN_OPTIONAL) if k in data}
    return TrainingRequest(dataset=data["dataset"], features=tuple(features), label=data["label"], train=train,
                           options={k: data[k] for k in JOB_OPTIONAL if k in data}, source=source, purpose=purpose)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NotAVeilRequest(f"'{key}' must be a number")
    return float(value)


def _from_mapping(data: Any, source: str) -> VeilRequest | TrainingRequest:
    if not isinstance(data, dict):
        raise NotAVeilRequest(f"{source} must hold one object")
    kind = data.get("kind", "query")
    if kind == "training":
        return _training(data, source)
    if kind != "query":
        raise NotAVeilRequest(f"{source} asks for kind '{kind}': through PySyft the site serves DP queries "
                              "('query') and DP-SGD training ('training')", code="unsupported_request")
    unknown = set(data) - {"kind", "sql", *LOSS_KEYS, *OPTIONAL_KEYS, "purpose"}
    if unknown:
        raise NotAVeilRequest(f"{source} has keys the bridge does not know: {sorted(unknown)}")
    sql = data.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise NotAVeilRequest(f"{source} must give 'sql' as text")
    losses = [k for k in LOSS_KEYS if k in data]
    if len(losses) != 1:
        raise NotAVeilRequest(f"{source} must give exactly one of {', '.join(LOSS_KEYS)}")
    loss = {k: _number(data[k], k) for k in (*losses, *OPTIONAL_KEYS) if k in data}
    purpose = data.get("purpose")
    if purpose is not None and not isinstance(purpose, str):
        raise NotAVeilRequest(f"{source}: 'purpose' must be text")
    return VeilRequest(sql=sql.strip(), loss=loss, source=source, purpose=purpose)


def _literal(node: ast.expr, what: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise NotAVeilRequest(f"{what} must be a literal in the script") from None


SDK_METHODS = {"dataset", "sql", "release"}


def _check_call_chain(node: ast.expr, names: set[str]) -> None:
    """An expression made only of the SDK's calls on known names (study, or names assigned from such calls)."""
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise NotAVeilRequest(f"the script uses '{node.id}', which is not the Veil SDK")
        return
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SDK_METHODS:
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            _literal(arg, f"the argument of .{node.func.attr}()")
        _check_call_chain(node.func.value, names)
        return
    if isinstance(node, ast.Attribute) and node.attr in {"rows", "receipt", "cost", "frame"}:
        _check_call_chain(node.value, names)
        return
    raise NotAVeilRequest(f"line {getattr(node, 'lineno', '?')} of the script is not a Veil SDK call")


def parse_script(text: str, source: str) -> VeilRequest:
    """The one `.sql(...).release(...)` of a script that uses nothing but the Veil SDK."""
    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise NotAVeilRequest(f"{source} is not valid Python ({exc.msg})") from None
    names = {"study"}
    for stmt in tree.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            modules = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
            if any(m != "veil" and not m.startswith("veil.") for m in modules):
                raise NotAVeilRequest(f"{source} imports {', '.join(modules)}: only veil may be imported")
            names.update(a.asname or a.name.split(".")[0] for a in stmt.names)
        elif isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            _check_call_chain(stmt.value, names)
            names.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name) \
                and stmt.value.func.id == "print" and not stmt.value.keywords:
            for arg in stmt.value.args:
                _check_call_chain(arg, names)
        elif isinstance(stmt, ast.Expr):
            _check_call_chain(stmt.value, names)
        else:
            raise NotAVeilRequest(f"line {stmt.lineno} of {source} is not a Veil SDK call")
    releases = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr == "release"]
    if len(releases) != 1:
        raise NotAVeilRequest(f"{source} must make exactly one release (it makes {len(releases)})")
    release = releases[0]
    inner = release.func.value if isinstance(release.func, ast.Attribute) else None
    if not (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "sql"
            and len(inner.args) == 1 and not inner.keywords):
        raise NotAVeilRequest(f"{source} must release a query written as .sql(\"SELECT ...\").release(epsilon=...)")
    if release.args:
        raise NotAVeilRequest(f"{source} must name the loss: .release(epsilon=...)")
    data = {"kind": "query", "sql": _literal(inner.args[0], "the SQL"),
            **{k.arg: _literal(k.value, k.arg or "an argument") for k in release.keywords if k.arg}}
    request = _from_mapping(data, source)
    assert isinstance(request, VeilRequest)
    return request


def read_request(code_dir: Path, entrypoint: str | None = None) -> VeilRequest | TrainingRequest:
    """The Veil request a job's code folder declares; NotAVeilRequest when it declares none."""
    for name in REQUEST_FILES:
        path = code_dir / name
        if path.is_file():
            text = path.read_text()
            try:
                data = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
            except (ValueError, tomllib.TOMLDecodeError) as exc:
                raise NotAVeilRequest(f"{name} does not parse ({exc})") from None
            return _from_mapping(data, name)
    scripts = sorted(code_dir.rglob("*.py")) if code_dir.is_dir() else []
    if entrypoint and (code_dir / entrypoint).is_file():
        scripts = [code_dir / entrypoint]
    if len(scripts) != 1:
        raise NotAVeilRequest("the job declares no Veil request" if not scripts
                              else f"the job has {len(scripts)} scripts and no veil_request.json")
    return parse_script(scripts[0].read_text(), scripts[0].name)
