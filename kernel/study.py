"""A study: the sites a researcher works with, read from a TOML config (never from the notebook).

The config's format, and where it is read from ($VEIL_STUDY, or ~/.veil/study.toml): `veil.kernel.config`,
which reads it with the standard library alone (the kernel does so at start, before it loads this module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from veil.errors import validation_problems
from veil.extras import needs
from veil.kernel.config import STUDY_ENV as STUDY_ENV  # also importable from here, as before
from veil.kernel.config import StudyConfig, read_study_config
from veil.kernel.config import study_path as study_path
from veil.kernel.errors import VeilError, VeilUsageError
from veil.kernel.sdk import Dataset, Site, live_only, train_request
from veil.models.spec import ModelSpec
from veil.sql import parse_sql
from veil.usage import StudyUsage
from veil.wire import EVALUATION_EPSILON, ApplicationInfo, ApplicationRequest, Federation, StandingQuery

if TYPE_CHECKING:
    from veil.kernel.federation import FederatedModel
    from veil.surveillance import AlarmRule, Surveillance


class Study:
    """The sites of a multi-center study; `study.dataset(name)` spans every site that offers it."""

    def __init__(self, name: str, project: str, sites: dict[str, Site], guards: list[Path],
                 default_site: str | None = None) -> None:
        self.name, self.project, self.sites, self._guards = name, project, sites, guards
        self.default_site = default_site
        """Where `%%veil sql` without --site or --all releases (the config's `default_site`)."""
        self.on_mode: Callable[[str], None] | None = None
        """Called with the new mode when `mode` changes (the kernel announces it to the lab extension)."""

    @classmethod
    def from_config(cls, config: StudyConfig) -> Study:
        """The study a config describes (`veil.kernel.config.read_study_config`), its sites in live mode."""
        sites = {s.name: Site(s.name, s.url, s.token, config.default_epsilon) for s in config.sites}
        return cls(config.name, config.project, sites, list(config.guards), config.default_site)

    @property
    def mode(self) -> str:
        """'live' (releases spend budget) or 'mock' (run locally on mock rows, spend nothing)."""
        return next(iter(self.sites.values())).mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ("live", "mock"):
            raise VeilUsageError(f"mode must be 'live' or 'mock', not '{mode}'")
        changed = any(site.mode != mode for site in self.sites.values())
        for site in self.sites.values():
            site.mode = mode
        if changed and self.on_mode is not None:
            self.on_mode(mode)

    def guarded_paths(self) -> list[Path]:
        """Directories that executors on this machine serve: the kernel refuses to open files there."""
        return list(self._guards)

    def dataset(self, name: str, sites: list[str] | None = None) -> Dataset:
        """The dataset `name` at every site that offers it (or at `sites`), for multi-center queries."""
        chosen = [self.sites[s] for s in sites] if sites else list(self.sites.values())
        having = [s for s in chosen if name in s.datasets]
        if not having:
            raise VeilUsageError(f"no site of study '{self.name}' offers a dataset '{name}' to project "
                            f"'{self.project}'; see study.datasets()")
        return Dataset(having, having[0].datasets[name].info)

    def train(self, dataset: str, features: Sequence[str], label: str, *, epsilon: float, rounds: int = 5,
              sites: Sequence[str] | None = None, delta: float = 1e-5, model: ModelSpec | None = None,
              epochs: int = 2, batch_size: int = 32, learning_rate: float = 1.0, optimizer: str = "sgd",
              max_grad_norm: float = 1.0, holdout: float = 0.2, evaluation_epsilon: float = EVALUATION_EPSILON,
              progress: bool = True) -> FederatedModel:
        """Train one model across sites with federated DP-SGD (Flower FedAvg; each site trains its own
        patients with Opacus and is charged on its own ledger).

        `epsilon` is each site's target for the whole study (all `rounds` of `epochs` epochs); `batch_size`
        is the expected batch at a site. A progress bar shows the rounds and each site's epsilon so far;
        Ctrl-C ends the study and every site charges only the rounds it ran. The result holds the global
        weights (`.module()`), each site's epsilon and its DP evaluation on its own held-out patients."""
        live_only(self.mode)
        names = list(sites) if sites else self.datasets().get(dataset, [])
        unknown = [s for s in names if s not in self.sites]
        if unknown or not names:
            raise VeilUsageError(f"no such site(s) {unknown} in study '{self.name}'" if unknown else
                            f"no site of study '{self.name}' offers '{dataset}' to project '{self.project}'")
        request = train_request(dataset, features, label, epsilon, delta, model, epochs, batch_size, learning_rate,
                                optimizer, max_grad_norm, holdout, evaluation_epsilon,
                                Federation(study=self.name, rounds=rounds))
        with needs("a federated study"):  # Flower and torch load only when a study trains (veil[train])
            from veil.kernel.federation import train_federated

        return train_federated([self.sites[s].client for s in names], request, progress)

    def standing(self, name: str, sql: str, time_column: str, start: date | str, *, epsilon: float, max_windows: int,
                 window_days: int = 7, horizon: int = 52, lag_days: int = 0, confidence: float = 0.95,
                 levels: int | None = None, purpose: str, sites: Sequence[str] | None = None
                 ) -> dict[str, ApplicationInfo]:
        """File a standing DP count (`SELECT [keys,] COUNT(*) FROM dataset [WHERE ...] [GROUP BY keys]`) at each
        site (or at `sites`): an application with uses ['surveillance'] for the SQL's dataset, reviewed as
        any other. Once approved, the site charges `epsilon` (the whole horizon, at its reporting delta) to the
        dataset's cap once, and releases each `window_days` window of `time_column` from `start`, `lag_days`
        after it ends, for `horizon` windows; each patient counts in at most `max_windows` (window, group)
        cells. `levels`: unset, the full binary tree (running totals err least); 1, each window released
        alone at the whole budget's share the bound allows (each window's count errs least: the better choice
        when the alarm reads weekly counts). `name` is study-wide: `study.surveillance(name)` gathers the
        sites' windows."""
        self._standing_live()
        try:
            spec = StandingQuery(name=name, sql=sql, time_column=time_column, start=start,  # type: ignore[arg-type]
                                 window_days=window_days, horizon=horizon, max_windows=max_windows,
                                 lag_days=lag_days, confidence=confidence, levels=levels)
            last = spec.start + timedelta(days=spec.horizon * spec.window_days + spec.lag_days)
            request = ApplicationRequest(purpose=purpose, datasets=[parse_sql(sql).dataset], epsilon=epsilon,
                                         duration_days=max(1, (last - datetime.now(UTC).date()).days + 1),
                                         uses=["surveillance"], standing=spec)
        except ValidationError as exc:
            raise VeilUsageError(f"standing query '{name}' cannot be filed: {validation_problems(exc.errors())}",
                                 "fix the argument named, then file it again") from None
        filed: dict[str, ApplicationInfo] = {}
        for site in self._chosen(sites):
            try:
                filed[site.name] = site.client.apply(request)
            except VeilError as exc:
                if not filed:
                    raise
                done = ", ".join(f"{s} (application {a.id})" for s, a in filed.items())
                raise VeilError(exc.code, f"standing query '{name}' was filed at {done}, then site '{site.name}' "
                                f"refused it (nothing filed at the sites after it): {exc.message}",
                                "fix what the site says, then file it where it is missing with sites=[...]",
                                exc.status) from exc
        return filed

    def surveillance(self, name: str, sites: Sequence[str] | None = None,
                     rule: AlarmRule | None = None) -> Surveillance:
        """Gather standing query `name` from each site (or `sites`) and combine the windows they have released
        into one series per group, with `rule`'s alarms (`veil.surveillance`). Costs nothing."""
        from veil.surveillance import Surveillance, find

        self._standing_live()
        chosen = self._chosen(sites)
        infos = find(name, {s.name: s.standing_queries() for s in chosen})
        windows = {s.name: s.standing_windows(infos[s.name].id) for s in chosen}
        return Surveillance(name, infos, windows, rule)

    def _chosen(self, sites: Sequence[str] | None) -> list[Site]:
        unknown = [s for s in sites or () if s not in self.sites]
        if unknown:
            raise VeilUsageError(f"no such site(s) {unknown} in study '{self.name}'", f"choose from {list(self.sites)}")
        return [self.sites[s] for s in sites] if sites else list(self.sites.values())

    def _standing_live(self) -> None:
        if self.mode != "live":
            raise VeilUsageError("standing queries run at the sites, on live data, window by window: there is none "
                                 "in mock mode", "switch with `%veil mode live` (or study.mode = 'live')")

    def report(self, since: str | None = None, until: str | None = None) -> StudyUsage:
        """The project's usage and value report from every site of the study over [since, until) (dates as
        YYYY-MM-DD, until excluded; by default everything until now): per site and dataset what it released to
        the project, at what cost, with the receipts to cite, the applications and approvals, models trained and
        federated rounds. Shows as Markdown in Jupyter; `.markdown()` and `.csv()` give the text."""
        return StudyUsage(study=self.name, project=self.project,
                          reports={name: site.client.report(since, until) for name, site in self.sites.items()})

    def datasets(self) -> dict[str, list[str]]:
        """Which sites offer which datasets."""
        offered: dict[str, list[str]] = {}
        for site in self.sites.values():
            for name in site.datasets:
                offered.setdefault(name, []).append(site.name)
        return offered

    def __repr__(self) -> str:
        return f"<Veil study {self.name} (project {self.project}): sites {', '.join(self.sites)}>"


def load_study(path: str | Path | None = None) -> Study:
    """Read a study config; tokens come from the files it names. VeilConfigError says what is wrong."""
    return Study.from_config(read_study_config(path))
