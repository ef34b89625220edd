"""POST /user_directory/search (the search itself: homeserver/services/user_directory.py)."""

from typing import Any

from twisted.web.server import Request

from client_api.schemas import profiles as schemas
from homeserver.http.validation import parse_body

CLIENT = "/_matrix/client/(?:v3|r0)"
DEFAULT_LIMIT = 10


def register_user_directory_resources(router: Any, hs: Any) -> None:
    async def search(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request)
        body = parse_body(request, schemas.USER_DIRECTORY_SEARCH)
        limit = body.get("limit", DEFAULT_LIMIT)
        return 200, await hs.profiles.search_user_directory(who.user_id, body["search_term"], limit)

    router.register("POST", CLIENT + "/user_directory/search", search)
