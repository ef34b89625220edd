"""PUT /rooms/{roomId}/typing/{userId}: start or stop typing, for yourself only."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import ephemeral as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body

CLIENT = "/_matrix/client/(?:v3|r0)"


def register_typing_resources(router: Any, hs: Any) -> None:
    async def set_typing(request: Request, room_id: str, user_id: str) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        if who.user_id != user_id:
            raise MatrixError("M_FORBIDDEN", "You can only set your own typing state")
        body = parse_body(request, schemas.TYPING)
        await hs.typing.set_typing(user_id, room_id, body["typing"], body.get("timeout"))
        return 200, {}

    router.register(
        "PUT", CLIENT + "/rooms/(?P<room_id>[^/]+)/typing/(?P<user_id>[^/]+)", set_typing
    )
