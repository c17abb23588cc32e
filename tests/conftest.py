"""Shared fixtures: a small synthetic cohort, state databases (SQLite always, PostgreSQL when
VEIL_TEST_POSTGRES_URL names a server), and real executors on loopback with tokens and grants."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import tomli_w
from sqlalchemy import Engine, create_engine, text

from veil.executor import ledger
from veil.executor.auth import create_token
from veil.executor.catalog import Catalog, load_catalog
from veil.executor.public_data import DATASET, write_sites
from veil.executor.store import open_store, write
from veil.executor.synth import synthesize
from veil.kernel.client import SiteClient
from veil.local import LocalExecutor

POSTGRES_URL = os.environ.get("VEIL_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]
PROJECT = "study1"


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sites (~3,000 patients each), shared read-only by all tests."""
    root = tmp_path_factory.mktemp("cohort")
    synthesize(root, sites=3, patients=3000, seed=11)
    return root


@pytest.fixture(scope="session")
def site_config(cohort: Path) -> Path:
    return cohort / "north" / "site.toml"


def _postgres_database() -> tuple[str, Callable[[], None]]:
    """A fresh, empty PostgreSQL database and a function that drops it."""
    assert POSTGRES_URL
    name = f"veil_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def make_database(backend: str, directory: Path) -> tuple[str, Callable[[], None]]:
    if backend == "sqlite":
        return f"sqlite:///{directory / f'state-{uuid.uuid4().hex[:8]}.db'}", lambda: None
    return _postgres_database()


@dataclass
class Deployment:
    """A real executor process with its catalog, state database and tokens per role."""

    executor: LocalExecutor
    catalog: Catalog
    engine: Engine
    database_url: str
    tokens: dict[str, str]
    clients: list[SiteClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.executor.url

    def client(self, who: str = "researcher") -> SiteClient:
        c = SiteClient(self.catalog.site, self.url, self.tokens[who])
        self.clients.append(c)
        return c

    def http(self, who: str | None = "researcher") -> httpx.Client:
        """A raw HTTP client, for requests the SDK would never send."""
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> None:
        """Stop the executor and let go of clients and connections."""
        self.executor.stop()
        for c in self.clients:
            c.close()
        self.engine.dispose()

    def spent(self, dataset: str) -> dict[str, float]:
        """study1's spending on `dataset` here: rho, delta, and epsilon (releases and DP-SGD composed)."""
        grant = next(g for g in ledger.list_grants(self.engine, PROJECT, 1e-6) if g.dataset == dataset)
        with self.engine.connect() as conn:
            row = ledger.grant_row(conn, PROJECT, dataset)
        assert row is not None
        return {"rho": grant.rho_spent, "delta": grant.delta_spent, "epsilon": row["approx_epsilon_spent"]}

    def approve_training(self, dataset: str, epsilon: float, delta: float = 1e-4) -> None:
        """The researcher applies for queries and training on `dataset`, and the steward approves."""
        with self.http() as http:
            app = http.post("/applications", json={
                "purpose": "A diagnosis-support model from biopsy features", "datasets": [dataset],
                "epsilon": epsilon, "delta": delta, "duration_days": 30, "uses": ["query", "training"]}).json()
        with self.http("steward") as http:
            review = {"decision": "approve", "comment": "training approved", "version": 1,
                      "on_existing_grant": "replace"}  # study1's query grant becomes this one
            assert http.post(f"/applications/{app['id']}/reviews", json=review).json()["status"] == "approved"

    def grant(self, project: str, dataset: str, epsilon: float) -> None:
        with write(self.engine) as conn:
            ledger.set_grant(conn, self.catalog, project, self.catalog.dataset(dataset), epsilon, by="test_steward")


def deploy(site_config: Path, database_url: str, log_dir: Path, grants: dict[str, float] | None = None,
           workers: int = 1, port: int | None = None) -> Deployment:
    """Tokens for a researcher (project study1), one of another project, a steward and an admin;
    grants for study1 (dataset -> epsilon); then the executor, started on `port` (default: a free one)."""
    catalog = load_catalog(site_config)
    engine = open_store(database_url)
    tokens = {
        "researcher": create_token(engine, "alice", "researcher", PROJECT),
        "outsider": create_token(engine, "bob", "researcher", "other_project"),
        "steward": create_token(engine, "carol", "steward", None),
        "admin": create_token(engine, "dave", "admin", None),
    }
    executor = LocalExecutor(site_config, database_url, port=port,
                             log=log_dir / f"executor-{uuid.uuid4().hex[:8]}.log", workers=workers)
    deployment = Deployment(executor, catalog, engine, database_url, tokens)
    for dataset, epsilon in (grants if grants is not None else {"encounters": 5.0}).items():
        deployment.grant(PROJECT, dataset, epsilon)
    deployment.executor.start()
    return deployment


def add_stewards(d: Deployment, token_dir: Path, stewards: dict[str, str]) -> None:
    """Steward tokens for `stewards` (name -> office), and every token of `d` written to `token_dir`
    (as `NAME.token`, for the steward CLI), which becomes `d.token_dir`."""
    for name, office in stewards.items():
        d.tokens[name] = create_token(d.engine, name, "steward", None, office)
    for who, token in d.tokens.items():
        (token_dir / f"{who}.token").write_text(token)
    d.token_dir = token_dir  # type: ignore[attr-defined]


@pytest.fixture
def deployer(site_config: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Deployment]]:
    """Start fresh deployments inside a test: deployer(backend, grants={...})."""
    started: list[tuple[Deployment, Callable[[], None]]] = []

    def start(backend: str = "sqlite", grants: dict[str, float] | None = None, workers: int = 1) -> Deployment:
        url, drop = make_database(backend, tmp_path)
        d = deploy(site_config, url, tmp_path, grants, workers)
        started.append((d, drop))
        return d

    yield start
    for d, drop in started:
        d.stop()
        drop()


@pytest.fixture(scope="module", params=BACKENDS)
def shared(request: pytest.FixtureRequest, site_config: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Deployment]:
    """One deployment per backend for a whole test module (tests must not depend on each other's spending)."""
    state = tmp_path_factory.mktemp("state")
    url, drop = make_database(request.param, state)
    d = deploy(site_config, url, state, {"encounters": 50.0, "patients": 50.0})
    yield d
    d.stop()
    drop()


def limited_config(site_config: Path, name: str, **settings: float) -> Path:
    """A copy of the site's catalog (beside it, so its relative paths hold) with a `[limits]` table."""
    path = site_config.with_name(f"site-{name}.toml")
    path.write_text(tomli_w.dumps({**tomllib.loads(site_config.read_text()), "limits": settings}))
    return path


SITES = ("north", "central", "valley")


@pytest.fixture(scope="module")
def sites(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Deployment]]:
    state = tmp_path_factory.mktemp("sites")
    started = {}
    for name in SITES:
        url, _ = make_database("sqlite", state)
        started[name] = deploy(cohort / name / "site.toml", url, state, {"encounters": 20.0, "patients": 20.0})
    yield started
    for d in started.values():
        d.executor.stop()
        d.engine.dispose()


@contextlib.contextmanager
def veil_kernel(root: Path, sites: dict[str, Deployment]) -> Iterator[Path]:
    """The `veil` kernelspec installed under `root`, and a study config for `sites`, in the environment."""
    subprocess.run([sys.executable, "-m", "veil.cli", "kernel", "install", "--prefix", str(root / "prefix")],
                   check=True, capture_output=True)
    study = write_study(root, sites)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "prefix" / "share" / "jupyter"))
        mp.setenv("VEIL_STUDY", str(study))
        mp.setenv("IPYTHONDIR", str(root / "ipython"))
        yield root


@pytest.fixture(scope="module", params=BACKENDS)
def cancer_sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[dict[str, Deployment]]:
    """Three executors holding 45/33/22% of scikit-learn's 569 breast-cancer patients (L2), each with
    study1 approved for queries and training (epsilon 12)."""
    root = tmp_path_factory.mktemp("cancer")
    started, drops = {}, []
    for config in write_sites(root, sites=SITES):
        url, drop = make_database(request.param, root)
        d = deploy(config, url, root, grants={})
        d.approve_training(DATASET, 12.0)
        started[d.catalog.site] = d
        drops.append(drop)
    yield started
    for d in started.values():
        d.stop()
    for drop in drops:
        drop()


def write_study(directory: Path, sites: dict[str, Deployment], urls: dict[str, str] | None = None) -> Path:
    """A researcher's study config for these sites (project study1), with token files beside it."""
    for name, d in sites.items():
        (directory / f"{name}.token").write_text(d.tokens["researcher"] + "\n")
    path = directory / "study.toml"
    path.write_text(tomli_w.dumps({
        "study": {"name": "test_study", "project": "study1"},
        "sites": {name: {"url": (urls or {}).get(name, d.url), "token_file": f"{name}.token",
                         "guard_paths": [str(d.catalog.path.parent)]} for name, d in sites.items()},
    }))
    return path
