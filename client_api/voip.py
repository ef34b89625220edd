"""GET /voip/turnServer."""

from typing import Any

from twisted.web.server import Request


def register_voip_resources(router: Any, hs: Any) -> None:
    async def turn_server(request: Request) -> tuple[int, Any]:
        who = await hs.auth.get_requester(request, allow_guest=True)
        return 200, hs.voip.turn_credentials(who.user_id, who.is_guest)

    router.register("GET", "/_matrix/client/(?:v3|r0)/voip/turnServer", turn_server)
