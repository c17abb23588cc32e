"""IPython magics of the Veil kernel: %veil datasets|budget|mode, %%veil sql, %%veil cost.

Declared with IPython's `magic_arguments`, so `%veil?` shows the usage and a wrong argument is a
`UsageError` that says which."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from veil.kernel.errors import VeilError, show_in_one_line
from veil.kernel.result import Result
from veil.kernel.sdk import RELEASE_LISTENERS, Site
from veil.sql import parse_sql
from veil.wire import Release

MAGIC_ARGUMENTS = (
    argument("command", nargs="?", choices=("datasets", "budget", "mode", "sql", "cost"),
             help="datasets, budget and mode are line magics (%%veil); sql and cost are cell magics (%%%%veil); "
                  "%%veil alone prints this help"),
    argument("mode", nargs="?", choices=("mock", "live"),
             help="with `mode`: mock (made-up rows, nothing spent) or live (real releases, charged); "
                  "without: which one is on"),
    argument("--site", help="sql: the site(s) to ask, comma separated (default: the study's default_site; "
                            "a study of several sites without one needs --site or --all)"),
    argument("--all", action="store_true", help="sql: ask every site and combine the releases"),
    argument("--epsilon", type=float, help="sql: the privacy loss of the release, in epsilon"),
    argument("--rho", type=float, help="sql: ... or in rho (zero-concentrated DP)"),
    argument("--accuracy", type=float,
             help="sql: ... or the half-width every count and sum must reach: the site charges the least loss for it"),
    argument("--delta", type=float, help="sql: delta, for releases that need one"),
    argument("--confidence", type=float, default=0.95,
             help="sql: the level of the intervals (default 0.95)"),
)
"""The arguments of %veil, for IPython's magic_arguments (so that `%veil?` shows them)."""


def _declared(magic: Callable[..., Any]) -> Callable[..., Any]:
    """`magic` with MAGIC_ARGUMENTS declared: its docstring becomes the usage `%veil?` shows."""
    for declare in reversed(MAGIC_ARGUMENTS):
        magic = declare(magic)
    declared: Callable[..., Any] = magic_arguments()(magic)
    return declared


@magics_class
class VeilMagics(Magics):
    """`%veil ...` and `%%veil ...`; the study is the `study` object of the user namespace."""

    def __init__(self, shell: Any, kernel: Any) -> None:
        super().__init__(shell)
        self.kernel = kernel
        self._cost_run: dict[str, list[Release]] | None = None
        RELEASE_LISTENERS.append(self._on_release)

    @property
    def study(self) -> Any:
        return self.shell.user_ns["study"]

    def _on_release(self, site: Site, result: Result) -> None:
        if result.mock:
            if self._cost_run is not None:
                self._cost_run.setdefault(site.name, []).append(result.release)
            return
        for provenance in result.provenance:
            self.kernel.send_budget_event({"site": site.name, **provenance})

    @_declared
    @line_cell_magic
    def veil(self, line: str, cell: str | None = None) -> Any:
        """Veil in a notebook: list datasets, show the budget, switch mode, release SQL, price a cell.

        %veil                   this help
        %veil datasets          which site offers what
        %veil budget            each grant: granted, spent, largest next release
        %veil mode [mock|live]  which mode is on, or switch: mock: made-up rows, nothing spent;
                                live: real releases, charged
        %%veil sql [--site A,B | --all] [--epsilon E | --rho R | --accuracy A] [--delta D] [--confidence C]
                                the cell's SQL as a DP release at the site(s)
        %%veil cost             run the cell in mock mode: what it would charge live, and the
                                half-widths its counts and sums would have
        """
        args = parse_argstring(self.veil, line)
        command = args.command
        if command is None:
            print(self.veil.__doc__)
            return None
        if args.mode is not None and command != "mode":
            raise UsageError("only %veil mode takes mock or live")
        if cell is None and command in ("sql", "cost"):
            raise UsageError(f"%%veil {command} is a cell magic: put it on the first line of a cell")
        if cell is not None and command not in ("sql", "cost"):
            raise UsageError(f"%veil {command} is a line magic, not a cell magic")
        if command == "datasets":
            return self._datasets()
        if command == "budget":
            return self._budget()
        if command == "mode":
            return self._mode(args.mode)
        assert cell is not None
        if command == "sql":
            return self._sql(args, cell)
        return self._cost(cell)

    def _datasets(self) -> pl.DataFrame:
        rows = [{"site": s.name, "dataset": d.name, "level": d.level, "sharing": d.info.sharing, "state": d.info.state,
                 "title": d.info.title, "columns": len(d.info.columns)}
                for s in self.study.sites.values() for d in s.datasets.values()]
        return pl.DataFrame(rows)

    def _budget(self) -> pl.DataFrame:
        rows = [{"site": s.name, "dataset": g.dataset, "granted_epsilon": g.epsilon,
                 "spent_epsilon": round(g.epsilon_spent, 4), "remaining_rho": g.rho_remaining,
                 "largest_next_epsilon": round(g.largest_next_epsilon, 4)}
                for s in self.study.sites.values() for g in s.budget()]
        return pl.DataFrame(rows)

    def _mode(self, mode: str | None) -> None:
        if mode is None:
            print(f"Veil mode: {self.study.mode.upper()} (switch with %veil mode mock or %veil mode live)")
            return
        self.study.mode = mode
        print("Veil mode: LIVE — releases spend privacy budget at the sites." if mode == "live" else
              "Veil mode: MOCK — queries run locally on made-up rows; nothing is spent, results are not real.")

    def _sql(self, args: Any, cell: str) -> Any:
        dataset = parse_sql(cell).dataset
        names = None if args.all or not args.site else [s.strip() for s in args.site.split(",")]
        if names is None and not args.all and len(self.study.sites) > 1:  # never spend everywhere by default
            if self.study.default_site is None:
                raise UsageError(f"this study has {len(self.study.sites)} sites ({', '.join(self.study.sites)}): "
                                 "say where with --site NAME[,NAME] or --all (every site, combined), or set "
                                 "default_site in the study's TOML")
            names = [self.study.default_site]
        if args.all or names is None or len(names) > 1:
            target = self.study.dataset(dataset, names)
        else:
            target = self.study.sites[names[0]].datasets[dataset]
        result = target.sql(cell).release(epsilon=args.epsilon, rho=args.rho, delta=args.delta,
                                          confidence=args.confidence, accuracy=args.accuracy)
        display(result)
        return None

    def _cost(self, cell: str) -> None:
        """Run the cell in mock mode and total, per site, the rho a live run would charge (rho adds up;
        the ledger turns it into epsilon with `%veil budget`), with the half-width each release's counts and
        sums would have live (OpenDP's accuracy of the same measurement: it does not depend on the rows).
        Nothing is spent."""
        listener, self.study.on_mode = getattr(self.study, "on_mode", None), None  # the lab sees no flicker
        previous, self.study.mode, self._cost_run = self.study.mode, "mock", {}
        try:
            outcome = self.shell.run_cell(cell, store_history=False)
            spent = self._cost_run
        finally:
            self.study.mode, self._cost_run = previous, None
            self.study.on_mode = listener
        outcome.raise_error()
        print("Veil cost: the cell ran in MOCK mode; this is what it would charge live. Nothing was spent.")
        totals = {site: sum(r.cost.rho for r in releases) for site, releases in spent.items()}
        frame = pl.DataFrame([{"site": site, "releases": len(spent[site]), "rho": rho,
                               "half_widths": " | ".join(_half_widths(r) for r in spent[site])}
                              for site, rho in totals.items()],
                             schema={"site": pl.String, "releases": pl.Int64, "rho": pl.Float64,
                                     "half_widths": pl.String})
        display(frame, metadata={"veil": {"cost_rho": totals}})


def _half_widths(release: Release) -> str:
    """'n ±12 (95%)' for each count and sum of a release (means and quantiles depend on the rows)."""
    widths = [f"{s.name} ±{s.accuracy:.3g}" for s in release.statistics if s.accuracy is not None]
    return (", ".join(widths) or "no count or sum") + f" ({release.confidence * 100:.4g}%)"


def register(shell: Any, kernel: Any) -> None:
    """Called by the Veil kernel on first use (before the first cell runs), once the SDK has loaded: the
    magics, and Veil's errors shown in one line (`%xmode Verbose` shows their tracebacks)."""
    shell.register_magics(VeilMagics(shell, kernel))
    shell.set_custom_exc((VeilError,), show_in_one_line)
