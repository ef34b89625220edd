"""Room aliases and the published room directory.

GET/PUT/DELETE /directory/room/{roomAlias}, GET /rooms/{roomId}/aliases,
GET/PUT /directory/list/room/{roomId}, GET/POST /publicRooms.
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import directory as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg, query_int

CLIENT = "/_matrix/client/(?:v3|r0)"


def register_directory_resources(router: Any, hs: Any) -> None:
    directory = hs.directory

    # --- aliases -------------------------------------------------------------------
    async def get_alias(request: Request, room_alias: str) -> tuple[int, Any]:
        room_id, servers = await directory.resolve_alias(room_alias)
        return 200, {"room_id": room_id, "servers": servers}

    async def put_alias(request: Request, room_alias: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.SET_ROOM_ALIAS)
        await directory.create_alias(room_alias, body["room_id"], who.user_id)
        return 200, {}

    async def delete_alias(request: Request, room_alias: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        await directory.delete_alias(room_alias, who.user_id)
        return 200, {}

    async def room_aliases(request: Request, room_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        room = await hs.room_states.get(room_id)
        allowed = room is not None and (
            room.membership(who.user_id) == "join"
            or room.content_of("m.room.history_visibility", "history_visibility")
            == "world_readable"
        )
        if not allowed and not await hs.auth.is_server_admin(who.user_id):
            raise MatrixError("M_FORBIDDEN", "You are not a member of the room.")
        return 200, {"aliases": await directory.get_local_aliases(room_id)}

    # --- published room directory -----------------------------------------------------
    async def get_visibility(request: Request, room_id: str) -> tuple[int, Any]:
        return 200, {"visibility": await directory.get_room_visibility(room_id)}

    async def put_visibility(request: Request, room_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.SET_ROOM_VISIBILITY)
        await directory.set_room_visibility(room_id, body.get("visibility", "public"), who.user_id)
        return 200, {}

    def remote_server(request: Request) -> str | None:
        """The ``server`` parameter when it names another server."""
        server = query_arg(request, "server")
        return server if server is not None and server != hs.server_name else None

    async def get_public_rooms(request: Request) -> tuple[int, Any]:
        if hs.config["allow_public_rooms_without_auth"]:
            await hs.auth.get_optional_requester(request, allow_guest=True)
        else:
            await hs.auth.get_requester(request, allow_guest=True)
        limit = query_int(request, "limit")
        since = query_arg(request, "since") or None
        server = remote_server(request)
        if server is not None:
            return 200, await directory.public_rooms_of(server, limit, since, None, False)
        return 200, await directory.public_rooms(limit, since, None)

    async def post_public_rooms(request: Request) -> tuple[int, Any]:
        await hs.auth.get_requester(request, allow_guest=True)
        body = parse_body(request, schemas.QUERY_PUBLIC_ROOMS)
        include_all = body.get("include_all_networks", False)
        server = remote_server(request)
        if server is not None:
            return 200, await directory.public_rooms_of(
                server, body.get("limit"), body.get("since") or None, body.get("filter"),
                include_all)
        network = body.get("third_party_instance_id")
        if network is not None:
            if include_all:
                raise MatrixError(
                    "M_INVALID_PARAM",
                    "third_party_instance_id cannot be combined with include_all_networks",
                )
            # No application service publishes rooms under a network here.
            return 200, {"chunk": [], "total_room_count_estimate": 0}
        return 200, await directory.public_rooms(
            body.get("limit"), body.get("since") or None, body.get("filter"), include_all
        )

    r = router.register
    alias_path = CLIENT + "/directory/room/(?P<room_alias>[^/]+)"
    r("GET", alias_path, get_alias)
    r("PUT", alias_path, put_alias)
    r("DELETE", alias_path, delete_alias)
    r("GET", CLIENT + "/rooms/(?P<room_id>[^/]+)/aliases", room_aliases)
    list_path = CLIENT + "/directory/list/room/(?P<room_id>[^/]+)"
    r("GET", list_path, get_visibility)
    r("PUT", list_path, put_visibility)
    r("GET", CLIENT + "/publicRooms", get_public_rooms)
    r("POST", CLIENT + "/publicRooms", post_public_rooms)


__all__ = ["register_directory_resources"]
