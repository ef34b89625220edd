"""Media administration, at Synapse's admin API paths (server admins only).

- ``POST /_synapse/admin/v1/media/quarantine/{serverName}/{mediaId}`` (and
  ``unquarantine``): quarantined media answers 404 everywhere.
- ``POST /_synapse/admin/v1/room/{roomId}/media/quarantine`` (older spelling
  ``/quarantine_media/{roomId}``): every media item an ``mxc://`` URL in the
  room's events points at. ``GET /_synapse/admin/v1/room/{roomId}/media`` lists them.
- ``POST /_synapse/admin/v1/user/{userId}/media/quarantine``: a user's uploads.
- ``POST /_synapse/admin/v1/media/protect/{mediaId}`` (and ``unprotect``):
  local media that quarantine and retention leave alone.
- ``GET`` / ``DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}``.
- ``GET`` / ``DELETE /_synapse/admin/v1/users/{userId}/media``: a user's uploads,
  paginated with ``from``, ``limit``, ``order_by`` and ``dir``.
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import media as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import query_arg, query_int

ADMIN = "/_synapse/admin/v1"
_TARGET = "/(?P<server_name>[^/]+)/(?P<media_id>[^/]+)"


def register_admin_media_resources(router: Any, hs: Any) -> None:
    async def require_admin(request: Request) -> str:
        requester = await hs.auth.get_requester(request)
        if not await hs.auth.is_server_admin(requester.user_id):
            raise MatrixError("M_FORBIDDEN", "You are not a server admin")
        return requester.user_id

    async def quarantine(request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        admin = await require_admin(request)
        await hs.media.quarantine(server_name, media_id, admin)
        return 200, {}

    async def unquarantine(request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await require_admin(request)
        await hs.media.quarantine(server_name, media_id, None)
        return 200, {}

    async def quarantine_room(request: Request, room_id: str) -> tuple[int, Any]:
        admin = await require_admin(request)
        return 200, {"num_quarantined": await hs.media.quarantine_room(room_id, admin)}

    async def room_media(request: Request, room_id: str) -> tuple[int, Any]:
        await require_admin(request)
        media = sorted(await hs.media.store.media_in_room(room_id))
        local = [f"mxc://{o}/{m}" for o, m in media if o == hs.server_name]
        remote = [f"mxc://{o}/{m}" for o, m in media if o != hs.server_name]
        return 200, {"local": local, "remote": remote}

    async def quarantine_user(request: Request, user_id: str) -> tuple[int, Any]:
        admin = await require_admin(request)
        return 200, {"num_quarantined": await hs.media.quarantine_user(user_id, admin)}

    async def protect(request: Request, media_id: str) -> tuple[int, Any]:
        await require_admin(request)
        await hs.media.protect(hs.server_name, media_id, True)
        return 200, {}

    async def unprotect(request: Request, media_id: str) -> tuple[int, Any]:
        await require_admin(request)
        await hs.media.protect(hs.server_name, media_id, False)
        return 200, {}

    async def media_info(request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await require_admin(request)
        record = await hs.media.get_media_info(server_name, media_id)
        return 200, {
            "media_info": {
                "media_origin": record.origin,
                "user_id": record.user_id,
                **record.admin_json(),
            }
        }

    async def delete_media(request: Request, server_name: str, media_id: str) -> tuple[int, Any]:
        await require_admin(request)
        if not await hs.media.delete(server_name, media_id):
            raise MatrixError("M_NOT_FOUND", "Unknown media")
        return 200, {"deleted_media": [media_id], "total": 1}

    async def list_user_media(request: Request, user_id: str) -> tuple[int, Any]:
        await require_admin(request)
        start = query_int(request, "from", 0) or 0
        limit = query_int(request, "limit", 100)
        if start < 0 or limit is None or limit < 0:
            raise MatrixError("M_INVALID_PARAM", "from and limit must not be negative")
        order_by = query_arg(request, "order_by", "created_ts") or "created_ts"
        if order_by not in schemas.ADMIN_MEDIA_ORDER_BY:
            raise MatrixError("M_INVALID_PARAM", f"unknown order_by {order_by!r}")
        direction = query_arg(request, "dir", "f")
        if direction not in ("f", "b"):
            raise MatrixError("M_INVALID_PARAM", "dir must be f or b")
        records, total = await hs.media.list_user_media(
            user_id, start, limit, order_by, direction == "b"
        )
        body: dict[str, Any] = {"media": [r.admin_json() for r in records], "total": total}
        if start + len(records) < total:
            body["next_token"] = start + len(records)
        return 200, body

    async def delete_user_media(request: Request, user_id: str) -> tuple[int, Any]:
        await require_admin(request)
        deleted = await hs.media.delete_user_media(user_id)
        return 200, {"deleted_media": deleted, "total": len(deleted)}

    router.register("POST", ADMIN + "/media/quarantine" + _TARGET, quarantine)
    router.register("POST", ADMIN + "/media/unquarantine" + _TARGET, unquarantine)
    router.register("POST", ADMIN + "/room/(?P<room_id>[^/]+)/media/quarantine", quarantine_room)
    router.register("POST", ADMIN + "/quarantine_media/(?P<room_id>[^/]+)", quarantine_room)
    router.register("GET", ADMIN + "/room/(?P<room_id>[^/]+)/media", room_media)
    router.register("POST", ADMIN + "/user/(?P<user_id>[^/]+)/media/quarantine", quarantine_user)
    router.register("POST", ADMIN + "/media/protect/(?P<media_id>[^/]+)", protect)
    router.register("POST", ADMIN + "/media/unprotect/(?P<media_id>[^/]+)", unprotect)
    router.register(["GET"], ADMIN + "/media" + _TARGET, media_info)
    router.register(["DELETE"], ADMIN + "/media" + _TARGET, delete_media)
    router.register("GET", ADMIN + "/users/(?P<user_id>[^/]+)/media", list_user_media)
    router.register("DELETE", ADMIN + "/users/(?P<user_id>[^/]+)/media", delete_user_media)
