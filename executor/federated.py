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
from typing import TYPE_CHECKING, Any  # noqa: E402

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from veil.errors import QueryError  # noqa: E402
from veil.executor import dpsgd, models  # noqa: E402
from veil.executor.catalog import load_catalog  # noqa: E402
from veil.executor.features import FeatureLayout  # noqa: E402
from veil.modelspec import ModelSpec, TrainSpec  # noqa: E402

if TYPE_CHECKING:
    from veil.executor.auth import Principal
    from veil.executor.rounds import Rounds

ACCOUNTANT_KEY = "veil-accountant"
"""Where a node keeps its accountant in `context.state` (a ConfigRecord)."""
WEIGHT_KEY = "weight"
"""The averaging weight a site reports: its public row count, never the private one."""
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
    """The Flower ClientApp a site runs. A SuperNode deployed beside an executor (node config
    `catalog=<site.toml>`) trains the site's part of the study named in the message (`jobs`: site name ->
    job id) through that executor's ledger; in simulation node i is `sites[i]`, run from a `plan`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if "jobs" in msg.content["config"]:
            database = context.node_config.get("database")
            rounds = _executor(str(context.node_config["catalog"]), str(database) if database else None)
            job_id = json.loads(str(msg.content["config"]["jobs"])).get(rounds.catalog.site)
            if job_id is None:
                raise QueryError("not_in_study", f"site {rounds.catalog.site} has no part in this study")
            return Message(content=executor_reply(rounds, int(job_id), msg.content, None), reply_to=msg)
        plan = StudyPlan.model_validate_json(str(msg.content["config"]["plan"]))
        site = _site(context, sites)
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


def _site(context: Context, sites: Sequence[SiteData] | None) -> SiteData:
    if sites is None:
        raise QueryError(
            "no_site_data",
            "this node has neither in-memory site data nor an executor catalog",
            "start the SuperNode with --node-config \"catalog='/path/to/site.toml'\"",
        )
    return sites[int(context.node_config["partition-id"])]


# ------------------------------------------------------------------ a site's executor


def executor_reply(rounds: Rounds, job_id: int, content: RecordDict, who: Principal | None) -> RecordDict:
    """One round at an executor: a train message's content in (global weights, `server-round`), the
    reply's content out (DP weights, the accountant's epsilon, the site's public weight)."""
    try:
        state = content["arrays"].to_torch_state_dict()
        server_round = int(content["config"]["server-round"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise QueryError("bad_round", "a round message needs 'arrays' (the global weights) and "
                         "config 'server-round'", "send what Flower's FedAvg sends") from None
    stretch, weight = rounds.train_round(job_id, state, server_round, who)
    metrics = MetricRecord({WEIGHT_KEY: float(weight), "epsilon": stretch.epsilon,
                            "steps": sum(k for _, _, k in stretch.history),
                            "noise-multiplier": stretch.noise_multiplier, "sample-rate": stretch.sample_rate})
    return RecordDict({"arrays": ArrayRecord(stretch.state), "metrics": metrics,
                       "site": ConfigRecord({"name": rounds.catalog.site})})


def encode_content(content: RecordDict) -> bytes:
    """A message's content as protobuf bytes (Flower's own wire format; arrays as .npy, never pickled)."""
    return recorddict_to_proto(content).SerializeToString()


def decode_content(data: bytes) -> RecordDict:
    """The inverse of `encode_content`; malformed bytes are a clear refusal."""
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(data))
    except Exception:  # noqa: BLE001 - protobuf and numpy raise many kinds on bad input
        raise QueryError("bad_round", "the body is not a Flower RecordDict (protobuf)",
                         "send encode_content(message.content)") from None


@functools.lru_cache(maxsize=4)
def _executor(catalog: str, database: str | None) -> Rounds:
    """The site's federated parts, in the executor's own database (the executor has checked the data
    files and recovered its jobs at start; a ClientApp process only trains rounds)."""
    from veil.executor.rounds import Rounds  # the executor imports this module
    from veil.executor.store import open_store
    from veil.executor.training import Trainer

    site = load_catalog(catalog)
    return Rounds(Trainer(open_store(database or site.database_url), site))


# ------------------------------------------------------------------ coordinator side


class SiteFedAvg(FedAvg):
    """FedAvg over all sites, weighted by each site's public weight, that also records every site's
    reported epsilon per round (the coordinator never averages epsilons into one number)."""

    def __init__(self, n_sites: int, on_round: Callable[[int, dict[str, float], list[str]], None] | None = None
                 ) -> None:
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
        self.on_round = on_round

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sites' DP weights; keep each site's epsilon for this round. A site that refused or
        failed is left out of this round's average (its charges are its own ledger's business)."""
        replies = list(replies)
        seen: dict[str, float] = {}
        failed: list[str] = []
        for msg in replies:
            if msg.has_error():
                self.refusals.append((server_round, msg.metadata.src_node_id, msg.error.reason))
                failed.append(msg.error.reason)
                continue
            name = str(msg.content["site"]["name"])
            seen[name] = float(msg.content["metrics"]["epsilon"])
            self.sigmas[name] = float(msg.content["metrics"]["noise-multiplier"])
        self.rounds.append(seen)
        if self.on_round is not None:
            self.on_round(server_round, seen, failed)
        if not seen:
            raise QueryError("round_failed", f"no site completed round {server_round}: {'; '.join(failed)}",
                             "read each site's reason; the rounds before were charged, nothing else")
        return super().aggregate_train(server_round, replies)


def initial_state(spec: ModelSpec, layout: FeatureLayout, seed: int | None = None) -> dict[str, torch.Tensor]:
    """A fresh model's weights, built by the coordinator from the spec alone (no data)."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        module = models.build_model(spec, layout)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def coordinate(
    grid: Grid,
    model: ModelSpec,
    layout: FeatureLayout,
    rounds: int,
    n_sites: int,
    config: Mapping[str, str],
    delta: float,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    seed: int | None = None,
    on_round: Callable[[int, dict[str, float], list[str]], None] | None = None,
) -> FederatedResult:
    """The coordinator's work, on any Flower Grid: `rounds` of FedAvg over `n_sites` sites from a fresh
    model of `model`, every train message carrying `config`. `evaluate` (benchmarks) scores the global
    model after each round on data the coordinator may see, i.e. public data, never a site's; `on_round`
    hears each round's per-site epsilons and failures."""
    started = time.perf_counter()
    strategy = SiteFedAvg(n_sites, on_round)
    scores: list[dict[str, float]] = []

    def score(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if evaluate is None or server_round == 0:
            return None
        module = models.build_model(model, layout)
        module.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        scores.append(evaluate(module.eval()))
        return MetricRecord(scores[-1])

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_state(model, layout, seed)),
        num_rounds=rounds,
        train_config=ConfigRecord(dict(config)),
        evaluate_fn=score,
    )
    state = {k: v.clone() for k, v in result.arrays.to_torch_state_dict().items()}
    final: dict[str, float] = {}
    for seen in strategy.rounds:  # a site that dropped out keeps the epsilon of its last round
        final.update(seen)
    module = models.build_model(model, layout)
    module.load_state_dict(state, strict=True)
    weights = models.weights_to_bytes(module, {
        "model_spec": model.model_dump(mode="json"),
        "layout": {"numeric": layout.numeric, "categorical": layout.categorical, "outputs": layout.outputs},
        "site_epsilon": final,
        "delta": delta,
        "rounds": rounds,
    })
    return FederatedResult(weights=weights, state=state, site_epsilon=final, rounds=strategy.rounds,
                           sigmas=strategy.sigmas, refusals=strategy.refusals, evaluation=scores, delta=delta,
                           seconds=time.perf_counter() - started)


def server_app(
    plan: StudyPlan,
    layout: FeatureLayout,
    n_sites: int,
    sink: list[FederatedResult],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    seed: int | None = None,
) -> ServerApp:
    """The coordinator's Flower ServerApp for in-memory sites (simulation): the result goes to `sink`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink.append(coordinate(grid, plan.model, layout, plan.rounds, n_sites, {"plan": plan.model_dump_json()},
                               plan.train.delta, evaluate, seed))

    return app


def deployed_server_app() -> ServerApp:
    """The study's coordinator on Flower's deployment runtime (`flwr run` of `APP_DIR`). The run config
    names each site's part (`jobs`: site -> job id, from joining each site over its HTTP API), the
    `model` spec and feature `layout` (JSON, as the sites reported them), `rounds` and `delta`; the
    global weights go to `out` (safetensors) and a summary beside it (`out` + .json)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        jobs = json.loads(str(config["jobs"]))
        model = ModelSpec.model_validate_json(str(config["model"]))
        shape = FeatureLayout.from_dict(json.loads(str(config["layout"])))
        result = coordinate(grid, model, shape, int(config["rounds"]), len(jobs), {"jobs": json.dumps(jobs)},
                            float(config["delta"]))
        out = Path(str(config["out"]))
        out.write_bytes(result.weights)
        out.with_name(out.name + ".json").write_text(json.dumps({
            "site_epsilon": result.site_epsilon, "rounds": result.rounds,
            "refusals": [list(r) for r in result.refusals], "seconds": result.seconds}))

    return app


APP_DIR = Path(__file__).with_name("flower_app")
"""The Flower App (FAB) directory `flwr run` submits: its components are the two apps below."""
deployed_server = deployed_server_app()
deployed_client = client_app()


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
    from flwr.simulation import run_simulation  # Ray loads only for simulations

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
