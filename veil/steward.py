"""`veil steward ...`: the data steward's desk on the command line, over the executor's API.

The steward's token decides who reviews (and for which office), exactly as in the lab extension:
`--site URL --token-file FILE`, or the environment's VEIL_SITE_URL and VEIL_TOKEN_FILE.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from veil import usage
from veil.kernel.client import SiteClient
from veil.wire import (
    ApplicationInfo,
    DatasetBudget,
    DirectGrantRequest,
    GrantInfo,
    MockRequest,
    ReviewRequest,
    RevokeRequest,
    StandingInfo,
    TransitionInfo,
)


def _client(args: argparse.Namespace) -> SiteClient:
    url = args.site or os.environ.get("VEIL_SITE_URL")
    token_file = args.token_file or os.environ.get("VEIL_TOKEN_FILE")
    if not url or not token_file:
        raise SystemExit("error: say which executor and which steward token: --site URL --token-file FILE "
                         "(or set VEIL_SITE_URL and VEIL_TOKEN_FILE)")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the token file {token_file}: {exc.strerror}") from None
    return SiteClient("site", url, token)


def _print_application(a: ApplicationInfo, detail: bool = False) -> None:
    r = a.request
    print(f"#{a.id} v{a.version} [{a.status}] project {a.project} by {a.applicant}: {', '.join(r.datasets)} "
          f"epsilon {r.epsilon:g} for {r.duration_days:g} days ({', '.join(r.uses)}); rule {a.rule.level}"
          + (f"; needs {a.needs}" if a.needs else ""))
    if detail:
        print(f"    purpose: {r.purpose}")
        if r.ethics_ref:
            print(f"    ethics approval: {r.ethics_ref}")
        if r.model_source:
            print("    custom model source (training may use exactly this code):")
            print("\n".join(f"      | {line}" for line in r.model_source.splitlines()))
        for review in a.reviews:
            print(f"    {review.decision} by {review.reviewer} ({review.office or 'no office'}) at {review.ts[:19]}: "
                  f"{review.comment}")
    for g in a.existing_grants:
        own = " (this application's own)" if g.application_id == a.id else " (approving: --existing add|replace|keep)"
        until = f"expires {g.expires_at[:10]}" if g.expires_at else "no expiry"
        print(f"    the project already holds grant {g.id} on {g.dataset}: epsilon granted {g.epsilon:g}, spent "
              f"{g.epsilon_spent:.4g}, largest next release {g.largest_next_epsilon:.4g}, {until}{own}")


NEXT_RELEASE_NOTE = ("largest next release: the most epsilon one more release may have; epsilons of several "
                     "releases do not add up (rho does), so it can be more than granted minus spent")


def _print_grant(g: GrantInfo) -> None:
    until = f" until {g.expires_at[:10]}" if g.expires_at else ""
    print(f"grant {g.id}: {g.project} on {g.dataset} [{g.status}{until}] epsilon: granted {g.epsilon:g}, "
          f"spent {g.epsilon_spent:.4g}, largest next release {g.largest_next_epsilon:.4g} ({', '.join(g.uses)})")


def _applications(args: argparse.Namespace) -> int:
    with _client(args) as site:
        found = site.applications("pending" if args.pending else None)
    for a in found:
        _print_application(a, detail=args.details)
    if not found:
        print("no pending applications" if args.pending else "no applications")
    return 0


def _review(args: argparse.Namespace) -> int:
    with _client(args) as site:
        version = args.version or site.application(args.id).version
        decision = ReviewRequest(decision="approve" if args.approve else "reject", comment=args.comment,
                                 version=version, on_existing_grant=args.existing if args.approve else None)
        after = site.review(args.id, decision)
    _print_application(after, detail=True)
    return 0


def _grants(args: argparse.Namespace) -> int:
    with _client(args) as site:
        found = site.grants()
    for g in found:
        _print_grant(g)
    print(NEXT_RELEASE_NOTE if found else "no grants")
    return 0


def _grant_create(args: argparse.Namespace) -> int:
    request = DirectGrantRequest(project=args.project, datasets=args.dataset, epsilon=args.epsilon, delta=args.delta,
                                 duration_days=args.days, uses=args.uses.split(","), ethics_ref=args.ethics_ref,
                                 reference=args.reference, on_existing_grant=args.existing)
    with _client(args) as site:
        _print_application(site.grant_directly(request), detail=True)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with _client(args) as site:
        _print_grant(site.revoke_grant(args.id, args.reason))
    return 0


def _print_broken_bound(b: DatasetBudget) -> None:
    """The site's file breaks its catalog's rows-per-patient bound: what that does and what to do."""
    refusing = b.on_excess_rows == "refuse"
    print(f"warning: the site's file breaks max_rows_per_unit = {b.max_rows_per_unit}: {b.patients_over_bound} "
          f"patients have more rows (up to {b.most_rows_per_patient}); "
          + ("requests on it are refused" if refusing else
             f"queries keep at most {b.max_rows_per_unit} rows per patient, so counts and sums come out low")
          + ". Fix the file, or raise max_rows_per_unit in the catalog if more rows per patient are right"
          + ("" if refusing else ', or set on_excess_rows = "refuse"'))


def _budget(args: argparse.Namespace) -> int:
    with _client(args) as site:
        if args.cap is not None:
            budget = site.set_cap(args.dataset, args.cap, args.reason)
        else:
            budget = next((b for b in site.budgets() if b.dataset == args.dataset), None)
            if budget is None:
                raise SystemExit(f"error: the site has no dataset '{args.dataset}'")
    print(f"{budget.dataset} ({budget.level}): lifetime cap epsilon {budget.cap_epsilon:g}, spent "
          f"{budget.spent_epsilon:.4g}, largest next release {budget.largest_next_epsilon:.4g}")
    if budget.patients_over_bound:
        _print_broken_bound(budget)
    for g in budget.grants:
        _print_grant(g)
    print(NEXT_RELEASE_NOTE)
    return 0


def _mock(args: argparse.Namespace) -> int:
    request = MockRequest(kind="synthetic" if args.synthetic else "schema",
                          epsilon=args.epsilon if args.synthetic else None, rows=args.rows)
    with _client(args) as site:
        mock = site.set_mock(args.dataset, request)
    spent = f", charged epsilon {mock.epsilon:g} to the lifetime cap (receipt {mock.receipt})" if mock.epsilon else ""
    print(f"{mock.dataset}: researchers' mock mode now uses {mock.kind} rows ({mock.rows} rows){spent}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    with _client(args) as site:
        sheet = site.publish_sheet(args.dataset, args.epsilon)
        text = site.sheet_markdown(args.dataset)
    print(f"{sheet.dataset}: published its DP statistics sheet, charged epsilon {sheet.epsilon:g} to the lifetime "
          f"cap (receipt {sheet.receipt}); any token on the site downloads it from GET /datasets/{sheet.dataset}/sheet"
          " (?format=markdown)\n")
    print(text)
    return 0


def _print_transition(t: TransitionInfo) -> None:
    by = f"; {t.status} by {t.reviewed_by} ({t.reviewed_office or 'no office'})" if t.reviewed_by else ""
    print(f"request {t.id}: make '{t.dataset}' {t.to} [{t.status}] asked by {t.requested_by} "
          f"({t.requested_office or 'no office'}) at {t.requested_at[:19]}{by}: {t.reason}"
          + (f"; needs {t.needs}" if t.needs else ""))
    for copy in t.deleted:
        print(f"    deleted {copy.what}: {copy.bytes} bytes, sha256 {copy.sha256}")


def _dataset_move(args: argparse.Namespace) -> int:
    with _client(args) as site:
        _print_transition(site.request_transition(args.dataset, DATASET_MOVES[args.dataset_action], args.reason))
    return 0


def _dataset_state(args: argparse.Namespace) -> int:
    with _client(args) as site:
        s = site.dataset_state(args.dataset)
    since = f" since {s.changed_at[:19]} by {s.changed_by}" if s.changed_at else ""
    print(f"{s.dataset}: {s.state}{since} ({s.reason})")
    for t in s.pending:
        _print_transition(t)
    return 0


def _dataset_requests(args: argparse.Namespace) -> int:
    with _client(args) as site:
        found = site.transitions("all" if args.all else "pending")
    for t in found:
        _print_transition(t)
    if not found:
        print("no dataset request awaits review" if not args.all else "no dataset request yet")
    return 0


def _dataset_review(args: argparse.Namespace) -> int:
    with _client(args) as site:
        _print_transition(site.review_transition(args.id, args.dataset_action, args.comment))
    return 0


def _report(args: argparse.Namespace) -> int:
    with _client(args) as site:
        found = site.report(args.since, args.until, dataset=args.dataset, project=args.project)
    text = usage.render(found, args.format)
    if args.out is None:
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"wrote the {args.format} report of site {found.site} to {args.out}")
    return 0


def _print_standing(s: StandingInfo) -> None:
    upcoming = (f"next: window {s.next_window} at {s.next_release_at[:16]} UTC" if s.next_release_at else
                s.status_reason or s.status)
    print(f"standing query {s.id} '{s.spec.name}' [{s.status}] project {s.project} on {s.dataset}: "
          f"{s.windows_released} of {s.spec.horizon} windows released; {upcoming}; epsilon {s.epsilon:g} "
          f"(rho {s.rho:.4g}) charged once, at approval (receipt {s.receipt[:16]}...)")


def _standing(args: argparse.Namespace) -> int:
    with _client(args) as site:
        found = site.standing_queries()
    for s in found:
        _print_standing(s)
    if not found:
        print("no standing queries")
    return 0


def _standing_stop(args: argparse.Namespace) -> int:
    with _client(args) as site:
        body = RevokeRequest(reason=args.reason).model_dump()
        _print_standing(StandingInfo.model_validate(site._call("POST", f"/standing/{args.id}/stop", json=body)))
    print("no later window is released; nothing is refunded (its budget was charged at approval)")
    return 0


DATASET_MOVES = {"activate": "active", "suspend": "suspended", "resume": "active", "retire": "retired",
                 "destroy": "destroyed"}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `veil steward ...` to the `veil` command."""
    steward = sub.add_parser("steward", help="review applications, grants and budgets (a steward's token)")
    actions = steward.add_subparsers(dest="action", required=True)

    def command(name: str, help: str, func, parent=actions) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = parent.add_parser(name, help=help)
        p.add_argument("--site", default=None, help="the executor's URL (default: $VEIL_SITE_URL)")
        p.add_argument("--token-file", default=None, help="your steward token (default: $VEIL_TOKEN_FILE)")
        p.set_defaults(func=func)
        return p

    p = command("applications", "list applications", _applications)
    p.add_argument("--pending", action="store_true", help="only those awaiting review")
    p.add_argument("--details", action="store_true", help="with purpose and reviews")

    p = command("review", "approve or reject an application", _review)
    p.add_argument("id", type=int)
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", action="store_true")
    verdict.add_argument("--reject", action="store_true")
    p.add_argument("--comment", required=True)
    p.add_argument("--version", type=int, default=None,
                   help="the version you read (default: the current one); a changed application is refused")
    p.add_argument("--existing", choices=("add", "replace", "keep"), default=None,
                   help="when the project already holds a grant on a requested dataset (another application's or "
                        "the site's default), what approving does to it: add (the budgets compose: rho adds up, "
                        "the later expiry stands), replace (it becomes what this application asks; what it spent "
                        "stays spent) or keep (it stays as it is); approving over one without this is refused")

    command("grants", "every project's grants: granted, spent, largest next release, status", _grants)
    grant = actions.add_parser("grant", help="change a grant").add_subparsers(dest="grant_action", required=True)
    p = command("create", "give a project a grant on a review made outside Veil (on paper): recorded as an "
                "application you filed and approved, citing --reference; audited", _grant_create, parent=grant)
    p.add_argument("--project", required=True)
    p.add_argument("--dataset", required=True, action="append", help="repeat for several datasets")
    p.add_argument("--epsilon", type=float, required=True, help="budget per dataset, at the site's reporting delta")
    p.add_argument("--delta", type=float, default=None, help="for thresholded GROUP BY and DP-SGD "
                   "(default: the site's reporting delta)")
    p.add_argument("--days", type=float, required=True, help="how long the grant lasts")
    p.add_argument("--uses", default="query", help="query, training or both: query,training")
    p.add_argument("--ethics-ref", default=None, help="the ethics approval (required for L3)")
    p.add_argument("--reference", required=True, help="the paper review the grant rests on (file number, minutes)")
    p.add_argument("--existing", choices=("add", "replace", "keep"), default=None,
                   help="when the project already holds a grant on the dataset: as in 'veil steward review'")
    p = command("revoke", "revoke a grant (what it spent stays spent)", _revoke, parent=grant)
    p.add_argument("id", type=int)
    p.add_argument("--reason", required=True)

    p = command("budget", "a dataset's lifetime cap, grants and file check; --cap changes the cap", _budget)
    p.add_argument("dataset")
    p.add_argument("--cap", type=float, default=None, help="new lifetime cap, epsilon at the reporting delta")
    p.add_argument("--reason", default="")

    dataset = actions.add_parser("dataset", help="a dataset's lifecycle: draft, active, suspended, retired, "
                                 "destroyed").add_subparsers(dest="dataset_action", required=True)
    moves = {"activate": "open a draft dataset (reviewed as its level's applications are)",
             "suspend": "stop serving it at once (running jobs are cancelled); resume reopens it",
             "resume": "serve a suspended dataset again (reviewed as its level's applications are)",
             "retire": "end its use for good: every grant revoked, every job cancelled (reviewed)",
             "destroy": "delete the site's copies of a retired dataset (file or snapshot, mock, model weights), "
                        "recording their SHA-256 in the audit log (reviewed; L3: both offices)"}
    for verb, help_text in moves.items():
        p = command(verb, help_text, _dataset_move, parent=dataset)
        p.add_argument("dataset")
        p.add_argument("--reason", required=True, help="why: recorded in the audit log and told to researchers")
    p = command("state", "where a dataset is in its lifecycle, and requests awaiting review", _dataset_state,
                parent=dataset)
    p.add_argument("dataset")
    p = command("requests", "dataset requests awaiting review", _dataset_requests, parent=dataset)
    p.add_argument("--all", action="store_true", help="also those done or rejected")
    for verb in ("approve", "reject"):
        p = command(verb, f"{verb} another steward's dataset request", _dataset_review, parent=dataset)
        p.add_argument("id", type=int)
        p.add_argument("--comment", required=True)

    p = command("standing", "standing queries (surveillance counts): status, windows released, next release, "
                "epsilon", _standing)
    stop = p.add_subparsers(dest="standing_action")
    p = command("stop", "stop a standing query: no later window is released, nothing refunded", _standing_stop,
                parent=stop)
    p.add_argument("id", type=int)
    p.add_argument("--reason", required=True, help="why: recorded in the audit log and told to the project")

    p = command("report", "usage and value over a period: applications, releases and their cost, models, "
                "federated rounds, refusals, budgets left, with receipts", _report)
    p.add_argument("--since", default=None, help="YYYY-MM-DD, included (default: the log's start)")
    p.add_argument("--until", default=None, help="YYYY-MM-DD, excluded (default: now)")
    p.add_argument("--dataset", default=None)
    p.add_argument("--project", default=None)
    p.add_argument("--format", choices=usage.FORMATS, default="md")
    p.add_argument("--out", default=None, help="write it to this file (default: print it)")

    p = command("publish", "publish an open dataset's DP statistics sheet for every token on the site (charged "
                "to its lifetime cap, audited)", _publish)
    p.add_argument("--dataset", required=True)
    p.add_argument("--epsilon", type=float, required=True, help="the whole sheet's epsilon, at the reporting delta")

    p = command("mock", "choose the dataset's mock for researchers' mock mode", _mock)
    p.add_argument("dataset")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--synthetic", action="store_true", help="DP synthetic rows fitted to the data (charged)")
    kind.add_argument("--schema", action="store_true", help="rows made from public metadata only (free)")
    p.add_argument("--epsilon", type=float, default=1.0, help="for --synthetic: charged to the lifetime cap")
    p.add_argument("--rows", type=int, default=None)
