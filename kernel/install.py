"""Install the `veil` kernelspec (the wheel also ships it as shared-data in `share/jupyter/kernels/veil`)."""

from __future__ import annotations

import sys
from pathlib import Path

KERNEL_NAME = "veil"
KERNELSPEC_DIR = Path(__file__).with_name("kernelspec")


def install_kernelspec(user: bool = False, sys_prefix: bool = False, prefix: str | None = None) -> str:
    """Copy the packaged kernelspec into Jupyter's kernels folder; return the folder it now lives in.

    `user`: the user's Jupyter data dir; `sys_prefix`: this Python environment; `prefix`: PREFIX/share/
    jupyter/kernels. With none of them, jupyter_client's system-wide location (may need root).
    """
    from jupyter_client.kernelspec import KernelSpecManager

    if sum([user, sys_prefix, prefix is not None]) > 1:
        raise ValueError("choose at most one of user, sys_prefix and prefix")
    if sys_prefix:
        prefix = sys.prefix
    return str(KernelSpecManager().install_kernel_spec(
        str(KERNELSPEC_DIR), kernel_name=KERNEL_NAME, user=user, prefix=prefix))
