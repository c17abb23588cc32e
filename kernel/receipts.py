"""Check a notebook's recorded releases against the sites' audit logs (`veil receipts verify`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from veil.kernel.errors import VeilError
from veil.kernel.study import Study


def recorded_releases(notebook: Path) -> list[dict[str, Any]]:
    """Every live release recorded in the notebook's output metadata (site, dataset, query, cost, receipt)."""
    cells = json.loads(notebook.read_text()).get("cells", [])
    return [release for cell in cells for output in cell.get("outputs", [])
            for release in output.get("metadata", {}).get("veil", {}).get("releases", [])]


def check_release(study: Study, release: dict[str, Any]) -> str | None:
    """None when the release's site confirms that its receipt records this release (site, dataset, query
    and cost, as the notebook recorded them; for a DP-SGD model, the job's settlement naming the weights'
    digest); else what is wrong."""
    site = study.sites.get(release["site"])
    if site is None:
        return f"release {release['receipt'][:16]} names site '{release['site']}', not in the study"
    try:
        entry = site.client.receipt(release["receipt"])
    except VeilError as exc:
        return f"site '{release['site']}' does not know receipt {release['receipt'][:16]}: {exc}"
    if release.get("kind") == "training":
        recorded = ("train", "settled", release["dataset"], release["weights_sha256"])
        matches = (entry.action, entry.decision, entry.dataset, entry.result_digest) == recorded
    else:
        matches = (entry.decision, entry.query, entry.dataset) == ("released", release["query"], release["dataset"]) \
            and entry.rho == release["cost"]["rho"]
    if not matches:
        return f"receipt {release['receipt'][:16]} at '{release['site']}' records a different release"
    return None


def verify_notebook(study: Study, notebook: Path) -> tuple[int, list[str]]:
    """(releases checked, problems): a problem is a receipt its site does not know or that does not match."""
    releases = recorded_releases(notebook)
    return len(releases), [p for r in releases if (p := check_release(study, r)) is not None]
