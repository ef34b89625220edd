"""Typing notifications and presence.

End to end on the real server (SQLite and PostgreSQL) with matrix-nio: typing
reaches the other member's /sync and clears after its timeout, a sleeping
/sync wakes at once, presence reaches room-mates only. In process with a fake
clock: typing timeouts and presence idle / offline transitions.
"""

import asyncio
import time
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from nio import (
    PresenceGetError,
    PresenceGetResponse,
    RoomTypingError,
    RoomTypingResponse,
    SyncResponse,
    TypingNoticeEvent,
)
from twisted.internet import defer, task
from twisted.python.failure import Failure

from homeserver.errors import MatrixError
from homeserver.services.clock import Clock
from homeserver.services.notifier import Notifier
from homeserver.services.presence import IDLE_TIMEOUT_MS, OFFLINE_TIMEOUT_MS, PresenceService
from homeserver.services.typing import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS, TypingService
from tests.support.clients import CLIENT, call, close, register, run, shared_room


async def typing_in(response: SyncResponse, room_id: str) -> list[str] | None:
    room = response.rooms.join.get(room_id)
    if room is None:
        return None
    notices = [e for e in room.ephemeral if isinstance(e, TypingNoticeEvent)]
    return notices[-1].users if notices else None


# --- typing, end to end ----------------------------------------------------------------------
def test_typing_reaches_the_other_member_and_clears_after_timeout(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        first = await bob.sync(timeout=0)
        assert await typing_in(first, room_id) is None

        assert isinstance(await alice.room_typing(room_id, True, timeout=1500), RoomTypingResponse)
        seen = await bob.sync(timeout=0, since=first.next_batch)
        assert await typing_in(seen, room_id) == [alice.user_id]
        # Nothing changed since: the next sync has no typing event for the room...
        again = await bob.sync(timeout=0, since=seen.next_batch)
        assert await typing_in(again, room_id) is None
        # ...and a sleeping sync is woken by the timeout, with nobody typing.
        started = time.monotonic()
        cleared = await bob.sync(timeout=10_000, since=again.next_batch)
        assert await typing_in(cleared, room_id) == []
        assert time.monotonic() - started < 5

        # Typing false stops at once; an initial sync shows whoever types now.
        await alice.room_typing(room_id, True, timeout=30_000)
        initial = await call(matrix_server, bob, "GET", f"{CLIENT}/sync")
        events = initial[1]["rooms"]["join"][room_id]["ephemeral"]["events"]
        assert events == [{"type": "m.typing", "content": {"user_ids": [alice.user_id]}}]
        await alice.room_typing(room_id, False)
        stopped = await bob.sync(timeout=0, since=initial[1]["next_batch"])
        assert await typing_in(stopped, room_id) == []
        await close(alice, bob)

    run(go())


def test_typing_refused_outside_the_room_and_for_someone_else(matrix_server):
    async def go():
        alice, bob, mallory = (
            await register(matrix_server),
            await register(matrix_server),
            await register(matrix_server),
        )
        room_id = await shared_room(alice, bob)
        refused = await mallory.room_typing(room_id, True)
        assert isinstance(refused, RoomTypingError) and refused.status_code == "M_FORBIDDEN"
        path = f"{CLIENT}/rooms/{quote(room_id)}/typing/{quote(alice.user_id)}"
        status, body = await call(matrix_server, bob, "PUT", path, {"typing": True})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        status, body = await call(matrix_server, alice, "PUT", path, {"timeout": 5})
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        status, body = await call(matrix_server, alice, "PUT", path, {"typing": "yes"})
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        await close(alice, bob, mallory)

    run(go())


def test_sleeping_sync_wakes_at_once_on_typing(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        first = await bob.sync(timeout=0)
        waiting = asyncio.ensure_future(bob.sync(timeout=10_000, since=first.next_batch))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        started = time.monotonic()
        await alice.room_typing(room_id, True, timeout=30_000)
        woken = await waiting
        assert time.monotonic() - started < 1.0
        assert await typing_in(woken, room_id) == [alice.user_id]
        await alice.room_typing(room_id, False)
        await close(alice, bob)

    run(go())


# --- presence, end to end --------------------------------------------------------------------
def presence_events(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["sender"]: e["content"] for e in body.get("presence", {}).get("events", [])}


def test_presence_reaches_room_mates_only(matrix_server):
    async def go():
        alice, bob, carol = (
            await register(matrix_server),
            await register(matrix_server),
            await register(matrix_server),
        )
        room_id = await shared_room(alice, bob)
        _, bob_first = await call(matrix_server, bob, "GET", f"{CLIENT}/sync")
        _, carol_first = await call(matrix_server, carol, "GET", f"{CLIENT}/sync")
        # Syncing made bob online; he sees himself.
        assert presence_events(bob_first)[bob.user_id]["presence"] == "online"

        await alice.set_presence("unavailable", "in a meeting")
        _, bob_next = await call(
            matrix_server, bob, "GET", f"{CLIENT}/sync?since={bob_first['next_batch']}"
        )
        content = presence_events(bob_next)[alice.user_id]
        assert content["presence"] == "unavailable"
        assert content["status_msg"] == "in a meeting"
        assert content["currently_active"] is False
        _, carol_next = await call(
            matrix_server, carol, "GET", f"{CLIENT}/sync?since={carol_first['next_batch']}"
        )
        assert alice.user_id not in presence_events(carol_next)
        # matrix-nio parses what we send.
        nio_sync = await bob.sync(timeout=0, since=bob_first["next_batch"])
        assert isinstance(nio_sync, SyncResponse)
        assert any(
            e.user_id == alice.user_id and e.presence == "unavailable"
            for e in nio_sync.presence_events
        )

        got = await bob.get_presence(alice.user_id)
        assert isinstance(got, PresenceGetResponse)
        assert (got.presence, got.status_msg) == ("unavailable", "in a meeting")
        refused = await carol.get_presence(alice.user_id)
        assert isinstance(refused, PresenceGetError) and refused.status_code == "M_FORBIDDEN"
        own = await carol.get_presence(carol.user_id)
        assert isinstance(own, PresenceGetResponse) and own.presence == "online"

        # Sending a message is activity: alice is online (and active) again.
        await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi"})
        _, bob_last = await call(
            matrix_server, bob, "GET", f"{CLIENT}/sync?since={bob_next['next_batch']}"
        )
        content = presence_events(bob_last)[alice.user_id]
        assert (content["presence"], content["currently_active"]) == ("online", True)
        assert content["status_msg"] == "in a meeting"

        path = f"{CLIENT}/presence/{quote(alice.user_id)}/status"
        status, body = await call(matrix_server, bob, "PUT", path, {"presence": "online"})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        status, body = await call(
            matrix_server,
            carol,
            "PUT",
            f"{CLIENT}/presence/{quote(carol.user_id)}/status",
            {"presence": "busy"},
        )
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        await close(alice, bob, carol)

    run(go())


# --- in process, with a fake clock ------------------------------------------------------------
class FakeRooms:
    """room_states and user_rooms over one table: room -> {user: membership}."""

    def __init__(self, rooms: dict[str, dict[str, str]]) -> None:
        self.rooms = rooms

    async def get(self, key: str) -> Any:
        if key.startswith("!"):
            members = self.rooms.get(key)
            return None if members is None else SimpleNamespace(room_id=key, members=members)
        return {r: (m[key], 1, "$e") for r, m in self.rooms.items() if key in m}


class FakeConfig:
    def __init__(self, enabled: Any = True) -> None:
        self.values = {
            "presence": {"enabled": enabled},
            "rc_presence": {"per_user": {"per_second": 100, "burst_count": 100}},
        }

    @property
    def presence_enabled(self) -> bool:
        enabled = self.values["presence"]["enabled"]
        return enabled is True or enabled == "untracked"

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def fake_hs(rooms: dict[str, dict[str, str]], presence: Any = True) -> Any:
    reactor = task.Clock()
    reactor.advance(1_000_000)
    clock = Clock(reactor)
    table = FakeRooms(rooms)
    return SimpleNamespace(
        reactor=reactor,
        clock=clock,
        notifier=Notifier(clock, 0),
        room_states=table,
        user_rooms=table,
        config=FakeConfig(presence),
    )


def resolve(coro: Any) -> Any:
    """Run a coroutine whose awaits all complete at once (fakes only)."""
    results: list[Any] = []
    defer.ensureDeferred(coro).addBoth(results.append)
    assert results, "the coroutine is still waiting"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def sleeping_sync(hs: Any, user_id: str, room_ids: list[str]) -> defer.Deferred:
    return defer.ensureDeferred(hs.notifier.wait(user_id, room_ids, 600_000))


ROOM = "!room:test"


def test_typing_times_out_on_the_clock():
    hs = fake_hs({ROOM: {"@a:test": "join", "@b:test": "join", "@c:test": "invite"}})
    typing = TypingService(hs)
    assert typing.typing_event(ROOM, None) is None
    waiter = sleeping_sync(hs, "@b:test", [ROOM])
    resolve(typing.set_typing("@a:test", ROOM, True, 10_000))
    assert waiter.called and typing.position == 1
    assert typing.typing_event(ROOM, 0) == {
        "type": "m.typing",
        "content": {"user_ids": ["@a:test"]},
    }
    assert typing.typing_event(ROOM, 1) is None
    # A refresh before the timeout extends it without a change in the stream.
    hs.reactor.advance(8)
    resolve(typing.set_typing("@a:test", ROOM, True, 10_000))
    assert typing.position == 1
    hs.reactor.advance(5)
    assert typing.typing_users(ROOM) == ["@a:test"]
    waiter = sleeping_sync(hs, "@b:test", [ROOM])
    hs.reactor.advance(5.1)
    assert typing.typing_users(ROOM) == [] and typing.position == 2 and waiter.called
    assert typing.typing_event(ROOM, 1) == {"type": "m.typing", "content": {"user_ids": []}}
    assert typing.typing_event(ROOM, None) is None
    # Only joined members type; missing and huge timeouts are bounded.
    with pytest.raises(MatrixError) as e:
        resolve(typing.set_typing("@c:test", ROOM, True, 1000))
    assert e.value.errcode == "M_FORBIDDEN"
    with pytest.raises(MatrixError):
        resolve(typing.set_typing("@a:test", "!nowhere:test", True, 1000))
    resolve(typing.set_typing("@a:test", ROOM, True, None))
    resolve(typing.set_typing("@b:test", ROOM, True, 10**9))
    hs.reactor.advance(DEFAULT_TIMEOUT_MS / 1000 + 0.1)
    assert typing.typing_users(ROOM) == ["@b:test"]
    hs.reactor.advance(MAX_TIMEOUT_MS / 1000)
    assert typing.typing_users(ROOM) == []
    # Stopping ends it at once; stopping again changes nothing.
    resolve(typing.set_typing("@a:test", ROOM, True, 60_000))
    position = typing.position
    resolve(typing.set_typing("@a:test", ROOM, False, None))
    resolve(typing.set_typing("@a:test", ROOM, False, None))
    assert typing.position == position + 1 and typing.typing_users(ROOM) == []
    # A token from before a restart (beyond our position) is an initial sync.
    resolve(typing.set_typing("@a:test", ROOM, True, 60_000))
    assert typing.typing_event(ROOM, typing.position + 50)["content"]["user_ids"] == ["@a:test"]
    typing.shutdown()
    assert not hs.reactor.getDelayedCalls()


def senders(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["sender"]: e["content"] for e in events}


def test_presence_goes_idle_then_offline_on_the_clock():
    hs = fake_hs({ROOM: {"@a:test": "join", "@b:test": "join"}, "!other:test": {"@c:test": "join"}})
    presence = PresenceService(hs)
    waiter = sleeping_sync(hs, "@b:test", [ROOM])
    resolve(presence.on_sync("@a:test", None))
    assert waiter.called
    online = presence.position
    events = resolve(presence.updates_for("@b:test", 0, presence.position))
    assert senders(events)["@a:test"] == {
        "presence": "online",
        "last_active_ago": 0,
        "currently_active": True,
    }
    # Syncing every 30 s keeps the user online until the idle timeout...
    for _ in range(int(IDLE_TIMEOUT_MS / 30_000) - 1):
        hs.reactor.advance(30)
        resolve(presence.on_sync("@a:test", None))
    assert presence.position == online
    assert resolve(presence.get_status("@b:test", "@a:test"))["presence"] == "online"
    waiter = sleeping_sync(hs, "@b:test", [ROOM])
    hs.reactor.advance(30.01)
    status = resolve(presence.get_status("@b:test", "@a:test"))
    assert status["presence"] == "unavailable" and status["currently_active"] is False
    assert status["last_active_ago"] >= IDLE_TIMEOUT_MS
    assert waiter.called
    # ...a passive sync does not end idleness; set_presence=online (activity) does.
    resolve(presence.on_sync("@a:test", None))
    assert resolve(presence.get_status("@a:test", "@a:test"))["presence"] == "unavailable"
    resolve(presence.on_sync("@a:test", "online"))
    assert resolve(presence.get_status("@a:test", "@a:test"))["presence"] == "online"
    # No sync for the offline timeout: offline.
    hs.reactor.advance(OFFLINE_TIMEOUT_MS / 1000 - 1)
    assert resolve(presence.get_status("@a:test", "@a:test"))["presence"] == "unavailable"
    before = presence.position
    hs.reactor.advance(1.01)
    assert resolve(presence.get_status("@a:test", "@a:test"))["presence"] == "offline"
    changes = resolve(presence.updates_for("@b:test", before, presence.position))
    assert [(e["sender"], e["content"]["presence"]) for e in changes] == [("@a:test", "offline")]
    assert not hs.reactor.getDelayedCalls()  # nobody online: no timer left
    # set_presence=offline on a sync does not bring the user online.
    resolve(presence.on_sync("@a:test", "offline"))
    assert resolve(presence.get_status("@a:test", "@a:test"))["presence"] == "offline"


def test_presence_reaches_room_mates_only_in_process():
    hs = fake_hs(
        {
            ROOM: {"@a:test": "join", "@b:test": "join", "@i:test": "invite"},
            "!other:test": {"@c:test": "join"},
        }
    )
    presence = PresenceService(hs)
    for user in ("@a:test", "@b:test", "@c:test", "@i:test"):
        resolve(presence.on_sync(user, None))
    start = presence.position
    assert set(senders(resolve(presence.updates_for("@b:test", None, start)))) == {
        "@a:test",
        "@b:test",
    }
    assert set(senders(resolve(presence.updates_for("@c:test", None, start)))) == {"@c:test"}
    resolve(presence.set_status("@a:test", "unavailable", "away"))
    resolve(presence.set_status("@c:test", "online", "here"))
    assert senders(resolve(presence.updates_for("@b:test", start, presence.position))) == {
        "@a:test": {
            "presence": "unavailable",
            "last_active_ago": 0,
            "currently_active": False,
            "status_msg": "away",
        }
    }
    # Not again after the token moved past it; nothing beyond ``upto``.
    assert resolve(presence.updates_for("@b:test", presence.position, presence.position)) == []
    assert resolve(presence.updates_for("@b:test", start, start)) == []
    # Status message: absent keeps it, null clears it.
    resolve(presence.set_status("@a:test", "online"))
    assert resolve(presence.get_status("@b:test", "@a:test"))["status_msg"] == "away"
    resolve(presence.set_status("@a:test", "online", None))
    assert "status_msg" not in resolve(presence.get_status("@b:test", "@a:test"))
    for requester in ("@c:test", "@i:test"):
        with pytest.raises(MatrixError) as e:
            resolve(presence.get_status(requester, "@a:test"))
        assert e.value.errcode == "M_FORBIDDEN"
    assert resolve(presence.get_status("@b:test", "@a:test"))["presence"] == "online"
    presence.shutdown()


def test_events_sent_from_a_client_are_activity():
    hs = fake_hs({ROOM: {"@a:test": "join", "@b:test": "join"}})
    hs.persister = SimpleNamespace(on_persisted=[])
    presence = PresenceService(hs)
    resolve(presence.set_status("@a:test", "unavailable"))
    resolve(presence.set_status("@b:test", "unavailable"))

    def item(sender: str, device_id: str | None) -> Any:
        return SimpleNamespace(pdu=SimpleNamespace(sender=sender), device_id=device_id)

    (hook,) = hs.persister.on_persisted
    # Not activity: events the server sent for a user, events of users we have
    # no presence for (remote users, users who never synced).
    hook([item("@b:test", None), item("@r:elsewhere", "D"), item("@new:test", "D")])
    assert resolve(presence.get_status("@a:test", "@b:test"))["presence"] == "unavailable"
    hook([item("@a:test", "DEVICE")])
    assert resolve(presence.get_status("@b:test", "@a:test"))["presence"] == "online"
    assert "@r:elsewhere" not in presence._users and "@new:test" not in presence._users
    presence.shutdown()


def test_presence_disabled_or_untracked():
    hs = fake_hs({ROOM: {"@a:test": "join", "@b:test": "join"}}, presence=False)
    presence = PresenceService(hs)
    resolve(presence.on_sync("@a:test", None))
    resolve(presence.set_status("@a:test", "online", "hi"))
    assert presence.position == 0
    assert resolve(presence.updates_for("@b:test", None, 0)) == []
    assert resolve(presence.get_status("@b:test", "@a:test")) == {"presence": "offline"}
    assert not hs.reactor.getDelayedCalls()

    hs = fake_hs({ROOM: {"@a:test": "join", "@b:test": "join"}}, presence="untracked")
    presence = PresenceService(hs)
    resolve(presence.on_sync("@a:test", None))
    assert presence.position == 0
    resolve(presence.set_status("@a:test", "online"))
    assert [e["sender"] for e in resolve(presence.updates_for("@b:test", None, 1))] == ["@a:test"]
    presence.shutdown()


def test_presence_put_is_rate_limited():
    hs = fake_hs({ROOM: {"@a:test": "join"}})
    hs.config.values["rc_presence"] = {"per_user": {"per_second": 0.1, "burst_count": 1}}
    presence = PresenceService(hs)
    resolve(presence.set_status("@a:test", "online"))
    with pytest.raises(MatrixError) as e:
        resolve(presence.set_status("@a:test", "unavailable"))
    assert e.value.errcode == "M_LIMIT_EXCEEDED"
    hs.reactor.advance(10)
    resolve(presence.set_status("@a:test", "unavailable"))
    presence.shutdown()
