"""Federated DP-SGD on Flower: each site trains with Opacus where its data lives; a coordinator averages.

The privacy unit is the patient at a site. A site keeps ONE accountant for the whole study: the noise
multiplier is calibrated once for every planned step (epochs per round x rounds, at the site's own
sampling rate), each round resumes the accountant's history of (sigma, sampling rate, steps) and
extends it, and a round that would take that history past the site's epsilon is refused before it
starts. (A new PrivacyEngine per round, as in Flower's Opacus example, reports one round's epsilon and
under-reports the study's.) The coordinator sees only what leaves a site: model weights that are already
DP, the epsilon the site's accountant gives its history, and a public weight. Averaging them is
post-processing, so every site's guarantee holds for the aggregate; the result carries one epsilon per
site, never a single number for the study.

Flower's own DP wrappers are not used: they add noise to the aggregate (site-level DP, sigma*C/m), which
with a handful of hospitals hides whole hospitals, not patients, and they compute no epsilon.

Here the accountant history lives in the Flower node's `context.state` (kept by the SuperNode across
rounds of one run); a production site keeps it in its ledger, keyed by (study, dataset).
"""

from __future__ import annotations

import os

# Flower reports usage to telemetry.flower.ai unless told not to, read when flwr is imported; Ray has
# its own usage statistics. A site sends nothing anywhere that Veil did not decide to send.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import functools  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import polars as pl  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from veil.errors import QueryError  # noqa: E402
from veil.executor import dpsgd, models  # noqa: E402
from veil.executor.catalog import load_catalog  # noqa: E402
from veil.executor.features import FeatureLayout, encode  # noqa: E402
from veil.modelspec import ModelSpec, TrainSpec  # noqa: E402

ACCOUNTANT_KEY = "veil-accountant"
"""Where a node keeps its accountant in `context.state` (a ConfigRecord)."""
WEIGHT_KEY = "weight"
"""The averaging weight a site reports: its public row count, never the private one."""
MAX_ROUNDS = 1000


class StudyPlan(BaseModel):
    """What the coordinator asks every site to do (plain JSON on the wire, validated at the site).

    `train` is one round's local training: `epochs` per round; its (epsilon, delta) are each site's
    target for the whole study, all rounds together (`site_epsilon` may set a site's own). `sample_rate`
    gives every site the same Poisson sampling rate (its batch grows with its rows). `dataset`,
    `features` and `label` name what a site reads from its catalog when the node is deployed with one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec
    train: TrainSpec
    rounds: int = Field(ge=1, le=MAX_ROUNDS)
    site_epsilon: dict[str, float] = Field(default_factory=dict)
    sample_rate: float | None = Field(default=None, gt=0.0, lt=1.0)
    study: str = "study"
    dataset: str | None = None
    features: list[str] = Field(default_factory=list)
    label: str | None = None

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
class SiteData:
    """One site's encoded training rows and what it may say about them.

    `public_rows` (a DP count, or a steward's declared size) sets the sampling rate and the averaging
    weight; without it the sampling rate uses the true count, which stays at the site, and the site's
    weight is 1. `max_epsilon` is the site's grant for the study: a plan that asks more is refused.
    `seed` is for tests and benchmarks only.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    layout: FeatureLayout
    public_rows: int | None = None
    max_epsilon: float | None = None
    seed: int | None = None


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


@dataclass
class FederatedResult:
    """A finished study: the averaged model, each site's epsilon after the last round and per round."""

    weights: bytes
    state: dict[str, torch.Tensor]
    site_epsilon: dict[str, float]
    rounds: list[dict[str, float]] = field(default_factory=list)
    sigmas: dict[str, float] = field(default_factory=dict)
    refusals: list[tuple[int, int, str]] = field(default_factory=list)
    evaluation: list[dict[str, float]] = field(default_factory=list)
    delta: float = 0.0
    seconds: float = 0.0


# ------------------------------------------------------------------ site side


def load_site(catalog: str | Path, dataset: str, features: Sequence[str], label: str) -> SiteData:
    """A site's rows of `dataset`, read from its catalog and encoded by public bounds and categories."""
    cat = load_catalog(catalog)
    data = cat.dataset(dataset)
    numeric: dict[str, tuple[float, float]] = {}
    categorical: dict[str, list[Any]] = {}
    for name in features:
        column = data.column(name)
        if column.categories is not None:
            categorical[name] = list(column.categories)
        elif column.bounds is not None and column.is_numeric:
            numeric[name] = column.bounds
        else:
            raise QueryError(
                "unbounded_feature", f"feature '{name}' has neither public bounds nor categories"
            )
    target = data.column(label)
    if target.categories is None:
        raise QueryError("bad_label", f"label '{label}' needs public categories (federated classification)")
    frame = pl.read_parquet(data.path, columns=[*features, label])
    encoded = encode(
        frame, label=label, numeric=numeric, categorical=categorical, classes=list(target.categories)
    )
    return SiteData(name=cat.site, x=encoded.x, y=encoded.y, layout=encoded.layout)


def site_round(
    site: SiteData,
    plan: StudyPlan,
    state: Mapping[str, torch.Tensor],
    history: Sequence[tuple[float, float, int]],
    server_round: int,
    device: str | torch.device | None = None,
) -> tuple[SiteRound, list[tuple[float, float, int]]]:
    """One round of local DP-SGD at a site, resuming its study accountant; returns the reply and the
    accountant's new history (to persist before the reply leaves the site)."""
    spec = plan.site_spec(site.name, site.public_rows or len(site.x))
    if site.max_epsilon is not None and spec.epsilon > site.max_epsilon:
        raise QueryError(
            "over_grant",
            f"site {site.name} grants epsilon {site.max_epsilon:g} for this study; "
            f"the plan asks {spec.epsilon:g}",
            "ask for a smaller epsilon at this site, or leave the site out",
        )
    seed = None if site.seed is None else site.seed * MAX_ROUNDS + server_round
    stretch = dpsgd.train_stretch(
        plan.model,
        spec,
        site.x,
        site.y,
        epochs=plan.train.epochs,
        state=state,
        history=history,
        layout=site.layout,
        device=device,
        seed=seed,
        public_rows=site.public_rows,
    )
    reply = SiteRound(
        site=site.name,
        state=stretch.state,
        epsilon=stretch.epsilon,
        steps=sum(k for _, _, k in stretch.history),
        noise_multiplier=stretch.noise_multiplier,
        sample_rate=stretch.sample_rate,
        weight=float(site.public_rows or 1),
    )
    return reply, stretch.history


def load_history(context: Context, study: str) -> list[tuple[float, float, int]]:
    """The node's accountant history for `study` (empty before its first round)."""
    record = context.state.get(ACCOUNTANT_KEY)
    if record is None or record.get("study") != study:
        return []
    return [(float(s), float(q), int(k)) for s, q, k in json.loads(str(record["history"]))]


def save_history(context: Context, study: str, history: Sequence[tuple[float, float, int]]) -> None:
    """Keep the accountant history for the node's next round."""
    context.state[ACCOUNTANT_KEY] = ConfigRecord({"study": study, "history": json.dumps(list(history))})


def client_app(sites: Sequence[SiteData] | None = None, device: str | None = None) -> ClientApp:
    """The Flower ClientApp a site runs. In simulation node i is `sites[i]`; a deployed SuperNode
    (node config `catalog=<site.toml>`) reads the plan's dataset from its own catalog instead."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        plan = StudyPlan.model_validate_json(str(msg.content["config"]["plan"]))
        site = _site(context, plan, sites)
        round_ = int(msg.content["config"]["server-round"])
        history = load_history(context, plan.study)
        reply, history = site_round(
            site, plan, msg.content["arrays"].to_torch_state_dict(), history, round_, device
        )
        save_history(context, plan.study, history)
        metrics = MetricRecord(
            {
                WEIGHT_KEY: reply.weight,
                "epsilon": reply.epsilon,
                "steps": reply.steps,
                "noise-multiplier": reply.noise_multiplier,
                "sample-rate": reply.sample_rate,
            }
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(reply.state),
                "metrics": metrics,
                "site": ConfigRecord({"name": reply.site}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _site(context: Context, plan: StudyPlan, sites: Sequence[SiteData] | None) -> SiteData:
    if "catalog" in context.node_config:
        if plan.dataset is None or plan.label is None:
            raise QueryError("bad_plan", "a deployed site needs the plan's dataset, features and label")
        return _load_site_cached(
            str(context.node_config["catalog"]), plan.dataset, tuple(plan.features), plan.label
        )
    if sites is None:
        raise QueryError(
            "no_site_data",
            "this node has neither in-memory site data nor a catalog",
            "start the SuperNode with --node-config \"catalog='/path/to/site.toml'\"",
        )
    return sites[int(context.node_config["partition-id"])]


@functools.lru_cache(maxsize=8)
def _load_site_cached(catalog: str, dataset: str, features: tuple[str, ...], label: str) -> SiteData:
    return load_site(catalog, dataset, features, label)


# ------------------------------------------------------------------ coordinator side


class SiteFedAvg(FedAvg):
    """FedAvg over all sites, weighted by each site's public weight, that also records every site's
    reported epsilon per round (the coordinator never averages epsilons into one number)."""

    def __init__(self, n_sites: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n_sites,
            min_available_nodes=n_sites,
            weighted_by_key=WEIGHT_KEY,
        )
        self.rounds: list[dict[str, float]] = []
        self.sigmas: dict[str, float] = {}
        self.refusals: list[tuple[int, int, str]] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sites' DP weights; keep each site's epsilon for this round."""
        replies = list(replies)
        seen: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():  # a refused or failed round: that site's update is left out
                self.refusals.append((server_round, msg.metadata.src_node_id, msg.error.reason))
                continue
            name = str(msg.content["site"]["name"])
            seen[name] = float(msg.content["metrics"]["epsilon"])
            self.sigmas[name] = float(msg.content["metrics"]["noise-multiplier"])
        self.rounds.append(seen)
        return super().aggregate_train(server_round, replies)


def initial_state(spec: ModelSpec, layout: FeatureLayout, seed: int | None = None) -> dict[str, torch.Tensor]:
    """A fresh model's weights, built by the coordinator from the spec alone (no data)."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        module = models.build_model(spec, layout)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def server_app(
    plan: StudyPlan,
    layout: FeatureLayout,
    n_sites: int,
    sink: list[FederatedResult],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    seed: int | None = None,
) -> ServerApp:
    """The coordinator's Flower ServerApp: `plan.rounds` of FedAvg over `n_sites` sites; the result is
    appended to `sink`. `evaluate` (benchmarks) scores the global model after every round on data the
    coordinator may see, i.e. public data, never a site's."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        started = time.perf_counter()
        strategy = SiteFedAvg(n_sites)
        scores: list[dict[str, float]] = []

        def score(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if evaluate is None or server_round == 0:
                return None
            module = models.build_model(plan.model, layout)
            module.load_state_dict(arrays.to_torch_state_dict(), strict=True)
            scores.append(evaluate(module.eval()))
            return MetricRecord(scores[-1])

        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial_state(plan.model, layout, seed)),
            num_rounds=plan.rounds,
            train_config=ConfigRecord({"plan": plan.model_dump_json()}),
            evaluate_fn=score,
        )
        state = {k: v.clone() for k, v in result.arrays.to_torch_state_dict().items()}
        final = strategy.rounds[-1] if strategy.rounds else {}
        module = models.build_model(plan.model, layout)
        module.load_state_dict(state, strict=True)
        weights = models.weights_to_bytes(
            module,
            {
                "model_spec": plan.model.model_dump(mode="json"),
                "layout": {
                    "numeric": layout.numeric,
                    "categorical": layout.categorical,
                    "outputs": layout.outputs,
                },
                "site_epsilon": final,
                "delta": plan.train.delta,
                "rounds": plan.rounds,
            },
        )
        sink.append(
            FederatedResult(
                weights=weights,
                state=state,
                site_epsilon=final,
                rounds=strategy.rounds,
                sigmas=strategy.sigmas,
                refusals=strategy.refusals,
                evaluation=scores,
                delta=plan.train.delta,
                seconds=time.perf_counter() - started,
            )
        )

    return app


_SIMULATION = threading.Lock()


def simulate(
    plan: StudyPlan,
    sites: Sequence[SiteData],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    seed: int | None = None,
    cpus_per_site: float = 1.0,
) -> FederatedResult:
    """Run a study with Flower's simulation engine (Ray), one virtual SuperNode per site."""
    if len({s.layout for s in sites}) != 1:
        raise QueryError("bad_plan", "every site must encode the same features the same way")
    sink: list[FederatedResult] = []
    backend = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }
    with _SIMULATION:  # one Ray runtime per process at a time
        run_simulation(
            server_app=server_app(plan, sites[0].layout, len(sites), sink, evaluate, seed),
            client_app=client_app(sites, device="cpu"),
            num_supernodes=len(sites),
            backend_config=backend,  # type: ignore[arg-type]
        )
    if not sink:
        raise RuntimeError("the federated run ended without a result; see the Flower log above")
    return sink[0]
