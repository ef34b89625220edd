"""GET /voip/turnServer: coturn's TURN REST credentials, or a clear error."""

import asyncio
import base64
import hashlib
import hmac
import time
from contextlib import ExitStack

from tests.support.clients import CLIENT, call, close, register, start_e2e_server


def test_turn_credentials_follow_the_turn_rest_scheme(tmp_path):
    async def go(server):
        alice = await register(server)
        status, body = await call(server, alice, "GET", f"{CLIENT}/voip/turnServer")
        assert status == 200
        expiry, user_id = body["username"].split(":", 1)
        assert user_id == alice.user_id
        assert abs(int(expiry) - (time.time() + 7200)) < 60
        expected = base64.b64encode(
            hmac.new(b"s3cret", body["username"].encode(), hashlib.sha1).digest()).decode()
        assert body["password"] == expected
        assert body["uris"] == ["turn:turn.example.com:3478?transport=udp"]
        assert body["ttl"] == 7200
        status, body = await call(server, None, "GET", f"{CLIENT}/voip/turnServer")
        assert status == 401
        await close(alice)

    with ExitStack() as stack:
        server = start_e2e_server(stack, tmp_path, "sqlite3",
                                  turn_uris=["turn:turn.example.com:3478?transport=udp"],
                                  turn_shared_secret="s3cret", turn_user_lifetime="2h")
        asyncio.run(go(server))


def test_no_turn_server_is_a_clear_error(tmp_path):
    async def go(server):
        alice = await register(server)
        status, body = await call(server, alice, "GET", f"{CLIENT}/voip/turnServer")
        assert status == 404
        assert body == {"errcode": "M_NOT_FOUND",
                        "error": "This server has no TURN server configured"}
        await close(alice)

    with ExitStack() as stack:
        asyncio.run(go(start_e2e_server(stack, tmp_path, "sqlite3")))
