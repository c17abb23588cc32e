"""A study: the sites a researcher works with, read from a TOML config (never from the notebook).

    [study]
    name = "rare_peds"
    project = "rare_peds"
    default_epsilon = 0.1              # a release's epsilon when a query names none
    [sites.north]
    url = "http://127.0.0.1:8701"
    token_file = "north.token"        # relative to this file; the token never enters the notebook
    guard_paths = ["/srv/north/data"]  # optional: what that executor serves on this machine

The config is `$VEIL_STUDY`, or `~/.veil/study.toml`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from veil.kernel.errors import VeilConfigError, VeilError
from veil.kernel.sdk import Dataset, Site

STUDY_ENV = "VEIL_STUDY"


def study_path() -> Path:
    """Where the study config is read from: $VEIL_STUDY, else ~/.veil/study.toml."""
    return Path(os.environ.get(STUDY_ENV) or Path.home() / ".veil" / "study.toml")


class Study:
    """The sites of a multi-center study; `study.dataset(name)` spans every site that offers it."""

    def __init__(self, name: str, project: str, sites: dict[str, Site], guards: list[Path]) -> None:
        self.name, self.project, self.sites, self._guards = name, project, sites, guards

    @property
    def mode(self) -> str:
        """'live' (releases spend budget) or 'mock' (run locally on mock rows, spend nothing)."""
        return next(iter(self.sites.values())).mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ("live", "mock"):
            raise VeilError(f"mode must be 'live' or 'mock', not '{mode}'")
        for site in self.sites.values():
            site.mode = mode

    def guarded_paths(self) -> list[Path]:
        """Directories that executors on this machine serve: the kernel refuses to open files there."""
        return list(self._guards)

    def dataset(self, name: str, sites: list[str] | None = None) -> Dataset:
        """The dataset `name` at every site that offers it (or at `sites`), for multi-center queries."""
        chosen = [self.sites[s] for s in sites] if sites else list(self.sites.values())
        having = [s for s in chosen if name in s.datasets]
        if not having:
            raise VeilError(f"no site of study '{self.name}' offers a dataset '{name}' to project "
                            f"'{self.project}'; see study.datasets()")
        return Dataset(having, having[0].datasets[name].info)

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
    path = Path(path) if path else study_path()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise VeilConfigError(f"no study config at {path}: set {STUDY_ENV} to your study's TOML file "
                              "(or create ~/.veil/study.toml); `veil demo` writes one for the demo") from None
    except tomllib.TOMLDecodeError as exc:
        raise VeilConfigError(f"{path} is not valid TOML: {exc}") from None
    study = raw.get("study", {})
    if "project" not in study or not raw.get("sites"):
        raise VeilConfigError(f"{path} needs [study] with project = ..., and at least one [sites.NAME]")
    sites, guards = {}, []
    for name, cfg in raw["sites"].items():
        if "url" not in cfg or "token_file" not in cfg:
            raise VeilConfigError(f"{path}: [sites.{name}] needs url and token_file")
        token_file = (path.parent / cfg["token_file"]).resolve()
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise VeilConfigError(f"{path}: cannot read the token file of site '{name}' ({exc})") from None
        sites[name] = Site(name, cfg["url"], token, float(study.get("default_epsilon", 0.1)))
        guards += [Path(p).resolve() for p in cfg.get("guard_paths", [])]
    return Study(study.get("name", study["project"]), study["project"], sites, guards)
