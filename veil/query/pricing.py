"""What a release costs, from the request and the site's public pricing alone.

The site charges exactly this; mock mode runs the same code on the same public figures, so a
rehearsal's cost is the live one to the last digit."""

from __future__ import annotations

from typing import Protocol

from veil.errors import GovernanceError
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.query.release import Output
from veil.wire import Cost, Pricing, QueryRequest, Release


class Certified(Protocol):
    """The loss OpenDP certified for a measurement (`calibrate.Certified`, or a site worker's summary)."""

    @property
    def rho(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def threshold(self) -> int | None: ...


def requested_rho(request: QueryRequest, level: str, pricing: Pricing) -> float | None:
    """The rho a release asks for (None when it asks for an accuracy instead: the certified loss decides);
    refused above the level's ceiling on one release."""
    if request.accuracy is not None:
        return None
    rho = request.rho if request.rho is not None else rho_for_epsilon(request.epsilon, pricing.reporting_delta)
    epsilon = request.epsilon if request.epsilon is not None else epsilon_of(rho, pricing.reporting_delta)
    within_level(epsilon, level, pricing, f"this query asks for {epsilon:.4g}")
    return rho


def within_level(epsilon: float, level: str, pricing: Pricing, asked: str) -> None:
    """Refuse a release whose epsilon is above the level's ceiling on one release; `asked` says why it costs that."""
    ceiling = pricing.max_epsilon_per_release
    if epsilon > ceiling * (1 + 1e-9):
        raise GovernanceError(
            "epsilon_above_level", f"{level} data allows at most epsilon {ceiling:g} per release at this site; {asked}",
            hint=f"ask for epsilon <= {ceiling:g} (or a looser accuracy); to narrow intervals further, combine "
                 "several releases", status=403)


def accuracy_within_level(request: QueryRequest, certified: Certified, level: str, pricing: Pricing) -> None:
    """For a release that asked for an accuracy: refuse it when the loss that certifies it is above the ceiling."""
    if request.accuracy is not None:
        epsilon = epsilon_of(certified.rho, pricing.reporting_delta)
        within_level(epsilon, level, pricing, f"a half-width of {request.accuracy:g} at {request.confidence * 100:.4g}% "
                     f"needs epsilon {epsilon:.4g}")


def cost_of(certified: Certified, pricing: Pricing) -> Cost:
    """The cost charged for a certified measurement, with its epsilon at the site's reporting delta."""
    return Cost(rho=certified.rho, delta=certified.delta, epsilon=epsilon_of(certified.rho, pricing.reporting_delta),
                epsilon_delta=pricing.reporting_delta)


def unsigned_release(site: str, dataset: str, project: str, query: str, request: QueryRequest, group_by: list[str],
                     certified: Certified, output: Output, pricing: Pricing) -> Release:
    """The release of a query's output, before the site's ledger and audit give it a receipt."""
    return Release(
        site=site, dataset=dataset, project=project, query=query, confidence=request.confidence,
        group_by=list(group_by), statistics=output.statistics, rows=output.rows, raw=output.raw,
        threshold=certified.threshold, cost=cost_of(certified, pricing), receipt="", released_at="",
    )
