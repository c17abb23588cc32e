"""Speaking the Jupyter protocol to a kernel in tests: run code, collect iopub, read comm messages."""

from __future__ import annotations

from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient

TIMEOUT = 60


def execute(kc: BlockingKernelClient, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run `code`; return the execute_reply content and every iopub message it caused (comms included)."""
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=TIMEOUT)
    return reply["content"], iopub_until_idle(kc, msg_id)


def iopub_until_idle(kc: BlockingKernelClient, msg_id: str) -> list[dict[str, Any]]:
    """The iopub messages whose parent is `msg_id`, up to its idle status."""
    seen = []
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return seen
        seen.append(msg)


def comm_msgs(outputs: list[dict[str, Any]], comm_id: str) -> list[dict[str, Any]]:
    return [m["content"]["data"] for m in outputs if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id]
