"""GET /relations and /threads (client-server v1)."""

from typing import Any

from twisted.web.server import Request

from homeserver.errors import MatrixError
from homeserver.http.validation import query_arg, query_int

ROOM = "/_matrix/client/v1/rooms/(?P<room_id>[^/]+)"


def register_relations_resources(router: Any, hs: Any) -> None:
    async def relations(request: Request, room_id: str, event_id: str,
                        rel_type: str | None = None, event_type: str | None = None
                        ) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        direction = query_arg(request, "dir", "b")
        if direction not in ("b", "f"):
            raise MatrixError("M_INVALID_PARAM", "dir must be b or f")
        return 200, await hs.relations.relations(
            who.user_id, who.device_id, room_id, event_id, rel_type, event_type,
            query_arg(request, "from"), query_arg(request, "to"),
            query_int(request, "limit", 50), direction)

    async def threads(request: Request, room_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        include = query_arg(request, "include", "all")
        if include not in ("all", "participated"):
            raise MatrixError("M_INVALID_PARAM", "include must be all or participated")
        return 200, await hs.relations.threads(
            who.user_id, who.device_id, room_id, include, query_arg(request, "from"),
            query_int(request, "limit", 50))

    router.register(
        "GET",
        ROOM + "/relations/(?P<event_id>[^/]+)(?:/(?P<rel_type>[^/]+)(?:/(?P<event_type>[^/]+))?)?",
        relations,
    )
    router.register("GET", ROOM + "/threads", threads)
