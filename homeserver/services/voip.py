"""TURN credentials for VoIP (GET /voip/turnServer), in the TURN REST scheme coturn uses.

With ``use-auth-secret`` coturn accepts username ``<expiry unix time>:<user id>``
and password ``base64(HMAC-SHA1(shared secret, username))`` until the expiry.
"""

import base64
import hashlib
import hmac
from typing import Any

from homeserver.config.loader import parse_duration_ms
from homeserver.errors import MatrixError


class VoipService:
    def __init__(self, hs: Any) -> None:
        config = hs.config
        self._clock = hs.clock
        self._uris: list[str] = config["turn_uris"]
        self._secret: str | None = config["turn_shared_secret"]
        self._lifetime_ms = parse_duration_ms(config["turn_user_lifetime"])
        self._allow_guests: bool = config["turn_allow_guests"]

    def turn_credentials(self, user_id: str, is_guest: bool) -> dict[str, Any]:
        if not self._uris or not self._secret:
            raise MatrixError("M_NOT_FOUND", "This server has no TURN server configured")
        if is_guest and not self._allow_guests:
            raise MatrixError("M_FORBIDDEN", "Guests may not use this server's TURN server")
        expiry = (self._clock.time_msec() + self._lifetime_ms) // 1000
        username = f"{expiry}:{user_id}"
        digest = hmac.new(self._secret.encode(), username.encode(), hashlib.sha1).digest()
        return {
            "username": username,
            "password": base64.b64encode(digest).decode("ascii"),
            "uris": list(self._uris),
            "ttl": self._lifetime_ms // 1000,
        }
