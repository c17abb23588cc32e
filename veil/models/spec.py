"""The declarative model and training spec of a DP training job (shared contract, plain JSON).

A researcher describes a model as data: an optional list of hidden layers between the encoded input
columns and an output layer sized by the task; or, when an approved application allows it, as the source
of an `nn.Module` that the site traces in a sandbox without data and rebuilds from checked parts.
`veil.models.build` makes the PyTorch module from it; a site also refuses anything Opacus cannot train
privately (`veil.executor.models`). Importing this module needs no torch.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from veil import limits
from veil.names import Name

Activation = Literal["relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid"]
"""Element-wise activations; none has parameters, so any of them trains under DP-SGD."""

MAX_LAYERS = 32
MAX_WIDTH = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Linear(_Strict):
    """A fully connected layer with `out` units."""

    type: Literal["linear"] = "linear"
    out: int = Field(ge=1, le=MAX_WIDTH)
    bias: bool = True


class Act(_Strict):
    """An element-wise activation function."""

    type: Literal["activation"] = "activation"
    fn: Activation


class LayerNorm(_Strict):
    """Layer normalization over the features of each row (per-row statistics: DP-compatible)."""

    type: Literal["layer_norm"] = "layer_norm"


class GroupNorm(_Strict):
    """Group normalization; `groups` must divide the width of the layer before it."""

    type: Literal["group_norm"] = "group_norm"
    groups: int = Field(ge=1, le=MAX_WIDTH)


class Dropout(_Strict):
    """Dropout with drop probability `p` (training only)."""

    type: Literal["dropout"] = "dropout"
    p: float = Field(ge=0.0, lt=1.0)


Layer = Annotated[Union[Linear, Act, LayerNorm, GroupNorm, Dropout], Field(discriminator="type")]
"""One hidden layer. BatchNorm is deliberately absent: it mixes rows of a batch, which DP-SGD forbids."""


class ModelSpec(_Strict):
    """A tabular model: encoded inputs -> `layers` -> an output layer.

    Numeric columns enter scaled by their public bounds; a categorical column enters through an
    embedding of the given width when `embeddings` names it, one-hot otherwise. The output layer has
    one unit per class (`classification`, cross-entropy) or one unit (`regression`, squared error), so
    `layers=[]` is logistic or linear regression.
    """

    task: Literal["classification", "regression"] = "classification"
    layers: list[Layer] = Field(default_factory=list, max_length=MAX_LAYERS)
    embeddings: dict[Name, Annotated[int, Field(ge=1, le=256)]] = Field(default_factory=dict)
    output_bias: bool = True
    source: str | None = Field(
        default=None, max_length=100_000,
        description="custom architecture: Python source defining `class Net(nn.Module)` built as Net(inputs, "
                    "outputs); allowed only as approved in the project's application for the dataset")

    @model_validator(mode="after")
    def _source_alone(self) -> ModelSpec:
        if self.source is not None and (self.layers or self.embeddings):
            raise ValueError("a model with `source` describes its whole architecture: leave layers and embeddings out")
        return self

    @classmethod
    def custom(cls, source: str, task: Literal["classification", "regression"] = "classification") -> ModelSpec:
        """A custom architecture: `source` defines `class Net(nn.Module)` taking (inputs, outputs). The site
        builds it from a checked trace (the code never sees data) once an application approves the source."""
        return cls(task=task, source=source)

    @classmethod
    def logistic(cls) -> ModelSpec:
        """Multinomial logistic regression (binary when the label has two classes)."""
        return cls(task="classification")

    @classmethod
    def linear(cls) -> ModelSpec:
        """Linear regression on a label with public bounds."""
        return cls(task="regression")

    @classmethod
    def mlp(
        cls,
        hidden: list[int],
        activation: Activation = "relu",
        norm: Literal["layer", "group"] | None = None,
        groups: int = 4,
        dropout: float = 0.0,
        task: Literal["classification", "regression"] = "classification",
        embeddings: dict[str, int] | None = None,
    ) -> ModelSpec:
        """A multilayer perceptron: per hidden width, linear -> [norm] -> activation -> [dropout]."""
        layers: list[Layer] = []
        for width in hidden:
            layers.append(Linear(out=width))
            if norm == "layer":
                layers.append(LayerNorm())
            elif norm == "group":
                layers.append(GroupNorm(groups=groups))
            layers.append(Act(fn=activation))
            if dropout > 0:
                layers.append(Dropout(p=dropout))
        return cls(task=task, layers=layers, embeddings=embeddings or {})


class TrainSpec(_Strict):
    """Hyperparameters and the DP target of one training job.

    `batch_size` is the *expected* batch size: each step includes every row independently with
    probability batch_size / n (Poisson sampling), which is what the accountant assumes. The noise is
    calibrated once, up front, so that all planned steps together spend at most (epsilon, delta).
    There is deliberately no seed: a researcher who knew the seed could regenerate and subtract the noise.
    """

    epsilon: float = Field(ge=limits.MIN_EPSILON, le=50.0)
    delta: float = Field(ge=limits.MIN_DELTA, lt=1e-2)
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=1_000_000)
    learning_rate: float = Field(gt=0.0, le=100.0)
    optimizer: Literal["sgd", "adam"] = "adam"
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e3)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
