"""IPython magics of the Veil kernel: %veil datasets|budget|mode, %%veil sql, %%veil cost."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import polars as pl
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

from veil.kernel.errors import VeilError
from veil.kernel.result import Result
from veil.kernel.sdk import RELEASE_LISTENERS, Site
from veil.sql import parse_sql

USAGE = ("%veil datasets | %veil budget | %veil mode mock|live | "
         "%%veil sql [--site A,B | --all] [--epsilon E | --rho R] [--delta D] [--confidence C] | %%veil cost")


def _sql_args(line: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="%%veil sql", add_help=False, exit_on_error=False)
    parser.add_argument("--site", default=None)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--epsilon", type=float, default=None)
    parser.add_argument("--rho", type=float, default=None)
    parser.add_argument("--delta", type=float, default=None)
    parser.add_argument("--confidence", type=float, default=0.95)
    try:
        args, extra = parser.parse_known_args(shlex.split(line))
    except argparse.ArgumentError as exc:
        raise VeilError(f"%%veil sql: {exc}; usage: {USAGE}") from None
    if extra:
        raise VeilError(f"%%veil sql: unknown arguments {extra}; usage: {USAGE}")
    return args


@magics_class
class VeilMagics(Magics):
    """`%veil ...` and `%%veil ...`; the study is the `study` object of the user namespace."""

    def __init__(self, shell: Any, kernel: Any) -> None:
        super().__init__(shell)
        self.kernel = kernel
        self._cost_run: dict[str, list[float]] | None = None
        RELEASE_LISTENERS.append(self._on_release)

    @property
    def study(self) -> Any:
        return self.shell.user_ns["study"]

    def _on_release(self, site: Site, result: Result) -> None:
        if result.mock:
            if self._cost_run is not None:
                self._cost_run.setdefault(site.name, []).append(result.release.cost.rho)
            return
        event = {"site": site.name, **result.provenance}
        self.kernel.send_budget_event(event)

    @line_cell_magic
    def veil(self, line: str, cell: str | None = None) -> Any:
        words = line.split(maxsplit=1)
        command, rest = (words[0], words[1] if len(words) > 1 else "") if words else ("", "")
        if cell is None and command == "datasets":
            return self._datasets()
        if cell is None and command == "budget":
            return self._budget()
        if cell is None and command == "mode":
            return self._mode(rest.strip())
        if cell is not None and command == "sql":
            return self._sql(rest, cell)
        if cell is not None and command == "cost":
            return self._cost(cell)
        raise VeilError(f"unknown %veil command '{line}'; usage: {USAGE}")

    def _datasets(self) -> pl.DataFrame:
        rows = [{"site": s.name, "dataset": d.name, "level": d.level, "title": d.info.title,
                 "columns": len(d.info.columns)} for s in self.study.sites.values() for d in s.datasets.values()]
        return pl.DataFrame(rows)

    def _budget(self) -> pl.DataFrame:
        rows = [{"site": s.name, "dataset": g.dataset, "granted_epsilon": g.epsilon,
                 "spent_epsilon": round(g.epsilon_spent, 4), "remaining_rho": g.rho_remaining,
                 "largest_next_epsilon": round(g.epsilon_remaining, 4)}
                for s in self.study.sites.values() for g in s.budget()]
        return pl.DataFrame(rows)

    def _mode(self, mode: str) -> None:
        self.study.mode = mode
        print("Veil mode: LIVE — releases spend privacy budget at the sites." if mode == "live" else
              "Veil mode: MOCK — queries run locally on made-up rows; nothing is spent, results are not real.")

    def _sql(self, line: str, cell: str) -> Any:
        args = _sql_args(line)
        dataset = parse_sql(cell).dataset
        names = None if args.all or not args.site else [s.strip() for s in args.site.split(",")]
        if args.all or names is None or len(names) > 1:
            target = self.study.dataset(dataset, names)
        else:
            target = self.study.sites[names[0]].datasets[dataset]
        result = target.sql(cell).release(epsilon=args.epsilon, rho=args.rho, delta=args.delta,
                                          confidence=args.confidence)
        display(result)
        return None

    def _cost(self, cell: str) -> None:
        """Run the cell in mock mode and total, per site, the rho a live run would charge (rho adds up;
        the ledger turns it into epsilon with `%veil budget`). Nothing is spent."""
        previous, self.study.mode, self._cost_run = self.study.mode, "mock", {}
        try:
            outcome = self.shell.run_cell(cell, store_history=False)
            spent = self._cost_run
        finally:
            self.study.mode, self._cost_run = previous, None
        outcome.raise_error()
        print("Veil cost: the cell ran in MOCK mode; this is what it would charge live. Nothing was spent.")
        totals = {site: sum(rhos) for site, rhos in spent.items()}
        frame = pl.DataFrame([{"site": site, "releases": len(spent[site]), "rho": rho} for site, rho in totals.items()],
                             schema={"site": pl.String, "releases": pl.Int64, "rho": pl.Float64})
        display(frame, metadata={"veil": {"cost_rho": totals}})


def register(shell: Any, kernel: Any) -> None:
    """Called by the Veil kernel at start."""
    shell.register_magics(VeilMagics(shell, kernel))
