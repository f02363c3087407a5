"""The members-written flag, its whole life in this module.

1. :class:`GroupMemberEventsMiddleware` sets ``request.group_member_events_written = False``
   on every request. Transaction Bundle entries are sub-requests, so each entry starts with
   the flag cleared.
2. The PATCH path (``groups.storage.ClickHouseRosters.patch``) writes the member events of a
   JSON Patch on ``/member`` itself and sets the flag (:func:`members_written_mark`).
3. The post-save path (``groups.services.group_post_save``), which diffs an incoming roster
   or applies an operation's delta, reads the flag (:func:`members_written`) and skips a
   write whose events are already written.

The flag lives on the HTTP request. A server-side write (a command, a test calling the
services) has no request: its flag lives on the ``WriteContext`` such a caller makes for the
call, and starts cleared like a request's.

The same middleware marks the thread as serving an HTTP request, which is when member events
ship in the background (``groups.outbox.background``): the client need not wait for ClickHouse.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from fhirservice.store.handlers import WriteContext
from groups.outbox import background

FLAG = "group_member_events_written"


class GroupMemberEventsMiddleware:
    """Set ``request.group_member_events_written = False`` on every request."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Initialise the flag, then handle the request."""
        setattr(request, FLAG, False)
        with background.serving_request():
            return self.get_response(request)


def _home(context: WriteContext) -> object:
    """Where a write's flag lives: its HTTP request, else its context."""
    return context.request if context.request is not None else context


def members_written_mark(context: WriteContext) -> None:
    """The PATCH path wrote this request's member events: post-save must not diff again."""
    setattr(_home(context), FLAG, True)


def members_written(context: WriteContext) -> bool:
    """Whether this request already wrote its member events (read by the post-save path)."""
    return bool(getattr(_home(context), FLAG, False))
