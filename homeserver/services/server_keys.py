"""Our signing keys as other servers see them: the signed /_matrix/key/v2/server body."""

from typing import Any

from crypto.keys import ServerSigningKey
from crypto.signing import sign_json
from homeserver.services.clock import Clock


class ServerKeys:
    def __init__(
        self,
        server_name: str,
        signing_keys: list[ServerSigningKey],
        old_verify_keys: dict[str, Any],
        refresh_interval_ms: int,
        clock: Clock,
    ) -> None:
        if not signing_keys:
            raise ValueError("a server needs at least one signing key")
        self.server_name = server_name
        self.signing_keys = signing_keys
        self._old_verify_keys = old_verify_keys or {}
        self._refresh_interval_ms = refresh_interval_ms
        self._clock = clock
        self._cached: dict[str, Any] | None = None

    @property
    def signing_key(self) -> ServerSigningKey:
        """The key new events and requests are signed with."""
        return self.signing_keys[0]

    def key_response(self) -> dict[str, Any]:
        """The self-signed key document, re-signed when half its validity has passed."""
        now = self._clock.time_msec()
        cached = self._cached
        if cached is not None and cached["valid_until_ts"] - now > self._refresh_interval_ms // 2:
            return cached
        body: dict[str, Any] = {
            "server_name": self.server_name,
            "valid_until_ts": now + self._refresh_interval_ms,
            "verify_keys": {k.key_id: {"key": k.public_key_base64} for k in self.signing_keys},
            "old_verify_keys": {
                key_id: {"key": old["key"], "expired_ts": old["expired_ts"]}
                for key_id, old in self._old_verify_keys.items()
            },
        }
        for key in self.signing_keys:
            body = sign_json(body, self.server_name, key)
        self._cached = body
        return body
