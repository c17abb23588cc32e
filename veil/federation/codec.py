"""What crosses between a site and a study's coordinator, for both roles: the study plan (plain JSON in a
train message's config), a site's reply to a round (DP weights and public numbers only), and Flower
RecordDicts as protobuf bytes for the executor's HTTP route (arrays as .npy, never pickled).

A train message, as Flower's FedAvg sends it: `arrays` (the global weights) and `config` (`server-round`,
plus `plan` in simulation or `jobs` on the deployment runtime). A reply: `arrays` (the site's DP weights),
`metrics` (`REPLY_METRICS`) and `site` (`name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

# (veil/federation/__init__.py, which runs first, has turned Flower's telemetry off)
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from pydantic import BaseModel, ConfigDict, Field

from veil.errors import QueryError
from veil.models.spec import ModelSpec, TrainSpec

if TYPE_CHECKING:
    import torch

WEIGHT_KEY = "weight"
"""The averaging weight a site reports: its public row count, never the private one."""
REPLY_METRICS = (WEIGHT_KEY, "epsilon", "steps", "noise-multiplier", "sample-rate")
"""Every number a site's reply holds."""
MAX_ROUNDS = 1000


class StudyPlan(BaseModel):
    """What the coordinator asks every site to do (plain JSON on the wire, validated at the site).

    `train` is one round's local training: `epochs` per round; its (epsilon, delta) are each site's
    target for the whole study, all rounds together (`site_epsilon` may set a site's own). `sample_rate`
    gives every site the same Poisson sampling rate (its batch grows with its rows).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec
    train: TrainSpec
    rounds: int = Field(ge=1, le=MAX_ROUNDS)
    site_epsilon: dict[str, float] = Field(default_factory=dict)
    sample_rate: float | None = Field(default=None, gt=0.0, lt=1.0)
    study: str = "study"

    def site_spec(self, site: str, rows: int) -> TrainSpec:
        """The whole study at `site` (of `rows` rows) as one job: every round's epochs, the site's epsilon
        target, and its expected batch (`sample_rate` x rows when set, else `train.batch_size`)."""
        update: dict[str, Any] = {
            "epochs": self.train.epochs * self.rounds,
            "epsilon": self.site_epsilon.get(site, self.train.epsilon),
        }
        if self.sample_rate is not None:
            update["batch_size"] = max(1, round(self.sample_rate * rows))
        return self.train.model_copy(update=update)


@dataclass(frozen=True)
class SiteRound:
    """What one site sends the coordinator after a round: DP weights and public numbers only."""

    site: str
    state: dict[str, torch.Tensor]
    epsilon: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    weight: float

    def content(self) -> RecordDict:
        """The reply message's content."""
        metrics = MetricRecord({WEIGHT_KEY: self.weight, "epsilon": self.epsilon, "steps": self.steps,
                                "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate})
        return RecordDict({"arrays": ArrayRecord(self.state), "metrics": metrics,
                           "site": ConfigRecord({"name": self.site})})


def read_round(content: RecordDict) -> tuple[dict[str, torch.Tensor], int]:
    """A train message's global weights and `server-round` (at a site); a malformed one is refused."""
    try:
        arrays, config = content["arrays"], content["config"]
        if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
            raise TypeError
        return arrays.to_torch_state_dict(), int(cast(Any, config["server-round"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise QueryError("bad_round", "a round message needs 'arrays' (the global weights) and "
                         "config 'server-round'", "send what Flower's FedAvg sends") from None


def read_reply(content: RecordDict) -> tuple[str, float, float]:
    """A site's reply as the coordinator records it: (site, its accountant's epsilon, its noise multiplier)."""
    metrics: Mapping[str, Any] = content["metrics"]
    return str(content["site"]["name"]), float(metrics["epsilon"]), float(metrics["noise-multiplier"])


def encode_content(content: RecordDict) -> bytes:
    """A message's content as protobuf bytes (Flower's own wire format; arrays as .npy, never pickled)."""
    data: bytes = recorddict_to_proto(content).SerializeToString()
    return data


def decode_content(data: bytes) -> RecordDict:
    """The inverse of `encode_content`; malformed bytes are a clear refusal."""
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(data))
    except Exception:  # noqa: BLE001 - protobuf and numpy raise many kinds on bad input
        raise QueryError("bad_round", "the body is not a Flower RecordDict (protobuf)",
                         "send encode_content(message.content)") from None
