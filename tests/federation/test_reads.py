"""Federation reads (/event, /state, /state_ids, /event_auth, /backfill,
/get_missing_events): the service on an in-process HomeServer, and the HTTP layer on
a loopback TLS listener called by our FederationClient signing as a remote server.

Remote users cannot join over federation yet, so the fixture room gets the
membership events of "@bob:<remote>" through the local room sender (an invite
by the local creator, then bob's join, which the auth rules allow).
Remote servers are named by loopback IP literals the homeserver's default IP
blocklist refuses, so nothing the server sends on its own leaves the process.
"""

import tempfile
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from crypto.keys import generate_signing_key
from federation import register_federation_resources
from homeserver.core.events import MEMBER
from homeserver.errors import MatrixError
from homeserver.services.federation_client import (
    HttpResponseError,
    build_path,
)
from tests.federation.helpers import FakeKeyring, LoopbackServer, loopback_client
from tests.support.homeserver import add_user, close_homeserver, make_homeserver

REMOTE = "127.0.0.1:1"  # has bob in the rooms
OTHER = "127.0.0.1:2"  # has nobody
BOB = f"@bob:{REMOTE}"
KEY = generate_signing_key("r")
OTHER_KEY = generate_signing_key("o")
V1 = "/_matrix/federation/v1"


class ReadsTestsMixin:
    engine = "sqlite3"
    timeout = 60

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.server = LoopbackServer(directory)
        self.hs = make_homeserver(self.stack, directory, self.engine, server_name=self.server.name)
        self.hs.keyring = FakeKeyring(
            {REMOTE: {KEY.key_id: KEY.verify_key}, OTHER: {OTHER_KEY.key_id: OTHER_KEY.verify_key}}
        )
        register_federation_resources(self.server.router, self.hs)  # as listeners do
        self.reads = self.hs.federation_reads
        self.clients = []

    def client(self, name, key):
        client = loopback_client(name, key)
        self.clients.append(client)
        return client

    async def _teardown(self):
        for client in self.clients:
            await client.close()
        await self.server.stop()
        await close_homeserver(self.hs)

    def tearDown(self):
        d = defer.ensureDeferred(self._teardown())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    # --- fixtures ------------------------------------------------------------
    async def send(self, sender, room_id, event_type, content, state_key=None):
        return await self.hs.room_sender.send(sender, room_id, event_type, content, state_key)

    async def message(self, sender, room_id, body):
        return await self.send(
            sender, room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )

    async def room(self, visibility=None, version=None):
        """A room with bob of REMOTE in it; returns (room_id, named events)."""
        if not hasattr(self, "alice"):
            self.alice = await add_user(self.hs, "alice")
        alice = self.alice
        body = {"preset": "private_chat", **({"room_version": version} if version else {})}
        room_id = await self.hs.room_creator.create_room(alice, body)
        ev = {"alice": alice}
        if visibility:
            ev["hv"] = await self.send(
                alice, room_id, "m.room.history_visibility", {"history_visibility": visibility}, ""
            )
        ev["m1"] = await self.message(alice, room_id, "before bob")
        ev["invite"] = await self.send(alice, room_id, MEMBER, {"membership": "invite"}, BOB)
        ev["m_invited"] = await self.message(alice, room_id, "bob is invited")
        ev["join"] = await self.send(BOB, room_id, MEMBER, {"membership": "join"}, BOB)
        ev["m2"] = await self.message(alice, room_id, "bob is here")
        ev["name"] = await self.send(alice, room_id, "m.room.name", {"name": "N"}, "")
        ev["m3"] = await self.message(BOB, room_id, "hi")
        return room_id, ev

    async def auth_chain_brute_force(self, event_ids):
        chain, todo = set(), list(event_ids)
        while todo:
            pdu = await self.hs.events.get_event(todo.pop())
            implicit = (  # room 12: the create event is an implicit auth event
                ["$" + pdu.room_id[1:]]
                if pdu.type != "m.room.create" and pdu.room_version.room_id_is_create_event_hash
                else []
            )
            for a in [*pdu.auth_event_ids, *implicit]:
                if a not in chain:
                    chain.add(a)
                    todo.append(a)
        return chain

    async def state_after(self, event_id):
        group = await self.hs.events_store.get_event_state_group(event_id)
        return await self.hs.state_groups.get(group)

    async def refused(self, coro):
        try:
            await coro
        except MatrixError as e:
            return e.errcode
        self.fail("not refused")

    async def all_events(self, room_id):
        rows = await self.hs.events_store.get_room_events(room_id, None, None, 1000, False)
        return [eid for _, eid, _ in rows]

    # --- the service ---------------------------------------------------------
    def test_event_and_authorisation(self):
        async def go():
            room_id, ev = await self.room()
            pdu = await self.reads.get_event(REMOTE, ev["m1"].event_id)
            self.assertEqual(pdu.data, ev["m1"].data)
            self.assertEqual(
                await self.refused(self.reads.get_event(OTHER, ev["m1"].event_id)), "M_FORBIDDEN"
            )
            self.assertEqual(
                await self.refused(self.reads.get_event(REMOTE, "$nope")), "M_NOT_FOUND"
            )
            for coro in (
                self.reads.get_state_ids(OTHER, room_id, ev["m2"].event_id),
                self.reads.get_state(OTHER, room_id, ev["m2"].event_id),
                self.reads.get_event_auth(OTHER, room_id, ev["m2"].event_id),
                self.reads.backfill(OTHER, room_id, [ev["m3"].event_id], 10),
                self.reads.get_missing_events(OTHER, room_id, [], [ev["m3"].event_id]),
            ):
                self.assertEqual(await self.refused(coro), "M_FORBIDDEN")
            for coro in (
                self.reads.get_state_ids(REMOTE, "!unknown:x", ev["m2"].event_id),
                self.reads.backfill(REMOTE, "!unknown:x", [ev["m3"].event_id], 10),
                self.reads.get_missing_events(REMOTE, "!unknown:x", [], [ev["m3"].event_id]),
                self.reads.get_state_ids(REMOTE, room_id, "$nope"),
                self.reads.get_event_auth(REMOTE, room_id, "$nope"),
            ):
                self.assertEqual(await self.refused(coro), "M_NOT_FOUND")
            # An event of another room is not found through this one.
            other_room, other = await self.room()
            self.assertEqual(
                await self.refused(self.reads.get_state_ids(REMOTE, room_id, other["m1"].event_id)),
                "M_NOT_FOUND",
            )
            # Once bob has left, REMOTE had a member: still readable.
            await self.send(BOB, room_id, MEMBER, {"membership": "leave"}, BOB)
            await self.reads.get_event(REMOTE, ev["m1"].event_id)
            # A server ACL denying REMOTE shuts it out.
            await self.send(
                ev["alice"],
                room_id,
                "m.room.server_acl",
                {"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": True},
                "",
            )
            self.assertEqual(
                await self.refused(self.reads.get_event(REMOTE, ev["m1"].event_id)), "M_FORBIDDEN"
            )

        return defer.ensureDeferred(go())

    def test_state_at_event_is_state_before_it(self):
        async def go():
            room_id, ev = await self.room()
            # At a state event: the state after the event before it.
            ids, chain = await self.reads.get_state_ids(REMOTE, room_id, ev["name"].event_id)
            before = await self.state_after(ev["m2"].event_id)
            self.assertEqual(set(ids), set(before.values()))
            self.assertNotIn(ev["name"].event_id, ids)
            self.assertEqual(set(chain), await self.auth_chain_brute_force(ids))
            self.assertEqual(len(chain), len(set(chain)))
            # At a message: the state of its group (includes the name).
            ids, _ = await self.reads.get_state_ids(REMOTE, room_id, ev["m3"].event_id)
            self.assertEqual(set(ids), set((await self.state_after(ev["m3"].event_id)).values()))
            self.assertIn(ev["name"].event_id, ids)
            # At bob's join: bob is invited, not joined.
            ids, _ = await self.reads.get_state_ids(REMOTE, room_id, ev["join"].event_id)
            self.assertIn(ev["invite"].event_id, ids)
            self.assertNotIn(ev["join"].event_id, ids)
            # /state: the same, as events.
            pdus, chain_pdus = await self.reads.get_state(REMOTE, room_id, ev["name"].event_id)
            self.assertEqual({p.event_id for p in pdus}, set(before.values()))
            self.assertEqual(
                {p.event_id for p in chain_pdus}, await self.auth_chain_brute_force(before.values())
            )
            self.assertEqual(chain_pdus[0].type, "m.room.create")

        return defer.ensureDeferred(go())

    def test_state_across_snapshots(self):
        async def go():
            room_id, ev = await self.room()
            names = [
                await self.send(ev["alice"], room_id, "m.room.name", {"name": f"n{i}"}, "")
                for i in range(60)
            ]
            for i in range(1, 60):
                ids, _ = await self.reads.get_state_ids(REMOTE, room_id, names[i].event_id)
                self.assertIn(names[i - 1].event_id, ids, i)
                self.assertEqual(
                    set(ids), set((await self.state_after(names[i - 1].event_id)).values())
                )
            create = (await self.hs.room_states.get(room_id)).create_event
            self.assertEqual(
                await self.reads.get_state_ids(REMOTE, room_id, create.event_id), ([], [])
            )

        return defer.ensureDeferred(go())

    def test_event_auth(self):
        async def go():
            room_id, ev = await self.room()
            for name in ("m3", "join", "name"):
                event_id = ev[name].event_id
                chain = await self.reads.get_event_auth(REMOTE, room_id, event_id)
                self.assertEqual(
                    {p.event_id for p in chain}, await self.auth_chain_brute_force([event_id])
                )
                self.assertNotIn(event_id, {p.event_id for p in chain})
                depths = [p.depth for p in chain]
                self.assertEqual(depths, sorted(depths))
            # Cached chains answer the same after the cache is warm, and
            # unions of chains are what each event's chain adds up to.
            both = await self.reads.auth_chain_ids([ev["m3"].event_id, ev["join"].event_id])
            self.assertEqual(
                both, await self.auth_chain_brute_force([ev["m3"].event_id, ev["join"].event_id])
            )

        return defer.ensureDeferred(go())

    def test_event_auth_room_11(self):
        async def go():
            room_id, ev = await self.room(version="11")
            chain = await self.reads.get_event_auth(REMOTE, room_id, ev["m3"].event_id)
            self.assertEqual(
                {p.event_id for p in chain}, await self.auth_chain_brute_force([ev["m3"].event_id])
            )
            self.assertEqual(chain[0].type, "m.room.create")
            ids, chain_ids = await self.reads.get_state_ids(REMOTE, room_id, ev["m3"].event_id)
            self.assertEqual(set(chain_ids), await self.auth_chain_brute_force(ids))

        return defer.ensureDeferred(go())

    def test_backfill_order_and_limit(self):
        async def go():
            room_id, ev = await self.room()
            got = await self.reads.backfill(REMOTE, room_id, [ev["m3"].event_id], 3)
            self.assertEqual(
                [p.event_id for p in got],
                [ev["m3"].event_id, ev["name"].event_id, ev["m2"].event_id],
            )
            everything = await self.all_events(room_id)
            got = await self.reads.backfill(REMOTE, room_id, [ev["m3"].event_id], 100)
            self.assertEqual([p.event_id for p in got], list(reversed(everything)))
            got = await self.reads.backfill(REMOTE, room_id, [ev["m2"].event_id, "$nope"], 2)
            self.assertEqual([p.event_id for p in got], [ev["m2"].event_id, ev["join"].event_id])
            self.assertEqual(await self.reads.backfill(REMOTE, room_id, [ev["m2"].event_id], 0), [])

        return defer.ensureDeferred(go())

    def test_get_missing_events(self):
        async def go():
            room_id, ev = await self.room()
            ids = lambda pdus: [p.event_id for p in pdus]  # noqa: E731
            got = await self.reads.get_missing_events(
                REMOTE, room_id, [ev["m1"].event_id], [ev["m3"].event_id]
            )
            self.assertEqual(
                ids(got), [ev[n].event_id for n in ("invite", "m_invited", "join", "m2", "name")]
            )
            # The limit keeps the events nearest to latest_events.
            got = await self.reads.get_missing_events(
                REMOTE, room_id, [ev["m1"].event_id], [ev["m3"].event_id], limit=2
            )
            self.assertEqual(ids(got), [ev["m2"].event_id, ev["name"].event_id])
            # min_depth
            got = await self.reads.get_missing_events(
                REMOTE, room_id, [], [ev["m3"].event_id], min_depth=ev["join"].depth
            )
            self.assertEqual(ids(got), [ev[n].event_id for n in ("join", "m2", "name")])
            # At most 20.
            for i in range(25):
                await self.message(ev["alice"], room_id, str(i))
            latest = (await self.hs.room_states.get(room_id)).extremities
            got = await self.reads.get_missing_events(REMOTE, room_id, [], latest, limit=100)
            self.assertEqual(len(got), 20)
            # Unknown latest events: nothing.
            self.assertEqual(await self.reads.get_missing_events(REMOTE, room_id, [], ["$x"]), [])

        return defer.ensureDeferred(go())

    def test_history_visibility_joined(self):
        async def go():
            room_id, ev = await self.room("joined")
            for name in ("m1", "m_invited"):
                self.assertEqual(
                    await self.refused(self.reads.get_event(REMOTE, ev[name].event_id)),
                    "M_FORBIDDEN",
                    name,
                )
            self.assertEqual(
                await self.refused(self.reads.get_state_ids(REMOTE, room_id, ev["m1"].event_id)),
                "M_FORBIDDEN",
            )
            # bob's own membership events, and everything from the join on.
            for name in ("invite", "join", "m2", "m3"):
                await self.reads.get_event(REMOTE, ev[name].event_id)
            # Backfill and missing events give hidden events redacted.
            got = {
                p.event_id: p
                for p in await self.reads.backfill(REMOTE, room_id, [ev["m3"].event_id], 100)
            }
            self.assertEqual(got[ev["m1"].event_id].content, {})
            self.assertEqual(got[ev["m_invited"].event_id].content, {})
            self.assertEqual(got[ev["m2"].event_id].content["body"], "bob is here")
            missing = await self.reads.get_missing_events(REMOTE, room_id, [], [ev["m2"].event_id])
            by_id = {p.event_id: p for p in missing}
            self.assertEqual(by_id[ev["m1"].event_id].content, {})
            self.assertEqual(by_id[ev["join"].event_id].content["membership"], "join")

        return defer.ensureDeferred(go())

    def test_history_visibility_invited_and_world_readable(self):
        async def go():
            room_id, ev = await self.room("invited")
            self.assertEqual(
                await self.refused(self.reads.get_event(REMOTE, ev["m1"].event_id)), "M_FORBIDDEN"
            )
            await self.reads.get_event(REMOTE, ev["m_invited"].event_id)
            room_id, ev = await self.room("world_readable")
            await self.reads.get_event(REMOTE, ev["m1"].event_id)
            # world_readable does not open the room to servers that were never in it.
            self.assertEqual(
                await self.refused(self.reads.get_event(OTHER, ev["m1"].event_id)), "M_FORBIDDEN"
            )

        return defer.ensureDeferred(go())

    # --- over HTTP -----------------------------------------------------------
    def test_http(self):
        async def go():
            room_id, ev = await self.room()
            remote = self.client(REMOTE, KEY)
            name = self.server.name
            m3, m1 = ev["m3"].event_id, ev["m1"].event_id

            body = await remote.get_json(name, build_path(V1 + "/event/{}", m1))
            self.assertEqual(body["origin"], name)
            self.assertIsInstance(body["origin_server_ts"], int)
            self.assertEqual(body["pdus"], [ev["m1"].data])

            body = await remote.get_json(
                name, build_path(V1 + "/state_ids/{}", room_id), {"event_id": m3}
            )
            state = await self.state_after(m3)
            self.assertEqual(set(body["pdu_ids"]), set(state.values()))
            self.assertEqual(
                set(body["auth_chain_ids"]), await self.auth_chain_brute_force(state.values())
            )

            body = await remote.get_json(
                name, build_path(V1 + "/state/{}", room_id), {"event_id": m3}
            )
            self.assertEqual(
                {p["type"] for p in body["pdus"]} >= {"m.room.create", "m.room.name"}, True
            )
            self.assertEqual(len(body["pdus"]), len(state))
            self.assertEqual(
                {p["origin_server_ts"] for p in body["auth_chain"]}
                <= {
                    p.origin_server_ts
                    for p in (
                        await self.hs.events.get_events(
                            await self.auth_chain_brute_force(state.values())
                        )
                    ).values()
                },
                True,
            )

            body = await remote.get_json(name, build_path(V1 + "/event_auth/{}/{}", room_id, m3))
            self.assertEqual(len(body["auth_chain"]), len(await self.auth_chain_brute_force([m3])))

            body = await remote.get_json(
                name, build_path(V1 + "/backfill/{}", room_id), {"v": m3, "limit": 2}
            )
            self.assertEqual([p["depth"] for p in body["pdus"]], [ev["m3"].depth, ev["name"].depth])
            self.assertEqual(body["origin"], name)

            body = await remote.post_json(
                name,
                build_path(V1 + "/get_missing_events/{}", room_id),
                {"earliest_events": [ev["m2"].event_id], "latest_events": [m3]},
            )
            self.assertEqual(body, {"events": [ev["name"].data]})

            async def error(client, method, path, query=None, content=None):
                with self.assertRaises(HttpResponseError) as cm:
                    await client.request(method, name, path, query=query, content=content)
                return cm.exception.status, cm.exception.errcode

            other = self.client(OTHER, OTHER_KEY)
            forbidden = (403, "M_FORBIDDEN")
            self.assertEqual(await error(other, "GET", build_path(V1 + "/event/{}", m1)), forbidden)
            self.assertEqual(
                await error(
                    other, "GET", build_path(V1 + "/state_ids/{}", room_id), {"event_id": m3}
                ),
                forbidden,
            )
            self.assertEqual(
                await error(
                    other, "GET", build_path(V1 + "/backfill/{}", room_id), {"v": m3, "limit": 5}
                ),
                forbidden,
            )
            self.assertEqual(
                await error(
                    other,
                    "POST",
                    build_path(V1 + "/get_missing_events/{}", room_id),
                    content={"earliest_events": [], "latest_events": [m3]},
                ),
                forbidden,
            )
            self.assertEqual(
                await error(remote, "GET", build_path(V1 + "/event/{}", "$nope")),
                (404, "M_NOT_FOUND"),
            )
            self.assertEqual(
                await error(remote, "GET", build_path(V1 + "/state/{}", "!no:x"), {"event_id": m3}),
                (404, "M_NOT_FOUND"),
            )
            self.assertEqual(
                await error(remote, "GET", build_path(V1 + "/state/{}", room_id)),
                (400, "M_MISSING_PARAM"),
            )
            self.assertEqual(
                await error(remote, "GET", build_path(V1 + "/backfill/{}", room_id), {"limit": 5}),
                (400, "M_MISSING_PARAM"),
            )
            self.assertEqual(
                await error(
                    remote,
                    "POST",
                    build_path(V1 + "/get_missing_events/{}", room_id),
                    content={"latest_events": "x"},
                ),
                (400, "M_BAD_JSON"),
            )

        return defer.ensureDeferred(go())


class SqliteReadsTests(ReadsTestsMixin, unittest.TestCase):
    engine = "sqlite3"


class PostgresReadsTests(ReadsTestsMixin, unittest.TestCase):
    engine = "psycopg"
