"""The exceptions a researcher meets. Each says which site refused, why, what remains and what to do.

There is one hierarchy: every Veil error, on either side, is a `veil.errors.VeilError` (a code, a message
and a hint), re-exported here. A refusal from a site (`wire.Refusal`) becomes a `VeilRefusal` subclass by
its code; nothing was charged for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from veil.errors import VeilError as VeilError

if TYPE_CHECKING:  # annotations only: the kernel raises these at start without loading the wire's models
    from veil.wire import Refusal


class VeilUsageError(VeilError):
    """The call itself is wrong (an unknown mode, dataset or site, a magic's arguments); nothing was sent."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__("usage", message, hint)


class VeilConfigError(VeilError):
    """The study configuration is missing or invalid."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__("config", message, hint)


class VeilSiteUnavailable(VeilError):
    """A site could not be reached; nothing was sent to it or nothing came back (and nothing is lost)."""

    def __init__(self, site: str, url: str, cause: Exception) -> None:
        super().__init__("site_unavailable",
                         f"site '{site}' at {url} could not be reached ({type(cause).__name__}: {cause}); "
                         "no release was made there. Check that its executor runs, then retry.",
                         "check that the site's executor runs, then retry", status=503)
        self.site, self.url = site, url


class VeilRefusal(VeilError):
    """A site refused the request. `refusal` holds its code, message, hint, receipt and what remains."""

    def __init__(self, site: str, status: int, refusal: Refusal) -> None:
        # The site's message says what was asked and what allows it (for a grant: the largest next release, with
        # granted and spent); `refusal.remaining` holds the grant's figures, which a cap's refusal does not turn on.
        text = f"site '{site}' refused [{refusal.code}]: {refusal.message}"
        if refusal.hint:
            text += f". What to do: {refusal.hint}"
        super().__init__(refusal.code, text, refusal.hint, status, refusal.remaining)
        self.site, self.refusal = site, refusal


class VeilPolicyError(VeilRefusal):
    """The query is not allowed or not provably private (unknown dataset/column, row-level output, ...)."""


class VeilBudgetError(VeilRefusal):
    """The grant or the dataset's lifetime cap cannot afford this release."""


class VeilAuthError(VeilRefusal):
    """The token is missing, invalid or revoked, or its role may not do this."""


class VeilRequestError(VeilRefusal):
    """The request itself was malformed or too large."""


def one_line(error: VeilError) -> str:
    """A Veil error as a notebook shows it: its class, code, message and what to do, on one line."""
    code = "" if f"[{error.code}]" in error.message else f" [{error.code}]"
    text = f"{type(error).__name__}{code}: {error.message}"
    if error.hint and "What to do:" not in error.message:
        text += f". What to do: {error.hint}"
    return text


def show_in_one_line(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None,
                     ) -> list[str]:
    """IPython's handler for Veil errors (`set_custom_exc`): `one_line`, or the whole traceback under
    `%xmode Verbose`. Either way the cell fails with the error's name and message, as any error does. The
    releases an error kept (some sites released, then others failed or the cell was interrupted) are shown
    first: they were charged, and the notebook records them."""
    from IPython.display import display

    for kept in (getattr(value, "results", None) or {}).values():
        display(kept)
    if shell.InteractiveTB.mode == "Verbose" or not isinstance(value, VeilError):
        stb: list[str] = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
    else:
        stb = [f"\x1b[0;31m{one_line(value)}\x1b[0m"]
    shell._showtraceback(etype, value, stb)
    return stb


def refusal_error(site: str, status: int, refusal: Refusal) -> VeilRefusal:
    """The exception for a site's refusal, by HTTP status and code."""
    if refusal.code in ("budget_exhausted", "delta_exhausted"):
        return VeilBudgetError(site, status, refusal)
    if status == 401 or refusal.code in ("forbidden", "wrong_project"):
        return VeilAuthError(site, status, refusal)
    if status in (413, 422) or status >= 500:
        return VeilRequestError(site, status, refusal)
    return VeilPolicyError(site, status, refusal)
