"""Project applications and their review: the paper process hospitals already run, kept in the ledger.

A researcher applies (purpose, datasets, budget, duration, uses); reviewers approve or reject the
version they read. When the approvals meet the rule of the strictest dataset's level, the grants
are created in the same transaction. Any change makes a new version that needs a new review.
Every step is an audit entry; every refusal changes nothing.

A rule that needs no reviewer (L1) approves at most each dataset's per-project share of its lifetime
cap (`ledger.project_share`; an application sets the project's grant total, so this bounds what the
project holds however many applications it files); a larger application waits for one steward's
review, who sees the figures and may approve it. A researcher is never told what the cap has left.

Approval never shrinks a grant by surprise. Where the project already holds an active grant on a requested
dataset, given by another application (or the site's default), the approving reviewer chooses what becomes of
it (`ReviewRequest.on_existing_grant`): `add` (the new budget composes with it: rho adds up in zCDP, deltas add
up, the later expiry and both uses stand), `replace` (the grant becomes what this application asks), or `keep`
(it stays as it is). Without a choice the approval is refused and nothing changes. The site's rule (no
reviewer) only ever adds, and only while the sum stays within the project's share; beyond it, a steward
reviews. A grant this same application gave (an amended, re-approved application) is its own: the reviewed
version replaces it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, insert, select, update

from veil.errors import CatalogError, GovernanceError
from veil.executor import audit, ledger, lifecycle, standing
from veil.executor.auth import Principal
from veil.executor.catalog import Catalog
from veil.executor.policy import combined, may_review, missing
from veil.executor.store import applications, reviews, write
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.wire import (
    ApplicationInfo,
    ApplicationRequest,
    DirectGrantRequest,
    ExistingGrantChoice,
    LevelRule,
    Review,
    ReviewRequest,
)

SITE_POLICY = Principal("site-policy", "system")


def rule_for(catalog: Catalog, request: ApplicationRequest) -> LevelRule:
    """The rule an application is reviewed under; refuses unknown datasets and what its levels forbid."""
    unknown = [d for d in request.datasets if d not in catalog.datasets]
    if unknown:
        raise CatalogError("unknown_dataset", f"site '{catalog.site}' has no dataset {', '.join(unknown)}",
                           hint="list the site's datasets with GET /datasets", status=404)
    rule = combined([catalog.rule(catalog.datasets[d]) for d in request.datasets])
    if "training" in request.uses and not rule.training:
        raise GovernanceError("training_not_allowed", f"the privacy level {rule.level} of these datasets does "
                              "not allow model training at this site", hint="apply for queries only", status=422)
    if rule.ethics_required and not (request.ethics_ref and request.ethics_ref.strip()):
        raise GovernanceError("ethics_required", f"{rule.level} data needs an ethics approval reference",
                              hint="add ethics_ref (your ethics board's approval number) and apply again",
                              status=422)
    return rule


def _row(conn: Connection, application_id: int) -> dict:
    row = conn.execute(select(applications).where(applications.c.id == application_id)).mappings().first()
    if row is None:
        raise GovernanceError("unknown_application", f"there is no application {application_id} on this site "
                              "that you may see", hint="list applications with GET /applications", status=404)
    return dict(row)


def _reviews(conn: Connection, application_id: int, version: int) -> list[Review]:
    rows = conn.execute(select(reviews).where(reviews.c.application_id == application_id,
                                              reviews.c.version == version).order_by(reviews.c.id)).mappings()
    return [Review(reviewer=r["reviewer"], office=r["office"], decision=r["decision"], comment=r["comment"],
                   version=r["version"], ts=r["ts"]) for r in rows]


def _existing(conn: Connection, row: dict, request: ApplicationRequest, own: bool = False) -> dict[str, dict]:
    """The project's active grants on the requested datasets, by dataset: those another application (or the
    site's default) gave, and with `own` also those this application gave. None for a standing query's
    application: it gives no grant and touches none."""
    now = audit.now()
    found: dict[str, dict] = {}
    if request.standing is not None:
        return found
    for name in request.datasets:
        held = ledger.grant_row(conn, row["project"], name)
        if held is not None and ledger.grant_status(held, now) == "active" and (
                own or held["application_id"] != row["id"]):
            found[name] = held
    return found


def _info(conn: Connection, catalog: Catalog, row: dict, steward: bool = False) -> ApplicationInfo:
    request = ApplicationRequest.model_validate_json(row["request"])
    rule = combined([catalog.rule(catalog.datasets[d]) for d in request.datasets if d in catalog.datasets])
    found = _reviews(conn, row["id"], row["version"])
    approvals = [(r.reviewer, r.office) for r in found if r.decision == "approve"]
    needs = None
    if row["status"] == "pending":
        needs = missing(rule, approvals)
        if needs is None and not approvals:  # a rule without reviewers held it: above the project share
            needs = "1 approving reviewer: " + "; ".join(_above_share(conn, catalog, request, row) or [
                "when filed, it was above what this level's rule approves without review"])
    existing = []
    if steward and row["status"] == "pending":
        existing = [ledger.grant_info(g, catalog.reporting_delta) for g in _existing(conn, row, request, own=True
                                                                                      ).values()]
    return ApplicationInfo(
        id=row["id"], project=row["project"], applicant=row["applicant"], status=row["status"],
        version=row["version"], request=request, rule=rule, reviews=found, needs=needs,
        created_at=row["created_at"], updated_at=row["updated_at"], decided_at=row["decided_at"],
        existing_grants=existing,
    )


def _audit(conn: Connection, who: Principal, decision: str, row: dict, reason: str, action: str = "application"
           ) -> None:
    audit.append(conn, principal=who.name, role=who.role, action=action, decision=decision,
                 project=row["project"], reason=f"application {row['id']} v{row['version']}: {reason}")


def _above_share(conn: Connection, catalog: Catalog, request: ApplicationRequest, row: dict) -> list[str]:
    """Why a rule without reviewers may not approve `request` alone, one line per dataset whose
    epsilon, added to the project's active grant there (the rule only ever adds), is above the project's
    share of its lifetime cap; empty when it may."""
    lines = []
    existing = _existing(conn, row, request)
    for name in request.datasets:
        dataset = catalog.datasets.get(name)
        if dataset is None:  # gone from the catalog since: nothing the rule could approve there
            continue
        share = ledger.project_share(conn, catalog, dataset)
        if request.standing is not None:  # charged to the cap at once: with what the project holds there
            total = standing.project_epsilon(conn, catalog, row["project"], name, request.epsilon)
            if total > share * (1 + 1e-9):
                lines.append(f"standing query '{request.standing.name}' of epsilon {request.epsilon:g} on '{name}', "
                             f"with the project's grant and standing queries there (together epsilon {total:.4g}), "
                             f"is above the most one project may hold there without review (epsilon {share:.4g}, "
                             f"{catalog.rule(dataset).max_project_share:.0%} of its lifetime cap)")
            continue
        held = existing.get(name)
        total = request.epsilon if held is None else ledger.added_grant(
            held, request.epsilon, 0.0, None, (), catalog.reporting_delta)["epsilon"]
        if total > share * (1 + 1e-9):
            what = (f"epsilon {request.epsilon:g} on '{name}'" if held is None else
                    f"epsilon {request.epsilon:g} on '{name}' added to the project's grant there (epsilon "
                    f"{held['epsilon']:.4g}, together {total:.4g})")
            lines.append(f"{what} is above the most one project may hold there "
                         f"without review (epsilon {share:.4g}, {catalog.rule(dataset).max_project_share:.0%} of "
                         "its lifetime cap)")
    return lines


def _figures(g: dict, reporting_delta: float) -> str:
    info = ledger.grant_info(g, reporting_delta)
    until = f"expires {g['expires_at'][:10]}" if g["expires_at"] else "no expiry"
    return (f"epsilon granted {info.epsilon:.4g}, spent {info.epsilon_spent:.4g}, largest next release "
            f"{info.largest_next_epsilon:.4g}, {until}")


def _no_choice(row: dict, request: ApplicationRequest, existing: dict[str, dict], reporting_delta: float
               ) -> GovernanceError:
    held = "; ".join(f"grant {g['id']} on '{name}' ({_figures(g, reporting_delta)})" for name, g in existing.items())
    added = ", ".join(f"epsilon {ledger.added_grant(g, request.epsilon, 0.0, None, (), reporting_delta)['epsilon']:.4g}"
                      f" on '{name}'" for name, g in existing.items())
    return GovernanceError(
        "existing_grant",
        f"project '{row['project']}' already holds {held}; application {row['id']} requests epsilon "
        f"{request.epsilon:g} for {request.duration_days:g} days ({', '.join(request.uses)}). Approving must say "
        "what becomes of the existing grant",
        hint=f"approve again choosing add (the budgets compose: {added}, the later expiry), replace (the grant "
             f"becomes epsilon {request.epsilon:g} for {request.duration_days:g} days; what it spent stays spent) "
             "or keep (it stays as it is; the application is approved without changing it): on_existing_grant in "
             f"the review, or 'veil steward review {row['id']} --approve --existing add|replace|keep'")


def _approve(conn: Connection, catalog: Catalog, row: dict, request: ApplicationRequest, by: Principal,
             choice: ExistingGrantChoice | None = None) -> str:
    """Create the grants of an approved application, if every dataset's remaining cap affords them; an active
    grant another application gave is added to, replaced or kept as `choice` says (refused without one; the
    site's rule adds). Returns what became of existing grants (before and after), for the audit log.

    A steward approving is told what the cap has left; the researcher whose application the site's rule
    approves is not (it would tell them what other projects spent)."""
    for name in request.datasets:
        lifecycle.require_active(conn, catalog.datasets[name], "be granted a budget on")
    if request.standing is not None:  # no grant: its whole horizon is charged to the cap now, once
        return standing.create(conn, catalog, row, request, by, reveal=by is not SITE_POLICY)
    existing = _existing(conn, row, request)
    if by is SITE_POLICY:
        choice = "add"  # `_above_share` held it unless the sum stays within the project's share
    if existing and choice is None:
        raise _no_choice(row, request, existing, catalog.reporting_delta)
    new_rho = rho_for_epsilon(request.epsilon, catalog.reporting_delta)
    for name in request.datasets:
        held = ledger.grant_row(conn, row["project"], name)
        if name in existing and choice == "keep":
            continue
        if name in existing and choice == "add":
            would_spend = existing[name]["rho_total"] + new_rho - existing[name]["rho_spent"]
        else:
            would_spend = new_rho - (held["rho_spent"] if held else 0.0)
        left = ledger.cap_remaining(conn, name, catalog.reporting_delta)
        if would_spend > left * (1 + 1e-9):
            if by is SITE_POLICY:
                raise GovernanceError(
                    "cap_exceeded", f"epsilon {request.epsilon:g} on '{name}' cannot be granted: this dataset's "
                    "site-wide budget cannot cover it",
                    hint="apply for a smaller budget; the site's data stewards can tell you more")
            raise GovernanceError(
                "cap_exceeded", f"approving epsilon {request.epsilon:g} on '{name}' exceeds what its lifetime cap "
                f"allows now (the largest next release or new grant: epsilon {epsilon_of(left, catalog.reporting_delta):.4g})",
                hint="ask the applicant for a smaller budget, or raise the cap with 'veil steward budget "
                     f"{name} --cap EPSILON'")
    expires = (datetime.now(UTC) + timedelta(days=request.duration_days)).isoformat(timespec="microseconds")
    notes = []
    for name in request.datasets:
        held = existing.get(name)
        if held is not None and choice == "add":
            ledger.add_to_grant(conn, catalog, held, request.epsilon, by=by.name, role=by.role, delta=request.delta,
                                expires_at=expires, application_id=row["id"], uses=tuple(request.uses))
        elif held is None or choice == "replace":
            ledger.set_grant(conn, catalog, row["project"], catalog.datasets[name], request.epsilon, by=by.name,
                             role=by.role, delta=request.delta, expires_at=expires, application_id=row["id"],
                             uses=tuple(request.uses))
        if held is not None:
            after = ledger.grant_row(conn, row["project"], name)
            assert after is not None
            notes.append(f"grant {held['id']} on '{name}' {_figures(held, catalog.reporting_delta)} -> "
                         f"{_figures(after, catalog.reporting_delta)}")
    for dropped in ledger.grants_of_application(conn, row["id"], exclude=request.datasets):
        ledger.revoke_grant(conn, dropped, by=by.name, reason=f"no longer in application {row['id']}")
    return f"; on the existing grant: {choice}: " + "; ".join(notes) if notes else ""


def _decide_if_met(conn: Connection, catalog: Catalog, row: dict, by: Principal,
                   choice: ExistingGrantChoice | None = None) -> dict:
    """Approve the application when the approvals of its current version meet its rule; `choice` says what
    becomes of a grant the project already holds (the approval that creates the grants must say)."""
    request = ApplicationRequest.model_validate_json(row["request"])
    rule = rule_for(catalog, request)
    approvals = [(r.reviewer, r.office) for r in _reviews(conn, row["id"], row["version"]) if r.decision == "approve"]
    if missing(rule, approvals) is None:
        if not approvals:  # no review needed: the site's rule approves it, up to each dataset's project share
            above = _above_share(conn, catalog, request, row)
            if above:
                _audit(conn, SITE_POLICY, "held", row, "needs a steward's review: " + "; ".join(above))
                return row
            by = SITE_POLICY
        changed = _approve(conn, catalog, row, request, by, choice)
        now = audit.now()
        conn.execute(update(applications).where(applications.c.id == row["id"])
                     .values(status="approved", decided_at=now))
        row = {**row, "status": "approved", "decided_at": now}
        _audit(conn, by, "approved", row, f"rule {rule.level} met by {len(approvals)} approval(s){changed}")
    return row


def _file(conn: Connection, project: str, applicant: Principal, request: ApplicationRequest, note: str) -> dict:
    """Insert version 1 of an application and audit its submission (`note` says what it asks); its row."""
    now = audit.now()
    new_id = conn.execute(insert(applications).values(
        project=project, applicant=applicant.name, status="pending", version=1,
        request=request.model_dump_json(), created_at=now, updated_at=now)).inserted_primary_key[0]
    row = _row(conn, new_id)
    _audit(conn, applicant, "submitted", row, f"{', '.join(request.datasets)} epsilon={request.epsilon:g} for "
           f"{request.duration_days:g} days ({', '.join(request.uses)}){note}")
    return row


def submit(engine: Engine, catalog: Catalog, who: Principal, request: ApplicationRequest) -> ApplicationInfo:
    """File an application for the caller's project; a rule that needs no reviewer approves it at once. A
    standing query its dataset cannot count is refused first, and nothing is written."""
    standing.check(catalog, request)
    with write(engine) as conn:
        for name in request.datasets:  # a dataset's state first: an ethics reference would not help a retired one
            if name in catalog.datasets:
                lifecycle.require_active(conn, catalog.datasets[name], "apply for")
        rule_for(catalog, request)
        row = _file(conn, who.project or "", who, request, f": {request.purpose[:200]}")
        row = _decide_if_met(conn, catalog, row, who)
        return _info(conn, catalog, row)


def grant_directly(engine: Engine, catalog: Catalog, who: Principal, body: DirectGrantRequest) -> ApplicationInfo:
    """A steward's grant on a review made outside Veil: filed as an application for the project and approved by
    the steward at once (the level's reviewer rule is the paper review's), audited as both, citing it."""
    if "surveillance" in body.uses:
        raise GovernanceError("surveillance_needs_application", "a standing query is filed as an application with "
                              "its spec (uses ['surveillance'] and standing), not granted directly",
                              hint="the project files it with POST /applications; a steward then reviews it", status=422)
    request = ApplicationRequest(purpose=f"granted directly on a review outside Veil: {body.reference}",
                                 datasets=body.datasets, epsilon=body.epsilon, delta=body.delta,
                                 duration_days=body.duration_days, uses=body.uses, ethics_ref=body.ethics_ref)
    rule_for(catalog, request)
    with write(engine) as conn:
        row = _file(conn, body.project, who, request, f", a direct grant on a review outside Veil: {body.reference[:300]}")
        new_id, now = row["id"], audit.now()
        try:
            changed = _approve(conn, catalog, row, request, who, body.on_existing_grant)
        except GovernanceError as exc:
            if exc.code != "existing_grant":
                raise
            raise GovernanceError("existing_grant", exc.message.replace(f"application {new_id}", "this grant"),
                                  hint="say what becomes of it: on_existing_grant add, replace or keep ('veil "
                                       "steward grant create ... --existing add|replace|keep')") from None
        conn.execute(update(applications).where(applications.c.id == new_id).values(status="approved", decided_at=now))
        row = {**row, "status": "approved", "decided_at": now}
        _audit(conn, who, "approved", row, f"granted directly on a review outside Veil ({body.reference[:300]})"
               + (f" [on an existing grant: {body.on_existing_grant}]" if body.on_existing_grant else "") + changed)
        return _info(conn, catalog, row, steward=True)


def _own(row: dict, who: Principal) -> None:
    if row["project"] != who.project:
        raise GovernanceError("unknown_application", f"there is no application {row['id']} on this site that you "
                              "may see", hint="list applications with GET /applications", status=404)


def amend(engine: Engine, catalog: Catalog, who: Principal, application_id: int, request: ApplicationRequest
          ) -> ApplicationInfo:
    """Change an application: a new version, pending a new review. Grants already given stay as they are."""
    rule_for(catalog, request)
    standing.check(catalog, request)
    with write(engine) as conn:
        row = _row(conn, application_id)
        _own(row, who)
        if row["status"] == "withdrawn":
            raise GovernanceError("application_withdrawn", f"application {application_id} was withdrawn",
                                  hint="file a new application")
        if ApplicationRequest.model_validate_json(row["request"]) == request:
            raise GovernanceError("no_change", f"application {application_id} already says exactly this",
                                  hint="change the purpose, datasets, budget, duration or uses", status=422)
        conn.execute(update(applications).where(applications.c.id == application_id).values(
            version=row["version"] + 1, status="pending", request=request.model_dump_json(),
            updated_at=audit.now(), decided_at=None))
        row = _row(conn, application_id)
        _audit(conn, who, "amended", row, "changed; it needs a new review")
        row = _decide_if_met(conn, catalog, row, who)
        return _info(conn, catalog, row)


def withdraw(engine: Engine, catalog: Catalog, who: Principal, application_id: int) -> ApplicationInfo:
    """Withdraw a pending application (an approved one's grants are revoked by a steward)."""
    with write(engine) as conn:
        row = _row(conn, application_id)
        _own(row, who)
        if row["status"] != "pending":
            raise GovernanceError("not_pending", f"application {application_id} is {row['status']}, not pending",
                                  hint="only a pending application can be withdrawn; ask a steward to revoke "
                                       "an approved one's grants")
        conn.execute(update(applications).where(applications.c.id == application_id).values(
            status="withdrawn", updated_at=audit.now()))
        row = _row(conn, application_id)
        _audit(conn, who, "withdrawn", row, "withdrawn by the applicant")
        return _info(conn, catalog, row)


def review(engine: Engine, catalog: Catalog, who: Principal, application_id: int, decision: ReviewRequest
           ) -> ApplicationInfo:
    """Record one reviewer's decision on the version they read; approve the application once its rule is met."""
    with write(engine) as conn:
        row = _row(conn, application_id)
        if row["status"] == "withdrawn":
            raise GovernanceError("application_withdrawn", f"application {application_id} was withdrawn by "
                                  "the applicant", hint="nothing to review")
        if decision.version != row["version"]:
            raise GovernanceError("application_changed", f"you reviewed version {decision.version} of "
                                  f"application {application_id}, but it is now version {row['version']}",
                                  hint="read the current version and review that")
        if row["status"] != "pending":
            raise GovernanceError("application_decided", f"application {application_id} is already "
                                  f"{row['status']}", hint="a change by the applicant reopens it for review")
        if row["applicant"] == who.name:
            raise GovernanceError("self_review", "you may not review your own application", status=403,
                                  hint="another steward must review it")
        current = _reviews(conn, application_id, row["version"])
        if any(r.reviewer == who.name for r in current):
            raise GovernanceError("already_reviewed", f"you already reviewed version {row['version']} of "
                                  f"application {application_id}", hint="another reviewer must review it")
        rule = rule_for(catalog, ApplicationRequest.model_validate_json(row["request"]))
        why_not = may_review(rule, who.office, [(r.reviewer, r.office) for r in current
                                                if r.decision == "approve"])
        if why_not:
            raise GovernanceError("reviewer_role", why_not, status=403,
                                  hint="a reviewer holding the required office must review it")
        conn.execute(insert(reviews).values(application_id=application_id, version=row["version"],
                                            reviewer=who.name, office=who.office, decision=decision.decision,
                                            comment=decision.comment, ts=audit.now()))
        verdict = "approve" if decision.decision == "approve" else "reject"
        choice = decision.on_existing_grant if decision.decision == "approve" else None
        _audit(conn, who, verdict, row, decision.comment[:500]
               + (f" [on an existing grant: {choice}]" if choice else ""), action="review")
        if decision.decision == "reject":
            now = audit.now()
            conn.execute(update(applications).where(applications.c.id == application_id)
                         .values(status="rejected", decided_at=now))
            row = {**row, "status": "rejected", "decided_at": now}
            _audit(conn, who, "rejected", row, decision.comment[:500])
        else:
            row = _decide_if_met(conn, catalog, row, who, choice)
        return _info(conn, catalog, row, steward=True)



def get(engine: Engine, catalog: Catalog, who: Principal, application_id: int) -> ApplicationInfo:
    """One application; researchers see only their project's."""
    with engine.connect() as conn:
        row = _row(conn, application_id)
        if who.role == "researcher":
            _own(row, who)
        return _info(conn, catalog, row, steward=who.role != "researcher")


def listing(engine: Engine, catalog: Catalog, who: Principal, status: str | None = None) -> list[ApplicationInfo]:
    """Applications, newest first: a researcher's project's, or all of them for stewards."""
    query = select(applications).order_by(applications.c.id.desc())
    if who.role == "researcher":
        query = query.where(applications.c.project == who.project)
    if status is not None:
        query = query.where(applications.c.status == status)
    with engine.connect() as conn:
        return [_info(conn, catalog, dict(r), steward=who.role != "researcher") for r in conn.execute(query).mappings()]



def approved_model_source(engine: Engine, project: str, dataset: str) -> str | None:
    """The model source approved by the application behind `project`'s grant on `dataset` (None if none)."""
    with engine.connect() as conn:
        grant = ledger.grant_row(conn, project, dataset)
        if grant is None or grant["application_id"] is None:
            return None
        row = conn.execute(select(applications).where(applications.c.id == grant["application_id"])).mappings().first()
    if row is None or row["status"] != "approved":
        return None
    return ApplicationRequest.model_validate_json(row["request"]).model_source
