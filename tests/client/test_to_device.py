"""Send-to-device messages, end to end with matrix-nio on SQLite and PostgreSQL.

Delivered exactly once (the sync after the one that returned a message does
not repeat it), idempotent per transaction id, fanned out by "*", waking a
sleeping /sync, and kept across a restart of the server. The per-sync limit
and device deletion are tested in process on a real database.
"""

import asyncio
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nio import AsyncClient, LoginResponse, SyncResponse, ToDeviceMessage, ToDeviceResponse
from twisted.internet import defer
from twisted.trial import unittest

from homeserver.services.to_device import ToDeviceService
from tests.support.clients import CLIENT, call, close, register, run
from tests.support.homeserver import add_user, make_homeserver


async def sync(server: Any, client: Any, since: str | None = None, timeout: int = 0) -> dict:
    path = f"{CLIENT}/sync?timeout={timeout}" + (f"&since={since}" if since else "")
    status, body = await call(server, client, "GET", path)
    assert status == 200, body
    return body


def messages(body: dict) -> list[dict]:
    return body.get("to_device", {}).get("events", [])


async def send(
    server: Any, client: Any, txn_id: str, messages: dict, event_type: str = "org.example.ping"
) -> tuple[int, Any]:
    return await call(
        server,
        client,
        "PUT",
        f"{CLIENT}/sendToDevice/{quote(event_type)}/{quote(txn_id)}",
        {"messages": messages},
    )


async def second_device(server: Any, client: AsyncClient) -> AsyncClient:
    other = AsyncClient(server.base_url, client.user_id)
    response = await other.login("correct horse battery", device_name="second")
    assert isinstance(response, LoginResponse), response
    return other


def test_delivered_exactly_once_and_idempotent_per_txn_id(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        start = await sync(matrix_server, bob)
        assert messages(start) == []
        ping = ToDeviceMessage("org.example.ping", bob.user_id, bob.device_id, {"n": 1})
        assert isinstance(await alice.to_device(ping, tx_id="txn-1"), ToDeviceResponse)
        # A retry with the same transaction id is not sent again, whatever its body.
        retry = ToDeviceMessage("org.example.ping", bob.user_id, bob.device_id, {"n": 2})
        assert isinstance(await alice.to_device(retry, tx_id="txn-1"), ToDeviceResponse)

        first = await sync(matrix_server, bob, start["next_batch"])
        expected = {"type": "org.example.ping", "sender": alice.user_id, "content": {"n": 1}}
        assert messages(first) == [expected]
        # Not acknowledged yet: syncing from the old token again delivers it again.
        assert messages(await sync(matrix_server, bob, start["next_batch"])) == [expected]
        # Syncing with the token that delivered it acknowledges it: never again.
        after = await sync(matrix_server, bob, first["next_batch"])
        assert messages(after) == []
        assert messages(await sync(matrix_server, bob, first["next_batch"])) == []
        assert messages(await sync(matrix_server, bob, start["next_batch"])) == []

        # Another transaction id is another message; matrix-nio parses it.
        again = ToDeviceMessage("org.example.ping", bob.user_id, bob.device_id, {"n": 3})
        assert isinstance(await alice.to_device(again, tx_id="txn-2"), ToDeviceResponse)
        response = await bob.sync(timeout=0, since=after["next_batch"])
        assert isinstance(response, SyncResponse)
        assert [(e.sender, e.source["content"]) for e in response.to_device_events] == [
            (alice.user_id, {"n": 3})
        ]
        # The same transaction id from another device of alice is a new transaction.
        alice2 = await second_device(matrix_server, alice)
        assert isinstance(await alice2.to_device(ping, tx_id="txn-1"), ToDeviceResponse)
        latest = await sync(matrix_server, bob, response.next_batch)
        assert messages(latest) == [expected]
        await close(alice, alice2, bob)

    run(go())


def test_star_reaches_every_device_others_are_skipped(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        bob2 = await second_device(matrix_server, bob)
        tokens = {c.device_id: (await sync(matrix_server, c))["next_batch"] for c in (bob, bob2)}
        status, body = await send(
            matrix_server,
            alice,
            "star",
            {
                bob.user_id: {"*": {"to": "all"}},
                alice.user_id: {"NOSUCHDEVICE": {"to": "nobody"}},
                "@someone:elsewhere.example": {"DEVICE": {"to": "remote"}},
            },
        )
        assert (status, body) == (200, {})
        for client in (bob, bob2):
            got = await sync(matrix_server, client, tokens[client.device_id])
            assert messages(got) == [
                {"type": "org.example.ping", "sender": alice.user_id, "content": {"to": "all"}}
            ]
            tokens[client.device_id] = got["next_batch"]
        assert messages(await sync(matrix_server, alice)) == []
        # One device named beside "*": that device gets its own content.
        status, _ = await send(
            matrix_server,
            alice,
            "mixed",
            {bob.user_id: {"*": {"to": "all"}, bob2.device_id: {"to": "bob2"}}},
        )
        assert status == 200
        got = await sync(matrix_server, bob2, tokens[bob2.device_id])
        assert [m["content"] for m in messages(got)] == [{"to": "bob2"}]

        for bad in [
            {},
            {"messages": []},
            {"messages": {"not-a-user": {"D": {}}}},
            {"messages": {bob.user_id: {"D": "text"}}},
        ]:
            status, body = await call(
                matrix_server, alice, "PUT", f"{CLIENT}/sendToDevice/m.x/bad-{len(str(bad))}", bad
            )
            assert status == 400 and body["errcode"] == "M_BAD_JSON", bad
        status, body = await call(
            matrix_server, None, "PUT", f"{CLIENT}/sendToDevice/m.x/t", {"messages": {}}
        )
        assert status == 401
        await close(alice, bob, bob2)

    run(go())


def test_sleeping_sync_wakes_at_once_on_to_device(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        start = await sync(matrix_server, bob)
        waiting = asyncio.ensure_future(
            sync(matrix_server, bob, start["next_batch"], timeout=10_000)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        started = time.monotonic()
        status, _ = await send(matrix_server, alice, "wake", {bob.user_id: {bob.device_id: {}}})
        assert status == 200
        woken = await waiting
        assert time.monotonic() - started < 1.0
        assert [m["sender"] for m in messages(woken)] == [alice.user_id]
        await close(alice, bob)

    run(go())


def test_kept_across_restart_and_positions_never_go_back(matrix_server):
    """Last in this module: it restarts the module's server."""

    async def before():
        alice, bob, carol = (
            await register(matrix_server),
            await register(matrix_server),
            await register(matrix_server),
        )
        carol_start = await sync(matrix_server, carol)
        status, _ = await send(
            matrix_server, alice, "for-carol", {carol.user_id: {carol.device_id: {"for": "carol"}}}
        )
        assert status == 200
        # bob gets and acknowledges his, so only carol's is stored at the restart.
        bob_token = (await sync(matrix_server, bob))["next_batch"]
        await send(matrix_server, alice, "for-bob", {bob.user_id: {bob.device_id: {"n": 1}}})
        delivered = await sync(matrix_server, bob, bob_token)
        assert len(messages(delivered)) == 1
        acknowledged = await sync(matrix_server, bob, delivered["next_batch"])
        assert messages(acknowledged) == []
        # Account data is durable too.
        path = f"{CLIENT}/user/{quote(alice.user_id)}/account_data/org.example.keep"
        assert (await call(matrix_server, alice, "PUT", path, {"kept": True}))[0] == 200
        alice_token = (await sync(matrix_server, alice))["next_batch"]
        await close(alice, bob, carol)  # their sessions belong to this event loop
        return alice, bob, carol, carol_start, acknowledged["next_batch"], alice_token, path

    async def after(alice, bob, carol, carol_start, bob_token, alice_token, path):
        assert messages(await sync(matrix_server, carol, carol_start["next_batch"])) == [
            {"type": "org.example.ping", "sender": alice.user_id, "content": {"for": "carol"}}
        ]
        # A message sent after the restart is newer than bob's token from before it.
        await send(matrix_server, alice, "after", {bob.user_id: {bob.device_id: {"n": 2}}})
        assert [m["content"] for m in messages(await sync(matrix_server, bob, bob_token))] == [
            {"n": 2}
        ]
        assert await call(matrix_server, alice, "GET", path) == (200, {"kept": True})
        await call(matrix_server, alice, "PUT", path, {"kept": "again"})
        changed = await sync(matrix_server, alice, alice_token)
        assert changed["account_data"]["events"] == [
            {"type": "org.example.keep", "content": {"kept": "again"}}
        ]

    state = run(before())
    matrix_server.stop()
    matrix_server.start()
    run(after(*state))


# --- in process, on a real database ----------------------------------------------------------
class ToDeviceServiceTest(unittest.TestCase):
    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(self.stack, directory, "sqlite3")

    def tearDown(self):
        d = defer.ensureDeferred(self.hs.database.close())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    async def _device(self, localpart: str, device_id: str) -> str:
        user_id = await add_user(self.hs, localpart)
        await self.hs.database.run_interaction(
            "add_device",
            lambda txn: txn.execute(
                "INSERT INTO devices (user_id, device_id, created_ts) VALUES (?, ?, 0)",
                (user_id, device_id),
            ),
        )
        return user_id

    def test_limit_reports_the_position_reached(self):
        async def go():
            service = self.hs.to_device
            bob = await self._device("bob", "D1")
            for i in range(5):
                await service.send("@alice:x", "A", f"t{i}", "m.x", {bob: {"D1": {"i": i}}})
            self.assertEqual(service.position, 5)
            got = []
            since = 0
            while True:
                batch = await service.messages_for(bob, "D1", since, service.position, limit=2)
                got.extend(m["content"]["i"] for m in batch)
                if not batch:
                    break
                self.assertLessEqual(len(batch), 2)
                since = batch.position
            self.assertEqual(got, [0, 1, 2, 3, 4])
            self.assertEqual(since, 5)
            self.assertEqual(service.waiting_devices(), 0)  # all acknowledged and deleted
            rows = await self.hs.database.select("count", "SELECT COUNT(*) FROM device_inbox")
            self.assertEqual(rows[0][0], 0)
            # Without a limit the batch reaches ``upto``.
            await service.send("@alice:x", "A", "t5", "m.x", {bob: {"D1": {"i": 5}}})
            batch = await service.messages_for(bob, "D1", since, service.position)
            self.assertEqual((len(batch), batch.position), (1, 6))

        return defer.ensureDeferred(go())

    def test_restart_reloads_position_and_waiting_devices(self):
        async def go():
            service = self.hs.to_device
            bob = await self._device("bob", "D1")
            carol = await self._device("carol", "C1")
            await service.send("@alice:x", "A", "t1", "m.x", {carol: {"C1": {"n": 1}}})
            await service.send("@alice:x", "A", "t2", "m.x", {bob: {"D1": {"n": 2}}})
            await service.messages_for(bob, "D1", 2, 2)  # bob acknowledges: deleted
            restarted = ToDeviceService(self.hs)
            self.assertEqual(restarted.position, 2)
            self.assertEqual(restarted.waiting_devices(), 1)
            self.assertEqual(list(await restarted.messages_for(bob, "D1", 2, 2)), [])
            got = await restarted.messages_for(carol, "C1", 0, 2)
            self.assertEqual([m["content"] for m in got], [{"n": 1}])

        return defer.ensureDeferred(go())

    def test_deleted_devices_lose_their_messages(self):
        async def go():
            service = self.hs.to_device
            bob = await self._device("bob", "D1")
            await service.send("@alice:x", "A", "t1", "m.x", {bob: {"D1": {"n": 1}}})
            self.assertEqual(service.waiting_devices(), 1)
            await self.hs.accounts.delete_devices(bob, ["D1"])
            self.assertEqual(service.waiting_devices(), 0)
            rows = await self.hs.database.select("count", "SELECT COUNT(*) FROM device_inbox")
            self.assertEqual(rows[0][0], 0)

        return defer.ensureDeferred(go())
