"""Privacy levels and their review rules: who must approve an application, and what a release may be.

Each site may override the defaults in its catalog (`[levels.L2]` ...). An application naming
several datasets is reviewed under the strictest rule among them (`combined`). What a rule approves
without any reviewer (L1) is bounded per project by `max_project_share` of each dataset's lifetime cap,
so that no project can take a whole dataset for itself and close it to the others; a larger request
waits for a steward's review.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from veil.errors import CatalogError
from veil.wire import LevelRule

DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "L1": dict(reviewers=0, max_epsilon_per_release=1.0, min_group_threshold=10, max_project_share=0.25),
    "L2": dict(reviewers=1, max_epsilon_per_release=1.0, min_group_threshold=10),
    "L3": dict(reviewers=2, offices=["data_center", "data_committee"], ethics_required=True,
               max_epsilon_per_release=0.5, min_group_threshold=20, max_epsilon_per_model=4.0),
}


def level_rules(raw: dict[str, Any], default_l1_epsilon: float) -> dict[str, LevelRule]:
    """The site's rules: the defaults, each key overridable by the catalog's `[levels.LX]` table."""
    unknown = set(raw) - set(DEFAULT_RULES)
    if unknown:
        raise CatalogError("bad_catalog", f"[levels]: unknown level(s) {sorted(unknown)}; levels are "
                           f"{sorted(DEFAULT_RULES)}", hint="classify datasets as L1, L2 or L3")
    rules = {}
    for level, defaults in DEFAULT_RULES.items():
        fields = {**defaults, **raw.get(level, {}), "level": level}
        if level == "L1":
            fields.setdefault("default_grant_epsilon", default_l1_epsilon)
        try:
            rules[level] = LevelRule(**fields)
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise CatalogError("bad_catalog", f"[levels.{level}] {'.'.join(map(str, problem['loc']))}: "
                               f"{problem['msg']}") from None
        if rules[level].reviewers < len(rules[level].offices):
            raise CatalogError("bad_catalog", f"[levels.{level}]: {len(rules[level].offices)} offices must "
                               f"approve, so reviewers must be at least that many")
    return rules


def combined(rules: list[LevelRule]) -> LevelRule:
    """The strictest of several rules: most reviewers, every office, ethics and training if any asks."""
    offices = sorted({o for r in rules for o in r.offices})
    return LevelRule(
        level="+".join(sorted({r.level for r in rules})),
        reviewers=max(max(r.reviewers for r in rules), len(offices)),
        offices=offices,  # type: ignore[arg-type]
        ethics_required=any(r.ethics_required for r in rules),
        max_epsilon_per_release=min(r.max_epsilon_per_release for r in rules),
        max_epsilon_per_model=min(r.max_epsilon_per_model for r in rules),
        min_group_threshold=max(r.min_group_threshold for r in rules),
        training=all(r.training for r in rules),
        default_grant_epsilon=None,
        max_project_share=min(r.max_project_share for r in rules),
    )


def missing(rule: LevelRule, approvals: list[tuple[str, str | None]]) -> str | None:
    """What the (reviewer, office) approvals still lack under `rule`, in words; None when it is met."""
    covered = {office for _, office in approvals}
    lacking = [o for o in rule.offices if o not in covered]
    more = max(rule.reviewers - len(approvals), len(lacking))
    if more <= 0:
        return None
    text = f"{more} more approving reviewer{'s' if more > 1 else ''}"
    return text + (f" (from: {', '.join(lacking)})" if lacking else "")


def may_review(rule: LevelRule, office: str | None, approvals: list[tuple[str, str | None]]) -> str | None:
    """Why a reviewer holding `office` cannot help approve under `rule` now; None when they can."""
    if not rule.offices:
        return None
    covered = {o for _, o in approvals}
    lacking = [o for o in rule.offices if o not in covered]
    if office not in rule.offices:
        return (f"this {rule.level} application must be reviewed by the offices {', '.join(rule.offices)}; "
                f"your token holds {office or 'no office'}")
    if office in covered and rule.reviewers - len(approvals) <= len(lacking):
        return f"{office} has already approved; it now needs {', '.join(lacking)}"
    return None
