"""GET /sync and the filter endpoints."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import sync as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body, query_arg, query_bool, query_int
from homeserver.services.sync import SyncRequest
from homeserver.services.tokens import StreamToken

CLIENT = "/_matrix/client/(?:v3|r0)"
MAX_TIMEOUT_MS = 5 * 60 * 1000


def register_sync_resources(router: Any, hs: Any) -> None:
    async def sync(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        since = query_arg(request, "since")
        set_presence = query_arg(request, "set_presence")
        if set_presence not in (None, "online", "offline", "unavailable"):
            raise MatrixError("M_INVALID_PARAM", "set_presence must be online, offline or unavailable")
        timeout = query_int(request, "timeout", 0) or 0
        sync_filter = await hs.filters.sync_filter(who.user_id, query_arg(request, "filter"))
        result = await hs.sync.sync(SyncRequest(
            user_id=who.user_id,
            device_id=who.device_id,
            since=StreamToken.parse(since) if since else None,
            timeout_ms=max(0, min(timeout, MAX_TIMEOUT_MS)),
            full_state=query_bool(request, "full_state"),
            filter=sync_filter,
            set_presence=set_presence,
        ))
        return 200, result

    async def create_filter(request: Request, user_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        if who.user_id != user_id:
            raise MatrixError("M_FORBIDDEN", "You can only create filters for yourself")
        body = parse_body(request, schemas.FILTER)
        return 200, {"filter_id": await hs.filters.add(user_id, body)}

    async def get_filter(request: Request, user_id: str, filter_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        if who.user_id != user_id:
            raise MatrixError("M_FORBIDDEN", "You can only read your own filters")
        return 200, await hs.filters.get(user_id, filter_id)

    router.register("GET", CLIENT + "/sync", sync)
    router.register("POST", CLIENT + "/user/(?P<user_id>[^/]+)/filter", create_filter)
    router.register("GET", CLIENT + "/user/(?P<user_id>[^/]+)/filter/(?P<filter_id>[^/]+)",
                    get_filter)
