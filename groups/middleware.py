"""The members-written flag: initialised per request, set by the Group PATCH service.

The Group post-save handler diffs the incoming roster and emits member events, unless the
request already wrote its member events itself (JSON Patch on ``/member``), in which case it
finds ``request.group_member_events_written`` set and skips member processing. Transaction
Bundle entries are sub-requests, so each entry starts with the flag cleared.

The same middleware marks the thread as serving an HTTP request, which is when member events
ship in the background (``groups.outbox.background``): the client need not wait for ClickHouse.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

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
