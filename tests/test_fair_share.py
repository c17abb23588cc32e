"""Fair share on L1 against a real executor: what the site's rule gives without review (an approval, a
default grant) is at most a project's share of the dataset's lifetime cap, so no project can take a
dataset for itself; more needs a steward's review. A researcher's refusal never tells what other
projects spent: it speaks of their own grant only, while stewards keep the full figures."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from conftest import BACKENDS, Deployment, deploy, make_database
from veil.errors import CatalogError
from veil.executor import ledger
from veil.executor.auth import create_token
from veil.executor.policy import level_rules
from veil.query.accounting import epsilon_of, rho_for_epsilon

SHARE = 0.15  # the site.toml override; the default is 0.25
CAP = 10.0  # the synthetic patients' lifetime epsilon
DELTA = 1e-6  # the synthetic site's reporting delta


def fair_catalog(site_config: Path, directory: Path) -> Path:
    """The north site with `[levels.L1]` overridden (a 15% share, a default grant of epsilon 2, above the
    share), plus `cohort`: an L1 copy of its patients for the test that runs its cap down."""
    config = tomllib.loads(site_config.read_text())
    for table in config["datasets"].values():
        table["path"] = str(site_config.parent / table["path"])
    config["datasets"]["cohort"] = config["datasets"]["patients"]
    config["levels"] = {"L1": {"max_project_share": SHARE, "default_grant_epsilon": 2.0}}
    path = directory / "site.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def fair(request: pytest.FixtureRequest, site_config: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Deployment]:
    """A site whose L1 share is 15%; researchers of four projects (study1, other_project, third, fourth)."""
    state = tmp_path_factory.mktemp("fair")
    url, drop = make_database(request.param, state)
    d = deploy(fair_catalog(site_config, state), url, state, grants={})
    d.tokens["third"] = create_token(d.engine, "carl", "researcher", "third")
    d.tokens["fourth"] = create_token(d.engine, "dora", "researcher", "fourth")
    yield d
    d.stop()
    drop()


def apply(d: Deployment, who: str, epsilon: float, dataset: str = "patients") -> Any:
    with d.http(who) as http:
        return http.post("/applications", json={"purpose": "Age distribution of enrolled patients",
                                                 "datasets": [dataset], "epsilon": epsilon, "duration_days": 30})


def amend(d: Deployment, who: str, app: dict[str, Any], epsilon: float) -> dict[str, Any]:
    with d.http(who) as http:
        response = http.put(f"/applications/{app['id']}", json={**app["request"], "epsilon": epsilon})
    assert response.status_code == 200, response.text
    return response.json()


def granted(d: Deployment, project: str, dataset: str = "patients") -> float | None:
    with d.engine.connect() as conn:
        row = ledger.grant_row(conn, project, dataset)
    return None if row is None else row["epsilon"]


def query(d: Deployment, who: str, epsilon: float, dataset: str = "patients") -> Any:
    with d.http(who) as http:
        return http.post("/query", json={"sql": f"SELECT COUNT(*) FROM {dataset}", "epsilon": epsilon})


def figures(*values: float) -> set[str]:
    """The ways a refusal could print these numbers."""
    return {f"{v:{spec}}" for v in values for spec in (".4g", ".3g", ".2g", "g")}


def test_the_share_is_set_per_level_in_site_toml(fair: Deployment) -> None:
    with fair.http() as http:
        rules = http.get("/levels").json()
    assert rules["L1"]["max_project_share"] == SHARE
    defaults = level_rules({}, 1.0)
    assert defaults["L1"].max_project_share == 0.25  # the default, where a site says nothing
    assert level_rules({"L2": {"reviewers": 0, "max_project_share": 0.1}}, 1.0)["L2"].max_project_share == 0.1
    with pytest.raises(CatalogError, match="max_project_share"):
        level_rules({"L1": {"max_project_share": 1.5}}, 1.0)


def test_l1_rule_approves_at_most_the_share_and_a_steward_may_approve_more(fair: Deployment) -> None:
    share = SHARE * CAP
    first = apply(fair, "researcher", 1.0).json()
    assert first["status"] == "approved" and granted(fair, "study1") == 1.0
    up_to = amend(fair, "researcher", first, share)  # in steps, up to the share: still by the rule
    assert up_to["status"] == "approved" and granted(fair, "study1") == share
    above = amend(fair, "researcher", up_to, share + 0.5)  # one step more: held for a steward
    assert above["status"] == "pending" and granted(fair, "study1") == share
    assert above["needs"].startswith("1 approving reviewer") and f"epsilon {share:.4g}" in above["needs"]
    assert "15% of its lifetime cap" in above["needs"]
    again = apply(fair, "researcher", 3.0).json()  # a new application is no way round it
    assert again["status"] == "pending" and granted(fair, "study1") == share
    more = apply(fair, "researcher", 0.1).json()  # nor a small one: the rule adds it to what the project holds
    assert more["status"] == "pending" and granted(fair, "study1") == share and "together" in more["needs"]

    other = apply(fair, "outsider", share).json()  # the next project still gets its share
    assert other["status"] == "approved" and granted(fair, "other_project") == share

    with fair.http("steward") as http:  # a steward reads the figures and may approve more by review
        pending = {a["id"] for a in http.get("/applications", params={"status": "pending"}).json()}
        assert {above["id"], again["id"]} <= pending
        review = http.post(f"/applications/{again['id']}/reviews",
                           json={"decision": "approve", "comment": "a larger study, agreed", "version": 1,
                                 "on_existing_grant": "replace"})
    assert review.status_code == 200, review.text
    assert review.json()["status"] == "approved" and granted(fair, "study1") == 3.0


def test_the_default_grant_is_no_more_than_the_share(fair: Deployment) -> None:
    """The level's default grant (epsilon 2) is above the share (1.5): the project gets the share."""
    assert granted(fair, "third") is None
    response = query(fair, "third", 0.5)
    assert response.status_code == 200, response.text
    assert granted(fair, "third") == pytest.approx(SHARE * CAP)


def test_refusals_tell_a_researcher_nothing_of_other_projects_spending(fair: Deployment) -> None:
    share = SHARE * CAP
    assert apply(fair, "researcher", share, "cohort").json()["status"] == "approved"
    for epsilon in (1.0, 0.8):  # study1 spends most of its share of cohort
        assert query(fair, "researcher", epsilon, "cohort").status_code == 200
    with fair.http("steward") as http:  # a steward lowers the cap to what was spent (and a hair more)
        spent = next(b for b in http.get("/budgets").json() if b["dataset"] == "cohort")["spent_epsilon"]
        cap = http.put("/budgets/cohort/cap", json={"epsilon": spent + 1e-6, "reason": "a smaller protocol"})
        assert cap.status_code == 200, cap.text
        budget = cap.json()
    assert budget["spent_epsilon"] == pytest.approx(spent) and budget["largest_next_epsilon"] < 0.01  # stewards see all
    with fair.engine.connect() as conn:
        mine = ledger.grant_row(conn, "study1", "cohort")
    assert mine is not None
    secret = figures(spent, budget["spent_rho"], budget["largest_next_epsilon"], budget["remaining_rho"],
                     budget["cap_epsilon"], budget["cap_rho"], ledger.epsilon_spent(mine, DELTA),
                     mine["rho_spent"])

    def disclosed(*texts: str) -> set[str]:
        return {s for s in secret for t in texts if re.search(rf"(?<![\d.]){re.escape(s)}(?![\d])", t)}

    # a query the project's own (default) grant covers but the dataset's cap cannot
    refused = query(fair, "fourth", 0.1, "cohort")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["code"] == "budget_exhausted" and "site-wide budget" in body["message"]
    assert not disclosed(body["message"], body["hint"]), body
    own = SHARE * budget["cap_epsilon"]  # the fourth project's default grant, nothing spent: its own figures
    assert body["remaining"] == pytest.approx({"rho": rho_for_epsilon(own, DELTA), "delta": DELTA,
                                               "rho_granted": rho_for_epsilon(own, DELTA), "epsilon_granted": own,
                                               "epsilon_spent": 0.0,
                                               "largest_next_epsilon": epsilon_of(rho_for_epsilon(own, DELTA), DELTA)})
    with fair.http("fourth") as http:  # the refusal's audit entry, which the researcher may read, says no more
        entry = http.get(f"/receipts/{body['receipt']}").json()
    assert not disclosed(entry["reason"]), entry["reason"]

    # an application the rule would approve (within the share), which the cap cannot cover
    refused = apply(fair, "fourth", round(own * 0.9, 4), "cohort")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["code"] == "cap_exceeded" and "site-wide budget" in body["message"]
    assert not disclosed(body["message"], body["hint"]), body
    assert body["remaining"] is None
    assert epsilon_of(budget["remaining_rho"], DELTA) < own * 0.9  # it was the cap that refused
