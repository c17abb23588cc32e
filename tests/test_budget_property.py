"""Property: whatever the interleaving of grants, releases (zCDP queries and (epsilon, delta) charges
such as DP-SGD's), revocations and cap changes, no dataset spends beyond its lifetime cap and no
project beyond its grant; a charge is refused exactly when a simple model of the ledger says it cannot
be afforded, and the audit log always verifies."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import select

from veil.errors import BudgetError, CatalogError, GovernanceError
from veil.executor import audit, ledger
from veil.executor.auth import Principal
from veil.executor.site import Site
from veil.executor.store import caps, grants, open_store, write
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.wire import QueryRequest

PROJECTS = ("p1", "p2")
DATASETS = ("patients", "encounters")  # L1 (a default grant on first use) and L2 (grants only)
TOLERANCE = 1e-9
Budget = dict[str, float | bool]


def spent_epsilon(b: Budget, delta: float, rho: float = 0.0, epsilon: float = 0.0) -> float:
    """The model's epsilon spent by a budget after one more charge: zCDP converted, plus (epsilon, delta)."""
    return epsilon_of(float(b["spent"]) + rho, delta) + float(b["approx"]) + epsilon


def fits(b: Budget, delta: float, rho: float = 0.0, epsilon: float = 0.0) -> bool:
    if epsilon == 0.0 and b["approx"] == 0.0:
        return float(b["spent"]) + rho <= float(b["total"])
    return spent_epsilon(b, delta, rho, epsilon) <= epsilon_of(float(b["total"]), delta)


@pytest.fixture(scope="module")
def base_site(site_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site.open(site_config, f"sqlite:///{tmp_path_factory.mktemp('prop') / 'base.db'}")
    yield site
    site.close()
    site.engine.dispose()


def test_no_interleaving_overspends(base_site: Site, tmp_path: Path) -> None:
    counter = itertools.count()
    outcomes: collections.Counter[str] = collections.Counter()
    delta = base_site.catalog.reporting_delta

    class Ledger(RuleBasedStateMachine):
        @initialize()
        def fresh_site(self) -> None:
            engine = open_store(f"sqlite:///{tmp_path / f'prop-{next(counter)}.db'}")
            # the catalog, certified queries and bound checks are shared; the state database is new
            self.site = Site(base_site.catalog, engine, base_site.queries, base_site._bounds)
            ledger.sync_caps(engine, base_site.catalog)
            self.grant: dict[tuple[str, str], Budget] = {}
            self.cap: dict[str, Budget] = {
                d: {"total": rho_for_epsilon(base_site.catalog.datasets[d].lifetime_epsilon, delta), "spent": 0.0,
                    "approx": 0.0} for d in DATASETS}
            self.cap_epsilon = {d: base_site.catalog.datasets[d].lifetime_epsilon for d in DATASETS}

        @rule(project=st.sampled_from(PROJECTS), dataset=st.sampled_from(DATASETS),
              epsilon=st.sampled_from([0.2, 0.5, 1.5, 3.0]))
        def set_grant(self, project: str, dataset: str, epsilon: float) -> None:
            with write(self.site.engine) as conn:
                ledger.set_grant(conn, self.site.catalog, project, self.site.catalog.datasets[dataset], epsilon,
                                 by="steward", uses=("query", "training"))
            held = self.grant.get((project, dataset), {})
            spent, approx = float(held.get("spent", 0.0)), float(held.get("approx", 0.0))
            floor = max(spent, rho_for_epsilon(spent_epsilon(held, delta), delta) if held and held["approx"] else 0.0)
            self.grant[(project, dataset)] = {"total": max(rho_for_epsilon(epsilon, delta), floor), "spent": spent,
                                              "approx": approx, "revoked": False, "training": True}

        @rule(project=st.sampled_from(PROJECTS), dataset=st.sampled_from(DATASETS))
        def revoke(self, project: str, dataset: str) -> None:
            with write(self.site.engine) as conn:
                row = ledger.grant_row(conn, project, dataset)
            if row is None or row["revoked"]:
                return
            with write(self.site.engine) as conn:
                ledger.revoke_grant(conn, row["id"], by="steward", reason="property test")
            self.grant[(project, dataset)]["revoked"] = True

        @rule(dataset=st.sampled_from(DATASETS), epsilon=st.sampled_from([0.5, 1.0, 2.0, 6.0]))
        def set_cap(self, dataset: str, epsilon: float) -> None:
            try:
                with write(self.site.engine) as conn:
                    ledger.set_cap(conn, self.site.catalog, self.site.catalog.datasets[dataset], epsilon,
                                   by="steward", reason="")
            except GovernanceError as exc:
                assert exc.code == "cap_below_spent"
                assert (rho_for_epsilon(epsilon, delta) < float(self.cap[dataset]["spent"])
                        or epsilon < spent_epsilon(self.cap[dataset], delta))
                return
            self.cap[dataset]["total"] = rho_for_epsilon(epsilon, delta)
            self.cap_epsilon[dataset] = epsilon

        @rule(project=st.sampled_from(PROJECTS), dataset=st.sampled_from(DATASETS),
              epsilon=st.sampled_from([0.1, 0.3, 0.6, 1.0]))
        def release(self, project: str, dataset: str, epsilon: float) -> None:
            who = Principal(f"{project}_researcher", "researcher", project)
            grant = self.grant.get((project, dataset))
            if grant is None and dataset == "patients":  # L1: the default grant a first release creates,
                share = self.site.catalog.levels["L1"].max_project_share * self.cap_epsilon[dataset]  # at most
                default = min(self.site.catalog.default_l1_epsilon, share)  # the project's share of the cap
                grant = {"total": rho_for_epsilon(default, delta), "spent": 0.0,
                         "approx": 0.0, "revoked": False, "training": False}
            asked = rho_for_epsilon(epsilon, delta)
            try:
                release = self.site.query(who, QueryRequest(sql=f"SELECT COUNT(*) FROM {dataset}", epsilon=epsilon))
            except (BudgetError, GovernanceError, CatalogError) as exc:
                outcomes[exc.code] += 1
                if exc.code == "unknown_dataset":
                    assert grant is None
                elif exc.code == "grant_revoked":
                    assert grant is not None and grant["revoked"]
                else:  # the certified cost is at most what was asked: if that fitted, so did the cost
                    assert exc.code == "budget_exhausted", exc.code
                    assert grant is not None and not grant["revoked"]
                    assert not (fits(grant, delta, rho=asked) and fits(self.cap[dataset], delta, rho=asked))
                return
            outcomes["released"] += 1
            cost = release.cost.rho
            assert grant is not None and not grant["revoked"]
            assert fits(grant, delta, rho=cost) and fits(self.cap[dataset], delta, rho=cost)
            grant["spent"] = float(grant["spent"]) + cost
            self.grant[(project, dataset)] = grant
            self.cap[dataset]["spent"] = float(self.cap[dataset]["spent"]) + cost

        @rule(project=st.sampled_from(PROJECTS), dataset=st.sampled_from(DATASETS),
              epsilon=st.sampled_from([0.2, 0.5, 1.0]))
        def approximate_dp_charge(self, project: str, dataset: str, epsilon: float) -> None:
            """A charge in (epsilon, delta) terms, as a DP-SGD job's reservation makes."""
            grant = self.grant.get((project, dataset))
            if grant is None or grant["revoked"]:
                return
            affordable = fits(grant, delta, epsilon=epsilon) and fits(self.cap[dataset], delta, epsilon=epsilon)
            try:
                with write(self.site.engine) as conn:
                    ledger.charge(conn, self.site.catalog, project, self.site.catalog.datasets[dataset], 0.0, 0.0,
                                  use="training", epsilon=epsilon)
                    audit.append(conn, principal="trainer", role="researcher", action="train", decision="reserved",
                                 project=project, dataset=dataset, epsilon=epsilon)
            except GovernanceError as exc:  # the L1 default grant covers queries only
                assert exc.code == "use_not_granted" and not grant["training"]
                return
            except BudgetError:
                outcomes["approx_refused"] += 1
                assert not affordable
                return
            outcomes["approx_charged"] += 1
            assert affordable
            grant["approx"] = float(grant["approx"]) + epsilon
            self.cap[dataset]["approx"] = float(self.cap[dataset]["approx"]) + epsilon

        @invariant()
        def ledger_within_grants_and_caps_and_as_modelled(self) -> None:
            if not hasattr(self, "site"):
                return
            with self.site.engine.connect() as conn:
                rows = [(r, self.grant[(r["project"], r["dataset"])]) for r in conn.execute(select(grants)).mappings()]
                rows += [(r, self.cap[r["dataset"]]) for r in conn.execute(select(caps)).mappings()]
            for row, model in rows:
                assert row["rho_spent"] <= row["rho_total"] * (1 + TOLERANCE)
                assert ledger.epsilon_spent(dict(row), delta) <= epsilon_of(row["rho_total"], delta) * (1 + TOLERANCE)
                assert row["rho_spent"] == pytest.approx(model["spent"], rel=1e-9, abs=1e-15)
                assert row["approx_epsilon_spent"] == pytest.approx(model["approx"], rel=1e-9, abs=1e-15)
            verification = audit.verify(self.site.engine)
            assert verification.ok, verification.problems

        def teardown(self) -> None:
            if hasattr(self, "site"):
                self.site.refusals.close()  # its own refusal counter; the query workers are base_site's
                self.site.engine.dispose()

    Ledger.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None, database=None,
                                        suppress_health_check=[HealthCheck.too_slow])
    Ledger.TestCase().runTest()
    # the property is only as good as what it exercised: releases, and refusals of each kind
    exercised = ("released", "budget_exhausted", "grant_revoked", "unknown_dataset", "approx_charged", "approx_refused")
    assert min(outcomes[k] for k in exercised) > 0, outcomes


@pytest.mark.parametrize("delta", [1e-5, 1e-6, 1e-8])
def test_the_lab_bounds_the_largest_next_release_from_below(delta: float) -> None:
    """The lab's status bar charges a release in rho and, until it refetches, shows the largest next release as
    max(before - epsilon, before * rho_left_after / rho_left) (budgetModel.ts `applyRelease`). Both are lower
    bounds only because OpenDP's conversion of rho to epsilon is concave and 0 at 0: check that it is, and that
    the bound never overstates, over the budgets people use; and that epsilons do not add up (spent plus the
    largest next release is more than granted once anything is spent)."""
    rhos = [1e-6 * 1.07**i for i in range(300)]  # 1e-6 to about 0.6
    epsilons = [epsilon_of(r, delta) for r in rhos]
    slopes = [(e1 - e0) / (r1 - r0) for (r0, e0), (r1, e1) in itertools.pairwise(zip(rhos, epsilons, strict=True))]
    assert all(s1 <= s0 * (1 + 1e-9) for s0, s1 in itertools.pairwise(slopes))  # concave
    for granted in (0.5, 2.0, 8.0):
        total = rho_for_epsilon(granted, delta)
        for spent_share in (0.1, 0.5, 0.9):
            left = total * (1 - spent_share)
            before = epsilon_of(left, delta)
            assert epsilon_of(total - left, delta) + before > granted * (1 - 1e-9)  # epsilons do not add up
            for asked in (0.01, 0.1, 0.5):
                rho = rho_for_epsilon(asked, delta)
                if rho > left:
                    continue
                after = epsilon_of(left - rho, delta)
                shown = max(before - epsilon_of(rho, delta), before * (left - rho) / left)
                assert shown <= after * (1 + 1e-12) + 1e-12, (granted, spent_share, asked)
