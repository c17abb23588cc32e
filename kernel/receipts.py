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


def verify_notebook(study: Study, notebook: Path) -> tuple[int, list[str]]:
    """(releases checked, problems): a problem is a receipt its site does not know or that does not match."""
    problems = []
    releases = recorded_releases(notebook)
    for release in releases:
        site = study.sites.get(release["site"])
        if site is None:
            problems.append(f"release {release['receipt'][:16]} names site '{release['site']}', not in the study")
            continue
        try:
            entry = site.client.receipt(release["receipt"])
        except VeilError as exc:
            problems.append(f"site '{release['site']}' does not know receipt {release['receipt'][:16]}: {exc}")
            continue
        if (entry.decision, entry.query, entry.dataset) != ("released", release["query"], release["dataset"]) \
                or entry.rho != release["cost"]["rho"]:
            problems.append(f"receipt {release['receipt'][:16]} at '{release['site']}' records a different release")
    return len(releases), problems
