"""Approving an application never shrinks a grant by surprise (issue 15): where the project already holds an
active grant on a requested dataset, the approving reviewer chooses add, replace or keep (API, desk's wire
and `veil steward review --existing`), without a choice the approval is refused and nothing changes, every
choice is audited with the figures before and after, and the site's rule (L1, no reviewer) only ever adds,
within the project's share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_governance import (
    SQL_ENCOUNTERS,
    apply,
    assert_refused,
    governance_catalog,
    query,
    review,
    state,
    steward_cli,
)

from conftest import BACKENDS, Deployment, add_stewards, deploy, make_database
from veil.executor import audit, ledger
from veil.executor.auth import create_token
from veil.query.accounting import epsilon_of, rho_for_epsilon

DELTA = 1e-6  # the north site's reporting delta


@pytest.fixture(scope="module", params=BACKENDS)
def site(request: pytest.FixtureRequest, site_config: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Deployment]:
    """The governance site (patients L1, encounters L2, registry L3), stewards holding each office."""
    root = tmp_path_factory.mktemp("existing")
    url, drop = make_database(request.param, root)
    d = deploy(governance_catalog(site_config, root, {"L2": {"training": False}}), url, root, grants={})
    add_stewards(d, root, {"erin": "data_center", "frank": "data_committee"})
    yield d
    d.stop()
    drop()


def project(d: Deployment, dataset: str, epsilon: float) -> tuple[str, str]:
    """A new project with a researcher and a steward's grant of `epsilon` on `dataset` (no expiry)."""
    name = f"p_{uuid.uuid4().hex[:8]}"
    who = f"r_{name}"
    d.tokens[who] = create_token(d.engine, who, "researcher", name)
    d.grant(name, dataset, epsilon)
    return name, who


def row(d: Deployment, name: str, dataset: str) -> dict[str, Any]:
    with d.engine.connect() as conn:
        found = ledger.grant_row(conn, name, dataset)
    assert found is not None
    return found


def reasons(d: Deployment, app: dict[str, Any]) -> dict[tuple[str, str], str]:
    """The audit entries of an application, (action, decision) -> reason (the last of each)."""
    return {(e.action, e.decision): e.reason or "" for e in audit.entries(d.engine)
            if e.reason and f"application {app['id']}" in e.reason}


def test_an_approval_over_an_existing_grant_must_choose_add_replace_or_keep(site: Deployment) -> None:
    name, who = project(site, "encounters", 8.0)
    assert query(site, SQL_ENCOUNTERS, who=who, epsilon=0.5).status_code == 200
    app = apply(site, who=who, epsilon=2.0, duration_days=90, purpose="A smaller follow-up on encounters")
    assert app["status"] == "pending" and app["existing_grants"] == []  # the researcher's own view
    with site.http("steward") as http:  # stewards see the grant the project holds on the card
        card = http.get(f"/applications/{app['id']}").json()
    (held,) = card["existing_grants"]
    assert held["dataset"] == "encounters" and held["epsilon"] == 8.0 and held["expires_at"] is None
    with site.http(who) as http:  # a researcher's view is unchanged
        assert http.get(f"/applications/{app['id']}").json()["existing_grants"] == []

    before_row = row(site, name, "encounters")
    before = state(site.engine)
    refused = review(site, "steward", app)
    assert_refused(site, refused, 409, "existing_grant", before)
    body = refused.json()
    assert "epsilon granted 8" in body["message"] and "no expiry" in body["message"]
    assert "spent 0.5" in body["message"] and "largest next release" in body["message"]
    assert "requests epsilon 2 for 90 days" in body["message"]
    assert all(word in body["hint"] for word in ("add", "replace", "keep", "--existing"))

    # keep: approved, the grant exactly as it was
    kept = review(site, "steward", app, existing="keep")
    assert kept.status_code == 200 and kept.json()["status"] == "approved", kept.text
    assert row(site, name, "encounters") == before_row
    logged = reasons(site, app)
    assert logged[("review", "approve")].endswith("[on an existing grant: keep]")
    assert "on the existing grant: keep" in logged[("application", "approved")]
    assert "epsilon granted 8, spent 0.5" in logged[("application", "approved")]

    # add: rho adds up (zCDP), the later expiry (none) stands, what it spent stays spent
    app = apply(site, who=who, epsilon=2.0, duration_days=90, purpose="A second follow-up on encounters")
    added = review(site, "steward", app, existing="add")
    assert added.status_code == 200 and added.json()["status"] == "approved", added.text
    after = row(site, name, "encounters")
    assert after["rho_total"] == pytest.approx(before_row["rho_total"] + rho_for_epsilon(2.0, DELTA))
    assert after["epsilon"] == pytest.approx(epsilon_of(after["rho_total"], DELTA))
    assert 8.0 < after["epsilon"] < 10.0  # epsilons do not add up: rho does
    assert after["rho_spent"] == before_row["rho_spent"] and after["expires_at"] is None
    assert after["application_id"] == app["id"]
    logged = reasons(site, app)
    assert "on the existing grant: add" in logged[("application", "approved")]
    assert f"epsilon 8 -> {after['epsilon']:.4g}" in logged[("grant", "granted")]

    # replace: the grant becomes what the application asks (never below what it spent)
    app = apply(site, who=who, epsilon=2.0, duration_days=90, purpose="A third follow-up on encounters")
    replaced = review(site, "steward", app, existing="replace")
    assert replaced.status_code == 200, replaced.text
    last = row(site, name, "encounters")
    assert last["epsilon"] == 2.0 and last["expires_at"] is not None and last["rho_spent"] == after["rho_spent"]
    assert last["rho_total"] == pytest.approx(rho_for_epsilon(2.0, DELTA))
    approved = reasons(site, app)[("application", "approved")]
    assert "on the existing grant: replace" in approved and "no expiry -> epsilon granted 2" in approved


def test_two_reviewers_the_approval_that_grants_chooses(site: Deployment) -> None:
    name, who = project(site, "registry", 3.0)
    app = apply(site, who=who, datasets=["registry"], epsilon=1.0, ethics_ref="IRB-2026-400",
                purpose="Registry survival analysis, an extension")
    first = review(site, "erin", app)  # the first approval creates no grant: no choice needed yet
    assert first.status_code == 200 and first.json()["needs"].startswith("1 more approving reviewer")
    before = state(site.engine)
    assert_refused(site, review(site, "frank", app), 409, "existing_grant", before)
    done = review(site, "frank", app, existing="add")
    assert done.status_code == 200 and done.json()["status"] == "approved", done.text
    assert row(site, name, "registry")["rho_total"] == pytest.approx(
        rho_for_epsilon(3.0, DELTA) + rho_for_epsilon(1.0, DELTA))


def test_the_l1_rule_only_adds_and_never_shrinks_a_grant(site: Deployment) -> None:
    name, who = project(site, "patients", 2.0)  # share: a quarter of the lifetime cap 10, epsilon 2.5
    held = row(site, name, "patients")
    small = apply(site, who=who, datasets=["patients"], epsilon=0.5, purpose="Age bands of enrolled patients")
    assert small["status"] == "approved"  # added: within the share together
    after = row(site, name, "patients")
    assert after["rho_total"] == pytest.approx(held["rho_total"] + rho_for_epsilon(0.5, DELTA))
    assert after["epsilon"] > 2.0 and after["expires_at"] is None  # the grant without expiry keeps none
    assert "on the existing grant: add" in reasons(site, small)[("application", "approved")]

    big = apply(site, who=who, datasets=["patients"], epsilon=1.5, purpose="Sex ratio of enrolled patients")
    assert big["status"] == "pending" and "together" in big["needs"] and "above the most" in big["needs"]
    assert row(site, name, "patients") == after  # held for a steward, who must choose
    before = state(site.engine)
    assert_refused(site, review(site, "steward", big), 409, "existing_grant", before)
    assert review(site, "steward", big, existing="keep").json()["status"] == "approved"
    assert row(site, name, "patients") == after


def test_the_cli_says_what_to_do_with_the_existing_grant(site: Deployment, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    name, who = project(site, "encounters", 4.0)
    app = apply(site, who=who, epsilon=1.0, duration_days=10, purpose="Encounters by weekday, a short study")
    code, out = steward_cli(site, "steward", "applications", "--pending", "--details", capsys=capsys)
    assert code == 0 and "the project already holds grant" in out and "--existing add|replace|keep" in out
    before = state(site.engine)
    code, out = steward_cli(site, "steward", "review", str(app["id"]), "--approve", "--comment", "ok",
                            capsys=capsys)
    assert code == 2 and "[existing_grant]" in out and "--existing" in out
    assert state(site.engine) == before
    code, out = steward_cli(site, "steward", "review", str(app["id"]), "--approve", "--comment", "ok",
                            "--existing", "add", capsys=capsys)
    assert code == 0 and f"#{app['id']} v1 [approved]" in out, out
    assert row(site, name, "encounters")["rho_total"] == pytest.approx(
        rho_for_epsilon(4.0, DELTA) + rho_for_epsilon(1.0, DELTA))


# ------------------------------------------------------------------ a steward's direct grant (issue 16)


def test_a_steward_grants_directly_on_a_paper_review(site: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"p_{uuid.uuid4().hex[:8]}"
    who = f"r_{name}"
    site.tokens[who] = create_token(site.engine, who, "researcher", name)
    (site.token_dir / f"{who}.token").write_text(site.tokens[who])  # type: ignore[attr-defined]
    body = {"project": name, "datasets": ["encounters"], "epsilon": 3.0, "duration_days": 30,
            "reference": "data committee minutes 2026-11-30, item 4"}
    with site.http(who) as http:  # researchers cannot grant themselves budget
        assert http.post("/grants", json=body).status_code == 403
    code, out = steward_cli(site, "steward", "grant", "create", "--project", name, "--dataset", "encounters",
                            "--epsilon", "3", "--days", "30", "--reference", body["reference"], capsys=capsys)
    assert code == 0, out
    assert "approved" in out and "encounters" in out
    grant = row(site, name, "encounters")
    assert grant["epsilon"] == 3.0 and grant["expires_at"] is not None and grant["created_by"] == "carol"
    assert query(site, SQL_ENCOUNTERS, who=who, epsilon=0.5).status_code == 200
    entries = [e for e in audit.entries(site.engine) if e.project == name and e.action in ("application", "grant")]
    assert [(e.action, e.decision) for e in entries][:3] == [
        ("application", "submitted"), ("grant", "granted"), ("application", "approved")]
    assert all(body["reference"] in (e.reason or "") for e in (entries[0], entries[2]))
    assert entries[0].principal == "carol"
    before = state(site.engine)
    with site.http("steward") as http:  # over the grant it now holds: add, replace or keep, never silently
        assert_refused(site, http.post("/grants", json={**body, "epsilon": 1.0}), 409, "existing_grant", before)
        added = http.post("/grants", json={**body, "epsilon": 1.0, "on_existing_grant": "add"})
    assert added.status_code == 201, added.text
    assert row(site, name, "encounters")["rho_total"] == pytest.approx(
        rho_for_epsilon(3.0, DELTA) + rho_for_epsilon(1.0, DELTA))
