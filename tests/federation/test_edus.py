"""Inbound EDUs (typing, receipts, presence, to-device, device lists) as a local
user's /sync sees them, on an in-process HomeServer.

Remote users cannot join over federation in these tests, so the room gets the
membership events of "@bob:<remote>" through the local room sender, as in
test_reads.py. The remote servers are loopback IP literals the default IP
blocklist refuses, so nothing the server sends on its own leaves the process;
what the federation sender is asked to send is recorded instead.
"""

import tempfile
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

from crypto.keys import generate_signing_key
from federation import register_federation_resources
from homeserver.core.events import MEMBER
from homeserver.services.clock import Clock
from homeserver.services.federation_client import (
    build_path,
)
from homeserver.services.federation_edus import REMOTE_TYPING_TIMEOUT_MS
from homeserver.services.filtering import SyncFilter
from homeserver.services.sync import SyncRequest
from homeserver.services.tokens import StreamToken
from homeserver.services.typing import TypingService
from tests.federation.helpers import FakeKeyring, LoopbackServer, loopback_client
from tests.support.homeserver import add_user, close_homeserver, make_homeserver

REMOTE = "127.0.0.1:1"  # bob's server: bob is in the room
OTHER = "127.0.0.1:2"  # another server, with nobody in the room
BOB = f"@bob:{REMOTE}"
DAVE = f"@dave:{REMOTE}"  # in no room
CAROL = f"@carol:{OTHER}"
KEY = generate_signing_key("r")


class _WithClock:
    """The HomeServer as a service sees it, with another clock."""

    def __init__(self, hs, clock):
        self._hs = hs
        self.clock = clock

    def __getattr__(self, name):
        return getattr(self._hs, name)


class EduTestsMixin:
    engine = "sqlite3"
    timeout = 60

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.server = LoopbackServer(directory)
        self.hs = make_homeserver(
            self.stack, directory, self.engine, server_name=self.server.name
        )
        self.hs.keyring = FakeKeyring({REMOTE: {KEY.key_id: KEY.verify_key}})
        # Typing timeouts on a fake clock.
        self.time = task.Clock()
        self.hs.typing = TypingService(_WithClock(self.hs, Clock(self.time)))
        # What would go out over federation (EDUs, to-device messages).
        self.sent = []
        sender = self.hs.federation_sender
        sender.send_edu = lambda *args, **kwargs: self.sent.append(args)

        async def send_to_device(*args):
            self.sent.append(args)

        sender.send_to_device = send_to_device
        self.edus = self.hs.federation_edus
        self.clients = []

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
    async def room(self):
        """alice (device ADEV) and bob in a room; returns the room id."""
        hs = self.hs
        self.alice = await add_user(hs, "alice")
        await hs.accounts.store.create_device(self.alice, "ADEV", None, 0)
        room_id = await hs.room_creator.create_room(self.alice, {"preset": "private_chat"})
        send = hs.room_sender.send
        await send(self.alice, room_id, MEMBER, {"membership": "invite"}, BOB)
        await send(BOB, room_id, MEMBER, {"membership": "join"}, BOB)
        return room_id

    async def sync(self, since=None):
        return await self.hs.sync.sync(
            SyncRequest(
                user_id=self.alice,
                device_id="ADEV",
                since=StreamToken.parse(since) if since else None,
                timeout_ms=0,
                full_state=False,
                filter=SyncFilter(),
            )
        )

    def echoes(self):
        """What was sent out about other servers' users (alice's own presence may go)."""
        return [s for s in self.sent if any(u in repr(s) for u in (BOB, CAROL, DAVE))]

    @staticmethod
    def ephemeral(body, room_id, event_type):
        room = body.get("rooms", {}).get("join", {}).get(room_id, {})
        events = room.get("ephemeral", {}).get("events", [])
        return [e["content"] for e in events if e["type"] == event_type]

    # --- typing ----------------------------------------------------------------
    def test_typing_shows_in_sync_and_times_out(self):
        async def go():
            room_id = await self.room()
            token = (await self.sync())["next_batch"]
            # Not bob's server, not a member, not a boolean: dropped.
            await self.edus.on_edu(OTHER, "m.typing", {"room_id": room_id, "user_id": BOB,
                                                       "typing": True})
            await self.edus.on_edu(REMOTE, "m.typing", {"room_id": room_id, "user_id": DAVE,
                                                        "typing": True})
            await self.edus.on_edu(REMOTE, "m.typing", {"room_id": room_id, "user_id": BOB,
                                                        "typing": "yes"})
            body = await self.sync(token)
            self.assertEqual(self.ephemeral(body, room_id, "m.typing"), [])

            await self.edus.on_edu(REMOTE, "m.typing", {"room_id": room_id, "user_id": BOB,
                                                        "typing": True})
            body = await self.sync(token)
            self.assertEqual(self.ephemeral(body, room_id, "m.typing"), [{"user_ids": [BOB]}])
            self.assertEqual(self.echoes(), [])  # not echoed
            # 30 s later, without news from bob's server: no longer typing.
            token = body["next_batch"]
            self.time.advance((REMOTE_TYPING_TIMEOUT_MS - 100) / 1000)
            self.assertEqual(self.hs.typing.typing_users(room_id), [BOB])
            self.time.advance(0.2)
            body = await self.sync(token)
            self.assertEqual(self.ephemeral(body, room_id, "m.typing"), [{"user_ids": []}])
            # typing: false stops at once.
            await self.edus.on_edu(REMOTE, "m.typing", {"room_id": room_id, "user_id": BOB,
                                                        "typing": True})
            await self.edus.on_edu(REMOTE, "m.typing", {"room_id": room_id, "user_id": BOB,
                                                        "typing": False})
            self.assertEqual(self.hs.typing.typing_users(room_id), [])

        return defer.ensureDeferred(go())

    def test_typing_and_receipts_obey_the_server_acl(self):
        async def go():
            room_id = await self.room()
            m1 = await self.hs.room_sender.send(
                self.alice, room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
            await self.hs.room_sender.send(
                self.alice, room_id, "m.room.server_acl",
                {"allow": ["*"], "allow_ip_literals": False}, "")  # REMOTE is an IP literal
            token = (await self.sync())["next_batch"]
            await self.edus.on_edu(REMOTE, "m.typing", {"room_id": room_id, "user_id": BOB,
                                                        "typing": True})
            await self.edus.on_edu(REMOTE, "m.receipt", {room_id: {"m.read": {
                BOB: {"event_ids": [m1.event_id], "data": {"ts": 1}}}}})
            body = await self.sync(token)
            self.assertEqual(self.ephemeral(body, room_id, "m.typing"), [])
            self.assertEqual(self.ephemeral(body, room_id, "m.receipt"), [])

        return defer.ensureDeferred(go())

    # --- receipts --------------------------------------------------------------
    def test_receipts_show_in_sync(self):
        async def go():
            room_id = await self.room()
            m1 = await self.hs.room_sender.send(
                self.alice, room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
            token = (await self.sync())["next_batch"]

            def receipt(user_id, event_id, receipt_type="m.read", **data):
                return {room_id: {receipt_type: {user_id: {
                    "event_ids": [event_id], "data": {"ts": 1234, **data}}}}}

            for origin, content in (
                (OTHER, receipt(BOB, m1.event_id)),  # not bob's server
                (REMOTE, receipt(DAVE, m1.event_id)),  # not a member
                (REMOTE, receipt(BOB, "$unknown")),  # an event we do not have
                (REMOTE, receipt(BOB, m1.event_id, "m.read.private")),  # never travels
                (REMOTE, {room_id: "nonsense"}),
            ):
                await self.edus.on_edu(origin, "m.receipt", content)
            self.assertEqual(self.ephemeral(await self.sync(token), room_id, "m.receipt"), [])

            await self.edus.on_edu(REMOTE, "m.receipt", receipt(BOB, m1.event_id,
                                                                thread_id="main"))
            body = await self.sync(token)
            self.assertEqual(
                self.ephemeral(body, room_id, "m.receipt"),
                [{m1.event_id: {"m.read": {BOB: {"ts": 1234, "thread_id": "main"}}}}],
            )
            self.assertEqual(self.echoes(), [])  # not echoed

        return defer.ensureDeferred(go())

    # --- presence --------------------------------------------------------------
    def test_presence_shows_in_sync(self):
        async def go():
            await self.room()
            token = (await self.sync())["next_batch"]
            entry = {"presence": "online", "last_active_ago": 5000, "currently_active": True,
                     "status_msg": "around"}
            await self.edus.on_edu(REMOTE, "m.presence", {"push": [
                {"user_id": BOB, **entry},
                {"user_id": DAVE, **entry},  # shares no room with us
                {"user_id": CAROL, **entry},  # not REMOTE's user
                "nonsense",
            ]})
            body = await self.sync(token)
            events = {e["sender"]: e["content"] for e in body["presence"]["events"]}
            self.assertEqual(set(events) - {self.alice}, {BOB})
            self.assertEqual(events[BOB]["presence"], "online")
            self.assertEqual(events[BOB]["status_msg"], "around")
            self.assertTrue(events[BOB]["currently_active"])
            self.assertGreaterEqual(events[BOB]["last_active_ago"], 5000)
            position = self.hs.presence.position
            self.assertEqual(await self.hs.presence.updates_for(DAVE, None, position), [])
            self.assertEqual(self.echoes(), [])  # not echoed

            await self.edus.on_edu(REMOTE, "m.presence", {"push": [
                {"user_id": BOB, "presence": "offline"}]})
            body = await self.sync(body["next_batch"])
            events = {e["sender"]: e["content"] for e in body["presence"]["events"]}
            self.assertEqual(events[BOB]["presence"], "offline")

        return defer.ensureDeferred(go())

    # --- to-device -------------------------------------------------------------
    def test_to_device_delivered_once(self):
        async def go():
            await self.room()
            await self.hs.accounts.store.create_device(self.alice, "ADEV2", None, 0)

            def edu(message_id, messages, sender=BOB):
                return {"sender": sender, "type": "m.room_key_request",
                        "message_id": message_id, "messages": messages}

            one = edu("m1", {self.alice: {"ADEV": {"n": 1}}, CAROL: {"C": {"n": 9}}})
            await self.edus.on_edu(REMOTE, "m.direct_to_device", one)
            await self.edus.on_edu(REMOTE, "m.direct_to_device", one)  # a retry
            await self.edus.on_edu(REMOTE, "m.direct_to_device",
                                   edu("m2", {self.alice: {"*": {"n": 2}}}))
            # Not REMOTE's user, malformed: dropped.
            await self.edus.on_edu(REMOTE, "m.direct_to_device",
                                   edu("m3", {self.alice: {"ADEV": {"n": 3}}}, sender=CAROL))
            await self.edus.on_edu(REMOTE, "m.direct_to_device", edu("m4", "nonsense"))
            body = await self.sync()
            self.assertEqual(
                body["to_device"]["events"],
                [
                    {"type": "m.room_key_request", "sender": BOB, "content": {"n": 1}},
                    {"type": "m.room_key_request", "sender": BOB, "content": {"n": 2}},
                ],
            )
            self.assertEqual(self.echoes(), [])  # carol's message is not relayed
            # The other device got the "*" message only.
            other = await self.hs.to_device.messages_for(
                self.alice, "ADEV2", 0, self.hs.to_device.position)
            self.assertEqual([m["content"] for m in other], [{"n": 2}])

        return defer.ensureDeferred(go())

    # --- device lists ----------------------------------------------------------
    def test_device_list_updates_show_in_sync(self):
        async def go():
            await self.room()
            token = (await self.sync())["next_batch"]
            update = {"user_id": BOB, "device_id": "BDEV", "stream_id": 3, "prev_id": [2],
                      "deleted": False, "keys": {}}
            # Not bob's server; dave shares no room: nothing to tell.
            await self.edus.on_edu(OTHER, "m.device_list_update", update)
            await self.edus.on_edu(REMOTE, "m.device_list_update",
                                   {**update, "user_id": DAVE})
            body = await self.sync(token)
            self.assertNotIn("device_lists", body)

            await self.edus.on_edu(REMOTE, "m.device_list_update", update)
            body = await self.sync(token)
            self.assertEqual(body["device_lists"], {"changed": [BOB], "left": []})

            token = body["next_batch"]
            await self.edus.on_edu(REMOTE, "m.signing_key_update", {"user_id": BOB})
            body = await self.sync(token)
            self.assertEqual(body["device_lists"], {"changed": [BOB], "left": []})

        return defer.ensureDeferred(go())

    # --- bad input ---------------------------------------------------------------
    def test_malformed_edus_are_dropped(self):
        async def go():
            room_id = await self.room()
            for edu_type in ("m.typing", "m.receipt", "m.presence", "m.direct_to_device",
                             "m.device_list_update", "m.signing_key_update", "m.unknown"):
                for content in (None, "x", [], {}, {"user_id": 5, "push": "x", "sender": []},
                                {room_id: {"m.read": {BOB: "x"}}}):
                    await self.edus.on_edu(REMOTE, edu_type, content)
            self.assertEqual(self.hs.typing.typing_users(room_id), [])
            self.assertEqual(self.echoes(), [])

        return defer.ensureDeferred(go())

    # --- through PUT /send --------------------------------------------------------
    def test_put_send_transaction(self):
        async def go():
            register_federation_resources(self.server.router, self.hs)
            room_id = await self.room()
            token = (await self.sync())["next_batch"]
            client = loopback_client(REMOTE, KEY)
            self.clients.append(client)
            transaction = {"origin": REMOTE, "origin_server_ts": 0, "pdus": [], "edus": [
                {"edu_type": "m.typing",
                 "content": {"room_id": room_id, "user_id": BOB, "typing": True}},
                {"edu_type": "m.direct_to_device",
                 "content": {"sender": BOB, "type": "m.dummy", "message_id": "once",
                             "messages": {self.alice: {"ADEV": {"n": 1}}}}},
                {"edu_type": "m.device_list_update",
                 "content": {"user_id": BOB, "device_id": "BDEV", "stream_id": 1}},
                {"edu_type": "m.typing", "content": "malformed"},
            ]}
            for txn_id in ("t1", "t1", "t2"):  # a retry, then the same EDUs in a new one
                answer = await client.put_json(
                    self.server.name, build_path("/_matrix/federation/v1/send/{}", txn_id),
                    transaction)
                self.assertEqual(answer, {"pdus": {}})
            body = await self.sync(token)
            self.assertEqual(self.ephemeral(body, room_id, "m.typing"), [{"user_ids": [BOB]}])
            self.assertEqual([e["content"] for e in body["to_device"]["events"]], [{"n": 1}])
            self.assertEqual(body["device_lists"]["changed"], [BOB])

        return defer.ensureDeferred(go())


class SqliteEduTests(EduTestsMixin, unittest.TestCase):
    engine = "sqlite3"


class PostgresEduTests(EduTestsMixin, unittest.TestCase):
    engine = "psycopg"
