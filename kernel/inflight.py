"""Live releases in flight at one or more sites, which a researcher can interrupt at any moment.

The requests run on an event loop of their own, in a background thread, so the notebook's thread only
waits for them. When the researcher interrupts (KeyboardInterrupt while it waits):

1. the releases that completed are kept;
2. the requests still in flight are cancelled, which closes their connections (a site charges nothing
   for a request whose client went away);
3. each of those sites is asked to cancel the request by its id, which settles the race with a release
   being charged at that very moment: the site answers that nothing was charged, or with the release it
   had already charged, which is kept like the others. A site that does not answer within
   `CANCEL_SECONDS` is reported so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from dataclasses import dataclass, field

from veil.kernel.client import SiteClient
from veil.kernel.errors import VeilError, VeilRefusal, VeilSiteUnavailable
from veil.wire import QueryRequest, Release

CANCEL_SECONDS = 3.0
"""How long an interrupt waits for each site still working to confirm the cancel."""


@dataclass
class Flight:
    """What became of each site's request: a release, or why not (refused, unreachable, interrupted)."""

    released: dict[str, Release] = field(default_factory=dict)
    errors: dict[str, VeilError] = field(default_factory=dict)
    interrupted: bool = False


@functools.cache
def _loop() -> asyncio.AbstractEventLoop:
    """The event loop the requests run on, in a daemon thread of its own (started on first use)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="veil-inflight", daemon=True).start()
    return loop


def release(requests: dict[str, tuple[SiteClient, QueryRequest]]) -> Flight:
    """Send each site its query request (each with its own request_id) at once and wait for all of them;
    an interrupt meanwhile settles them as the module says, and the Flight says `interrupted`."""
    futures = {name: asyncio.run_coroutine_threadsafe(client.query_async(request), _loop())
               for name, (client, request) in requests.items()}
    flight = Flight()
    try:
        concurrent.futures.wait(futures.values())
    except KeyboardInterrupt:
        flight.interrupted = True
        in_flight = [name for name, future in futures.items() if not future.done()]
        for name in in_flight:
            futures[name].cancel()  # the request's task is cancelled on the loop: its connection closes
        _settle({name: requests[name] for name in in_flight}, flight)
    for name, future in futures.items():
        if future.cancelled():
            continue
        try:
            flight.released[name] = future.result()
        except (VeilRefusal, VeilSiteUnavailable) as exc:
            flight.errors[name] = exc
    return flight


def _settle(cut_off: dict[str, tuple[SiteClient, QueryRequest]], flight: Flight) -> None:
    """Ask each site whose request was cut off to cancel it, all at once; record what each says."""
    for name, (client, _) in cut_off.items():
        flight.errors[name] = _unconfirmed(client.name, "no answer yet")
    if not cut_off:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(cut_off))
    answers = {name: pool.submit(_cancel, *pair) for name, pair in cut_off.items()}
    pool.shutdown(wait=False)
    try:
        concurrent.futures.wait(answers.values())
    except KeyboardInterrupt:  # a second interrupt: report the sites that have not answered as unconfirmed
        pass
    for name, answer in answers.items():
        if not answer.done():
            continue
        outcome = answer.result()
        if isinstance(outcome, Release):
            del flight.errors[name]
            flight.released[name] = outcome
        else:
            flight.errors[name] = outcome


def _cancel(client: SiteClient, request: QueryRequest) -> Release | VeilError:
    """The site's answer to cancelling `request`: the release it had already charged, or why there is none."""
    assert request.request_id is not None
    try:
        answer = client.cancel(request.request_id, timeout=CANCEL_SECONDS)
    except VeilError as exc:
        return _unconfirmed(client.name, exc.message)
    if answer.release is not None:
        return answer.release.model_copy(update={"notes": [
            *answer.release.notes, "charged before the interrupt reached the site"]})
    return VeilError("interrupted", f"site '{client.name}': the request was cancelled, nothing was charged",
                     hint="run the cell again to retry")


def _unconfirmed(site: str, why: str) -> VeilError:
    return VeilError("interrupted", f"site '{site}' did not confirm the cancel ({why}); its request's connection "
                     "was closed, and a site charges nothing for a request whose client has gone, unless the "
                     "network to it is down", hint="check with %veil budget once the site answers")
