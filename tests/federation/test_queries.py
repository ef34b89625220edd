"""The query and publicRooms endpoints, in process: our client against our server
code (federation.queries on a loopback TLS listener) with fake services."""

import json
import tempfile
from pathlib import Path

import treq
from twisted.internet import defer, reactor, ssl
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from crypto.keys import generate_signing_key
from federation.queries import register_query_resources
from homeserver.errors import MatrixError
from homeserver.services.federation_client import (
    HttpResponseError,
)
from tests.federation.helpers import (
    FakeHomeServer,
    FakeKeyring,
    LoopbackServer,
    loopback_client,
)

ORIGIN = "origin.test"
KEY = generate_signing_key("q")


class FakeProfiles:
    def __init__(self, server_name):
        self.server_name = server_name

    def is_mine(self, user_id):
        return user_id.endswith(":" + self.server_name)

    async def get_profile(self, user_id):
        if user_id.startswith("@bob:"):
            return {"displayname": "Bob", "avatar_url": "mxc://x/y"}
        raise MatrixError("M_NOT_FOUND", "Profile not found")

    async def get_profile_field(self, user_id, field):
        profile = await self.get_profile(user_id)
        if field not in profile:
            raise MatrixError("M_NOT_FOUND", "not set")
        return {field: profile[field]}


class FakeDirectory:
    def __init__(self):
        self.public_calls = []

    async def resolve_alias(self, alias):
        if alias.startswith("#room:"):
            return "!room:x", ["a", "b"]
        raise MatrixError("M_NOT_FOUND", "Room alias not found")

    async def public_rooms(self, limit, since, filter, include_all_networks=False):
        self.public_calls.append((limit, since, filter, include_all_networks))
        return {
            "chunk": [{"room_id": "!room:x", "num_joined_members": 1}],
            "total_room_count_estimate": 1,
        }


class QueryTests(TestCase):
    timeout = 30

    def setUp(self):
        self.server = LoopbackServer(Path(tempfile.mkdtemp()))
        self.hs = FakeHomeServer(
            self.server.name,
            FakeKeyring({ORIGIN: {KEY.key_id: KEY.verify_key}}),
            allow_public_rooms_over_federation=True,
        )
        self.hs.profiles = FakeProfiles(self.server.name)
        self.hs.directory = FakeDirectory()
        register_query_resources(self.server.router, self.hs)
        self.client = loopback_client(ORIGIN, KEY)

    async def _teardown(self):
        await self.client.close()
        await self.server.stop()

    def tearDown(self):
        return defer.ensureDeferred(self._teardown())

    async def error(self, method, path, query=None, content=None):
        with self.assertRaises(HttpResponseError) as cm:
            await self.client.request(method, self.server.name, path, query=query, content=content)
        return cm.exception.status, cm.exception.errcode

    def test_profile(self):
        async def go():
            name = self.server.name
            path = "/_matrix/federation/v1/query/profile"
            self.assertEqual(
                await self.client.get_json(name, path, {"user_id": f"@bob:{name}"}),
                {"displayname": "Bob", "avatar_url": "mxc://x/y"},
            )
            self.assertEqual(
                await self.client.get_json(
                    name, path, {"user_id": f"@bob:{name}", "field": "avatar_url"}
                ),
                {"avatar_url": "mxc://x/y"},
            )
            self.assertEqual(
                await self.error("GET", path, {"user_id": f"@bob:{name}", "field": "m.tz"}),
                (404, "M_NOT_FOUND"),
            )
            self.assertEqual(
                await self.error("GET", path, {"user_id": f"@eve:{name}"}), (404, "M_NOT_FOUND")
            )
            self.assertEqual(
                await self.error("GET", path, {"user_id": "@bob:elsewhere"}),
                (400, "M_INVALID_PARAM"),
            )
            self.assertEqual(await self.error("GET", path), (400, "M_MISSING_PARAM"))

        return defer.ensureDeferred(go())

    def test_directory(self):
        async def go():
            path = "/_matrix/federation/v1/query/directory"
            self.assertEqual(
                await self.client.get_json(self.server.name, path, {"room_alias": "#room:x"}),
                {"room_id": "!room:x", "servers": ["a", "b"]},
            )
            self.assertEqual(
                await self.error("GET", path, {"room_alias": "#nope:x"}), (404, "M_NOT_FOUND")
            )
            self.assertEqual(await self.error("GET", path), (400, "M_MISSING_PARAM"))

        return defer.ensureDeferred(go())

    def test_public_rooms(self):
        async def go():
            path = "/_matrix/federation/v1/publicRooms"
            body = await self.client.get_json(
                self.server.name, path, {"limit": 0, "include_all_networks": True}
            )
            self.assertEqual(body["chunk"][0]["room_id"], "!room:x")
            await self.client.post_json(
                self.server.name,
                path,
                {"limit": 5, "since": "n123", "filter": {"generic_search_term": "x"}},
            )
            self.assertEqual(
                self.hs.directory.public_calls,
                [(None, None, None, True), (5, "n123", {"generic_search_term": "x"}, False)],
            )
            body = await self.client.post_json(
                self.server.name, path, {"third_party_instance_id": "irc"}
            )
            self.assertEqual(body, {"chunk": [], "total_room_count_estimate": 0})
            self.assertEqual(
                await self.error("POST", path, content={"limit": "x"}), (400, "M_INVALID_PARAM")
            )
            self.hs.config["allow_public_rooms_over_federation"] = False
            self.assertEqual(await self.error("GET", path), (403, "M_FORBIDDEN"))
            self.assertEqual(await self.error("POST", path, content={}), (403, "M_FORBIDDEN"))

        return defer.ensureDeferred(go())

    def test_unsigned_requests_are_refused(self):
        @implementer(IPolicyForHTTPS)
        class AnyCertificate:
            def creatorForNetloc(self, hostname, port):
                return ssl.CertificateOptions(verify=False)

        async def go():
            agent = Agent(reactor, contextFactory=AnyCertificate())
            for path in [
                "publicRooms",
                "query/profile?user_id=@bob:x",
                "query/directory?room_alias=%23room:x",
            ]:
                url = f"https://{self.server.name}/_matrix/federation/v1/{path}"
                response = await agent.request(b"GET", url.encode())
                body = json.loads(await treq.content(response))
                self.assertEqual((response.code, body["errcode"]), (401, "M_UNAUTHORIZED"))

        return defer.ensureDeferred(go())
