"""GET /_matrix/key/v2/server: our keys, self-signed."""

from typing import Any

from twisted.web.server import Request


def register_key_resources(router: Any, hs: Any) -> None:
    async def server_keys(request: Request, key_id: str | None = None) -> tuple[int, Any]:
        # The key_id path segment is deprecated; the whole document is returned.
        return 200, hs.server_keys.key_response()

    router.register("GET", r"/_matrix/key/v2/server(?:/(?P<key_id>[^/]*))?", server_keys)
