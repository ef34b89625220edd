"""The rooms core in-process: creation, chaining under concurrency, durability, reload."""

import tempfile
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from homeserver.core.events import MEMBER, POWER_LEVELS
from homeserver.errors import MatrixError
from homeserver.services.rooms.persister import PersistError
from tests.support.homeserver import add_user, close_homeserver, make_homeserver


class RoomsTestsMixin:
    engine = "sqlite3"

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(self.stack, directory, self.engine)

    def tearDown(self):
        d = defer.ensureDeferred(close_homeserver(self.hs))
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    def run_async(self, coro):
        return defer.ensureDeferred(coro)

    async def _room(self, creator, **body):
        return await self.hs.room_creator.create_room(creator, body)

    def test_create_room_v12_derives_room_id_and_orders_events(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            room_id = await self._room(alice, name="Hello", topic="World")
            room = await self.hs.room_states.get(room_id)
            create = room.create_event
            self.assertEqual(room_id, "!" + create.event_id[1:])
            self.assertEqual(room.content_of("m.room.name", "name"), "Hello")
            self.assertEqual(room.membership(alice), "join")
            # Room 12: the creator is not listed in users and outranks everyone.
            self.assertNotIn(alice, room.get(POWER_LEVELS).content["users"])
            self.assertGreater(room.power_levels.user_level(alice), 10**9)
            # The room reloads from the database with the same state and tip.
            self.hs.room_states.invalidate(room_id)
            reloaded = await self.hs.room_states.get(room_id)
            self.assertEqual(reloaded.state_ids(), room.state_ids())
            self.assertEqual(reloaded.extremities, room.extremities)
            self.assertEqual(reloaded.depth, room.depth)
        return self.run_async(go())

    def test_concurrent_sends_chain_and_are_all_durable(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            room_id = await self._room(alice)
            sends = [
                defer.ensureDeferred(self.hs.room_sender.send(
                    alice, room_id, "m.room.message", {"body": str(i), "msgtype": "m.text"}))
                for i in range(30)
            ]
            pdus = await defer.gatherResults(sends)
            # Each event's only prev_event is the one sent before it.
            for before, after in zip(pdus, pdus[1:], strict=False):
                self.assertEqual(after.prev_event_ids, (before.event_id,))
                self.assertEqual(after.depth, before.depth + 1)
            self.hs.event_cache.clear()
            stored = await self.hs.events.get_events(p.event_id for p in pdus)
            self.assertEqual([stored[p.event_id].content["body"] for p in pdus],
                             [str(i) for i in range(30)])
            self.assertEqual(self.hs.notifier.position, self.hs.stream_ids.persisted_upto)
        return self.run_async(go())

    def test_transaction_id_makes_retries_idempotent(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            room_id = await self._room(alice)
            content = {"body": "once", "msgtype": "m.text"}
            first, concurrent = await defer.gatherResults([
                defer.ensureDeferred(self.hs.room_sender.send(
                    alice, room_id, "m.room.message", content, device_id="D", txn_id="t1"))
                for _ in range(2)
            ])
            self.assertEqual(first.event_id, concurrent.event_id)
            # As after a restart: the transaction ids are loaded from the database.
            self.hs.room_sender._txns.clear()
            self.hs.room_sender.load_recent_txn_ids(self.hs.database.run_blocking(
                self.hs.events_store.recent_txn_ids_txn, 0))
            again = await self.hs.room_sender.send(
                alice, room_id, "m.room.message", content, device_id="D", txn_id="t1")
            self.assertEqual(again.event_id, first.event_id)
            other_device = await self.hs.room_sender.send(
                alice, room_id, "m.room.message", content, device_id="E", txn_id="t1")
            self.assertNotEqual(other_device.event_id, first.event_id)
        return self.run_async(go())

    def test_auth_rules_refuse_with_reason(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            bob = await add_user(self.hs, "bob")
            room_id = await self._room(
                alice, preset="public_chat", power_level_content_override={"events_default": 50})
            await self.hs.membership.join(bob, room_id)
            with self.assertRaises(MatrixError) as cm:
                await self.hs.room_sender.send(bob, room_id, "m.room.message", {"body": "hi"})
            self.assertEqual(cm.exception.errcode, "M_FORBIDDEN")
            self.assertIn("power level", cm.exception.message)
            # A refused event leaves the room unchanged and later sends work.
            await self.hs.room_sender.send(alice, room_id, "m.room.message", {"body": "ok"})
        return self.run_async(go())

    def test_state_groups_give_state_at_each_event(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            room_id = await self._room(alice, preset="public_chat")
            names = []
            # More state events than one delta chain holds, so snapshots are written.
            for i in range(120):
                pdu = await self.hs.room_sender.send(
                    alice, room_id, "m.room.name", {"name": f"n{i}"}, state_key="")
                names.append(pdu)
            for i in (0, 48, 49, 50, 99, 119):
                group = await self.hs.events_store.get_event_state_group(names[i].event_id)
                state = await self.hs.events_store.get_state_group(group)
                self.assertEqual(state[("m.room.name", "")], names[i].event_id)
                self.assertEqual(state[(MEMBER, alice)],
                                 (await self.hs.room_states.get(room_id)).get(MEMBER, alice).event_id)
        return self.run_async(go())

    def test_a_failed_write_fails_the_request_and_stores_nothing_built_on_it(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            store = self.hs.events_store
            real = store.persist_events
            calls = []

            async def fail_first(items, **kwargs):
                calls.append(items)
                if len(calls) == 1:
                    raise RuntimeError("disk on fire")
                return await real(items, **kwargs)

            store.persist_events = fail_first
            # The failed batch's own error, or PersistError for events queued
            # after it that were built on it.
            with self.assertRaises((RuntimeError, PersistError)):
                await self.hs.room_creator.create_room(alice, {"name": "doomed"})
            store.persist_events = real
            rows = await self.hs.database.select("n", "SELECT count(*) FROM events")
            self.assertEqual(rows, [(0,)])
            room_id = await self._room(alice, name="fine")
            self.assertIsNotNone(await self.hs.room_states.get(room_id))
        return self.run_async(go())


class SqliteRoomsTests(RoomsTestsMixin, unittest.TestCase):
    engine = "sqlite3"


class PostgresRoomsTests(RoomsTestsMixin, unittest.TestCase):
    engine = "psycopg"


class CreateRoomCollisionTests(unittest.TestCase):
    """Two identical /createRoom requests in the same millisecond make two rooms."""

    def test_identical_creates_in_one_millisecond(self):
        stack = ExitStack()
        self.addCleanup(stack.close)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        hs = make_homeserver(stack, directory, "sqlite3")
        hs.clock.time_msec = lambda: 1_700_000_000_000  # a frozen clock

        async def go():
            alice = await add_user(hs, "alice")
            first, second = await defer.gatherResults([
                defer.ensureDeferred(hs.room_creator.create_room(alice, {"name": "same"}))
                for _ in range(2)
            ])
            self.assertNotEqual(first, second)
            for room_id in (first, second):
                room = await hs.room_states.get(room_id)
                self.assertEqual(room.membership(alice), "join")
            await close_homeserver(hs)
        return defer.ensureDeferred(go())
