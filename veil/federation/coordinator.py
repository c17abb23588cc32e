"""A federated study's coordinator: Flower's FedAvg over any Grid of sites, with no data of its own.

Each site trains with its own accountant under its own grant (`veil.executor.federated`); what reaches
the coordinator is what leaves a site: weights that are already DP, the epsilon the site's accountant
gives its history, and a public weight. Averaging them is post-processing, so every site's guarantee
holds for the aggregate; the result carries one epsilon per site, never a single number for the study.

Flower's own DP wrappers are not used: they add noise to the aggregate (site-level DP, sigma*C/m), which
with a handful of hospitals hides whole hospitals, not patients, and they compute no epsilon.

`coordinate` runs in the researcher's kernel (over the sites' HTTP APIs, `veil.kernel.federation`), in
Flower's simulation (`server_app`) and on Flower's deployment runtime (`deployed_server`, the ServerApp
of the Flower App in executor/flower_app).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.typing import Run
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from veil.errors import QueryError
from veil.federation.codec import WEIGHT_KEY, StudyPlan, read_reply
from veil.models.build import build_model, weights_to_bytes
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec


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
                reason = msg.error.reason or ""
                self.refusals.append((server_round, msg.metadata.src_node_id, reason))
                failed.append(reason)
                continue
            name, epsilon, sigma = read_reply(msg.content)
            seen[name] = epsilon
            self.sigmas[name] = sigma
        self.rounds.append(seen)
        if self.on_round is not None:
            self.on_round(server_round, seen, failed)
        if not seen:
            raise QueryError("round_failed", f"no site completed round {server_round}: {'; '.join(failed)}",
                             "read each site's reason; the rounds before were charged, nothing else")
        return super().aggregate_train(server_round, replies)


class PromptGrid(Grid):
    """A Grid that hands a round's replies to the strategy as soon as the last one is in. Flower 1.30's
    GrpcGrid (the deployment runtime's) asks the SuperLink for replies every 3 s in `send_and_receive`,
    which FedAvg calls once a round; this asks every `interval` seconds through the Grid's own
    `pull_messages`, and otherwise is the grid it wraps."""

    def __init__(self, grid: Grid, interval: float = 0.2) -> None:
        self.grid, self.interval = grid, interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies


def initial_state(spec: ModelSpec, layout: FeatureLayout, seed: int | None = None) -> dict[str, torch.Tensor]:
    """A fresh model's weights, built by the coordinator from the spec alone (no data)."""
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        module = build_model(spec, layout)
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
        module = build_model(model, layout)
        module.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        scores.append(evaluate(module.eval()))
        metrics: dict[str, int | float | list[int] | list[float]] = dict(scores[-1])
        return MetricRecord(metrics)

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
    module = build_model(model, layout)
    module.load_state_dict(state, strict=True)
    weights = weights_to_bytes(module, {
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
    """The coordinator's Flower ServerApp for a simulated study (every train message carries the `plan`):
    the result goes to `sink`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink.append(coordinate(grid, plan.model, layout, plan.rounds, n_sites, {"plan": plan.model_dump_json()},
                               plan.train.delta, evaluate, seed))

    return app


def deployed_server_app() -> ServerApp:
    """The study's coordinator on Flower's deployment runtime (`flwr run` of the Flower App,
    `veil.executor.federated.APP_DIR`). The run config names each site's part (`jobs`: site -> job id, from
    joining each site over its HTTP API), the `model` spec and feature `layout` (JSON, as the sites
    reported them), `rounds` and `delta`; the global weights go to `out` (safetensors) and a summary beside
    it (`out` + .json), with the seconds from the coordinator's start to each round's end. Replies are
    collected as they arrive (`PromptGrid`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        jobs = json.loads(str(config["jobs"]))
        model = ModelSpec.model_validate_json(str(config["model"]))
        shape = FeatureLayout.from_dict(json.loads(str(config["layout"])))
        started, ended = time.perf_counter(), []

        def on_round(server_round: int, seen: dict[str, float], failed: list[str]) -> None:
            ended.append(time.perf_counter() - started)

        result = coordinate(PromptGrid(grid), model, shape, int(config["rounds"]), len(jobs),
                            {"jobs": json.dumps(jobs)}, float(config["delta"]), on_round=on_round)
        out = Path(str(config["out"]))
        out.write_bytes(result.weights)
        out.with_name(out.name + ".json").write_text(json.dumps({
            "site_epsilon": result.site_epsilon, "rounds": result.rounds,
            "refusals": [list(r) for r in result.refusals], "seconds": result.seconds, "round_ended_s": ended}))

    return app


deployed_server = deployed_server_app()
"""The Flower App's `serverapp` component."""
