"""Inbound X-Matrix authentication (federation.auth) over a real loopback socket,
so the raw request target the server checks is exactly what went on the wire."""

import io
import json
import tempfile
from pathlib import Path

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from crypto.keys import generate_signing_key
from crypto.xmatrix import sign_request
from federation.auth import authenticated
from homeserver.http.server import parse_json_body
from tests.federation.helpers import FakeHomeServer, FakeKeyring, LoopbackServer

US = "us.test"
THEM = "them.test"
KEY = generate_signing_key("them")
OTHER_KEY = generate_signing_key("them")  # same key id, different key


class InboundAuthTests(TestCase):
    timeout = 30

    def setUp(self):
        self.server = LoopbackServer(Path(tempfile.mkdtemp()), tls=False)
        self.keyring = FakeKeyring({THEM: {KEY.key_id: KEY.verify_key}})
        self.hs = FakeHomeServer(US, self.keyring)
        self.calls = []

        async def handler(request, origin, **params):
            self.calls.append((origin, params))
            return 200, {"origin": origin, "params": params, "body": parse_json_body(request)}

        self.server.router.register(
            ["GET", "PUT", "POST"],
            r"/_matrix/federation/v1/t/(?P<x>[^/]+)",
            authenticated(self.hs, handler),
        )

        @authenticated(self.hs)
        async def decorated(request, origin):
            return 200, {"origin": origin}

        self.server.router.register("GET", "/_matrix/federation/v1/decorated", decorated)
        self.agent = Agent(reactor)

    def tearDown(self):
        return defer.ensureDeferred(self.server.stop())

    async def send(self, method, target, auth=None, body=None, extra_auth=None):
        headers = Headers()
        for value in [auth, extra_auth]:
            if value is not None:
                headers.addRawHeader(b"Authorization", value.encode())
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(
                io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
            )
        url = f"http://127.0.0.1:{self.server.port_number}{target}".encode()
        response = await self.agent.request(method.encode(), url, headers, producer)
        return response.code, json.loads(await treq.content(response))

    def sign(self, method, target, content=None, destination=US, key=KEY, origin=THEM):
        return sign_request(key, origin, destination, method, target, content)

    def assertUnauthorized(self, result, status=401, errcode="M_UNAUTHORIZED"):
        code, body = result
        self.assertEqual((code, body["errcode"]), (status, errcode), body)
        self.assertEqual(self.calls, [])

    def run_async(self, coro):
        return defer.ensureDeferred(coro)

    def test_valid_requests_reach_the_handler_with_the_origin(self):
        async def go():
            target = "/_matrix/federation/v1/t/a%2Fb?user_id=%40a%3Ab&x=1"
            code, body = await self.send("GET", target, self.sign("GET", target))
            self.assertEqual(code, 200, body)
            self.assertEqual(body["origin"], THEM)
            self.assertEqual(body["params"], {"x": "a/b"})
            # The key must be valid now: old keys sign events, not requests.
            self.assertEqual(self.keyring.lookups, [(THEM, KEY.key_id, self.hs.clock.now)])
            content = {"pdus": [], "n": 1, "s": "é"}
            target = "/_matrix/federation/v1/t/put"
            code, body = await self.send("PUT", target, self.sign("PUT", target, content), content)
            self.assertEqual((code, body["body"]), (200, content))
            code, body = await self.send(
                "GET",
                "/_matrix/federation/v1/decorated",
                self.sign("GET", "/_matrix/federation/v1/decorated"),
            )
            self.assertEqual((code, body), (200, {"origin": THEM}))

        return self.run_async(go())

    def test_missing_or_malformed_header(self):
        async def go():
            target = "/_matrix/federation/v1/t/x"
            self.assertUnauthorized(await self.send("GET", target))
            self.assertUnauthorized(await self.send("GET", target, "Bearer abc"))
            self.assertUnauthorized(await self.send("GET", target, "X-Matrix origin=them.test"))
            self.assertUnauthorized(await self.send("GET", target, "X-Matrix garbage"))

        return self.run_async(go())

    def test_wrong_signature(self):
        async def go():
            target = "/_matrix/federation/v1/t/x"
            self.assertUnauthorized(
                await self.send("GET", target, self.sign("GET", target, key=OTHER_KEY))
            )
            # Signed for another method.
            self.assertUnauthorized(await self.send("GET", target, self.sign("POST", target)))
            # Someone else's claim of origin.
            self.assertUnauthorized(
                await self.send("GET", target, self.sign("GET", target, origin="x.test"))
            )
            # A second header that does not verify spoils the request.
            self.assertUnauthorized(
                await self.send(
                    "GET",
                    target,
                    self.sign("GET", target),
                    extra_auth=self.sign("GET", target, key=OTHER_KEY),
                )
            )

        return self.run_async(go())

    def test_wrong_destination(self):
        async def go():
            target = "/_matrix/federation/v1/t/x"
            self.assertUnauthorized(
                await self.send(
                    "GET", target, self.sign("GET", target, destination="elsewhere.test")
                )
            )

        return self.run_async(go())

    def test_query_string_and_encoding_tampering(self):
        async def go():
            signed = "/_matrix/federation/v1/t/x?user_id=%40a%3Ab&limit=1"
            auth = self.sign("GET", signed)
            for sent in [
                "/_matrix/federation/v1/t/x?user_id=%40a%3Ab&limit=2",
                "/_matrix/federation/v1/t/x?limit=1&user_id=%40a%3Ab",
                "/_matrix/federation/v1/t/x",
                "/_matrix/federation/v1/t/x?user_id=@a:b&limit=1",
            ]:
                self.assertUnauthorized(await self.send("GET", sent, auth))
            code, _ = await self.send("GET", signed, auth)
            self.assertEqual(code, 200)

        return self.run_async(go())

    def test_body_tampering(self):
        async def go():
            target = "/_matrix/federation/v1/t/x"
            auth = self.sign("PUT", target, {"a": 1})
            self.assertUnauthorized(await self.send("PUT", target, auth, {"a": 2}))
            self.assertUnauthorized(await self.send("PUT", target, auth))
            # A body that the signature omitted.
            self.assertUnauthorized(
                await self.send("PUT", target, self.sign("PUT", target), {"a": 1})
            )
            code, body = await self.send("PUT", target, auth, b'{"a":  1}')
            self.assertEqual(code, 200, body)
            self.calls.clear()
            self.assertUnauthorized(
                await self.send("PUT", target, auth, b"{not json"), 400, "M_NOT_JSON"
            )

        return self.run_async(go())

    def test_unknown_key_and_missing_destination(self):
        async def go():
            target = "/_matrix/federation/v1/t/x"
            stranger = generate_signing_key("zzz")
            self.assertUnauthorized(
                await self.send("GET", target, self.sign("GET", target, key=stranger))
            )
            # Old senders leave destination out: the signature must then be over our name.
            auth = self.sign("GET", target).replace(f'destination="{US}",', "")
            self.assertNotIn("destination", auth)
            code, _ = await self.send("GET", target, auth)
            self.assertEqual(code, 200)
            self.calls.clear()
            auth = self.sign("GET", target, destination="x.test").replace(
                'destination="x.test",', ""
            )
            self.assertUnauthorized(await self.send("GET", target, auth))

        return self.run_async(go())

    def test_federation_domain_whitelist_forbids(self):
        async def go():
            self.hs.config["federation_domain_whitelist"] = ["friend.test"]
            target = "/_matrix/federation/v1/t/x"
            self.assertUnauthorized(
                await self.send("GET", target, self.sign("GET", target)), 403, "M_FORBIDDEN"
            )

        return self.run_async(go())
