"""Federated DP-SGD on Flower, the site's side: each site trains with Opacus where its data lives.

The privacy unit is the patient at a site. A site keeps ONE accountant for the whole study: the noise
multiplier is calibrated once for every planned step (epochs per round x rounds, at the site's own
sampling rate), each round resumes the accountant (Opacus' `state_dict()`, kept as JSON: see
`dpsgd.save_accountant`) and extends it, and a round that would take it past the site's epsilon is
refused before it starts. (A new PrivacyEngine per round, as in Flower's Opacus example, reports one
round's epsilon and under-reports the study's.) What leaves a site is a `codec.SiteRound`: DP weights,
the epsilon its accountant gives, and a public weight. The coordinator that averages them holds no data
and lives in the shared core (`veil.federation.coordinator`).

In simulation the accountant lives in the Flower node's `context.state` (kept by the SuperNode across
rounds of one run); a site's executor keeps it in its ledger's job row (`veil.executor.rounds`).
"""

from __future__ import annotations

from veil.federation import coordinator  # first: it turns Flower's telemetry off before flwr loads

# isort: split
import functools
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from veil.errors import QueryError
from veil.executor import dpsgd
from veil.executor.catalog import load_catalog
from veil.federation.codec import MAX_ROUNDS, SiteRound, StudyPlan, read_round
from veil.models.layout import FeatureLayout

if TYPE_CHECKING:
    from veil.executor.auth import Principal
    from veil.executor.rounds import Rounds

ACCOUNTANT_KEY = "veil-accountant"
"""Where a node keeps its accountant in `context.state` (a ConfigRecord)."""


# ------------------------------------------------------------------ in-memory sites (simulation)


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


def site_round(
    site: SiteData,
    plan: StudyPlan,
    state: Mapping[str, torch.Tensor],
    accountant: Mapping[str, Any] | None,
    server_round: int,
    device: str | torch.device | None = None,
) -> tuple[SiteRound, dict[str, Any]]:
    """One round of local DP-SGD at a site, resuming its study accountant (`accountant`: the state this
    returned last round, None before the first); returns the reply and the accountant's new state (to
    persist before the reply leaves the site)."""
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
        accountant=accountant,
        layout=site.layout,
        device=device,
        seed=seed,
        public_rows=site.public_rows,
    )
    return _reply(site.name, stretch, float(site.public_rows or 1)), stretch.accountant_state


def load_accountant(context: Context, study: str) -> dict[str, Any] | None:
    """The node's accountant state for `study` (None before its first round)."""
    record = context.state.get(ACCOUNTANT_KEY)
    if record is None or record.get("study") != study:
        return None
    state: dict[str, Any] = json.loads(str(record["accountant"]))
    return state


def save_accountant(context: Context, study: str, state: Mapping[str, Any]) -> None:
    """Keep the accountant state (plain JSON data) for the node's next round."""
    context.state[ACCOUNTANT_KEY] = ConfigRecord({"study": study, "accountant": json.dumps(state)})


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
        state, server_round = read_round(msg.content)
        reply, accountant = site_round(site, plan, state, load_accountant(context, plan.study), server_round,
                                       device)
        save_accountant(context, plan.study, accountant)
        return Message(content=reply.content(), reply_to=msg)

    return app


def _site(context: Context, sites: Sequence[SiteData] | None) -> SiteData:
    if sites is None:
        raise QueryError(
            "no_site_data",
            "this node has neither in-memory site data nor an executor catalog",
            "start the SuperNode with --node-config \"catalog='/path/to/site.toml'\"",
        )
    return sites[int(context.node_config["partition-id"])]


def _reply(site: str, stretch: dpsgd.Stretch, weight: float) -> SiteRound:
    """What leaves the site after a round: the stretch's DP weights and public numbers."""
    return SiteRound(site=site, state=stretch.state, epsilon=stretch.epsilon,
                     steps=sum(k for _, _, k in stretch.history), noise_multiplier=stretch.noise_multiplier,
                     sample_rate=stretch.sample_rate, weight=weight)


# ------------------------------------------------------------------ a site's executor


def executor_reply(rounds: Rounds, job_id: int, content: RecordDict, who: Principal | None) -> RecordDict:
    """One round at an executor: a train message's content in (global weights, `server-round`), the
    reply's content out (DP weights, the accountant's epsilon, the site's public weight)."""
    state, server_round = read_round(content)
    stretch, weight = rounds.train_round(job_id, state, server_round, who)
    return _reply(rounds.catalog.site, stretch, float(weight)).content()


@functools.lru_cache(maxsize=4)
def _executor(catalog: str, database: str | None) -> Rounds:
    """The site's federated parts, in the executor's own database (the executor has checked the data
    files and recovered its jobs at start; a ClientApp process only trains rounds)."""
    from veil.executor.rounds import Rounds  # the executor imports this module
    from veil.executor.store import open_store
    from veil.executor.training import Trainer

    site = load_catalog(catalog)
    return Rounds(Trainer(open_store(database or site.database_url), site))


APP_DIR = Path(__file__).with_name("flower_app")
"""The Flower App (FAB) directory `flwr run` submits: its serverapp is `veil.federation.coordinator`'s
`deployed_server`, its clientapp `veil.executor.supernode.deployed_client`: that relays each round to the
site's running executor, or, where the SuperNode names none, trains it with `deployed_client` below."""
deployed_client = client_app()
"""A SuperNode's ClientApp that trains each round in its own process (beside an executor, on its ledger)."""


_SIMULATION = threading.Lock()


def simulate(
    plan: StudyPlan,
    sites: Sequence[SiteData],
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    seed: int | None = None,
    cpus_per_site: float = 1.0,
) -> coordinator.FederatedResult:
    """Run a study with Flower's simulation engine (Ray), one virtual SuperNode per site and the
    coordinator's ServerApp (`coordinator.server_app`)."""
    if len({s.layout for s in sites}) != 1:
        raise QueryError("bad_plan", "every site must encode the same features the same way")
    sink: list[coordinator.FederatedResult] = []
    backend = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }
    from flwr.simulation import run_simulation  # Ray loads only for simulations

    pythonpath = os.environ.get("PYTHONPATH")
    with _SIMULATION:  # one Ray runtime per process at a time
        try:
            run_simulation(
                server_app=coordinator.server_app(plan, sites[0].layout, len(sites), sink, evaluate, seed),
                client_app=client_app(sites, device="cpu"),
                num_supernodes=len(sites),
                backend_config=backend,  # type: ignore[arg-type]
            )
        finally:  # Flower's Ray backend sets PYTHONPATH to this process's sys.path for good: put it back
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath
    if not sink:
        raise RuntimeError("the federated run ended without a result; see the Flower log above")
    return sink[0]
