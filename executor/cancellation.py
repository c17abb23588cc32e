"""Queries their client may cancel: a release is charged only while its client still wants it.

A query may carry a `request_id` its client made up. The client cancels it with
`POST /query/{request_id}/cancel` (the kernel does when a researcher interrupts a cell), or by going
away (the query route watches its connection). Either way the moment that counts is the charge:
`Ticket.commit` writes the ledger only if the request was not cancelled, and a cancel that comes after
the commit gets the release back instead. Both hold the ticket's lock, so a release is either charged
and returned, or cancelled and not charged; never charged and lost.

Tickets live in the executor's process. A cancel for a request the site has not seen yet (still on its
way, or queued behind a stalled site) leaves a tombstone that refuses the request when it comes. Settled
tickets are kept `RETAIN_SECONDS`, at most `MAX_KEPT` per project, so that a late cancel or a retry with
the same id still finds them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from veil.errors import VeilError
from veil.wire import Cancellation, Release

RETAIN_SECONDS = 600.0
MAX_KEPT = 256


def cancelled(request_id: str | None) -> VeilError:
    """The refusal of a request whose client cancelled it (or went away) before it was charged."""
    which = f"request {request_id}" if request_id else "the request"
    return VeilError("request_cancelled", f"{which} was cancelled by its client before it was charged; nothing "
                     "was charged", hint="send the query again, with a new request_id, if you still want it",
                     status=409)


@dataclass
class Ticket:
    """One query's standing: running, cancelled (nothing charged) or released (charged; the release kept)."""

    request_id: str | None
    state: Literal["running", "cancelled", "released"] = "running"
    release: Release | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    """Set on cancel: the query's worker stops waiting (and is replaced) at once."""
    settled_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        """Refuse if the request was cancelled (before starting work it would throw away)."""
        if self.state == "cancelled":
            raise cancelled(self.request_id)

    def commit(self, charge: Callable[[], Release]) -> Release:
        """Run `charge` (the ledger and audit write, returning the release) unless the request was cancelled."""
        with self._lock:
            self.check()
            self.release = charge()
            self.state, self.settled_at = "released", time.monotonic()
            return self.release

    def cancel(self) -> Cancellation:
        """Cancel unless already released; say which happened."""
        with self._lock:
            if self.state == "released":
                return Cancellation(request_id=self.request_id or "", outcome="released", release=self.release,
                                    message="the release was made and charged before the cancel arrived")
            self.state, self.settled_at = "cancelled", time.monotonic()
            self.stopped.set()
            return Cancellation(request_id=self.request_id or "", outcome="cancelled",
                                message="cancelled before it was charged; nothing was charged")


class Tickets:
    """The tickets of one site, by project and request id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: dict[tuple[str, str], Ticket] = {}

    def begin(self, project: str, request_id: str | None) -> Ticket:
        """The ticket of a new query. A request id used before gets its earlier release back (a retry) or is
        refused: cancelled, or still running."""
        if request_id is None:
            return Ticket(None)  # cancelled only by its connection closing
        with self._lock:
            self._forget_old(project)
            ticket = self._tickets.get((project, request_id))
            if ticket is None:
                ticket = self._tickets[(project, request_id)] = Ticket(request_id)
                return ticket
        if ticket.state == "running":
            raise VeilError("duplicate_request", f"request {request_id} is already running at this site",
                            hint="make a new request_id for each query", status=409)
        ticket.check()
        return ticket  # released: the site answers with the same release, charged once

    def settle(self, project: str, ticket: Ticket) -> None:
        """The query of `ticket` has ended: a ticket still running was refused before its charge, so it is
        forgotten (nothing was charged; the same request_id may come again as a new query)."""
        if ticket.request_id is None or ticket.state != "running":
            return
        with self._lock:
            if self._tickets.get((project, ticket.request_id)) is ticket and ticket.state == "running":
                del self._tickets[(project, ticket.request_id)]

    def cancel(self, project: str, request_id: str) -> Cancellation:
        """Cancel a project's request; one not seen yet is refused when it arrives."""
        with self._lock:
            self._forget_old(project)
            ticket = self._tickets.setdefault((project, request_id), Ticket(request_id))
        return ticket.cancel()

    def _forget_old(self, project: str) -> None:
        """Drop the project's settled tickets older than RETAIN_SECONDS, and the oldest beyond MAX_KEPT - 1."""
        now = time.monotonic()
        settled = sorted((t.settled_at, key) for key, t in self._tickets.items()
                         if key[0] == project and t.state != "running")
        drop = max(sum(now - at > RETAIN_SECONDS for at, _ in settled), len(settled) - MAX_KEPT + 1)
        for _, key in settled[:drop]:
            del self._tickets[key]
