"""Which optional install brings which library, and the error that names it.

`pip install veil` is the researcher's client; torch and Flower come with `veil[train]`, the
executor's service stack with `veil[site]`, JupyterLab with `veil[lab]` (pyproject.toml)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from veil.errors import VeilError

EXTRA_OF = {
    "torch": "train", "safetensors": "train", "flwr": "train",
    "fastapi": "site", "starlette": "site", "uvicorn": "site", "sqlalchemy": "site", "opacus": "site",
    "cryptography": "site", "mbi": "site", "sklearn": "site", "scipy": "site", "prometheus_client": "site",
    "alembic": "site",
    "jupyterlab": "lab", "jupyter_server": "lab", "matplotlib": "lab",
    "psycopg": "postgres", "ray": "simulation",
}


class MissingExtra(VeilError):
    """A feature whose libraries this installation does not have."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__("missing_extra", f"{what} needs {module}, which this installation of Veil does not have",
                         hint=f'pip install "veil[{extra}]"', status=501)
        self.extra = extra


@contextmanager
def needs(what: str) -> Iterator[None]:
    """Turn an import of an optional library inside the block into a `MissingExtra` naming its extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in EXTRA_OF:
            raise
        raise MissingExtra(what, EXTRA_OF[root], root) from exc
