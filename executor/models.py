"""A site's checks on the modules it trains: Opacus must be able to train them privately. Building them
(`build_model`) and moving weights (safetensors) is the shared `veil.models.build`; a custom source is
traced in the sandbox first (`veil.executor.custom_model`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from veil.errors import QueryError
from veil.models.build import HINT, parse_model_spec
from veil.models.build import build_model as build_shared
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec


def build_model(spec: ModelSpec | Mapping[str, Any], layout: FeatureLayout) -> nn.Module:
    """The module a spec describes for inputs of `layout`, checked for DP-SGD (see `validate_module`); a
    custom `source` is traced in the sandbox and rebuilt from checked parts (see `custom_model`)."""
    spec = parse_model_spec(spec)
    if spec.source is not None:
        from veil.executor.custom_model import build_custom

        if spec.task == "classification" and layout.outputs < 2:
            raise QueryError("bad_model_spec", "classification needs a label with at least two public classes")
        return build_custom(spec.source, layout.width, layout.outputs if spec.task == "classification" else 1)
    model = build_shared(spec, layout)
    validate_module(model)
    return model


def validate_module(module: nn.Module) -> None:
    """Refuse a module Opacus cannot train privately: its validator's complaints (BatchNorm, say) and
    any layer with parameters but no per-sample gradient rule, reported as one `bad_model_spec`."""
    problems = [str(e) for e in ModuleValidator.validate(module, strict=False)]
    problems += [
        f"{name or type(m).__name__}: Opacus has no per-sample gradient rule for {type(m).__name__}"
        for name, m in module.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
        and type(m) not in GradSampleModule.GRAD_SAMPLERS
    ]
    if problems:
        raise QueryError(
            "bad_model_spec", "Opacus cannot train this model privately: " + "; ".join(problems), HINT
        )
