"""The federation sender in-process: a fake federation client records transactions
(and fails on demand), a fake clock drives back-off; SQLite and PostgreSQL."""

import tempfile
from contextlib import ExitStack
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from homeserver.core.events import MEMBER
from homeserver.services.clock import Clock
from homeserver.services.federation_client import (
    Backoff,
    HttpResponseError,
    NotRetryingDestination,
    RequestFailedError,
)
from homeserver.services.federation_sender import FederationSender
from homeserver.services.server import HomeServer
from storage import Database, DatabaseConfig
from tests.support.homeserver import add_user, close_homeserver, make_homeserver

REMOTE = "remote.example"
BOB = f"@bob:{REMOTE}"
MIN_RETRY_MS = 10_000


class FakeFederationClient:
    """Records PUT /send transactions; ``failing`` destinations fail like a dead server."""

    def __init__(self, clock: Clock) -> None:
        self.backoff = Backoff(clock.time_msec, min_interval_ms=MIN_RETRY_MS, multiplier=2)
        self.attempts: list[tuple[str, str, dict]] = []  # every try, failed or not
        self.sent: list[tuple[str, str, dict]] = []  # acknowledged transactions
        self.failing: set[str] = set()
        self.status: dict[str, int] = {}  # destination -> HTTP status to answer
        self.holding = False
        self.held: list[defer.Deferred] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def put_json(self, destination, path, content):
        retry_at = self.backoff.retry_at_ms(destination)
        if retry_at is not None:
            raise NotRetryingDestination(destination, retry_at)
        txn_id = path.rsplit("/", 1)[1]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.holding:
                d = defer.Deferred()
                self.held.append(d)
                await d
            self.attempts.append((destination, txn_id, content))
            if destination in self.failing:
                self.backoff.record_failure(destination)
                raise RequestFailedError(destination, "connection refused")
            status = self.status.get(destination, 200)
            if status >= 500:
                self.backoff.record_failure(destination)
            else:
                self.backoff.record_success(destination)
            if status != 200:
                raise HttpResponseError(destination, f"HTTP {status}", status=status)
            self.sent.append((destination, txn_id, content))
            return {"pdus": {}}
        finally:
            self.in_flight -= 1

    def release_one(self) -> bool:
        if not self.held:
            return False
        self.held.pop(0).callback(None)
        return True

    def pdus_to(self, destination: str) -> list[dict]:
        return [p for dest, _, body in self.sent if dest == destination for p in body["pdus"]]

    def edus_to(self, destination: str, edu_type: str | None = None) -> list[dict]:
        return [
            e
            for dest, _, body in self.sent
            if dest == destination
            for e in body["edus"]
            if edu_type is None or e["edu_type"] == edu_type
        ]


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class SenderTestsMixin:
    engine = "sqlite3"

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(self.stack, directory, self.engine)
        self._attach()

    def tearDown(self):
        self.hs.federation_sender.detach()
        d = defer.ensureDeferred(close_homeserver(self.hs))
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    def _attach(self) -> None:
        """Replace the server's sender with one on a fake client and a fake clock."""
        self.hs.federation_sender.detach()
        self.fake_time = task.Clock()
        clock = Clock(self.fake_time)
        self.client = FakeFederationClient(clock)
        self.sender = FederationSender(self.hs, client=self.client, clock=clock)
        self.hs.federation_sender = self.sender

    async def _restart(self) -> None:
        """Close the server and start a new one on the same database (new sender too)."""
        old = self.hs
        old.federation_sender.detach()
        await close_homeserver(old)
        db = Database(reactor, DatabaseConfig(old.config.database_engine, old.config.database_args))
        db.open()
        max_stream = db.run_blocking(
            lambda txn: txn.execute("SELECT MAX(stream_ordering) FROM events").fetchone()[0] or 0
        )
        self.hs = HomeServer(old.config, reactor, db, [old.server_keys.signing_key], max_stream)
        self._attach()

    def _busy(self) -> bool:
        sender = self.sender
        return bool(
            sender._processing
            or sender._presence_pending
            or any(d.in_flight for d in sender._destinations.values())
        )

    async def _settle(self) -> None:
        """Wait until the sender has nothing in flight (database writes included)."""
        deadline = reactor.seconds() + 60
        while reactor.seconds() < deadline:
            if not self._busy():
                await sleep(0.01)  # let database completions run once more
                if not self._busy():
                    return
            await sleep(0.005)
        raise AssertionError("the federation sender did not settle")

    async def _advance(self, seconds: float) -> None:
        self.fake_time.advance(seconds)
        await self._settle()

    async def _room_with_bob(self) -> tuple[str, str]:
        alice = await add_user(self.hs, "alice")
        room_id = await self.hs.room_creator.create_room(alice, {"preset": "public_chat"})
        # A remote member, as an accepted join from remote.example would leave it.
        await self.hs.room_sender.send(BOB, room_id, MEMBER, {"membership": "join"}, state_key=BOB)
        await self._settle()
        return alice, room_id

    async def _send(self, alice: str, room_id: str, body: str):
        return await self.hs.room_sender.send(
            alice, room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )

    async def _stored_position(self, destination: str):
        rows = await self.hs.database.select(
            "t",
            "SELECT last_successful_stream_ordering, retry_interval_ms"
            " FROM federation_destinations WHERE destination = ?",
            (destination,),
        )
        return rows[0] if rows else None

    # --- PDUs ------------------------------------------------------------------------------
    def test_batches_one_in_flight_order_kept(self):
        async def go():
            alice, room_id = await self._room_with_bob()
            self.assertEqual(self.client.sent, [])  # nothing of ours to send yet
            self.client.holding = True
            sends = [defer.ensureDeferred(self._send(alice, room_id, str(i))) for i in range(120)]
            pdus = await defer.gatherResults(sends)
            deadline = reactor.seconds() + 60
            while len(self.client.pdus_to(REMOTE)) < 120 and reactor.seconds() < deadline:
                self.client.release_one()
                await sleep(0.005)
                self.assertLessEqual(self.client.in_flight, 1)
            self.client.holding = False
            while self.client.release_one():
                pass
            await self._settle()
            self.assertEqual(self.client.max_in_flight, 1)
            sent = [p["content"]["body"] for p in self.client.pdus_to(REMOTE)]
            self.assertEqual(sent, [str(i) for i in range(120)])
            self.assertEqual(
                [p["content"]["body"] for p in self.client.pdus_to(REMOTE)],
                [p.content["body"] for p in pdus],
            )
            sizes = [len(body["pdus"]) for _, _, body in self.client.sent]
            self.assertTrue(all(0 < n <= 50 for n in sizes), sizes)
            self.assertLessEqual(len(sizes), 4)  # the first goes alone, the rest in 50s
            txn_ids = [t for _, t, _ in self.client.sent]
            self.assertEqual(len(set(txn_ids)), len(txn_ids))
            _, _, body = self.client.sent[0]
            self.assertEqual(body["origin"], self.hs.server_name)
            self.assertIsInstance(body["origin_server_ts"], int)
            self.assertEqual(body["edus"], [])
            last_stream = self.hs.stream_ids.persisted_upto
            self.assertEqual((await self._stored_position(REMOTE))[0], last_stream)
            # Bob's own join came from his server: never sent back to it.
            self.assertNotIn(MEMBER, [p["type"] for p in self.client.pdus_to(REMOTE)])

        return defer.ensureDeferred(go())

    def test_retry_with_backoff_resends_same_transaction(self):
        async def go():
            alice, room_id = await self._room_with_bob()
            self.client.failing.add(REMOTE)
            await self._send(alice, room_id, "first")
            await self._settle()
            self.assertEqual(len(self.client.attempts), 1)
            first_txn = self.client.attempts[0][1]
            for i in range(5):
                await self._send(alice, room_id, f"more {i}")
            await self._settle()
            await self._advance(9)
            self.assertEqual(len(self.client.attempts), 1)  # still backing off
            await self._advance(1.1)
            self.assertEqual(len(self.client.attempts), 2)
            self.assertEqual(self.client.attempts[1][1], first_txn)  # the same transaction
            self.assertEqual(self.client.attempts[1][2]["pdus"], self.client.attempts[0][2]["pdus"])
            stored = await self._stored_position(REMOTE)
            self.assertEqual(stored[1], 2 * MIN_RETRY_MS)  # back-off recorded, doubled
            self.client.failing.clear()
            await self._advance(15)
            self.assertEqual(len(self.client.attempts), 2)  # the wait is 20 s now
            await self._advance(6)
            self.assertEqual(self.client.sent[0][1], first_txn)
            bodies = [p["content"]["body"] for p in self.client.pdus_to(REMOTE)]
            self.assertEqual(bodies, ["first"] + [f"more {i}" for i in range(5)])
            self.assertEqual(len(self.client.sent), 2)
            stored = await self._stored_position(REMOTE)
            self.assertEqual(stored, (self.hs.stream_ids.persisted_upto, 0))

        return defer.ensureDeferred(go())

    def test_recovery_resumes_at_once_and_4xx_drops(self):
        async def go():
            alice, room_id = await self._room_with_bob()
            self.client.failing.add(REMOTE)
            await self._send(alice, room_id, "a")
            await self._settle()
            self.client.failing.clear()
            # Another request to the server worked: the back-off ends, sending resumes.
            self.client.backoff.record_success(REMOTE)
            await self._settle()
            self.assertEqual([p["content"]["body"] for p in self.client.pdus_to(REMOTE)], ["a"])
            # A 4xx for the whole transaction cannot be fixed by retrying: it is dropped.
            self.client.status[REMOTE] = 400
            await self._send(alice, room_id, "b")
            await self._settle()
            del self.client.status[REMOTE]
            await self._send(alice, room_id, "c")
            await self._settle()
            self.assertEqual(
                [p["content"]["body"] for p in self.client.pdus_to(REMOTE)], ["a", "c"]
            )

        return defer.ensureDeferred(go())

    def test_invite_goes_to_target_server(self):
        async def go():
            alice, room_id = await self._room_with_bob()
            carol = "@carol:other.example"
            invite = await self.hs.room_sender.send(
                alice, room_id, MEMBER, {"membership": "invite"}, state_key=carol
            )
            await self._settle()
            to_other = self.client.pdus_to("other.example")
            self.assertEqual(len(to_other), 1)
            self.assertEqual(to_other[0]["state_key"], carol)
            self.assertEqual(len(self.client.pdus_to(REMOTE)), 1)  # bob's server too
            self.assertEqual(to_other[0], invite.to_federation_json())

        return defer.ensureDeferred(go())

    def test_catch_up_after_restart_reads_the_database(self):
        async def go():
            alice, room_id = await self._room_with_bob()
            await self._send(alice, room_id, "before")
            await self._settle()
            self.assertEqual(len(self.client.sent), 1)
            # The server goes away; 120 events pile up, one failed attempt on record.
            self.client.failing.add(REMOTE)
            for i in range(120):
                await self._send(alice, room_id, str(i))
            await self._settle()
            await self._restart()
            self.assertEqual(self.client.sent, [])
            self.sender.start()
            await self._settle()
            self.assertEqual(self.client.attempts, [])  # the stored back-off holds
            await self._advance(MIN_RETRY_MS / 1000 + 1)
            sizes = [len(body["pdus"]) for _, _, body in self.client.sent]
            self.assertEqual(sizes, [50, 50, 20])
            bodies = [p["content"]["body"] for p in self.client.pdus_to(REMOTE)]
            self.assertEqual(bodies, [str(i) for i in range(120)])
            stored = await self._stored_position(REMOTE)
            self.assertEqual(stored, (self.hs.stream_ids.persisted_upto, 0))
            # Live again: the next event goes from memory.
            await self._send(alice, room_id, "after")
            await self._settle()
            self.assertEqual(self.client.pdus_to(REMOTE)[-1]["content"]["body"], "after")
            self.assertEqual(len(self.client.sent), 4)

        return defer.ensureDeferred(go())

    def test_memory_overflow_falls_back_to_catch_up(self):
        async def go():
            import homeserver.services.federation_sender as module

            self.patch(module, "MAX_QUEUED_PDUS", 10)
            alice, room_id = await self._room_with_bob()
            self.client.failing.add(REMOTE)
            for i in range(30):
                await self._send(alice, room_id, str(i))
            await self._settle()
            self.client.failing.clear()
            self.client.backoff.record_success(REMOTE)
            await self._settle()
            bodies = [p["content"]["body"] for p in self.client.pdus_to(REMOTE)]
            self.assertEqual(bodies, [str(i) for i in range(30)])

        return defer.ensureDeferred(go())

    # --- EDUs -------------------------------------------------------------------------------
    def test_edus_typing_dedup_receipts_presence(self):
        async def go():
            alice, room_id = await self._room_with_bob()
            self.client.failing.add(REMOTE)
            pdu = await self._send(alice, room_id, "hello")  # fails: back-off
            await self._settle()
            await self.hs.typing.set_typing(alice, room_id, True, 30_000)
            await self.hs.typing.set_typing(alice, room_id, False)
            await self.hs.receipts.send_receipt(alice, room_id, "m.read", pdu.event_id)
            self.patch(self.hs.presence._limiter, "check", lambda *a, **k: None)
            await self.hs.presence.set_status(alice, "online", "hi")
            await self.hs.presence.set_status(alice, "unavailable")
            await self._settle()
            self.client.failing.clear()
            self.client.backoff.record_success(REMOTE)
            await self._settle()
            typing = self.client.edus_to(REMOTE, "m.typing")
            self.assertEqual(
                [e["content"] for e in typing],
                [{"room_id": room_id, "user_id": alice, "typing": False}],
            )
            receipts = self.client.edus_to(REMOTE, "m.receipt")
            self.assertEqual(len(receipts), 1)
            entry = receipts[0]["content"][room_id]["m.read"][alice]
            self.assertEqual(entry["event_ids"], [pdu.event_id])
            self.assertIsInstance(entry["data"]["ts"], int)
            presence = self.client.edus_to(REMOTE, "m.presence")
            self.assertEqual(len(presence), 1)
            push = presence[0]["content"]["push"]
            self.assertEqual(
                [(p["user_id"], p["presence"]) for p in push], [(alice, "unavailable")]
            )
            self.assertEqual(push[0]["status_msg"], "hi")
            # Typing in a room with no remote member goes nowhere.
            lonely = await self.hs.room_creator.create_room(alice, {})
            before = len(self.client.sent)
            await self.hs.typing.set_typing(alice, lonely, True, 1000)
            await self._settle()
            self.assertEqual(len(self.client.sent), before)
            self.hs.typing.shutdown()
            self.hs.presence.shutdown()

        return defer.ensureDeferred(go())

    def test_edu_limit_per_transaction(self):
        async def go():
            self.client.failing.add(REMOTE)
            self.sender.send_edu(REMOTE, "org.example", {"n": -1})
            await self._settle()
            for i in range(150):
                self.sender.send_edu(REMOTE, "org.example", {"n": i}, key=i % 120)
            self.client.failing.clear()
            self.client.backoff.record_success(REMOTE)
            await self._settle()
            sizes = [len(body["edus"]) for _, _, body in self.client.sent]
            self.assertEqual(sizes, [1, 100, 20])
            ns = [e["content"]["n"] for e in self.client.edus_to(REMOTE)]
            # Keys 0-29 were replaced by 120-149 (moved to the back).
            self.assertEqual(ns, [-1] + list(range(30, 150)))

        return defer.ensureDeferred(go())

    def test_to_device_is_durable_across_restart(self):
        async def go():
            alice = await add_user(self.hs, "alice")
            self.client.failing.add(REMOTE)
            messages = {BOB: {"BOBDEVICE": {"secret": 1}}}
            await self.hs.to_device.send(alice, "DEV", "t1", "m.room_key_request", messages)
            # A retried request (same transaction id) sends nothing twice.
            await self.hs.to_device.send(alice, "DEV", "t1", "m.room_key_request", messages)
            await self._settle()
            self.assertEqual(len(self.client.attempts), 1)
            await self._restart()
            self.sender.start()
            await self._advance(MIN_RETRY_MS / 1000 + 1)
            edus = self.client.edus_to(REMOTE, "m.direct_to_device")
            self.assertEqual(len(edus), 1)
            content = edus[0]["content"]
            self.assertEqual(content["sender"], alice)
            self.assertEqual(content["type"], "m.room_key_request")
            self.assertEqual(content["messages"], messages)
            self.assertIsInstance(content["message_id"], str)
            rows = await self.hs.database.select(
                "t", "SELECT COUNT(*) FROM federation_outbox_to_device"
            )
            self.assertEqual(rows[0][0], 0)  # acknowledged: forgotten
            await self._restart()
            self.sender.start()
            await self._advance(MIN_RETRY_MS / 1000 + 1)
            self.assertEqual(self.client.sent, [])  # nothing sent twice

        return defer.ensureDeferred(go())


class SqliteSenderTests(SenderTestsMixin, unittest.TestCase):
    engine = "sqlite3"


class PostgresSenderTests(SenderTestsMixin, unittest.TestCase):
    engine = "psycopg"
