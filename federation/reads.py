"""Reading events and state over federation, all X-Matrix authenticated
(``homeserver/services/federation_reads.py`` decides what the origin may see).

- ``GET /_matrix/federation/v1/event/{eventId}`` -> a transaction with the one PDU
- ``GET /_matrix/federation/v1/state/{roomId}?event_id=`` -> ``{pdus, auth_chain}``
- ``GET /_matrix/federation/v1/state_ids/{roomId}?event_id=`` -> ``{pdu_ids, auth_chain_ids}``
- ``GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`` -> ``{auth_chain}``
- ``GET /_matrix/federation/v1/backfill/{roomId}?v=...&limit=`` -> a transaction
- ``POST /_matrix/federation/v1/get_missing_events/{roomId}`` -> ``{events}``
"""

from typing import Any

from twisted.web.server import Request

from federation.auth import authenticated
from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_object
from homeserver.http.validation import query_arg, query_args, query_int
from homeserver.services.federation_reads import MISSING_EVENTS_DEFAULT_LIMIT

FEDERATION = "/_matrix/federation/v1"
SEGMENT = r"[^/]+"


def _pdus(events: list[Any]) -> list[dict[str, Any]]:
    return [pdu.to_federation_json() for pdu in events]


def _string_list(body: dict[str, Any], name: str, required: bool = True) -> list[str]:
    value = body.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MatrixError("M_BAD_JSON", f"{name} must be a list of event ids")
    return value


def _int(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if type(value) is not int or value < 0:
        raise MatrixError("M_BAD_JSON", f"{name} must be a non-negative integer")
    return value


def register_read_resources(router: Any, hs: Any) -> None:
    reads = hs.federation_reads

    def transaction(pdus: list[Any]) -> dict[str, Any]:
        return {
            "origin": hs.server_name,
            "origin_server_ts": hs.clock.time_msec(),
            "pdus": _pdus(pdus),
        }

    def event_id_arg(request: Request) -> str:
        event_id = query_arg(request, "event_id")
        if not event_id:
            raise MatrixError("M_MISSING_PARAM", "Missing parameter: event_id")
        return event_id

    async def get_event(request: Request, origin: str, event_id: str) -> tuple[int, Any]:
        return 200, transaction([await reads.get_event(origin, event_id)])

    async def get_state(request: Request, origin: str, room_id: str) -> tuple[int, Any]:
        pdus, chain = await reads.get_state(origin, room_id, event_id_arg(request))
        return 200, {"pdus": _pdus(pdus), "auth_chain": _pdus(chain)}

    async def get_state_ids(request: Request, origin: str, room_id: str) -> tuple[int, Any]:
        ids, chain = await reads.get_state_ids(origin, room_id, event_id_arg(request))
        return 200, {"pdu_ids": ids, "auth_chain_ids": chain}

    async def get_event_auth(
        request: Request, origin: str, room_id: str, event_id: str
    ) -> tuple[int, Any]:
        return 200, {"auth_chain": _pdus(await reads.get_event_auth(origin, room_id, event_id))}

    async def backfill(request: Request, origin: str, room_id: str) -> tuple[int, Any]:
        event_ids = query_args(request, "v")
        if not event_ids:
            raise MatrixError("M_MISSING_PARAM", "Missing parameter: v")
        limit = query_int(request, "limit")
        if limit is None:
            raise MatrixError("M_MISSING_PARAM", "Missing parameter: limit")
        if limit < 0:
            raise MatrixError("M_INVALID_PARAM", "limit must not be negative")
        return 200, transaction(await reads.backfill(origin, room_id, event_ids, limit))

    async def get_missing_events(request: Request, origin: str, room_id: str) -> tuple[int, Any]:
        body = parse_json_object(request)
        events = await reads.get_missing_events(
            origin,
            room_id,
            _string_list(body, "earliest_events"),
            _string_list(body, "latest_events"),
            _int(body, "limit", MISSING_EVENTS_DEFAULT_LIMIT),
            _int(body, "min_depth", 0),
        )
        return 200, {"events": _pdus(events)}

    r = router.register
    r("GET", FEDERATION + f"/event/(?P<event_id>{SEGMENT})", authenticated(hs, get_event))
    r("GET", FEDERATION + f"/state/(?P<room_id>{SEGMENT})", authenticated(hs, get_state))
    r("GET", FEDERATION + f"/state_ids/(?P<room_id>{SEGMENT})", authenticated(hs, get_state_ids))
    r(
        "GET",
        FEDERATION + f"/event_auth/(?P<room_id>{SEGMENT})/(?P<event_id>{SEGMENT})",
        authenticated(hs, get_event_auth),
    )
    r("GET", FEDERATION + f"/backfill/(?P<room_id>{SEGMENT})", authenticated(hs, backfill))
    r(
        "POST",
        FEDERATION + f"/get_missing_events/(?P<room_id>{SEGMENT})",
        authenticated(hs, get_missing_events),
    )
