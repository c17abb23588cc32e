"""The jupyter_server extension app and its REST handlers under /veil/api (see extensions/veil-lab/README.md for the
contract the front end uses). Every handler needs the Jupyter server's own authentication; the
executors are reached with the tokens named in the user's configs, which never leave this process."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from pydantic import BaseModel, ValidationError
from traitlets import Unicode

from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilConfigError, VeilError, VeilRefusal, VeilSiteUnavailable
from veil.kernel.receipts import check_release
from veil.kernel.study import Study, load_study
from veil.wire import ReviewRequest

STEWARD_ENV = "VEIL_STEWARD"
MOCK_ROWS = 100


class VeilLabApp(ExtensionApp):
    """Serves /veil/api/* for the Veil lab extension: budgets, datasets and receipts for researchers, the
    steward desk for stewards."""

    name = "veil_lab"
    study_path = Unicode("", help="the researcher's study config (default: $VEIL_STUDY, else ~/.veil/study.toml)"
                         ).tag(config=True)
    steward_path = Unicode("", help="a steward config, [sites.NAME] with url and token_file of a steward's token "
                           "(default: $VEIL_STEWARD; none: the steward desk is off)").tag(config=True)

    def initialize_handlers(self) -> None:
        base = self.serverapp.base_url if self.serverapp else "/"
        routes: list[tuple[str, type[tornado.web.RequestHandler]]] = [
            ("budget", BudgetHandler), ("datasets", DatasetsHandler),
            (r"datasets/([^/]+)/([^/]+)/mock", MockHandler), ("receipts/verify", ReceiptsHandler),
            ("standing", StandingHandler),
            ("steward", StewardHandler), ("steward/whoami", WhoAmIHandler), ("steward/applications", ApplicationsHandler),
            (r"steward/applications/([^/]+)/(\d+)/reviews", ReviewHandler), ("steward/budgets", BudgetsHandler),
            (r"steward/grants/([^/]+)/(\d+)/revoke", RevokeHandler),
            (r"steward/budgets/([^/]+)/([^/]+)/cap", CapHandler), ("steward/audit", AuditHandler),
            ("steward/audit/verify", AuditVerifyHandler), ("steward/audit/export", AuditExportHandler),
            ("steward/report", ReportHandler)]
        self.handlers.extend((url_path_join(base, "veil/api", path), handler, {"lab": self})
                             for path, handler in routes)

    def study(self) -> Study:
        """The user's study, read afresh (its config may change while the server runs)."""
        return load_study(self.study_path or None)

    def stewardship(self) -> dict[str, SiteClient] | None:
        """Clients with the steward's token per site, or None when no steward config is set."""
        path = self.steward_path or os.environ.get(STEWARD_ENV, "")
        if not path:
            return None
        try:
            raw = tomllib.loads(Path(path).read_text())
            return {name: SiteClient(name, cfg["url"], (Path(path).parent / cfg["token_file"]).read_text().strip())
                    for name, cfg in raw["sites"].items()}
        except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise VeilConfigError(f"the steward config {path} is unusable ({type(exc).__name__}: {exc}); it needs "
                                  "[sites.NAME] tables with url and token_file") from None


class _Handler(APIHandler):
    """JSON in and out; a Veil error becomes {code, message, hint} with the site's status."""

    def initialize(self, lab: VeilLabApp) -> None:
        self.lab = lab
        self._clients: list[SiteClient] = []

    def on_finish(self) -> None:
        for client in self._clients:
            client.close()

    def study(self) -> Study:
        study = self.lab.study()
        self._clients += [site.client for site in study.sites.values()]
        return study

    def reply(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload, default=str))

    def fail(self, error: Exception) -> None:
        if isinstance(error, VeilRefusal):
            r = error.refusal
            self.reply({"code": r.code, "message": str(error), "hint": r.hint}, error.status)
        elif isinstance(error, VeilSiteUnavailable):
            self.reply({"code": "site_unavailable", "message": str(error), "hint": "check that its executor runs"}, 502)
        elif isinstance(error, VeilConfigError):
            self.reply({"code": "no_config", "message": str(error), "hint": None}, 503)
        elif isinstance(error, (ValidationError, ValueError, KeyError)):
            self.reply({"code": "bad_request", "message": str(error), "hint": "see extensions/veil-lab/README.md for the API"}, 400)
        else:
            self.reply({"code": "error", "message": str(error), "hint": None}, 500)

    async def run(self, work: Callable[[], Any]) -> None:
        """Do blocking executor calls off the event loop; reply with the result or the error."""
        try:
            self.reply(await asyncio.to_thread(work))
        except (VeilError, ValidationError, ValueError, KeyError) as exc:
            self.fail(exc)

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise ValueError("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object")
        return data

    def steward(self, site: str | None = None) -> dict[str, SiteClient]:
        clients = self.lab.stewardship()
        self._clients += list((clients or {}).values())
        if clients is None:
            raise VeilConfigError(f"no steward config: set {STEWARD_ENV} (or VeilLabApp.steward_path)")
        if site is not None and site not in clients:
            raise KeyError(f"no site '{site}' in the steward config")
        return clients


def _per_site(clients: dict[str, Any], key: str, fetch: Callable[[Any], Any]) -> dict[str, Any]:
    """{site: {"status": "ok", key: fetch(client)} or {"status": "unreachable"|"refused", "error": ...}}."""
    out: dict[str, Any] = {}
    for name, client in clients.items():
        try:
            out[name] = {"status": "ok", key: _plain(fetch(client))}
        except VeilSiteUnavailable as exc:
            out[name] = {"status": "unreachable", "error": str(exc)}
        except VeilRefusal as exc:
            out[name] = {"status": "refused", "error": str(exc)}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- researchers


class BudgetHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        """The project's grants at every site of the study."""
        def work() -> Any:
            study = self.study()
            return {"project": study.project,
                    "sites": _per_site({n: s.client for n, s in study.sites.items()}, "grants", lambda c: c.grants())}
        await self.run(work)


class DatasetsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        """Every site's datasets the project may use: schema and public metadata, never rows."""
        def work() -> Any:
            study = self.study()
            return {"sites": _per_site({n: s.client for n, s in study.sites.items()}, "datasets",
                                       lambda c: c.datasets())}
        await self.run(work)


class MockHandler(_Handler):
    @tornado.web.authenticated
    async def get(self, site: str, name: str) -> None:
        """Mock rows of a dataset (the steward's DP synthetic rows, or rows made from public metadata)."""
        rows = min(int(self.get_argument("rows", "10")), MOCK_ROWS)

        def work() -> Any:
            frame = self.study().sites[site].datasets[name].mock(rows)
            return {"columns": frame.columns, "rows": [list(r) for r in frame.rows()]}
        await self.run(work)


class StandingHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        """The project's standing queries at every site of the study: windows released, next release, budget."""
        def work() -> Any:
            study = self.study()
            return {"project": study.project,
                    "sites": _per_site(study.sites, "standing", lambda site: site.standing_queries())}
        await self.run(work)


class ReceiptsHandler(_Handler):
    @tornado.web.authenticated
    async def post(self) -> None:
        """Check releases (site, receipt, and what the notebook recorded) against the sites' audit logs."""
        def work() -> Any:
            study = self.study()
            results = []
            for release in self.body().get("releases", []):
                problem = check_release(study, release)
                results.append({"site": release["site"], "receipt": release["receipt"], "ok": problem is None,
                                "detail": problem or "confirmed by the site's audit log"})
            return {"results": results}
        await self.run(work)


# ---------------------------------------------------------------- stewards


class StewardHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        """Whether the steward desk is on (a steward config is set), and for which sites."""
        def work() -> Any:
            clients = self.lab.stewardship()
            self._clients += list((clients or {}).values())
            return {"enabled": clients is not None, "sites": sorted(clients or {})}
        await self.run(work)


class WhoAmIHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        """Who the steward config's token signs in as at each site (the site's /whoami), or why not."""
        await self.run(lambda: {"sites": _per_site(self.steward(), "whoami", lambda c: c.whoami())})


class ApplicationsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        status = self.get_argument("status", None)
        await self.run(lambda: {"sites": _per_site(self.steward(), "applications", lambda c: c.applications(status))})


class ReviewHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, site: str, application_id: str) -> None:
        """Approve or reject the version of an application the steward read, with a comment."""
        await self.run(lambda: _plain(self.steward(site)[site].review(
            int(application_id), ReviewRequest.model_validate(self.body()))))


class BudgetsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        await self.run(lambda: {"sites": _per_site(self.steward(), "budgets", lambda c: c.budgets())})


class RevokeHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, site: str, grant_id: str) -> None:
        await self.run(lambda: _plain(self.steward(site)[site].revoke_grant(int(grant_id), self.body()["reason"])))


class CapHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, site: str, dataset: str) -> None:
        def work() -> Any:
            body = self.body()
            return _plain(self.steward(site)[site].set_cap(dataset, float(body["epsilon"]), str(body.get("reason", ""))))
        await self.run(work)


AUDIT_FILTERS = ("project", "dataset", "action", "decision")


class AuditHandler(_Handler):
    """A page of a site's audit log, newest first (`before`: the last seq of the previous page), filtered;
    `total`: how many entries match the filters."""

    @tornado.web.authenticated
    async def get(self) -> None:
        site = self.get_argument("site")
        since, limit = int(self.get_argument("since", "0")), int(self.get_argument("limit", "100"))
        before = self.get_argument("before", "") or None
        project, dataset, action, decision = (self.get_argument(k, "") or None for k in AUDIT_FILTERS)

        def work() -> Any:
            found, total = self.steward(site)[site].audit_page(
                since, limit, None if before is None else int(before), project=project, dataset=dataset,
                action=action, decision=decision)
            return {"entries": _plain(found), "total": total}
        await self.run(work)


class AuditExportHandler(_Handler):
    """The filtered log as JSON lines or CSV text, for the desk to save: {filename, content}."""

    @tornado.web.authenticated
    async def get(self) -> None:
        site, fmt = self.get_argument("site"), self.get_argument("format", "jsonl")
        project, dataset, action, decision = (self.get_argument(k, "") or None for k in AUDIT_FILTERS)
        await self.run(lambda: {"filename": f"{site}-audit.{fmt}", "content": self.steward(site)[site].audit_export(
            fmt, project=project, dataset=dataset, action=action, decision=decision)})


class AuditVerifyHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        site = self.get_argument("site")
        await self.run(lambda: _plain(self.steward(site)[site].verify_audit()))


REPORT_PARAMS = ("since", "until", "dataset", "project")


class ReportHandler(_Handler):
    """A site's usage and value report (`veil.usage.UsageReport`) for [since, until), filtered."""

    @tornado.web.authenticated
    async def get(self) -> None:
        site = self.get_argument("site")
        since, until, dataset, project = (self.get_argument(k, "") or None for k in REPORT_PARAMS)
        await self.run(lambda: _plain(self.steward(site)[site].report(since, until, dataset=dataset,
                                                                      project=project)))
