"""The Jupyter server Galata drives: Galata's test settings, root allowed (CI runs as root)."""

from jupyterlab.galata import configure_jupyter_server

configure_jupyter_server(c)  # noqa: F821 - `c` is the config object Jupyter passes in
c.ServerApp.allow_root = True  # noqa: F821
