"""GET/PUT /presence/{userId}/status.

Setting is for yourself only; reading is for yourself and the users you share
a room with. With presence disabled, PUT still answers 200 and does nothing.
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import ephemeral as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body

CLIENT = "/_matrix/client/(?:v3|r0)"


def register_presence_resources(router: Any, hs: Any) -> None:
    async def get_status(request: Request, user_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        return 200, await hs.presence.get_status(who.user_id, user_id)

    async def set_status(request: Request, user_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        if who.user_id != user_id:
            raise MatrixError("M_FORBIDDEN", "You can only set your own presence")
        body = parse_body(request, schemas.SET_PRESENCE)
        if "status_msg" in body:
            await hs.presence.set_status(user_id, body["presence"], body["status_msg"])
        else:
            await hs.presence.set_status(user_id, body["presence"])
        return 200, {}

    path = CLIENT + "/presence/(?P<user_id>[^/]+)/status"
    router.register("GET", path, get_status)
    router.register("PUT", path, set_status)
