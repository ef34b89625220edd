"""Room endpoints: createRoom, membership, state, send, members."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import rooms as schemas
from homeserver.core.events import HISTORY_VISIBILITY, MEMBER
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg, query_args
from homeserver.services.ratelimit import ratelimiter_from_config
from homeserver.services.rooms.sender import relation_of

CLIENT = "/_matrix/client/(?:v3|r0)"
ROOM = CLIENT + "/rooms/(?P<room_id>[^/]+)"


def parse_stream_position(token: str) -> int:
    """A stream position from a sync or pagination token ("s123", "s123_4_5", "t3-123")."""
    text = token.split("_")[0]
    if text[:1] in ("s", "t"):
        text = text[1:].split("-")[-1]
    try:
        return int(text)
    except ValueError:
        raise MatrixError("M_INVALID_PARAM", f"Bad token {token!r}") from None


def register_room_resources(router: Any, hs: Any) -> None:
    rc = hs.config
    message_limiter = ratelimiter_from_config(hs.clock, rc["rc_message"])
    join_limiter = ratelimiter_from_config(hs.clock, rc["rc_joins"]["local"])
    invite_room_limiter = ratelimiter_from_config(hs.clock, rc["rc_invites"]["per_room"])
    invite_user_limiter = ratelimiter_from_config(hs.clock, rc["rc_invites"]["per_user"])
    invite_issuer_limiter = ratelimiter_from_config(hs.clock, rc["rc_invites"]["per_issuer"])

    async def requester(request: Request) -> Any:
        return await hs.auth.get_requester(request)

    async def create_room(request: Request) -> tuple[int, Any]:
        who = await requester(request)
        body = parse_body(request, schemas.CREATE_ROOM)
        message_limiter.check(who.user_id)
        room_id = await hs.room_creator.create_room(who.user_id, body, who.device_id)
        result: dict[str, Any] = {"room_id": room_id}
        if body.get("room_alias_name"):
            result["room_alias"] = f"#{body['room_alias_name']}:{hs.server_name}"
        return 200, result

    async def resolve_room(request: Request, room_id_or_alias: str) -> tuple[str, list[str]]:
        """(room id, servers to ask if the room is elsewhere: ``via``/``server_name``,
        then those the alias names)."""
        servers = query_args(request, "via") or query_args(request, "server_name")
        if room_id_or_alias.startswith("#"):
            room_id, alias_servers = await hs.directory.resolve_alias(room_id_or_alias)
            return room_id, [*servers, *alias_servers]
        if not room_id_or_alias.startswith("!"):
            raise MatrixError("M_INVALID_PARAM", f"{room_id_or_alias} is not a room id or alias")
        return room_id_or_alias, servers

    async def join(request: Request, room_id_or_alias: str) -> tuple[int, Any]:
        who = await requester(request)
        body = parse_body(request, schemas.JOIN)
        room_id, servers = await resolve_room(request, room_id_or_alias)
        join_limiter.check(who.user_id)
        await hs.membership.join(who.user_id, room_id, body.get("reason"), who.device_id,
                                 servers=servers)
        return 200, {"room_id": room_id}

    async def join_by_id(request: Request, room_id: str) -> tuple[int, Any]:
        return await join(request, room_id)

    async def knock(request: Request, room_id_or_alias: str) -> tuple[int, Any]:
        who = await requester(request)
        body = parse_body(request, schemas.KNOCK)
        room_id, servers = await resolve_room(request, room_id_or_alias)
        await hs.membership.knock(who.user_id, room_id, body.get("reason"), servers=servers)
        return 200, {"room_id": room_id}

    async def leave(request: Request, room_id: str) -> tuple[int, Any]:
        who = await requester(request)
        body = parse_body(request, schemas.LEAVE)
        await hs.membership.leave(who.user_id, room_id, body.get("reason"))
        return 200, {}

    async def forget(request: Request, room_id: str) -> tuple[int, Any]:
        who = await requester(request)
        parse_body(request, schemas.FORGET)
        await hs.membership.forget(who.user_id, room_id)
        return 200, {}

    async def invite(request: Request, room_id: str) -> tuple[int, Any]:
        who = await requester(request)
        body = parse_body(request, schemas.INVITE)
        invite_room_limiter.check(room_id, update=False)
        invite_user_limiter.check(body["user_id"], update=False)
        invite_issuer_limiter.check(who.user_id)
        invite_room_limiter.check(room_id)
        invite_user_limiter.check(body["user_id"])
        await hs.membership.invite(who.user_id, room_id, body["user_id"], body.get("reason"),
                                   body.get("is_direct", False))
        return 200, {}

    def moderation(action: str, schema: dict[str, Any]) -> Any:
        async def handler(request: Request, room_id: str) -> tuple[int, Any]:
            who = await requester(request)
            body = parse_body(request, schema)
            method = getattr(hs.membership, action)
            await method(who.user_id, room_id, body["user_id"], body.get("reason"))
            return 200, {}
        return handler

    async def joined_rooms(request: Request) -> tuple[int, Any]:
        who = await requester(request)
        return 200, {"joined_rooms": await hs.events_store.get_rooms_for_user(who.user_id)}

    async def visible_state(user_id: str, room_id: str) -> dict[tuple[str, str], str]:
        """The state the user may see: current if joined (or world-readable), else the
        state when they left; 403 otherwise."""
        room = await hs.room_states.get(room_id)
        if room is None:
            raise MatrixError("M_FORBIDDEN", "You are not a member of this room")
        membership = room.membership(user_id)
        if membership == "join" or room.content_of(
            HISTORY_VISIBILITY, "history_visibility") == "world_readable":
            return room.state_ids()
        if membership in ("leave", "ban"):
            leave_event = room.get(MEMBER, user_id)
            group = await hs.events_store.get_event_state_group(leave_event.event_id)
            return await hs.events_store.get_state_group(group)
        raise MatrixError("M_FORBIDDEN", "You are not a member of this room")

    async def get_state(request: Request, room_id: str) -> tuple[int, Any]:
        who = await requester(request)
        state = await visible_state(who.user_id, room_id)
        events = await hs.events.get_events(state.values())
        return 200, [hs.client_events.serialize(events[e]) for e in state.values()]

    async def get_state_event(request: Request, room_id: str, event_type: str,
                              state_key: str = "") -> tuple[int, Any]:
        who = await requester(request)
        state = await visible_state(who.user_id, room_id)
        event_id = state.get((event_type, state_key))
        if event_id is None:
            raise MatrixError("M_NOT_FOUND", "Event not found.")
        event = await hs.events.get_event(event_id)
        if query_arg(request, "format") == "event":
            return 200, hs.client_events.serialize(event)
        return 200, event.content

    async def put_state_event(request: Request, room_id: str, event_type: str,
                              state_key: str = "") -> tuple[int, Any]:
        who = await requester(request)
        content = parse_body(request, schemas.EVENT_CONTENT)
        message_limiter.check(who.user_id)
        if event_type == MEMBER:
            # Only a per-room profile (nickname, avatar) of a joined user goes through
            # here; membership changes use the membership endpoints.
            room = await hs.room_states.get(room_id)
            if not (state_key == who.user_id and room is not None
                    and room.membership(who.user_id) == "join"
                    and content.get("membership") == "join"):
                raise MatrixError("M_FORBIDDEN",
                                  "Use the membership endpoints to change membership")
        if event_type == "m.room.canonical_alias":
            await hs.directory.check_canonical_alias_content(room_id, content)
        room = await hs.room_states.get(room_id)
        if room is not None:
            current = room.get(event_type, state_key)
            if current is not None and current.sender == who.user_id and current.content == content:
                return 200, {"event_id": current.event_id}  # unchanged: no new event
        pdu = await hs.room_sender.send(who.user_id, room_id, event_type, content,
                                        state_key=state_key, device_id=who.device_id)
        return 200, {"event_id": pdu.event_id}

    async def send(request: Request, room_id: str, event_type: str, txn_id: str) -> tuple[int, Any]:
        who = await requester(request)
        content = parse_body(request, schemas.EVENT_CONTENT)
        message_limiter.check(who.user_id)
        if await hs.accounts.is_suspended(who.user_id):
            raise MatrixError("M_USER_SUSPENDED", "Your account is suspended: you cannot send")
        parent, rel_type, key = relation_of(content)
        if event_type == "m.reaction" and rel_type == "m.annotation" and key is not None:
            # One reaction per key per user (a retry of the same transaction is no repeat).
            earlier = await hs.room_sender.previous_send(who.user_id, who.device_id, txn_id)
            if earlier is not None:
                return 200, {"event_id": earlier.event_id}
            await hs.relations.claim_annotation(parent, who.user_id, key)
            try:
                pdu = await hs.room_sender.send(who.user_id, room_id, event_type, content,
                                                device_id=who.device_id, txn_id=txn_id)
            except BaseException:
                hs.relations.release_annotation(parent, who.user_id, key)
                raise
            return 200, {"event_id": pdu.event_id}
        pdu = await hs.room_sender.send(who.user_id, room_id, event_type, content,
                                        device_id=who.device_id, txn_id=txn_id)
        return 200, {"event_id": pdu.event_id}

    async def members(request: Request, room_id: str) -> tuple[int, Any]:
        who = await requester(request)
        state = await visible_state(who.user_id, room_id)
        at = query_arg(request, "at")
        if at is not None:
            member_ids = await hs.events_store.get_membership_events_before(
                room_id, parse_stream_position(at))
        else:
            member_ids = [eid for (t, _), eid in state.items() if t == MEMBER]
        events = await hs.events.get_events(member_ids)
        wanted = query_arg(request, "membership")
        unwanted = query_arg(request, "not_membership")
        chunk = []
        for event_id in member_ids:
            event = events[event_id]
            membership = event.membership
            if wanted is not None and membership != wanted:
                continue
            if unwanted is not None and membership == unwanted:
                continue
            chunk.append(hs.client_events.serialize(event))
        return 200, {"chunk": chunk}

    async def joined_members(request: Request, room_id: str) -> tuple[int, Any]:
        who = await requester(request)
        room = await hs.room_states.get(room_id)
        if room is None or room.membership(who.user_id) != "join":
            raise MatrixError("M_FORBIDDEN", "You are not a member of this room")
        joined = {}
        for user_id in room.users_with_membership("join"):
            content = room.get(MEMBER, user_id).content
            joined[user_id] = {"display_name": content.get("displayname"),
                               "avatar_url": content.get("avatar_url")}
        return 200, {"joined": joined}

    r = router.register
    r("POST", CLIENT + "/createRoom", create_room)
    r("POST", CLIENT + "/join/(?P<room_id_or_alias>[^/]+)", join)
    r("POST", ROOM + "/join", join_by_id)
    r("POST", CLIENT + "/knock/(?P<room_id_or_alias>[^/]+)", knock)
    r("POST", ROOM + "/leave", leave)
    r("POST", ROOM + "/forget", forget)
    r("POST", ROOM + "/invite", invite)
    r("POST", ROOM + "/kick", moderation("kick", schemas.KICK))
    r("POST", ROOM + "/ban", moderation("ban", schemas.BAN))
    r("POST", ROOM + "/unban", moderation("unban", schemas.UNBAN))
    r("GET", CLIENT + "/joined_rooms", joined_rooms)
    r("GET", ROOM + "/state", get_state)
    state_path = ROOM + "/state/(?P<event_type>[^/]+)(?:/(?P<state_key>[^/]*))?"
    r("GET", state_path, get_state_event)
    r("PUT", state_path, put_state_event)
    r("PUT", ROOM + "/send/(?P<event_type>[^/]+)/(?P<txn_id>[^/]+)", send)
    r("GET", ROOM + "/members", members)
    r("GET", ROOM + "/joined_members", joined_members)
