"""GET /_matrix/federation/v1/version."""

from typing import Any

from twisted.web.server import Request


def register_federation_resources(router: Any, hs: Any) -> None:
    async def version(request: Request) -> tuple[int, Any]:
        return 200, {"server": {"name": "homeserver", "version": hs.version}}

    router.register("GET", "/_matrix/federation/v1/version", version)
