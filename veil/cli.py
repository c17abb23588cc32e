"""The `veil` command: data synthesis, the site executor and its tokens, the steward's desk, audit, the demo."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from veil.steward import add_commands as add_steward_commands

if TYPE_CHECKING:
    from veil.executor.surveillance_data import VisitsSpec


def _synth(args: argparse.Namespace) -> int:
    if args.format == "omop":
        from veil.executor.omop import synthesize_omop

        if args.sites != 3:
            raise SystemExit("veil data synth --format omop writes three hospitals (north, central, valley)")
        if _visits_spec(args) is not None:
            raise SystemExit("--outbreak, --surveillance-start and --weeks go with --format veil")
        paths = synthesize_omop(Path(args.out), persons=args.patients, seed=args.seed, database_url=args.database_url)
    else:
        from veil.executor.synth import synthesize

        if args.database_url:
            raise SystemExit("--database-url goes with --format omop")
        try:
            paths = synthesize(Path(args.out), sites=args.sites, patients=args.patients, seed=args.seed,
                               visits=_visits_spec(args))
        except ValueError as exc:
            raise SystemExit(f"veil data synth: {exc}") from None
    for path in paths:
        print(f"wrote {path}")
    return 0


def _visits_spec(args: argparse.Namespace) -> VisitsSpec | None:
    """The surveillance visits asked for by --outbreak, --surveillance-start or --weeks (None: none of them)."""
    from datetime import date

    from veil.executor.surveillance_data import WEEKS, VisitsSpec, default_start, parse_outbreak

    if not args.outbreak and args.surveillance_start is None and args.weeks is None:
        return None
    try:
        start = date.fromisoformat(args.surveillance_start) if args.surveillance_start else default_start()
    except ValueError:
        raise SystemExit(f"veil data synth: --surveillance-start {args.surveillance_start!r} is not a date "
                         "(YYYY-MM-DD, a Monday)") from None
    try:
        return VisitsSpec(start, WEEKS if args.weeks is None else args.weeks,
                          tuple(parse_outbreak(o) for o in args.outbreak))
    except ValueError as exc:
        raise SystemExit(f"veil data synth: {exc}") from None


def _site_init(args: argparse.Namespace) -> int:
    """Draft a site catalog for the steward to complete (README, "Set up your own site")."""
    from veil.executor import draft
    from veil.executor.omop import draft_catalog

    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists: choose another --out, or --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    url = args.database_url or (os.environ.get(args.url_env) if args.url_env else None)
    if args.omop:
        if args.persons_bound is None:
            raise SystemExit("--omop needs --persons-bound N: a public upper bound on the site's persons")
        draft_catalog(out, args.site, args.title or args.site, args.persons_bound, parquet=args.schema is None,
                      url_env=args.url_env or "VEIL_OMOP_URL", schema=args.schema)
        where = f"in schema {args.schema}" if args.schema else "as Parquet files beside it"
        print(f"wrote {out}: the OMOP CDM tables ({where}); check the levels, rows per person and bounds it proposes")
        return 0
    source = args.source
    if source.endswith(".parquet"):
        found = Path(source).resolve()
        name = args.name or found.stem
        text = draft.draft(name, draft.file_schema(found), path=os.path.relpath(found, out.parent.resolve()),
                           site=args.site)
    else:
        if not url:
            raise SystemExit(f"reading table {source}'s schema needs --database-url or ${args.url_env or 'VEIL_SOURCE_URL'}")
        name = args.name or source.split(".")[-1]
        text = draft.draft(name, draft.table_schema(url, source), source_table=source,
                           url_env=args.url_env or "VEIL_SOURCE_URL", site=args.site)
    out.write_text(text)
    from veil.executor.catalog import todos

    print(f"wrote {out}: dataset '{name}' with {len(todos(tomllib.loads(text)))} TODO(s) for the data steward; the "
          "executor refuses to start until each is declared")
    return 0


def _site_bounds(args: argparse.Namespace) -> int:
    """DP estimates of numeric columns' bounds, charged to the dataset's lifetime cap and audited."""
    from veil.executor import bounds
    from veil.executor.catalog import load_catalog

    ranges = {name: (float(lo), float(hi)) for name, lo, hi in args.column}
    result = bounds.estimate(args.site_config, args.dataset, ranges, args.epsilon, args.by,
                             quantiles=(args.quantiles[0], args.quantiles[1]), database_url=args.database_url)
    print(f"dataset {result.dataset}: quantiles {result.quantiles[0]:g} and {result.quantiles[1]:g}, epsilon "
          f"{result.epsilon:.3g} charged to its lifetime cap (audit #{result.receipt.seq}, receipt "
          f"{result.receipt.hash[:16]})")
    for e in result.estimates:
        print(f"  {e.column}: [{e.lower:g}, {e.upper:g}]  (searched [{e.search[0]:g}, {e.search[1]:g}])")
    if args.write:
        dataset = load_catalog(args.site_config, allow_todos=bounds.DRAFT_TODOS).dataset(args.dataset)
        untouched = bounds.write_into(args.site_config, result,
                                      {name: dataset.columns[name].is_integer for name in ranges})
        print(f"wrote the estimates into {args.site_config}"
              + (f"; left alone (their bounds were not a TODO): {', '.join(untouched)}" if untouched else ""))
    else:
        print("review them, then declare them as the columns' bounds in site.toml (or rerun with --write: "
              "that spends the budget again)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import uvicorn

    from veil.executor.app import DATABASE_URL_ENV, SHUTDOWN_SECONDS, SITE_CONFIG_ENV, create_app
    from veil.executor.observability import (
        LOG_FORMAT_ENV,
        METRICS_TOKEN_ENV,
        MULTIPROCESS_ENV,
        configure_logging,
        uvicorn_log_config,
    )
    from veil.executor.site import Site

    if 0 < len(os.environ.get(METRICS_TOKEN_ENV, "")) < 16:
        print(f"error: {METRICS_TOKEN_ENV} is set but shorter than 16 characters; use a long random secret",
              file=sys.stderr)
        return 2
    os.environ[LOG_FORMAT_ENV] = args.log_format  # the worker processes log alike
    configure_logging(args.log_format)
    site = Site.open(args.site_config, args.database_url)  # fails early, with a clear message
    print(f"veil executor for site '{site.catalog.site}' on http://{args.host}:{args.port}"
          f" ({args.workers} worker{'s' if args.workers > 1 else ''})", flush=True)
    common = {"host": args.host, "port": args.port, "log_level": args.log_level, "access_log": False,
              "log_config": uvicorn_log_config(args.log_format), "timeout_graceful_shutdown": SHUTDOWN_SECONDS}
    if args.workers == 1:
        uvicorn.run(create_app(site), **common)
        return 0
    site.close()
    site.engine.dispose()
    os.environ[SITE_CONFIG_ENV] = str(Path(args.site_config).resolve())
    if args.database_url:
        os.environ[DATABASE_URL_ENV] = args.database_url
    metrics_dir = None
    if not os.environ.get(MULTIPROCESS_ENV):  # /metrics then adds up every worker's counters
        metrics_dir = os.environ[MULTIPROCESS_ENV] = tempfile.mkdtemp(prefix="veil-metrics-")
    try:
        uvicorn.run("veil.executor.app:app_from_environment", factory=True, workers=args.workers, **common)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _supernode(args: argparse.Namespace) -> int:
    """Run Flower's SuperNode beside this site's executor: it connects outward to a study's SuperLink and
    trains the site's parts of studies through the executor's ledger (the site's catalog and database): with
    `--executor-url`, by relaying each round to the running executor (veil.executor.supernode)."""
    import shutil

    from veil.executor.catalog import load_catalog

    catalog_path = Path(args.site_config).resolve()
    catalog = load_catalog(catalog_path)
    database = args.database_url or catalog.database_url
    binary = shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))
    security = ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
    relay = f" executor='{args.executor_url.rstrip('/')}'" if args.executor_url else ""
    command = [binary, *security, "--superlink", args.superlink, "--clientappio-api-address", args.clientappio,
               "--node-config", f"catalog='{catalog_path}' database='{database}' site='{catalog.site}'{relay}"]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.execv(binary, command)
    return 1  # not reached


def _open(args: argparse.Namespace, signing: bool = False):  # type: ignore[no-untyped-def]
    """The site's catalog and state database; `signing` for commands that write audit entries."""
    from veil.executor import checkpoints
    from veil.executor.catalog import load_catalog
    from veil.executor.store import open_store

    catalog = load_catalog(args.site_config)
    engine = open_store(args.database_url or catalog.database_url)
    if signing:  # the entries this command writes are checkpointed like the executor's
        checkpoints.register(engine, checkpoints.Signer.load(catalog.site, catalog.audit_key))
    return catalog, engine


def _token(args: argparse.Namespace) -> int:
    from veil.executor.auth import create_token

    _, engine = _open(args, signing=True)
    try:
        token = create_token(engine, args.principal, args.role, args.project, args.office)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.write_text(token + "\n")
        out.chmod(0o600)
        print(f"token for {args.principal} ({args.role}) written to {out}")
    else:
        print(token)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from veil.executor.auth import revoke_token

    _, engine = _open(args, signing=True)
    token_id = args.token.split("_")[1] if args.token.startswith("veil_") else args.token
    if not revoke_token(engine, token_id, by=args.by):
        print(f"error: no active token with id '{token_id}'", file=sys.stderr)
        return 2
    print(f"token {token_id} revoked")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from veil.executor import checkpoints, witness
    from veil.executor.audit import verify

    catalog, engine = _open(args)
    key = checkpoints.site_key(catalog.site, catalog.audit_key)
    published: list[checkpoints.Checkpoint] = []
    if args.checkpoints:
        try:
            with open(args.checkpoints) as f:
                published = checkpoints.read(f)
        except (OSError, ValidationError, ValueError) as exc:
            print(f"error: cannot read checkpoints from {args.checkpoints}: {exc}", file=sys.stderr)
            return 2
    witnessed, unreachable = witness.gather(catalog) if args.witnesses else ({}, [])
    result = verify(engine, key, published, witnessed)
    result.problems.extend(unreachable)
    if key is None:
        with engine.connect() as conn:
            signed = bool(checkpoints.stored(conn, catalog.site, latest=True))
        if signed or published or witnessed:
            result.problems.append(f"no audit-signing key at {catalog.audit_key} (or its .pub): the signed "
                                   "checkpoints cannot be checked; restore the key or set audit_key in site.toml")
    if result.ok:
        if key is None:
            signed_note = f" (no audit-signing key at {catalog.audit_key}: no checkpoints checked)"
        else:
            stored = result.checkpoints - len(published) - sum(map(len, witnessed.values()))
            signed_note = f", {stored} signed checkpoints match (site key {key.key_id})"
        print(f"audit log OK: {result.entries} entries, chain intact, ledger matches the releases{signed_note}")
        if published:
            print(f"all {len(published)} checkpoints in {args.checkpoints} are signed by this site and match the log")
        for peer, heads in witnessed.items():
            print(f"peer {peer}: the log extends all {len(heads)} heads it witnessed")
        return 0
    print(f"audit log FAILED verification ({result.entries} entries):")
    for problem in result.problems:
        print(f"  - {problem}")
    return 1


def _witness(args: argparse.Namespace) -> int:
    from veil.errors import CatalogError
    from veil.executor import witness

    catalog, engine = _open(args)
    if not catalog.peers:
        raise CatalogError("no_peers", f"{args.site_config} has no [peers]: nobody to push the audit head to",
                           hint="add a [peers.NAME] table (url, public_key) for each site that witnesses this one")
    outcomes = witness.push(catalog, engine)
    for outcome in outcomes:
        print(f"peer {outcome.peer}: {'accepted' if outcome.ok else 'NOT accepted'}: {outcome.detail}")
    return 0 if all(o.ok for o in outcomes) else 1


def _key(args: argparse.Namespace) -> int:
    from veil.executor import checkpoints
    from veil.executor.catalog import load_catalog

    catalog = load_catalog(args.site_config)
    print(checkpoints.Signer.load(catalog.site, catalog.audit_key).key.public_hex)
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from veil.executor import checkpoints

    catalog, engine = _open(args)
    with engine.connect() as conn:
        found = checkpoints.stored(conn, catalog.site, latest=args.latest)
    out = open(args.out, "w") if args.out else sys.stdout
    try:
        for cp in found:
            out.write(cp.model_dump_json() + "\n")
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"wrote {len(found)} signed checkpoints to {args.out}; publish them outside the site")
    return 0


def _export(args: argparse.Namespace) -> int:
    from veil.executor.audit import entries, export_text, reported

    catalog, engine = _open(args)
    since = args.since or "0"
    found = entries(engine, since=int(since)) if since.isdigit() else [e for e in entries(engine) if e.ts >= since]
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        out.write(export_text((reported(e, catalog.reporting_delta) for e in found), args.format))
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"wrote {len(found)} audit entries to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from veil.demo import DemoError, run_demo

    lab = "headless" if args.headless else "no-browser" if args.no_browser else "none" if args.no_lab or args.serve \
        else "browser"
    try:
        return run_demo(Path(args.dir), patients=args.patients, reset=args.reset, lab=lab, port=args.port,
                        serve=args.serve)
    except DemoError as exc:
        print(f"veil demo: {exc}", file=sys.stderr)
        return 2


def _kernel_install(args: argparse.Namespace) -> int:
    from veil.kernel.install import install_kernelspec

    user = args.user or not (args.sys_prefix or args.prefix)
    where = install_kernelspec(user=user, sys_prefix=args.sys_prefix, prefix=args.prefix)
    print(f"installed kernelspec 'veil' (\"Veil (private data)\") in {where}")
    return 0


def _receipts_verify(args: argparse.Namespace) -> int:
    from veil.kernel.receipts import verify_notebook
    from veil.kernel.study import load_study

    notebook = Path(args.notebook)
    if not notebook.is_file():
        print(f"there is no notebook at {notebook}: give the path of the .ipynb whose releases to check",
              file=sys.stderr)
        return 2
    checked, problems = verify_notebook(load_study(args.study), notebook)
    if problems:
        print(f"{len(problems)} of {checked} recorded releases are not confirmed by the sites:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"all {checked} recorded releases are confirmed by the sites' audit logs")
    return 0


def _syft_serve(args: argparse.Namespace) -> int:
    """Run the PySyft bridge (veil_syft/, in the checkout) in its own environment: it reaches the executor over
    HTTP only, so PySyft's dependencies never meet the site's."""
    root = Path(__file__).resolve().parent.parent
    venv = Path(os.environ.get("VEIL_SYFT_VENV") or root / ".venv-syft")
    python = venv / "bin" / "python"
    if not python.exists() or not (root / "veil_syft").is_dir():
        print(f"veil syft serve: the PySyft bridge runs in its own environment, and {python} is missing: run "
              f"'bash scripts/setup-syft.sh' in the Veil checkout ({root})", file=sys.stderr)
        return 2
    rest = ["--executor-url", args.executor_url, "--token-file", args.token_file, "--interval", str(args.interval)]
    for flag, value in (("--email", args.email), ("--token-path", args.token_path), ("--state-dir", args.state_dir)):
        rest += [flag, value] if value else []
    rest += ["--once"] if args.once else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    os.execve(python, [str(python), "-m", "veil_syft.serve", "--site-config", args.site_config, *rest], env)
    return 0  # not reached


def _env(name: str, default: str | None = None) -> str | None:
    """An option's default from the environment (twelve-factor): the command line still wins."""
    return os.environ.get(name) or default


def _site_args(p: argparse.ArgumentParser) -> None:
    config = _env("VEIL_SITE_CONFIG")
    p.add_argument("--site-config", "--config", dest="site_config", required=config is None, default=config,
                   help="the site's catalog (site.toml) [env VEIL_SITE_CONFIG]")
    p.add_argument("--database-url", default=_env("VEIL_DATABASE_URL"),
                   help="state database (default: the catalog's; e.g. postgresql+psycopg://host/db) "
                        "[env VEIL_DATABASE_URL]")


SERVE_ENVIRONMENT = """environment (an option on the command line wins over its variable):
  VEIL_SITE_CONFIG     the site's catalog, as --site-config/--config
  VEIL_DATABASE_URL    the state database, as --database-url
  VEIL_HOST, VEIL_PORT, VEIL_WORKERS, VEIL_LOG_LEVEL
                       as --host, --port, --workers, --log-level
  VEIL_LOG_FORMAT      json (default: one JSON object a line per request) or text, as --log-format
  VEIL_METRICS_TOKEN   a secret (16+ characters) that lets a scraper read /metrics and nothing else;
                       stewards' and admins' tokens read /metrics too, researchers' do not
  PROMETHEUS_MULTIPROC_DIR
                       where several workers keep their counters (default: a temporary folder)
"""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="veil", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthetic data").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="write a synthetic multi-center pediatric rare-disease cohort")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--patients", type=int, default=10_000, help="patients per site")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=("veil", "omop"), default="veil",
                       help="veil: the pediatric rare-disease cohort; omop: an OMOP CDM v5.4 subset per hospital")
    synth.add_argument("--database-url", default=None,
                       help="with --format omop: write the tables into PostgreSQL (schema cdm_<site>), not Parquet")
    synth.add_argument("--outbreak", action="append", default=[], metavar="SITE:WEEK[:FACTOR]",
                       help="adds the surveillance dataset `visits` (emergency visits by date, region, age band and "
                            "syndrome) with ILI visits at SITE times FACTOR (3 by default) for 4 weeks from WEEK "
                            "(0-based); repeat it for several sites")
    synth.add_argument("--surveillance-start", default=None, metavar="DATE",
                       help="adds `visits`: the Monday its weekly series starts (default: 40 weeks before this "
                            "week's Monday)")
    synth.add_argument("--weeks", type=int, default=None, help="adds `visits`: weeks in its series (default 52)")
    synth.set_defaults(func=_synth)

    site = sub.add_parser("site", help="set up a site").add_subparsers(dest="action", required=True)
    init = site.add_parser("init", help="draft a site.toml for the data steward to complete (from a schema, "
                                        "never from rows)")
    what = init.add_mutually_exclusive_group(required=True)
    what.add_argument("--from", dest="source", help="a Parquet file, or a PostgreSQL table or view (schema.table)")
    what.add_argument("--omop", action="store_true", help="an OMOP CDM: every table Veil serves, with public "
                      "bounds and categories from the CDM's conventions and vocabulary")
    init.add_argument("--out", required=True, help="the site.toml to write")
    init.add_argument("--site", default="TODO_site_name", help="the site's name (letters, digits, _)")
    init.add_argument("--title", default=None)
    init.add_argument("--name", default=None, help="the dataset's name (default: the file's or table's)")
    init.add_argument("--database-url", default=None, help="PostgreSQL URL to read a table's schema (not written "
                      "to the catalog)")
    init.add_argument("--url-env", default=None, help="the environment variable the catalog names for the "
                      "database URL (default VEIL_SOURCE_URL, or VEIL_OMOP_URL with --omop)")
    init.add_argument("--schema", default=None, help="with --omop: the database schema holding the CDM "
                      "(default: Parquet files beside the catalog)")
    init.add_argument("--persons-bound", type=int, default=None, help="with --omop: a public upper bound on persons")
    init.add_argument("--force", action="store_true", help="overwrite --out")
    init.set_defaults(func=_site_init)
    estimate = site.add_parser("bounds", help="DP estimates of numeric columns' bounds where no public range is "
                               "known: charged to the dataset's lifetime cap and audited")
    _site_args(estimate)
    estimate.add_argument("--dataset", required=True)
    estimate.add_argument("--column", nargs=3, action="append", required=True, metavar=("NAME", "LOW", "HIGH"),
                          help="a column and a coarse public range its values surely lie in (the estimate is "
                               "picked from a grid over it); repeat for more columns")
    estimate.add_argument("--epsilon", type=float, required=True, help="the privacy loss of all the estimates")
    estimate.add_argument("--quantiles", type=float, nargs=2, default=(0.02, 0.98), metavar=("LOW", "HIGH"),
                          help="the quantiles taken as bounds (default: %(default)s); more extreme ones need more "
                               "patients in the tails or a larger epsilon to be found")
    estimate.add_argument("--by", default=getpass.getuser(), help="who asks, for the audit log (default: %(default)s)")
    estimate.add_argument("--write", action="store_true", help="replace the columns' TODO bounds in site.toml")
    estimate.set_defaults(func=_site_bounds)

    executor = sub.add_parser("executor", help="the site executor").add_subparsers(dest="action", required=True)
    serve = executor.add_parser("serve", help="serve a site's DP query API", epilog=SERVE_ENVIRONMENT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _site_args(serve)
    serve.add_argument("--host", default=_env("VEIL_HOST", "127.0.0.1"), help="[env VEIL_HOST] (default: %(default)s)")
    serve.add_argument("--port", type=int, default=_env("VEIL_PORT", "8700"), help="[env VEIL_PORT] (default: %(default)s)")
    serve.add_argument("--log-level", default=_env("VEIL_LOG_LEVEL", "warning"),
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="uvicorn's own messages [env VEIL_LOG_LEVEL] (default: %(default)s)")
    serve.add_argument("--log-format", default=_env("VEIL_LOG_FORMAT", "json"), choices=["json", "text"],
                       help="the executor's log, one line per request [env VEIL_LOG_FORMAT] (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=_env("VEIL_WORKERS", "1"),
                       help="worker processes; they share the state database, so budgets stay exact "
                            "[env VEIL_WORKERS] (default: %(default)s)")
    serve.set_defaults(func=_serve)

    supernode = executor.add_parser("supernode", help="join federated studies: Flower's SuperNode beside the executor")
    _site_args(supernode)
    supernode.add_argument("--superlink", required=True, help="the study's SuperLink Fleet API, HOST:PORT")
    supernode.add_argument("--clientappio", default="127.0.0.1:9094",
                           help="where the SuperNode serves its ClientApp processes (loopback)")
    supernode.add_argument("--executor-url", default=None,
                           help="this site's running executor (e.g. http://127.0.0.1:8000): each round is relayed "
                                "to it and trained there, warm, instead of in a new process per round")
    security = supernode.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-certificates", help="the SuperLink's CA certificate (TLS)")
    security.add_argument("--insecure", action="store_true", help="no TLS: for loopback tests only")
    supernode.set_defaults(func=_supernode)

    token = executor.add_parser("token", help="bearer tokens").add_subparsers(dest="token_action", required=True)
    create = token.add_parser("create", help="create a token; it is printed once")
    _site_args(create)
    create.add_argument("--role", required=True, choices=["researcher", "steward", "admin"])
    create.add_argument("--principal", required=True)
    create.add_argument("--project", default=None)
    create.add_argument("--office", default=None, choices=["data_center", "data_committee"],
                        help="a steward's office: L3 applications need a reviewer from each")
    create.add_argument("--out", default=None, help="write the token to this file (mode 600) instead of printing")
    create.set_defaults(func=_token)

    revoke = token.add_parser("revoke", help="revoke a token (give the token or its id)")
    _site_args(revoke)
    revoke.add_argument("token", help="the token, or its id: the 16 hex digits after 'veil_'")
    revoke.add_argument("--by", default="site-admin", help="who revokes it (audited)")
    revoke.set_defaults(func=_revoke)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    verify = audit.add_parser("verify", help="check the hash chain, the signed checkpoints and that the ledger "
                              "matches the chain")
    _site_args(verify)
    verify.add_argument("--checkpoints", default=None, metavar="FILE",
                        help="checkpoints published earlier (JSON lines from 'veil audit checkpoints'): each must be "
                             "signed by this site's key and still match the log")
    verify.add_argument("--witnesses", action="store_true",
                        help="ask every peer in site.toml's [peers] for the heads of this site it witnessed: the log "
                             "must extend each (an unreachable peer counts as not verified)")
    verify.set_defaults(func=_verify)

    push = audit.add_parser("witness", help="push the latest signed audit head to every peer in [peers] now, and "
                            "say which accepted it")
    _site_args(push)
    push.set_defaults(func=_witness)

    key = audit.add_parser("key", help="print this site's audit-signing public key (hex) for its peers' "
                           "[peers.NAME] public_key (made if absent)")
    _site_args(key)
    key.set_defaults(func=_key)

    signed = audit.add_parser("checkpoints", help="write the signed checkpoints of the audit log (JSON lines), "
                              "to publish outside the site")
    _site_args(signed)
    signed.add_argument("--latest", action="store_true", help="only the latest checkpoint")
    signed.add_argument("--out", default=None, help="a file (default: standard output)")
    signed.set_defaults(func=_checkpoints)

    export = audit.add_parser("export", help="write the audit log as JSON lines or CSV")
    _site_args(export)
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--since", default=None,
                        help="only entries after this sequence number, or at/after this ISO date or time")
    export.add_argument("--out", default=None, help="a file (default: standard output)")
    export.set_defaults(func=_export)

    add_steward_commands(sub)

    kernel = sub.add_parser("kernel", help="the Veil Jupyter kernel").add_subparsers(dest="action", required=True)
    install = kernel.add_parser("install", help="install the 'veil' kernelspec (default: --user)")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="in your Jupyter data dir (the default)")
    where.add_argument("--sys-prefix", action="store_true", help="in this Python environment (sys.prefix)")
    where.add_argument("--prefix", default=None, help="in PREFIX/share/jupyter/kernels")
    install.set_defaults(func=_kernel_install)

    receipts = sub.add_parser("receipts", help="a notebook's releases").add_subparsers(dest="action",
                                                                                         required=True)
    check = receipts.add_parser("verify", help="check every release a notebook records against the sites")
    check.add_argument("notebook")
    check.add_argument("--study", default=None, help="the study config (default: $VEIL_STUDY or ~/.veil/study.toml)")
    check.set_defaults(func=_receipts_verify)

    demo = sub.add_parser("demo", help="a multi-center study here: three hospitals' executors, then JupyterLab "
                          "on the tutorials")
    demo.add_argument("--dir", default=".veil-demo", help="where the demo's data and state live")
    demo.add_argument("--patients", type=int, default=20_000, help="patients per site")
    demo.add_argument("--reset", action="store_true", help="start from fresh data and state")
    demo.add_argument("--port", type=int, default=8888, help="JupyterLab's port")
    how = demo.add_mutually_exclusive_group()
    how.add_argument("--no-browser", action="store_true", help="start JupyterLab without a browser; print its URL")
    how.add_argument("--headless", action="store_true", help="run the tutorials and print their outcome")
    how.add_argument("--no-lab", action="store_true", help="stop after the executors' first answers")
    how.add_argument("--serve", action="store_true",
                     help="keep only the executors running (configs in DIR) until Ctrl-C")
    demo.set_defaults(func=_demo)

    syft = sub.add_parser("syft", help="PySyft 0.10 users: the bridge beside a site").add_subparsers(
        dest="action", required=True)
    bridge = syft.add_parser("serve", help="publish the site's datasets to PySyft and answer jobs with DP releases "
                             "only (runs in .venv-syft: scripts/setup-syft.sh)")
    bridge.add_argument("--site-config", "--config", dest="site_config", required=True, help="the site's site.toml")
    bridge.add_argument("--executor-url", default=_env("VEIL_EXECUTOR_URL", "http://127.0.0.1:8000"),
                        help="the site's executor [env VEIL_EXECUTOR_URL]")
    bridge.add_argument("--token-file", required=True, help="the project's researcher token the bridge queries with")
    bridge.add_argument("--email", default=None, help="the data owner's syft (Google) account")
    bridge.add_argument("--token-path", default=None, help="syft's Google OAuth token file")
    bridge.add_argument("--state-dir", default=None, help="where the bridge keeps its releases (default: beside "
                        "site.toml, syft-bridge/)")
    bridge.add_argument("--interval", type=float, default=10.0, help="seconds between syncs")
    bridge.add_argument("--once", action="store_true", help="one pass, then exit")
    bridge.set_defaults(func=_syft_serve)
    return root


def main(argv: list[str] | None = None) -> int:
    from veil.errors import VeilError
    from veil.extras import needs

    args = parser().parse_args(argv)
    try:
        with needs(f"'veil {' '.join(sys.argv[1:3] if argv is None else argv[:2])}'"):
            return int(args.func(args) or 0)
    except VeilError as exc:  # a site's refusal relayed by the client already says what to do
        said = str(exc)
        print(f"error: {said}" + (f"\n  hint: {exc.hint}" if exc.hint and exc.hint not in said else ""),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
