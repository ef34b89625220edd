"""Joins, leaves, knocks and invites from other servers, all X-Matrix authenticated
(``homeserver/services/federation_membership.py`` does the work).

- ``GET /v1/make_join/{roomId}/{userId}?ver=...``, ``PUT /v2/send_join/{roomId}/{eventId}``
  (and v1, which wraps the answer in ``[200, ...]``)
- ``GET /v1/make_leave/{roomId}/{userId}``, ``PUT /v2/send_leave/{roomId}/{eventId}`` (and v1)
- ``GET /v1/make_knock/{roomId}/{userId}?ver=...``, ``PUT /v1/send_knock/{roomId}/{eventId}``
- ``PUT /v2/invite/{roomId}/{eventId}`` (and v1, whose body is the event itself)
"""

from typing import Any

from twisted.web.server import Request

from federation.auth import authenticated
from homeserver.http.server import parse_json_object
from homeserver.http.validation import query_args

V1 = "/_matrix/federation/v1"
V2 = "/_matrix/federation/v2"
SEGMENT = r"[^/]+"
ROOM_USER = f"/(?P<room_id>{SEGMENT})/(?P<user_id>{SEGMENT})"
ROOM_EVENT = f"/(?P<room_id>{SEGMENT})/(?P<event_id>{SEGMENT})"


def register_membership_resources(router: Any, hs: Any) -> None:
    service = hs.federation_membership

    def make(membership: str, with_versions: bool) -> Any:
        async def handler(request: Request, origin: str, room_id: str, user_id: str) -> Any:
            versions = query_args(request, "ver") or ["1"] if with_versions else None
            return 200, await service.make_membership(origin, room_id, user_id, membership,
                                                      versions)
        return handler

    async def send_join(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        return 200, await service.send_join(origin, room_id, event_id, parse_json_object(request))

    async def send_join_v1(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        return 200, [200, (await send_join(request, origin, room_id, event_id))[1]]

    async def send_leave(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        await service.send_membership(origin, room_id, event_id, parse_json_object(request),
                                      "leave")
        return 200, {}

    async def send_leave_v1(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        return 200, [200, (await send_leave(request, origin, room_id, event_id))[1]]

    async def send_knock(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        return 200, await service.send_knock(origin, room_id, event_id, parse_json_object(request))

    async def invite(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        return 200, await service.on_invite(origin, room_id, event_id, parse_json_object(request))

    async def invite_v1(request: Request, origin: str, room_id: str, event_id: str) -> Any:
        event = parse_json_object(request)
        body = {"event": event, "room_version": "1",
                "invite_room_state": (event.get("unsigned") or {}).get("invite_room_state")}
        return 200, [200, await service.on_invite(origin, room_id, event_id, body)]

    r = router.register
    r("GET", V1 + "/make_join" + ROOM_USER, authenticated(hs, make("join", True)))
    r("GET", V1 + "/make_leave" + ROOM_USER, authenticated(hs, make("leave", False)))
    r("GET", V1 + "/make_knock" + ROOM_USER, authenticated(hs, make("knock", True)))
    r("PUT", V2 + "/send_join" + ROOM_EVENT, authenticated(hs, send_join))
    r("PUT", V1 + "/send_join" + ROOM_EVENT, authenticated(hs, send_join_v1))
    r("PUT", V2 + "/send_leave" + ROOM_EVENT, authenticated(hs, send_leave))
    r("PUT", V1 + "/send_leave" + ROOM_EVENT, authenticated(hs, send_leave_v1))
    r("PUT", V1 + "/send_knock" + ROOM_EVENT, authenticated(hs, send_knock))
    r("PUT", V2 + "/invite" + ROOM_EVENT, authenticated(hs, invite))
    r("PUT", V1 + "/invite" + ROOM_EVENT, authenticated(hs, invite_v1))
