"""GET /capabilities."""

from typing import Any

from twisted.web.server import Request

from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS

CLIENT = "/_matrix/client/(?:r0|v3)"


def register_capabilities_resources(router: Any, hs: Any) -> None:
    available = {version: "stable" for version in KNOWN_ROOM_VERSIONS}

    async def capabilities(request: Request) -> tuple[int, Any]:
        requester = await hs.auth.get_requester(request, allow_guest=True)
        caps: dict[str, Any] = {
            "m.change_password": {"enabled": not requester.is_guest},
            "m.room_versions": {
                "default": hs.config["default_room_version"],
                "available": dict(available),
            },
            "m.set_displayname": {"enabled": True},
            "m.set_avatar_url": {"enabled": True},
            "m.3pid_changes": {"enabled": False},
            "m.get_login_token": {"enabled": not requester.is_guest},
        }
        if await hs.auth.is_server_admin(requester.user_id):
            caps["m.account_moderation"] = {"suspend": True, "lock": True}
        return 200, {"capabilities": caps}

    router.register("GET", CLIENT + "/capabilities", capabilities)
