"""Room history and redaction: /messages, /context, /event, /redact."""

import json
from typing import Any

from twisted.web.server import Request

from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg, query_int
from homeserver.services.filtering import EventFilter
from homeserver.services.ratelimit import ratelimiter_from_config

ROOM = "/_matrix/client/(?:v3|r0)/rooms/(?P<room_id>[^/]+)"
REDACT = {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 4096}}}
MAX_LIMIT = 1000


def _event_filter(request: Request) -> EventFilter:
    text = query_arg(request, "filter")
    if not text:
        return EventFilter()
    try:
        data = json.loads(text)
    except ValueError:
        raise MatrixError("M_INVALID_PARAM", "filter is not valid JSON") from None
    return EventFilter.from_json(data)


def register_room_event_resources(router: Any, hs: Any) -> None:
    message_limiter = ratelimiter_from_config(hs.clock, hs.config["rc_message"])

    async def messages(request: Request, room_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        direction = query_arg(request, "dir", "b")
        if direction not in ("b", "f"):
            raise MatrixError("M_INVALID_PARAM", "dir must be b or f")
        limit = max(0, min(query_int(request, "limit", 10), MAX_LIMIT))
        return 200, await hs.pagination.messages(
            who.user_id, who.device_id, room_id, query_arg(request, "from"),
            query_arg(request, "to"), direction, limit, _event_filter(request))

    async def context(request: Request, room_id: str, event_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        limit = max(0, min(query_int(request, "limit", 10), MAX_LIMIT))
        return 200, await hs.pagination.context(
            who.user_id, who.device_id, room_id, event_id, limit, _event_filter(request))

    async def get_event(request: Request, room_id: str, event_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        room = await hs.room_states.get(room_id)
        if room is None or (room.membership(who.user_id) is None and room.content_of(
                "m.room.history_visibility", "history_visibility") != "world_readable"):
            raise MatrixError("M_NOT_FOUND", "Event not found")
        pdu, _ = await hs.pagination.get_visible_event(who.user_id, room_id, event_id)
        return 200, (await hs.client_events.serialize_events([pdu], who.user_id,
                                                             who.device_id))[0]

    async def redact(request: Request, room_id: str, event_id: str, txn_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, REDACT)
        message_limiter.check(who.user_id)
        room = await hs.room_sender.get_room(room_id)
        target = await hs.events.get_event(event_id)
        if target is not None and target.room_id != room_id:
            target = None
        if target is not None and target.sender != who.user_id:
            # Redacting someone else's event needs the "redact" level (own events need
            # only the right to send the redaction, which the auth rules check).
            power = room.power_levels
            if power.user_level(who.user_id) < power.named("redact"):
                raise MatrixError("M_FORBIDDEN", "You may only redact your own events here")
        content = {"reason": body["reason"]} if "reason" in body else {}
        pdu = await hs.room_sender.send(
            who.user_id, room_id, "m.room.redaction", content, redacts=event_id,
            device_id=who.device_id, txn_id=f"redact:{txn_id}", redacted_target=target)
        return 200, {"event_id": pdu.event_id}

    r = router.register
    r("GET", ROOM + "/messages", messages)
    r("GET", ROOM + "/context/(?P<event_id>[^/]+)", context)
    r("GET", ROOM + "/event/(?P<event_id>[^/]+)", get_event)
    r("PUT", ROOM + "/redact/(?P<event_id>[^/]+)/(?P<txn_id>[^/]+)", redact)
