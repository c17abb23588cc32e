"""`veil syft serve`: log in to syft as the data owner, publish the site's datasets, answer jobs until stopped.

Run in the bridge's own environment (.venv-syft) by `veil syft serve`; the executor is reached over HTTP.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

from veil_syft.api import ExecutorAPI
from veil_syft.bridge import Bridge


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="veil syft serve", description=__doc__)
    p.add_argument("--site-config", required=True, help="the site's site.toml (its name)")
    p.add_argument("--executor-url", default=os.environ.get("VEIL_EXECUTOR_URL", "http://127.0.0.1:8000"))
    p.add_argument("--token-file", required=True, help="the project's researcher token the bridge queries with")
    p.add_argument("--email", default=None, help="the data owner's syft (Google) account")
    p.add_argument("--token-path", default=None, help="syft's Google OAuth token file")
    p.add_argument("--state-dir", default=None, help="where the bridge keeps its releases (default: beside site.toml)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between syncs")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    args = p.parse_args(argv)

    config = Path(args.site_config)
    site = tomllib.loads(config.read_text())["site"]["name"]
    token = Path(args.token_file).read_text().strip()
    from syft_rds import login_do  # PySyft 0.10's data-owner login (Google Drive transport)

    rds = login_do(email=args.email, token_path=args.token_path)
    state = Path(args.state_dir) if args.state_dir else config.parent / "syft-bridge"
    bridge = Bridge(rds, ExecutorAPI(args.executor_url, token), site, state)
    print(f"publishing site '{site}': {bridge.publish() or 'nothing new'}", flush=True)
    while True:
        for outcome in bridge.process():
            print(f"job {outcome.job} from {outcome.submitter}: {outcome.status}: {outcome.message}", flush=True)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
