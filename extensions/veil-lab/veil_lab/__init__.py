"""The Veil jupyter_server extension: the lab extension's backend on the researcher's Jupyter server.

It talks to the executors with the credentials of the user's study config (and, for stewards, of a
steward config), so tokens stay on the server and never reach the browser. Enable it with
`jupyter server extension enable veil.lab` (the package installs the config that does it).
"""

from __future__ import annotations

from typing import Any

from veil.lab.app import VeilLabApp


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "veil.lab", "app": VeilLabApp}]


__all__ = ["VeilLabApp"]
