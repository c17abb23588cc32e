"""The study config, read and checked with the standard library alone (tomllib): the kernel reads it at
start, for its banner and its guard, before it loads the SDK; `load_study` builds the study from it.

    [study]
    name = "rare_peds"
    project = "rare_peds"
    default_epsilon = 0.1              # a release's epsilon when a query names none
    default_site = "north"             # optional: where `%%veil sql` without --site/--all releases
    [sites.north]
    url = "http://127.0.0.1:8701"
    token_file = "north.token"        # relative to this file; the token never enters the notebook
    guard_paths = ["/srv/north/data"]  # optional: what that executor serves on this machine

The config is `$VEIL_STUDY`, or `~/.veil/study.toml`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from veil.kernel.errors import VeilConfigError

STUDY_ENV = "VEIL_STUDY"


KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "[study]": {
        "name": ("the project", "the study's name, shown in the kernel's banner"),
        "project": ("required", "the project the sites granted budget to (the tokens' project)"),
        "default_epsilon": ("0.1", "a release's epsilon when a query names none"),
        "default_site": ("none", "where `%%veil sql` without --site or --all releases"),
    },
    "[sites.NAME]": {
        "url": ("required", "the site's executor"),
        "token_file": ("required", "the researcher's token, relative to this file; it never enters the notebook"),
        "guard_paths": ("[]", "directories that executor serves on this machine: the kernel refuses to open them"),
    },
}
"""Every key of study.toml, per table: (required or default, meaning); the README's reference table is generated
from it (scripts/catalog_reference.py)."""


def study_path() -> Path:
    """Where the study config is read from: $VEIL_STUDY, else ~/.veil/study.toml."""
    return Path(os.environ.get(STUDY_ENV) or Path.home() / ".veil" / "study.toml")


@dataclass(frozen=True)
class SiteConfig:
    """One site of the config: its executor's URL and the researcher's token (read from its file)."""

    name: str
    url: str
    token: str


@dataclass(frozen=True)
class StudyConfig:
    """A study config as read: name, project, sites and the directories the kernel guard covers."""

    path: Path
    name: str
    project: str
    default_epsilon: float
    sites: tuple[SiteConfig, ...]
    guards: tuple[Path, ...]
    default_site: str | None = None


def read_study_config(path: str | Path | None = None) -> StudyConfig:
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
    if not isinstance(study, dict) or "project" not in study or not isinstance(raw.get("sites"), dict) \
            or not raw["sites"]:
        raise VeilConfigError(f"{path} needs [study] with project = ..., and at least one [sites.NAME]")
    try:
        default_epsilon = float(study.get("default_epsilon", 0.1))
    except (TypeError, ValueError):
        raise VeilConfigError(f"{path}: default_epsilon must be a number, not "
                              f"{study['default_epsilon']!r}") from None
    sites, guards = [], []
    for name, cfg in raw["sites"].items():
        if not isinstance(cfg, dict) or "url" not in cfg or "token_file" not in cfg:
            raise VeilConfigError(f"{path}: [sites.{name}] needs url and token_file")
        token_file = (path.parent / cfg["token_file"]).resolve()
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise VeilConfigError(f"{path}: cannot read the token file of site '{name}' ({exc})") from None
        sites.append(SiteConfig(name, cfg["url"], token))
        guards += [Path(p).resolve() for p in cfg.get("guard_paths", [])]
    default_site = study.get("default_site")
    if default_site is not None and default_site not in raw["sites"]:
        raise VeilConfigError(f"{path}: default_site '{default_site}' is not one of the sites "
                              f"({', '.join(raw['sites'])})")
    return StudyConfig(path, str(study.get("name", study["project"])), str(study["project"]), default_epsilon,
                       tuple(sites), tuple(guards), default_site)
