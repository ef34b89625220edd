"""Account data and room tags, for the user themself only.

GET/PUT /user/{userId}/account_data/{type}
GET/PUT /user/{userId}/rooms/{roomId}/account_data/{type}
GET /user/{userId}/rooms/{roomId}/tags, PUT/DELETE /user/{userId}/rooms/{roomId}/tags/{tag}
"""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import ephemeral as schemas
from homeserver.errors import MatrixError
from homeserver.http.validation import parse_body
from homeserver.services.account_data import check_client_settable, check_room_id

USER = "/_matrix/client/(?:v3|r0)/user/(?P<user_id>[^/]+)"
ROOM = USER + "/rooms/(?P<room_id>[^/]+)"


def register_account_data_resources(router: Any, hs: Any) -> None:
    async def me(request: Request, user_id: str, action: str) -> str:
        who = await hs.auth.get_requester(request)
        if who.user_id != user_id:
            raise MatrixError("M_FORBIDDEN", f"Cannot {action} account data for other users.")
        return user_id

    async def get_global(request: Request, user_id: str, data_type: str) -> tuple[int, Any]:
        await me(request, user_id, "read")
        content = await hs.account_data.get_global(user_id, data_type)
        if content is None:
            raise MatrixError("M_NOT_FOUND", "Account data not found.")
        return 200, content

    async def put_global(request: Request, user_id: str, data_type: str) -> tuple[int, Any]:
        await me(request, user_id, "add")
        check_client_settable(data_type)
        content = parse_body(request, schemas.SET_ACCOUNT_DATA)
        await hs.account_data.set_global(user_id, data_type, content)
        return 200, {}

    async def get_room(
        request: Request, user_id: str, room_id: str, data_type: str
    ) -> tuple[int, Any]:
        await me(request, user_id, "read")
        check_room_id(room_id)
        content = await hs.account_data.get_room(user_id, room_id, data_type)
        if content is None:
            raise MatrixError("M_NOT_FOUND", "Room account data not found.")
        return 200, content

    async def put_room(
        request: Request, user_id: str, room_id: str, data_type: str
    ) -> tuple[int, Any]:
        await me(request, user_id, "add")
        check_room_id(room_id)
        check_client_settable(data_type)
        content = parse_body(request, schemas.SET_ROOM_ACCOUNT_DATA)
        await hs.account_data.set_room(user_id, room_id, data_type, content)
        return 200, {}

    async def get_tags(request: Request, user_id: str, room_id: str) -> tuple[int, Any]:
        await me(request, user_id, "read")
        check_room_id(room_id)
        return 200, {"tags": await hs.account_data.get_tags(user_id, room_id)}

    async def put_tag(request: Request, user_id: str, room_id: str, tag: str) -> tuple[int, Any]:
        await me(request, user_id, "add")
        check_room_id(room_id)
        body = parse_body(request, schemas.SET_TAG)
        await hs.account_data.set_tag(user_id, room_id, tag, body)
        return 200, {}

    async def delete_tag(request: Request, user_id: str, room_id: str, tag: str) -> tuple[int, Any]:
        await me(request, user_id, "remove")
        check_room_id(room_id)
        await hs.account_data.remove_tag(user_id, room_id, tag)
        return 200, {}

    router.register("GET", USER + "/account_data/(?P<data_type>[^/]+)", get_global)
    router.register("PUT", USER + "/account_data/(?P<data_type>[^/]+)", put_global)
    router.register("GET", ROOM + "/account_data/(?P<data_type>[^/]+)", get_room)
    router.register("PUT", ROOM + "/account_data/(?P<data_type>[^/]+)", put_room)
    router.register("GET", ROOM + "/tags", get_tags)
    router.register("PUT", ROOM + "/tags/(?P<tag>[^/]+)", put_tag)
    router.register("DELETE", ROOM + "/tags/(?P<tag>[^/]+)", delete_tag)
