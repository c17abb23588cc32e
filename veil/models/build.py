"""Build PyTorch modules from a declarative `ModelSpec` (or a custom model's checked graph) and move
weights in and out as safetensors (never pickle). Shared by both roles: a site builds the module it
trains, the researcher's side rebuilds the trained one from the weights' metadata. Needs torch and
safetensors (`veil[train]`); a site also checks that Opacus can train the module (`veil.executor.models`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn import functional as F

from veil.errors import QueryError, validation_problems
from veil.limits import MAX_PARAMETERS
from veil.models.graph import rebuild
from veil.models.layout import FeatureLayout
from veil.models.spec import Act, Dropout, GroupNorm, LayerNorm, Linear, ModelSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
HINT = (
    "Layers are linear, activation (relu, leaky_relu, elu, gelu, silu, tanh, sigmoid), layer_norm, "
    "group_norm and dropout. BatchNorm mixes the rows of a batch and cannot be trained with DP-SGD: "
    "use layer_norm or group_norm instead."
)


class TabularNet(nn.Module):
    """Encoded tabular input -> hidden layers -> output layer.

    The input holds the numeric columns, then one float code per categorical column; each code column
    goes through its embedding, or is one-hot encoded when the spec gives it no embedding.
    """

    def __init__(self, spec: ModelSpec, layout: FeatureLayout) -> None:
        super().__init__()
        self.n_numeric = len(layout.numeric)
        self.embedded = [spec.embeddings.get(name) for name, _ in layout.categorical]
        self.cardinalities = [card for _, card in layout.categorical]
        self.embeddings = nn.ModuleList(
            nn.Embedding(card, dim) for card, dim in zip(self.cardinalities, self.embedded) if dim is not None
        )
        width = self.n_numeric + sum(
            dim if dim is not None else card for card, dim in zip(self.cardinalities, self.embedded)
        )
        layers: list[nn.Module] = []
        for i, layer in enumerate(spec.layers):
            if isinstance(layer, Linear):
                layers.append(nn.Linear(width, layer.out, bias=layer.bias))
                width = layer.out
            elif isinstance(layer, Act):
                layers.append(ACTIVATIONS[layer.fn]())
            elif isinstance(layer, LayerNorm):
                layers.append(nn.LayerNorm(width))
            elif isinstance(layer, GroupNorm):
                if width % layer.groups:
                    raise QueryError(
                        "bad_model_spec",
                        f"layers[{i}]: group_norm with {layer.groups} groups needs a width divisible by "
                        f"{layer.groups}, but the layer before it has width {width}",
                    )
                layers.append(nn.GroupNorm(layer.groups, width))
            elif isinstance(layer, Dropout):
                layers.append(nn.Dropout(layer.p))
        self.body = nn.Sequential(*layers)
        outputs = layout.outputs if spec.task == "classification" else 1
        self.head = nn.Linear(width, outputs, bias=spec.output_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, : self.n_numeric]]
        embeddings = iter(self.embeddings)
        for j, (card, dim) in enumerate(zip(self.cardinalities, self.embedded)):
            codes = x[:, self.n_numeric + j].long()
            parts.append(next(embeddings)(codes) if dim is not None else F.one_hot(codes, card).to(x.dtype))
        return self.head(self.body(torch.cat(parts, dim=1)))


def parse_model_spec(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
    """Validate a spec given as JSON-like data; a malformed one becomes a `bad_model_spec` refusal."""
    if isinstance(spec, ModelSpec):
        return spec
    try:
        return ModelSpec.model_validate(spec)
    except ValidationError as exc:
        raise QueryError("bad_model_spec", f"invalid model spec: {validation_problems(exc.errors())}", HINT) from None


def build_model(spec: ModelSpec | Mapping[str, Any], layout: FeatureLayout,
                graph: Mapping[str, Any] | None = None) -> nn.Module:
    """The module a spec describes for inputs of `layout`. A custom `source` is never run here: its module
    is rebuilt from `graph`, the checked description of its traced graph that the site's sandbox made
    (`veil.executor.custom_model.traced_graph`; trained weights carry it in their metadata)."""
    spec = parse_model_spec(spec)
    if spec.task == "classification" and layout.outputs < 2:
        raise QueryError("bad_model_spec", "classification needs a label with at least two public classes")
    if spec.source is not None:
        if graph is None:
            raise QueryError("bad_model_spec", "a custom model is rebuilt from its checked graph, which was not given",
                             "rebuild it from trained weights (their metadata holds the graph), or at a site")
        return rebuild(graph, layout.width, layout.outputs if spec.task == "classification" else 1)
    categorical = {name for name, _ in layout.categorical}
    unknown = sorted(set(spec.embeddings) - categorical)
    if unknown:
        raise QueryError(
            "bad_model_spec",
            f"embeddings name column(s) that are not categorical inputs: {', '.join(unknown)}",
            f"categorical inputs: {', '.join(sorted(categorical)) or 'none'}",
        )
    if layout.width == 0:
        raise QueryError("bad_model_spec", "the model has no input columns")
    model = TabularNet(spec, layout)
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:
        raise QueryError(
            "bad_model_spec",
            f"the model has {size:,} parameters; at most {MAX_PARAMETERS:,} are allowed",
            "use fewer or narrower layers, or smaller embeddings",
        )
    return model


def trained_module(weights: bytes) -> nn.Module:
    """The trained module in eval mode, rebuilt from the spec, layout (and custom graph) stored in the
    weights' metadata by the site that trained it."""
    meta = read_metadata(weights)
    layout = FeatureLayout.from_dict(meta["layout"])
    return load_weights(build_model(meta["model_spec"], layout, meta.get("graph")), weights).eval()


def weights_to_bytes(module: nn.Module, metadata: Mapping[str, Any]) -> bytes:
    """The module's state as safetensors; `metadata` values are stored as JSON strings."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    return save_safetensors(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_weights(module: nn.Module, data: bytes) -> nn.Module:
    """Load safetensors bytes into a module of the same spec and layout (strict: every key must match)."""
    module.load_state_dict(load_safetensors(data), strict=True)
    return module


def read_metadata(data: bytes) -> dict[str, Any]:
    """The metadata stored by `weights_to_bytes`, read from the safetensors header without the tensors."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
