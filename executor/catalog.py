"""A site's catalog: its datasets, where they live, and the public metadata the steward set.

The catalog is a TOML file (see `README.md`, "Site catalog"). Bounds, category sets and the maximum
number of rows per patient are public facts declared by the steward, never read from the data.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from veil import limits
from veil.errors import CatalogError
from veil.executor.policy import DEFAULT_RULES, level_rules
from veil.query.sharing import SHARING_MODELS
from veil.query.table import DTYPES, Column, Table
from veil.wire import DEFAULT_SHARING, NAME_PATTERN, DatasetInfo, LevelRule, Pricing, Sharing

TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
"""A database table or view, optionally schema-qualified (`cdm.person`)."""


@dataclass(frozen=True)
class DatabaseSource:
    """Where a dataset's rows live when they are not a Parquet file: a table or view in PostgreSQL, copied
    into the site's Parquet snapshot (the dataset's `path`) at start and every `refresh_minutes`."""

    url: str = field(repr=False)
    """A PostgreSQL URL (`postgresql://role@host:5432/db`), best of a role that may only SELECT."""
    table: str
    refresh_minutes: float = 1440.0
    statement_seconds: float = 600.0
    """The longest the copy may run (the database's statement_timeout); past it the copy fails."""


@dataclass(frozen=True, kw_only=True)
class Dataset(Table):
    """One dataset of a site: its public metadata (`Table`) and, on the site only, the Parquet file (the
    snapshot of its `source` table, when it has one)."""

    title: str
    description: str
    path: Path
    level: str
    lifetime_epsilon: float
    lifetime_delta: float = 1e-4
    on_excess_rows: Literal["truncate", "refuse"] = "truncate"
    """What the site does when the file breaks max_rows_per_unit: "truncate" each patient's rows, or "refuse"."""
    source: DatabaseSource | None = None
    initial_state: Literal["draft", "active"] = "active"
    """Where the dataset's lifecycle starts (executor/lifecycle.py); the state database keeps where it is now."""
    sharing: Sharing = DEFAULT_SHARING
    """Its sharing model (veil/query/sharing.py): "open" (L1 only), "controlled" or "enclave"."""

    def scan(self) -> pl.LazyFrame:
        """The dataset's rows, each column in its declared dtype (a file column of a mapped dtype, say UInt32
        declared Int64, is cast; a value that does not fit fails the query rather than wrapping). Only columns
        whose file dtype differs are cast: a strict cast reads its columns whatever the query uses, so with none
        a bare count is answered from the file's row count."""
        stored = _file_schema(str(self.path), *_version(self.path))
        cast = {c: t for c, t in self.schema().items() if stored is None or stored.get(c) != t}
        frame = pl.scan_parquet(self.path)
        return frame.cast(cast, strict=True) if cast else frame  # type: ignore[arg-type]  # (Mapping invariance)

    def info(self, pricing: Pricing | None = None) -> DatasetInfo:
        return DatasetInfo(
            name=self.name,
            title=self.title,
            description=self.description,
            level=self.level,  # type: ignore[arg-type]
            privacy_unit=self.privacy_unit,
            max_rows_per_unit=self.max_rows_per_unit,
            max_rows=self.max_rows,
            columns=[c.info() for c in self.columns.values()],
            pricing=pricing,
            sharing=self.sharing,
        )


def _version(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _file_schema(path: str, mtime_ns: int, size: int) -> dict[str, pl.DataType] | None:
    """The dtypes a Parquet file stores (its footer only), per version of the file; None when it cannot be read
    that way (then every column is cast)."""
    try:
        return dict(pl.read_parquet_schema(path))
    except Exception:  # a directory, a glob, a missing or broken file: the scan itself reports it
        return None


@dataclass(frozen=True)
class SiteLimits:
    """How much one client may ask of the site (`[limits]` in site.toml); see README, "Hostile input"."""

    query_seconds: float = 30.0
    """A query's planning and run time; past it the query is stopped, refused and charged nothing."""
    query_workers: int = 2
    """Processes that plan and run queries (each killed and replaced when a query overruns)."""
    requests_per_minute: int = 600
    """Requests per token (and per address for tokens' requests), refused beyond with `rate_limited`."""
    anonymous_per_minute: int = 60
    """Requests without a valid token, per client address."""
    audit_window_seconds: float = 60.0
    """Anonymous and rate-limited refusals are counted into one audit entry per window."""


@dataclass(frozen=True)
class Peer:
    """Another site that witnesses this site's signed audit heads, and whose heads this site witnesses
    (`[peers.NAME]`, executor/witness.py)."""

    name: str
    url: str
    """Where its executor listens (http:// or https://)."""
    public_key: str
    """Its raw Ed25519 audit-signing public key, hex (`veil audit key` on that site prints it)."""


@dataclass(frozen=True)
class Catalog:
    """A site: its name, database URL, accounting settings and datasets."""

    site: str
    title: str
    database_url: str
    reporting_delta: float
    default_l1_epsilon: float
    datasets: dict[str, Dataset]
    path: Path
    audit_key: Path  # the site's Ed25519 audit-signing key, outside the state database
    levels: dict[str, LevelRule] = field(default_factory=dict)
    max_training_seconds: float = 3600.0
    limits: SiteLimits = field(default_factory=SiteLimits)
    peers: dict[str, Peer] = field(default_factory=dict)
    witness_minutes: float = 60.0
    """How often this site pushes its latest signed audit head to its peers (0: only on demand)."""
    standing_check_seconds: float = 60.0
    """How often the site releases the due windows of its standing queries (and once at start)."""

    def rule(self, dataset: Dataset) -> LevelRule:
        """The review rule and release bounds of the dataset's privacy level."""
        return self.levels[dataset.level]

    def pricing(self, dataset: Dataset) -> Pricing:
        """What a release on the dataset costs and may ask for here (public: mock mode prices with it)."""
        rule = self.rule(dataset)
        return Pricing(reporting_delta=self.reporting_delta, max_epsilon_per_release=rule.max_epsilon_per_release,
                       min_group_threshold=rule.min_group_threshold)

    def dataset(self, name: str) -> Dataset:
        try:
            return self.datasets[name]
        except KeyError:
            raise CatalogError(
                "unknown_dataset",
                f"site '{self.site}' has no dataset '{name}'",
                hint="list the datasets you may use with GET /datasets",
                status=404,
            ) from None


KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "[site]": {
        "name": ("required", "the site's name (letters, digits, _), as researchers' study configs name it"),
        "title": ("the name", "the hospital's name, as researchers read it"),
        "database": ('"sqlite:///veil.db"', "the state database (grants, ledger, applications, audit log): SQLite "
                     "relative to this file, or PostgreSQL; `--database-url` overrides it"),
        "reporting_delta": ("1e-6", "the delta at which every epsilon is stated (at most 1e-3)"),
        "default_l1_epsilon": ("1.0", "the budget every project gets on each L1 dataset without applying"),
        "max_training_seconds": ("3600", "a training job is stopped here (charged for its steps, weights kept)"),
        "audit_key": ('"audit-signing.key"', "the Ed25519 key that signs the audit log, relative to this file "
                      "(made at first start; keep it outside the state database)"),
        "witness_minutes": ("60", "how often the site pushes its latest signed audit head to its `[peers]` "
                            "(0: only with `veil audit witness`)"),
        "standing_check_seconds": ("60", "how often the site releases the due windows of its standing queries "
                                   "(at least 1; also once at start)"),
    },
    "[limits]": {  # defaults (""): SiteLimits()
        "query_seconds": ("", "a query's planning and run time; past it the query is stopped, refused and "
                          "charged nothing"),
        "query_workers": ("", "processes that plan and run queries (one that overruns is killed and replaced)"),
        "requests_per_minute": ("", "requests per token (and per address for tokens' requests), refused "
                                "beyond with `rate_limited`"),
        "anonymous_per_minute": ("", "requests without a valid token, per client address"),
        "audit_window_seconds": ("", "anonymous and rate-limited refusals are counted into one audit entry "
                                 "per window"),
    },
    "[levels.L1], [levels.L2], [levels.L3]": {  # defaults (""): policy.DEFAULT_RULES, LevelRule's
        "reviewers": ("", "distinct approving reviewers an application needs"),
        "offices": ("", "offices that must each be among the approving reviewers"),
        "ethics_required": ("", "an application must name its ethics approval"),
        "max_epsilon_per_release": ("", "the most one release may spend"),
        "min_group_threshold": ("", "the least count a thresholded group may be released at"),
        "training": ("", "whether DP-SGD training is allowed on datasets of the level"),
        "max_epsilon_per_model": ("", "the most a training job may spend"),
        "default_grant_epsilon": ("", "a budget every project gets without applying"),
        "max_project_share": ("", "the most of a dataset's lifetime cap one project may hold without a "
                              "steward's review"),
    },
    "[datasets.NAME]": {
        "title": ("NAME", "the dataset's title in the catalog researchers read"),
        "description": ('""', "one sentence a researcher reads in the catalog"),
        "path": ("required, or snapshots/NAME.parquet with source", "the Parquet file, relative to this file "
                 "(with `source`: the site's snapshot of the table)"),
        "source": ("none", "a PostgreSQL table or view to serve instead of a file (keys below)"),
        "level": ("required", "L1 open aggregates, L2 controlled, L3 restricted (ethics approval, two reviewers)"),
        "privacy_unit": ("required", "the column that identifies a patient"),
        "max_rows_per_unit": ("required", "public: the most rows one patient has; the site checks it"),
        "on_excess_rows": ('"truncate"', 'if the file has more rows per patient: "truncate" them or "refuse" '
                           "requests on the dataset"),
        "max_rows": ("required", "a public upper bound on the number of rows"),
        "sharing": ('"controlled"', '"open" (L1 only: any project queries it, and the steward may publish a '
                    'DP statistics sheet), "controlled" (its level\'s rules) or "enclave" (no query releases: '
                    'approved training jobs and their DP evaluations only)'),
        "state": ('"active"', 'where its lifecycle starts: "draft" (serves nothing until a steward activates it) '
                  'or "active"; stewards move it on (veil steward dataset ...)'),
        "lifetime_epsilon": ("required", "the budget all projects together may spend on the dataset"),
        "lifetime_delta": ("1e-4", "the delta all projects together may spend (thresholded GROUP BY, DP-SGD)"),
        "columns": ("required", "one `[datasets.NAME.columns.COLUMN]` table per column of the file"),
    },
    "[datasets.NAME.columns.COLUMN]": {
        "dtype": ("required", "one of " + ", ".join(DTYPES) + ": the file's dtype, or one the site casts it to"),
        "description": ("none", "what the column holds, with its unit"),
        "bounds": ("none", "public [lower, upper] (a clinical or physical range); values outside are clamped; "
                   "sums and means need it"),
        "categories": ("none", "the public list of values (a code list); GROUP BY shows every one of them"),
        "nullable": ("false", "whether the column may be empty (checked at start)"),
    },
    "[peers.NAME]": {
        "url": ("required", "where the peer site's executor listens (http:// or https://)"),
        "public_key": ("required", "the peer's audit-signing public key, hex (`veil audit key` on the peer prints "
                       "it): only heads it signed are witnessed"),
    },
    "[datasets.NAME] source = { ... }": {
        "table": ("required", "the table or view, optionally schema-qualified (`cdm.person`)"),
        "url": ("one of url, url_env", "the PostgreSQL URL, best of a role that may only SELECT"),
        "url_env": ("one of url, url_env", "the environment variable holding the URL (no password in the file)"),
        "refresh_minutes": ("1440", "how often the snapshot is retaken"),
        "statement_seconds": ("600", "the longest a copy may run (its statement_timeout)"),
    },
}
"""Every key of site.toml, per table: (required or default, meaning). The README's reference table is
generated from it (scripts/catalog_reference.py), and that script checks it against the keys this module reads."""


def _require(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise CatalogError("bad_catalog", f"{where}: missing required key '{key}'")
    return table[key]


def _check_name(name: str, where: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise CatalogError("bad_catalog", f"{where}: '{name}' is not a valid name (letters, digits, _)")
    return name


def _declared(raw: dict[str, Any], key: str) -> Any:
    """A column's optional public fact, None while it is a TODO (only a draft catalog may still hold one)."""
    value = raw.get(key)
    return None if isinstance(value, str) and value.startswith("TODO") else value


def _column(name: str, raw: dict[str, Any], where: str) -> Column:
    dtype = _require(raw, "dtype", where)
    if dtype not in DTYPES:
        raise CatalogError("bad_catalog", f"{where}: dtype '{dtype}' is not one of {sorted(DTYPES)}")
    bounds = _declared(raw, "bounds")
    if bounds is not None:
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise CatalogError("bad_catalog", f"{where}: bounds must be [lower, upper] with lower < upper")
        bounds = (bounds[0], bounds[1])
    categories = _declared(raw, "categories")
    return Column(
        name=_check_name(name, where),
        dtype=dtype,
        description=raw.get("description"),
        bounds=bounds,
        categories=tuple(categories) if categories is not None else None,
        nullable=bool(raw.get("nullable", False)),
    )


def _number(raw: dict[str, Any], key: str, where: str, low: float, high: float, default: float | None = None) -> float:
    """A number from the catalog within [low, high], or a CatalogError naming the key and the range."""
    value = raw.get(key, default) if default is not None else _require(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise CatalogError("bad_catalog", f"{where}: {key} = {value!r} must be a number from {low:g} to {high:g}",
                           hint="fix the value in site.toml and restart the executor")
    return float(value)


def _budget(raw: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    return _number(raw, key, where, limits.MIN_EPSILON, limits.MAX_BUDGET_EPSILON, default)


def _site_limits(raw: dict[str, Any]) -> SiteLimits:
    known = set(SiteLimits.__dataclass_fields__)
    if set(raw) - known:
        raise CatalogError("bad_catalog", f"[limits]: unknown key(s) {sorted(set(raw) - known)}",
                           hint=f"the keys are {', '.join(sorted(known))}")
    d = SiteLimits()
    return SiteLimits(
        query_seconds=_number(raw, "query_seconds", "[limits]", 0.01, 3600, d.query_seconds),
        query_workers=int(_number(raw, "query_workers", "[limits]", 1, 64, d.query_workers)),
        requests_per_minute=int(_number(raw, "requests_per_minute", "[limits]", 1, 1e6, d.requests_per_minute)),
        anonymous_per_minute=int(_number(raw, "anonymous_per_minute", "[limits]", 1, 1e6, d.anonymous_per_minute)),
        audit_window_seconds=_number(raw, "audit_window_seconds", "[limits]", 1, 86400, d.audit_window_seconds),
    )


EXCESS_ROWS = ("truncate", "refuse")
"""A dataset's `on_excess_rows`: what the site does when its file has more rows per patient than the catalog says."""


def _dataset(name: str, raw: dict[str, Any], base: Path) -> Dataset:
    where = f"dataset '{name}'"
    level = _require(raw, "level", where)
    if level not in DEFAULT_RULES:
        raise CatalogError("bad_catalog", f"{where}: unknown privacy level '{level}'",
                           hint=f"classify it as one of {', '.join(DEFAULT_RULES)}")
    columns = {
        cname: _column(cname, craw, f"{where}, column '{cname}'")
        for cname, craw in _require(raw, "columns", where).items()
    }
    unit = _require(raw, "privacy_unit", where)
    if unit not in columns:
        raise CatalogError("bad_catalog", f"{where}: privacy_unit '{unit}' is not a column")
    max_per_unit = int(_require(raw, "max_rows_per_unit", where))
    if max_per_unit < 1:
        raise CatalogError("bad_catalog", f"{where}: max_rows_per_unit must be at least 1")
    on_excess_rows = raw.get("on_excess_rows", "truncate")
    if on_excess_rows not in EXCESS_ROWS:
        raise CatalogError("bad_catalog", f"{where}: on_excess_rows must be one of {', '.join(EXCESS_ROWS)}, "
                           f"not {on_excess_rows!r}", hint='"truncate" (the default) or "refuse"')
    source = _source(raw["source"], where) if "source" in raw else None
    sharing = _sharing(raw.get("sharing", DEFAULT_SHARING), level, where)
    initial_state = raw.get("state", "active")
    if initial_state not in ("draft", "active"):
        raise CatalogError("bad_catalog", f"{where}: state must be \"draft\" or \"active\", not {initial_state!r}",
                           hint="stewards move a dataset on from there: veil steward dataset suspend|retire|destroy")
    return Dataset(
        name=_check_name(name, where),
        title=raw.get("title", name),
        description=raw.get("description", ""),
        path=(base / (raw.get("path", f"snapshots/{name}.parquet") if source else _require(raw, "path", where))
              ).resolve(),
        source=source,
        level=level,
        privacy_unit=unit,
        max_rows_per_unit=max_per_unit,
        max_rows=int(_require(raw, "max_rows", where)),
        lifetime_epsilon=_budget(raw, "lifetime_epsilon", where),
        lifetime_delta=_number(raw, "lifetime_delta", where, limits.MIN_DELTA, 0.1, 1e-4),
        columns=columns,
        on_excess_rows=on_excess_rows,
        initial_state=initial_state,
        sharing=sharing,
    )


def _sharing(value: Any, level: str, where: str) -> Sharing:
    """A dataset's sharing model, checked against its level: only an L1 dataset may be open."""
    if value not in SHARING_MODELS:
        raise CatalogError("bad_catalog", f"{where}: sharing must be one of {', '.join(SHARING_MODELS)}, not "
                           f"{value!r}", hint='leave it out for "controlled", the default')
    if value == "open" and level != "L1":
        raise CatalogError("bad_catalog", f"{where}: an {level} dataset cannot be open: open datasets give DP "
                           "statistics to every project without review, which only L1 allows",
                           hint='declare it sharing = "controlled" (or leave sharing out), or classify it L1')
    return value  # type: ignore[no-any-return]


PEER_KEYS = {"url", "public_key"}
PUBLIC_KEY = re.compile(r"^[0-9a-f]{64}$")
"""A raw Ed25519 public key in hex, as `veil audit key` prints it."""


def _peer(name: str, raw: Any, site: str) -> Peer:
    """A peer's `[peers.NAME]` table: its URL and its audit-signing public key."""
    where = f"[peers.{name}]"
    if not isinstance(raw, dict) or set(raw) - PEER_KEYS:
        raise CatalogError("bad_catalog", f"{where}: a table of {', '.join(sorted(PEER_KEYS))}",
                           hint='e.g. [peers.central] url = "https://central.example:8700", public_key = "ab12..."')
    if _check_name(name, where) == site:
        raise CatalogError("bad_catalog", f"{where}: a site cannot be its own peer",
                           hint="list the other sites that witness this site's audit heads")
    url = _require(raw, "url", where)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise CatalogError("bad_catalog", f"{where}: url {url!r} is not an http:// or https:// URL",
                           hint="the peer's executor, as its steward publishes it")
    public_key = _require(raw, "public_key", where)
    if not isinstance(public_key, str) or not PUBLIC_KEY.match(public_key):
        raise CatalogError("bad_catalog", f"{where}: public_key must be 64 lowercase hex digits (a raw Ed25519 key)",
                           hint="ask the peer's administrator for the output of 'veil audit key' on their site")
    return Peer(name=name, url=url.rstrip("/"), public_key=public_key)


SOURCE_KEYS = {"url", "url_env", "table", "refresh_minutes", "statement_seconds"}


def _source(raw: Any, where: str) -> DatabaseSource:
    """A dataset's `source = { table = "cdm.person", url_env = "VEIL_OMOP_URL" }` (or `url = ...`)."""
    where = f"{where}, source"
    if not isinstance(raw, dict) or set(raw) - SOURCE_KEYS:
        raise CatalogError("bad_catalog", f"{where}: a table of {', '.join(sorted(SOURCE_KEYS))}",
                           hint='e.g. source = { table = "cdm.person", url_env = "VEIL_OMOP_URL" }')
    if ("url" in raw) == ("url_env" in raw):
        raise CatalogError("bad_catalog", f"{where}: give exactly one of url and url_env",
                           hint="url_env names an environment variable holding the URL, so that no password "
                                "is written in site.toml")
    url = raw.get("url") or os.environ.get(raw["url_env"], "")
    if not url:
        raise CatalogError("bad_catalog", f"{where}: the environment variable {raw['url_env']} is not set",
                           hint="set it to the database's URL (postgresql://role:password@host:5432/db)")
    if not url.startswith(("postgresql://", "postgres://")):
        raise CatalogError("bad_catalog", f"{where}: only PostgreSQL URLs are supported (postgresql://...)")
    table = _require(raw, "table", where)
    if not isinstance(table, str) or not TABLE_NAME.match(table):
        raise CatalogError("bad_catalog", f"{where}: table {table!r} is not a table name (schema.table or table)")
    return DatabaseSource(url=url, table=table,
                          refresh_minutes=_number(raw, "refresh_minutes", where, 1, 366 * 1440, 1440),
                          statement_seconds=_number(raw, "statement_seconds", where, 1, 86400, 600))


def todos(raw: object, where: str = "") -> list[str]:
    """The dotted keys where a parsed catalog still holds a "TODO..." string (`veil site init` writes them)."""
    if isinstance(raw, dict):
        return [t for key, value in raw.items() for t in todos(value, f"{where}.{key}" if where else key)]
    if isinstance(raw, list):
        return [t for i, value in enumerate(raw) for t in todos(value, f"{where}[{i}]")]
    return [where] if isinstance(raw, str) and raw.startswith("TODO") else []


def load_catalog(path: str | Path, allow_todos: re.Pattern[str] | None = None) -> Catalog:
    """Read and check a site catalog. Relative paths in it are relative to the file.

    A TODO left by `veil site init` is refused, except where its dotted key matches `allow_todos` (the
    steward's tools that complete a draft: a column's TODO bounds or categories then read as undeclared)."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogError("bad_catalog", f"no site catalog at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError("bad_catalog", f"{path} is not valid TOML: {exc}") from None
    left = [key for key in todos(raw) if allow_todos is None or not allow_todos.match(key)]
    if left:
        raise CatalogError("bad_catalog", f"{path} still has {len(left)} TODO(s) to declare: {', '.join(left)}",
                           hint="replace each TODO with the public fact it asks for (README, \"Set up your own "
                                "site\"); the executor never takes them from the data")
    site = _require(raw, "site", str(path))
    base = path.parent
    database_url = site.get("database", "sqlite:///veil.db")
    if database_url.startswith("sqlite:///") and not database_url.startswith("sqlite:////"):
        database_url = "sqlite:///" + str((base / database_url.removeprefix("sqlite:///")).resolve())
    datasets = {name: _dataset(name, d, base) for name, d in raw.get("datasets", {}).items()}
    default_l1_epsilon = _budget(site, "default_l1_epsilon", "[site]", 1.0)
    return Catalog(
        site=_check_name(_require(site, "name", "[site]"), "[site]"),
        title=site.get("title", site["name"]),
        database_url=database_url,
        reporting_delta=_number(site, "reporting_delta", "[site]", limits.MIN_DELTA, 1e-3, 1e-6),
        default_l1_epsilon=default_l1_epsilon,
        datasets=datasets,
        path=path,
        audit_key=(base / site.get("audit_key", "audit-signing.key")).resolve(),
        levels=level_rules(raw.get("levels", {}), default_l1_epsilon),
        max_training_seconds=_number(site, "max_training_seconds", "[site]", 0.01, 7 * 86400, 3600.0),
        limits=_site_limits(raw.get("limits", {})),
        peers={name: _peer(name, peer, site["name"]) for name, peer in raw.get("peers", {}).items()},
        witness_minutes=_number(site, "witness_minutes", "[site]", 0, 7 * 1440, 60.0),
        standing_check_seconds=_number(site, "standing_check_seconds", "[site]", 1, 86400, 60.0),
    )


MAPPED: dict[pl.DataType, str] = {
    pl.Int8(): "Int32", pl.Int16(): "Int32", pl.UInt8(): "Int32", pl.UInt16(): "Int32", pl.UInt32(): "Int64",
    pl.UInt64(): "Int64", pl.Float32(): "Float64", pl.Categorical(): "String",
}
"""File dtypes the catalog declares as another (the site casts them on reading): dtype -> declared dtype."""


def declared_dtype(found: pl.DataType) -> str | None:
    """The catalog dtype for a file column's dtype: itself if the catalog has it, its mapping, or None."""
    exact = next((name for name, dtype in DTYPES.items() if dtype == found), None)
    return exact or MAPPED.get(found) or ("String" if isinstance(found, pl.Enum) else None)


def _dtype_problem(name: str, declared: pl.DataType, found: pl.DataType) -> str | None:
    """What is wrong with a file column of dtype `found` declared `declared` (None: it is read as declared)."""
    mapped = declared_dtype(found)
    if found == declared or (mapped is not None and DTYPES[mapped] == declared):
        return None
    fix = f"declare it {mapped}" if mapped else "not supported: cast it in the file or in a database view"
    return f"column '{name}' is declared {declared} but the file's is {found} ({fix})"


def check_data_matches(dataset: Dataset) -> None:
    """Refuse to serve a dataset whose file differs from the catalog: a column missing, undeclared or of
    another dtype, or nulls in a column the catalog says has none. Each problem names its column."""
    if not dataset.path.is_file():
        raise CatalogError("bad_catalog", f"dataset '{dataset.name}': no file at {dataset.path}")
    actual = pl.scan_parquet(dataset.path).collect_schema()
    expected = dataset.schema()
    problems = [p for name, dtype in expected.items() if name in actual
                and (p := _dtype_problem(name, dtype, actual[name])) is not None]
    problems += [f"column '{name}' ({dtype}) is declared but not in the file"
                 for name, dtype in expected.items() if name not in actual]
    problems += [f"the file's column '{name}' ({dtype}) is not declared" for name, dtype in actual.items()
                 if name not in expected]
    if problems:
        raise CatalogError("bad_catalog", f"dataset '{dataset.name}' does not match its file: " + "; ".join(problems),
                           hint="declare each column of the file with its exact dtype (veil site init drafts "
                                "them), or fix the file")
    required = [c.name for c in dataset.columns.values() if not c.nullable]
    nulls = dataset.scan().select(pl.col(required).null_count()).collect().row(0, named=True) \
        if required else {}
    if any(nulls.values()):
        found = ", ".join(f"'{name}' ({count} nulls)" for name, count in nulls.items() if count)
        raise CatalogError("bad_catalog", f"dataset '{dataset.name}': column(s) {found} hold nulls, but the catalog "
                           "says they have none (nullable = false)",
                           hint="declare them nullable = true (then GROUP BY shows a null group, and counts and "
                                "sums leave the nulls out), or fix the file")
