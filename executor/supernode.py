"""The ClientApp of a SuperNode deployed beside a running executor: it relays each round to that executor.

Flower 1.30's SuperNode starts a fresh `flwr-clientapp` process for every message, which imports its
ClientApp module. Training a round in that process (`veil.executor.federated.deployed_client`) costs, per
round and site, importing torch, Opacus and the executor, opening the state database and encoding the
site's rows again. This module imports none of those: when the SuperNode's node config names the site's
executor (`executor='http://127.0.0.1:PORT'`, from `veil executor supernode --executor-url`), the round
goes to the executor's `POST /jobs/{id}/round`, where the warm process trains it through
`Rounds.train_round` and the site's ledger, as a researcher's coordinator's round would.

The credential is the site's own: the ClientApp holds the state database's URL (node config, set by the
site), reads the job's project from it, and mints a researcher token of that project that lives for the
one round: created before the request and revoked after it, both in the audit log. It gives the round
no more than the in-process path has (that path writes the ledger directly), and the executor applies
the researcher path's checks: the project's grant for training, the job's project, the round's order.
Without `executor` in the node config, the round trains in this process as before.
"""

from __future__ import annotations

import veil.federation  # noqa: F401 - first: it turns Flower's telemetry off before flwr loads

# isort: split
import json
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from veil.errors import QueryError, VeilError
from veil.federation.codec import decode_content, encode_content

deployed_client = ClientApp()
"""The Flower App's `clientapp` component (a SuperNode beside an executor)."""


@deployed_client.train()
def train(msg: Message, context: Context) -> Message:
    executor = context.node_config.get("executor")
    if not executor or "jobs" not in msg.content["config"]:
        from veil.executor import federated  # torch, Opacus and the executor: the round trains here

        reply: Message = federated.deployed_client(msg, context)
        return reply
    site, database = context.node_config.get("site"), context.node_config.get("database")
    if not site or not database:
        raise QueryError("bad_node_config", "a SuperNode that relays rounds needs the site's name and state "
                         "database in its node config", hint="start it with 'veil executor supernode', which sets "
                         "site=, database= and executor=")
    job_id = json.loads(str(msg.content["config"]["jobs"])).get(str(site))
    if job_id is None:
        raise QueryError("not_in_study", f"site {site} has no part in this study")
    content = relay_round(str(executor), str(database), str(site), int(job_id), encode_content(msg.content))
    return Message(content=decode_content(content), reply_to=msg)


def relay_round(executor: str, database: str, site: str, job_id: int, content: bytes) -> bytes:
    """One round of job `job_id` at the site's executor (`content`: the train message's, protobuf), with a
    token of the job's project minted in the site's database for this round only."""
    import httpx
    from sqlalchemy import select

    from veil.executor.auth import create_token, revoke_token
    from veil.executor.store import jobs, open_store

    engine = open_store(database)
    try:
        with engine.connect() as conn:
            project = conn.execute(select(jobs.c.project).where(jobs.c.id == job_id)).scalar()
        if project is None:
            raise QueryError("unknown_job", f"site {site} has no training job {job_id}")
        token = create_token(engine, f"supernode_{site}", "researcher", project)
        try:
            response = httpx.post(f"{executor.rstrip('/')}/jobs/{job_id}/round", content=content,
                                  headers={"Authorization": f"Bearer {token}",
                                           "Content-Type": "application/x-protobuf"},
                                  timeout=httpx.Timeout(None, connect=10.0))
        finally:
            revoke_token(engine, token.split("_")[1], by=f"supernode_{site}")
    finally:
        engine.dispose()
    if response.status_code >= 400:
        raise _refusal(site, response)
    return response.content


def _refusal(site: str, response: Any) -> VeilError:
    """The executor's refusal, as the error the ClientApp raises (its reason reaches the coordinator)."""
    try:
        body = response.json()
        return VeilError(str(body["code"]), f"site {site}: {body['message']}", body.get("hint"),
                         status=response.status_code)
    except Exception:  # noqa: BLE001 - not a Refusal: report the status
        return VeilError("round_failed", f"site {site}: the executor answered HTTP {response.status_code}")
