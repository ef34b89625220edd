"""Account data (global and per room) and room tags, end to end with matrix-nio.

Every scenario runs on SQLite and on PostgreSQL. What a client cannot provoke
(concurrent tag changes, the position only counting committed writes) is
tested in process.
"""

import asyncio
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nio import PushRulesEvent, RoomCreateResponse, SyncResponse
from twisted.internet import defer
from twisted.trial import unittest

from homeserver.services.account_data import AccountDataService, StreamWriter
from tests.support.clients import CLIENT, call, close, register, run
from tests.support.homeserver import make_homeserver


def global_path(user_id: str, data_type: str) -> str:
    return f"{CLIENT}/user/{quote(user_id)}/account_data/{quote(data_type)}"


def room_path(user_id: str, room_id: str, rest: str) -> str:
    return f"{CLIENT}/user/{quote(user_id)}/rooms/{quote(room_id)}/{rest}"


async def sync(server: Any, client: Any, since: str | None = None, timeout: int = 0) -> dict:
    path = f"{CLIENT}/sync?timeout={timeout}" + (f"&since={since}" if since else "")
    status, body = await call(server, client, "GET", path)
    assert status == 200, body
    return body


def global_events(body: dict) -> list[dict]:
    """Global account data the client set (not the server-managed m.push_rules)."""
    events = body.get("account_data", {}).get("events", [])
    return [e for e in events if e["type"] != "m.push_rules"]


def room_events(body: dict, room_id: str) -> list[dict]:
    room = body.get("rooms", {}).get("join", {}).get(room_id, {})
    return room.get("account_data", {}).get("events", [])


async def new_room(client: Any) -> str:
    response = await client.room_create()
    assert isinstance(response, RoomCreateResponse), response
    return response.room_id


def test_global_account_data_round_trip_and_sync_once_per_change(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        path = global_path(alice.user_id, "org.example.config")
        status, body = await call(matrix_server, alice, "GET", path)
        assert status == 404 and body["errcode"] == "M_NOT_FOUND"
        first = await sync(matrix_server, alice)

        assert (await call(matrix_server, alice, "PUT", path, {"theme": "dark"}))[0] == 200
        assert await call(matrix_server, alice, "GET", path) == (200, {"theme": "dark"})
        changed = await sync(matrix_server, alice, first["next_batch"])
        assert global_events(changed) == [
            {"type": "org.example.config", "content": {"theme": "dark"}}
        ]
        unchanged = await sync(matrix_server, alice, changed["next_batch"])
        assert global_events(unchanged) == []
        # Overwritten: the new content, once; an initial sync has the latest only.
        await call(matrix_server, alice, "PUT", path, {"theme": "light"})
        await call(matrix_server, alice, "PUT", global_path(alice.user_id, "org.example.b"), {})
        again = await sync(matrix_server, alice, unchanged["next_batch"])
        assert global_events(again) == [
            {"type": "org.example.config", "content": {"theme": "light"}},
            {"type": "org.example.b", "content": {}},
        ]
        initial = await sync(matrix_server, alice)
        assert {e["type"]: e["content"] for e in global_events(initial)} == {
            "org.example.config": {"theme": "light"}, "org.example.b": {}}
        # The first sync also carries the user's push rules, as clients expect.
        pushed = [e for e in initial["account_data"]["events"] if e["type"] == "m.push_rules"]
        assert len(pushed) == 1 and "override" in pushed[0]["content"]["global"]
        # matrix-nio reads it too.
        response = await alice.sync(timeout=0)
        assert isinstance(response, SyncResponse)
        assert {e.type for e in response.account_data_events
                if hasattr(e, "type")} >= {"org.example.config"}
        # nio understands the push rules the first sync carries.
        assert any(isinstance(e, PushRulesEvent) for e in response.account_data_events)

        # Only your own, and not the types the server manages.
        status, body = await call(matrix_server, bob, "GET", path)
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        status, body = await call(matrix_server, bob, "PUT", path, {"theme": "x"})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        for managed in ("m.fully_read", "m.push_rules"):
            status, body = await call(
                matrix_server, alice, "PUT", global_path(alice.user_id, managed), {"a": 1}
            )
            assert status == 405 and body["errcode"] == "M_BAD_JSON"
        status, body = await call(matrix_server, alice, "PUT", path, [1, 2])
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        status, body = await call(matrix_server, alice, "PUT", path, raw=b"{not json")
        assert status == 400 and body["errcode"] == "M_NOT_JSON"
        assert global_events(await sync(matrix_server, bob)) == []
        await close(alice, bob)

    run(go())


def test_room_account_data_and_tags(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await new_room(alice)
        data = room_path(alice.user_id, room_id, "account_data/org.example.room")
        status, body = await call(matrix_server, alice, "GET", data)
        assert status == 404 and body["errcode"] == "M_NOT_FOUND"
        first = await sync(matrix_server, alice)
        assert await call(matrix_server, alice, "PUT", data, {"pinned": True}) == (200, {})
        assert await call(matrix_server, alice, "GET", data) == (200, {"pinned": True})
        # Room account data is not global account data.
        status, _ = await call(
            matrix_server, alice, "GET", global_path(alice.user_id, "org.example.room")
        )
        assert status == 404

        tags = room_path(alice.user_id, room_id, "tags")
        assert await call(matrix_server, alice, "GET", tags) == (200, {"tags": {}})
        assert (await call(matrix_server, alice, "PUT", f"{tags}/m.favourite", {"order": 0.25}))[
            0
        ] == 200
        assert (await call(matrix_server, alice, "PUT", f"{tags}/u.work", {}))[0] == 200
        assert await call(matrix_server, alice, "GET", tags) == (
            200,
            {"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}},
        )
        changed = await sync(matrix_server, alice, first["next_batch"])
        assert room_events(changed, room_id) == [
            {"type": "org.example.room", "content": {"pinned": True}},
            {"type": "m.tag", "content": {"tags": {"m.favourite": {"order": 0.25}, "u.work": {}}}},
        ]
        assert global_events(changed) == []
        assert room_events(await sync(matrix_server, alice, changed["next_batch"]), room_id) == []

        assert await call(matrix_server, alice, "DELETE", f"{tags}/m.favourite") == (200, {})
        assert await call(matrix_server, alice, "DELETE", f"{tags}/m.nothing") == (200, {})
        assert await call(matrix_server, alice, "GET", tags) == (200, {"tags": {"u.work": {}}})
        removed = await sync(matrix_server, alice, changed["next_batch"])
        assert room_events(removed, room_id) == [
            {"type": "m.tag", "content": {"tags": {"u.work": {}}}}
        ]
        # The tag data is in the room's account data as m.tag.
        assert await call(
            matrix_server, alice, "GET", room_path(alice.user_id, room_id, "account_data/m.tag")
        ) == (200, {"tags": {"u.work": {}}})

        # Errors: someone else's, server-managed types, bad room ids, bad tags.
        status, body = await call(matrix_server, bob, "GET", tags)
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        status, body = await call(
            matrix_server, bob, "PUT", room_path(alice.user_id, room_id, "tags/u.x"), {}
        )
        assert status == 403
        status, body = await call(
            matrix_server,
            alice,
            "PUT",
            room_path(alice.user_id, room_id, "account_data/m.fully_read"),
            {"event_id": "$x"},
        )
        assert status == 405 and body["errcode"] == "M_BAD_JSON"
        status, body = await call(
            matrix_server, alice, "GET", room_path(alice.user_id, "@notaroom:x", "account_data/a.b")
        )
        assert status == 400 and body["errcode"] == "M_INVALID_PARAM"
        status, body = await call(matrix_server, alice, "PUT", f"{tags}/{'t' * 256}", {})
        assert status == 400 and body["errcode"] == "M_INVALID_PARAM"
        status, body = await call(matrix_server, alice, "PUT", f"{tags}/u.bad", {"order": "first"})
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        await close(alice, bob)

    run(go())


def test_sleeping_sync_wakes_at_once_on_account_data(matrix_server):
    async def go():
        alice = await register(matrix_server)
        room_id = await new_room(alice)
        first = await sync(matrix_server, alice)
        for path, content in [
            (global_path(alice.user_id, "org.example.wake"), {"n": 1}),
            (room_path(alice.user_id, room_id, "tags/u.wake"), {}),
        ]:
            waiting = asyncio.ensure_future(
                sync(matrix_server, alice, first["next_batch"], timeout=10_000)
            )
            await asyncio.sleep(0.3)
            assert not waiting.done()
            started = time.monotonic()
            assert (await call(matrix_server, alice, "PUT", path, content))[0] == 200
            woken = await waiting
            assert time.monotonic() - started < 1.0
            assert global_events(woken) or room_events(woken, room_id)
            first = woken
        await close(alice)

    run(go())


# --- in process -----------------------------------------------------------------------------
def test_stream_writer_position_waits_for_earlier_writes():
    seen: list[list[Any]] = []
    stream = StreamWriter(10, seen.append)
    a, b, c = stream.allocate(), stream.allocate(), stream.allocate()
    assert (a, b, c) == (11, 12, 13)
    stream.finish(b, "b")
    assert stream.position == 10 and seen == []  # 11 has not committed yet
    stream.finish(a, "a")
    assert stream.position == 12 and seen == [["a", "b"]]
    stream.finish(c)  # failed: the position moves past it, nobody is told
    assert stream.position == 13 and seen == [["a", "b"]]


class ConcurrentWritesTest(unittest.TestCase):
    """On a real database (SQLite): concurrent changes of one user's data all land."""

    def setUp(self):
        self.stack = ExitStack()
        directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(self.stack, directory, "sqlite3")

    def tearDown(self):
        d = defer.ensureDeferred(self.hs.database.close())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    def test_concurrent_tag_changes_keep_every_tag(self):
        async def go():
            service = self.hs.account_data
            user, room = "@a:test.local", "!r:test.local"
            await defer.gatherResults(
                [
                    defer.ensureDeferred(service.set_tag(user, room, f"u.{i}", {"order": i / 20}))
                    for i in range(20)
                ]
            )
            await defer.gatherResults(
                [
                    defer.ensureDeferred(service.set_global(user, f"t.{i}", {"i": i}))
                    for i in range(10)
                ]
            )
            tags = await service.get_tags(user, room)
            self.assertEqual(set(tags), {f"u.{i}" for i in range(20)})
            changes = await service.global_changes(user, 0, service.position)
            self.assertEqual([e["content"]["i"] for e in changes], list(range(10)))
            self.assertEqual(service.position, 30)
            self.assertEqual(await service.global_changes(user, 30, 30), [])
            # Read back from the database, and the position from MAX(stream_id).
            service._cache.clear()
            self.assertEqual(await service.get_tags(user, room), tags)
            self.assertEqual(AccountDataService(self.hs).position, 30)

        return defer.ensureDeferred(go())
