"""Federation queries and the published room directory, all X-Matrix authenticated.

- ``GET /_matrix/federation/v1/query/profile?user_id=...[&field=...]``
- ``GET /_matrix/federation/v1/query/directory?room_alias=...``
- ``GET`` and ``POST /_matrix/federation/v1/publicRooms`` (403 unless
  ``allow_public_rooms_over_federation``)
"""

from typing import Any

from twisted.web.server import Request

from federation.auth import authenticated
from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_object
from homeserver.http.validation import query_arg, query_int

FEDERATION = "/_matrix/federation/v1"


def _required(request: Request, name: str) -> str:
    value = query_arg(request, name)
    if not value:
        raise MatrixError("M_MISSING_PARAM", f"Missing parameter: {name}")
    return value


def register_query_resources(router: Any, hs: Any) -> None:
    async def query_profile(request: Request, origin: str) -> tuple[int, Any]:
        user_id = _required(request, "user_id")
        if not hs.profiles.is_mine(user_id):
            raise MatrixError("M_INVALID_PARAM", "User is not local to this server")
        field = query_arg(request, "field")
        if field:
            return 200, await hs.profiles.get_profile_field(user_id, field)
        return 200, await hs.profiles.get_profile(user_id)

    async def query_directory(request: Request, origin: str) -> tuple[int, Any]:
        alias = _required(request, "room_alias")
        room_id, servers = await hs.directory.resolve_alias(alias)
        return 200, {"room_id": room_id, "servers": servers}

    def check_allowed() -> None:
        if not hs.config["allow_public_rooms_over_federation"]:
            raise MatrixError(
                "M_FORBIDDEN", "This server does not publish its room directory over federation"
            )

    async def rooms(
        limit: Any, since: Any, filter: Any, include_all: Any, network: Any
    ) -> dict[str, Any]:
        if limit is not None and (type(limit) is not int or limit < 0):
            raise MatrixError("M_INVALID_PARAM", "limit must be a non-negative integer")
        if since is not None and not isinstance(since, str):
            raise MatrixError("M_INVALID_PARAM", "since must be a string")
        if filter is not None and not isinstance(filter, dict):
            raise MatrixError("M_BAD_JSON", "filter must be an object")
        if network is not None and not include_all:
            # No application service publishes rooms under a network here.
            return {"chunk": [], "total_room_count_estimate": 0}
        # "limit: Defaults to 0 (no limit)"
        return await hs.directory.public_rooms(
            limit or None, since or None, filter, bool(include_all)
        )

    async def get_public_rooms(request: Request, origin: str) -> tuple[int, Any]:
        check_allowed()
        include_all = (query_arg(request, "include_all_networks") or "false").lower() == "true"
        return 200, await rooms(
            query_int(request, "limit"),
            query_arg(request, "since"),
            None,
            include_all,
            query_arg(request, "third_party_instance_id"),
        )

    async def post_public_rooms(request: Request, origin: str) -> tuple[int, Any]:
        check_allowed()
        body = parse_json_object(request)
        return 200, await rooms(
            body.get("limit"),
            body.get("since"),
            body.get("filter"),
            body.get("include_all_networks", False),
            body.get("third_party_instance_id"),
        )

    r = router.register
    r("GET", FEDERATION + "/query/profile", authenticated(hs, query_profile))
    r("GET", FEDERATION + "/query/directory", authenticated(hs, query_directory))
    r("GET", FEDERATION + "/publicRooms", authenticated(hs, get_public_rooms))
    r("POST", FEDERATION + "/publicRooms", authenticated(hs, post_public_rooms))
