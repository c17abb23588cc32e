"""Federated DP-SGD from the researcher's side: the study's coordinator runs in the kernel.

`Study.train(...)` asks every site whether it would take part (POST /job-checks: nothing reserved), joins
each site to the study (POST /jobs with `federated`: the site checks its policy and reserves the study's
budget on its own ledger), then runs Flower's FedAvg (the shared core's
`veil.federation.coordinator.coordinate`, which holds no data) over an `ExecutorGrid`, a Flower Grid
whose nodes are the sites' executors: each train message goes to POST /jobs/{id}/round with the
researcher's token, the site trains where its data lives and answers with DP weights and public
numbers only. At the end every site evaluates the global model on its own
held-out patients (a DP release) and settles its ledger to what its accountant spent. Ctrl-C ends every
site's part; each is charged only for the rounds it ran.
"""

from __future__ import annotations

from veil.federation import codec, coordinator  # first: they turn Flower's telemetry off before flwr loads

# isort: split
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from flwr.app import Error, Message, RecordDict
from flwr.common.typing import Run
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilError
from veil.kernel.result import Result
from veil.kernel.training import TrainedModel
from veil.models.layout import FeatureLayout
from veil.wire import JobInfo, TrainingCheck, TrainRequest

Site = TypeVar("Site")
Answer = TypeVar("Answer")
SITE_FAILED = 1
"""The Flower error code a reply carries when a site refused or could not be reached."""


class ExecutorGrid(Grid):
    """A Flower Grid over executors' HTTP APIs: node i+1 is `parts[i]` (a site's client and its job id).
    Messages go out in parallel, one request per site; a refusal or an unreachable site comes back as
    an error reply, so the round goes on without that site."""

    def __init__(self, parts: Sequence[tuple[SiteClient, int]]) -> None:
        self._parts = {i + 1: part for i, part in enumerate(parts)}
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._parts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message (in parallel) and keep the replies for `pull_messages`."""
        messages = list(messages)
        for n, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"{msg.metadata.group_id}-{msg.metadata.dst_node_id}-{n}"
        with ThreadPoolExecutor(max_workers=max(1, len(messages))) as pool:
            replies = list(pool.map(self._deliver, messages))
        with self._lock:
            for msg, reply in zip(messages, replies):
                self._replies[msg.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        client, job_id = self._parts[msg.metadata.dst_node_id]
        try:
            content = codec.decode_content(client.job_round(job_id, codec.encode_content(msg.content)))
        except VeilError as exc:
            return Message(Error(SITE_FAILED, f"{client.name}: {exc}"), reply_to=msg)
        return Message(content, reply_to=msg)


@dataclass(frozen=True)
class FederatedModel:
    """A model trained across sites: the global weights, and each site's part (its epsilon, its DP
    evaluation on its own held-out patients, its receipt)."""

    weights: bytes
    parts: dict[str, JobInfo]
    rounds: list[dict[str, float]]
    failures: list[tuple[int, str]]

    @property
    def epsilon(self) -> dict[str, float]:
        """What each site's accountant says the study spent there (one number per site, never summed)."""
        return {site: job.epsilon for site, job in self.parts.items()}

    @property
    def evaluation(self) -> dict[str, Result]:
        """Each site's DP release of the global model's held-out accuracy (or squared error)."""
        return {site: Result.of(job.evaluation) for site, job in self.parts.items() if job.evaluation is not None}

    def module(self):  # noqa: ANN201 - torch is imported lazily
        """The global `torch.nn.Module`."""
        first = next(iter(self.parts))
        return TrainedModel(first, self.parts[first], self.weights).module()

    def save(self, path: str) -> None:
        """Write the global weights as a .safetensors file."""
        with open(path, "wb") as out:
            out.write(self.weights)

    def __repr__(self) -> str:
        spent = ", ".join(f"{s} {e:.3g}" for s, e in self.epsilon.items())
        return f"<FederatedModel over {len(self.parts)} sites, {len(self.rounds)} rounds: epsilon {spent}>"


def train_federated(clients: Sequence[SiteClient], request: TrainRequest, progress: bool = True) -> FederatedModel:
    """Join every site to the study, run its rounds with Flower's FedAvg, then have each site evaluate the
    global model and settle. The sites are asked at once (each joins, and later evaluates, on its own
    machine). Every site first checks the request without reserving anything: a site that would refuse, or
    sites whose catalogs encode the features differently, stop the study before any site spends anything.
    A site that still refuses to join (its budget changed in between) stops it before any round (the sites
    that joined are released, charged only their DP counts of rows)."""
    assert request.federated is not None
    checked = _at_every_site(clients, lambda client: client.check_training(request))
    refused = [error for error in checked if isinstance(error, VeilError)]
    if refused:
        raise refused[0]
    if len({c.layout.model_dump_json() for c in checked if isinstance(c, TrainingCheck)}) != 1:
        raise VeilError("incompatible_sites",
                        "the sites encode the features differently (their public bounds or categories differ); "
                        "nothing was reserved or charged",
                        "align the catalogs, or train at each site alone")
    joined = _at_every_site(clients, lambda client: client.train(request))
    parts = [(client, job) for client, job in zip(clients, joined) if isinstance(job, JobInfo)]
    refused = [error for error in joined if isinstance(error, VeilError)]
    if refused:
        for client, job in parts:
            client.cancel_job(job.id)
        raise refused[0]
    if len({_layout_key(job) for _, job in parts}) != 1:  # a catalog changed between the check and the join
        for client, job in parts:
            client.cancel_job(job.id)
        raise VeilError("incompatible_sites",
                        "the sites encode the features differently (their public bounds or categories differ)",
                        "align the catalogs, or train at each site alone")
    layout = parts[0][1].layout
    assert layout is not None
    shape = FeatureLayout.from_dict(layout.model_dump())
    rounds = request.federated.rounds
    bar = tqdm(total=rounds, unit="round", desc=f"study {request.federated.study}", disable=not progress)
    failures: list[tuple[int, str]] = []

    def on_round(server_round: int, epsilons: dict[str, float], failed: list[str]) -> None:
        failures.extend((server_round, reason) for reason in failed)
        bar.set_postfix({f"eps {site}": f"{eps:.2g}" for site, eps in epsilons.items()}
                        | ({"failed": len(failed)} if failed else {}), refresh=False)
        bar.update(1)

    grid = ExecutorGrid([(client, job.id) for client, job in parts])
    flower = logging.getLogger("flwr")
    level, flower.level = flower.level, logging.ERROR
    try:
        result = coordinator.coordinate(grid, request.model, shape, rounds, len(parts), {}, request.train.delta,
                                      on_round=on_round)
    except BaseException:  # Ctrl-C or a failed study: end every part; each keeps what its rounds spent
        for client, job in parts:
            client.cancel_job(job.id)
        raise
    finally:
        flower.setLevel(level)
        bar.close()
    finished: dict[str, JobInfo] = {}
    ended = _at_every_site(parts, lambda part: part[0].finish_job(part[1].id, result.weights))
    for (client, job), done in zip(parts, ended):
        if isinstance(done, VeilError):  # that site settles its part when it expires, to what its rounds spent
            failures.append((rounds, f"{client.name} could not evaluate and settle: {done}"))
        finished[client.name] = done if isinstance(done, JobInfo) else job
    return FederatedModel(result.weights, finished, result.rounds, failures)


def _at_every_site(sites: Sequence[Site], call: Callable[[Site], Answer]) -> list[Answer | VeilError]:
    """`call` for every site at once (each site works on its own machine), in the order of `sites`: the
    site's answer, or the VeilError it refused with."""
    def one(site: Site) -> Answer | VeilError:
        try:
            return call(site)
        except VeilError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, len(sites))) as pool:
        return list(pool.map(one, sites))


def _layout_key(job: JobInfo) -> str:
    return job.layout.model_dump_json() if job.layout is not None else ""
