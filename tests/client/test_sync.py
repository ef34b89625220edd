"""/sync end to end with matrix-nio: tokens, long-poll wake-up, filters, room sections."""

import asyncio
import json
import time
from urllib.parse import quote

from nio import RoomMessageText, SyncResponse

from tests.support.clients import CLIENT, call, close, create, register, run, say


def bodies(sync: SyncResponse, room_id: str) -> list[str]:
    room = sync.rooms.join.get(room_id)
    if room is None:
        return []
    return [e.body for e in room.timeline.events if isinstance(e, RoomMessageText)]


def test_incremental_sync_delivers_each_event_exactly_once(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        since = (await bob.sync(timeout=0)).next_batch
        seen: list[str] = []
        for batch in range(4):
            for i in range(3):
                await say(alice, room_id, f"m{batch}-{i}")
            sync = await bob.sync(timeout=0, since=since)
            seen += bodies(sync, room_id)
            since = sync.next_batch
        # Nothing new: an empty incremental sync, and still nothing repeated.
        sync = await bob.sync(timeout=0, since=since)
        assert bodies(sync, room_id) == [] and sync.next_batch == since
        assert seen == [f"m{b}-{i}" for b in range(4) for i in range(3)]
        await close(alice, bob)
    run(go())


def test_sleeping_sync_wakes_at_once(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        since = (await bob.sync(timeout=0)).next_batch

        async def send_later():
            await asyncio.sleep(0.5)
            return time.monotonic(), await say(alice, room_id, "wake up")

        async def sync_until_message():
            # Other streams (presence, say) may wake the sync first: keep syncing.
            token = since
            while True:
                sync = await bob.sync(timeout=20000, since=token)
                token = sync.next_batch
                if bodies(sync, room_id):
                    return time.monotonic(), sync

        started = time.monotonic()
        (woke_at, sync), (sent_at, _) = await asyncio.gather(sync_until_message(), send_later())
        assert bodies(sync, room_id) == ["wake up"]
        assert woke_at - sent_at < 0.5, "the sync did not wake promptly"
        assert woke_at - started < 5
        # With nothing new a long-poll waits for its timeout.
        started = time.monotonic()
        status, empty = await call(matrix_server, bob, "GET",
                                   f"{CLIENT}/sync?timeout=1000&since={sync.next_batch}")
        elapsed = time.monotonic() - started
        assert status == 200 and elapsed < 5
        if "rooms" not in empty and not empty.get("presence", {}).get("events"):
            assert elapsed >= 0.9, "an empty long-poll returned before its timeout"
        await close(alice, bob)
    run(go())


def test_limited_timeline_prev_batch_and_messages_paging(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        since = (await bob.sync(timeout=0)).next_batch
        for i in range(25):
            await say(alice, room_id, f"n{i}")
        sync_filter = json.dumps({"room": {"timeline": {"limit": 5}}})
        status, sync = await call(matrix_server, bob, "GET",
                                  f"{CLIENT}/sync?since={since}&filter={quote(sync_filter)}")
        timeline = sync["rooms"]["join"][room_id]["timeline"]
        assert timeline["limited"] is True
        assert [e["content"]["body"] for e in timeline["events"]] == [f"n{i}" for i in range(20, 25)]
        # Paging back from prev_batch returns what came before, newest first, without gaps.
        token, older = timeline["prev_batch"], []
        while True:
            status, page = await call(
                matrix_server, bob, "GET",
                f"{CLIENT}/rooms/{quote(room_id)}/messages?dir=b&limit=7&from={token}")
            assert status == 200
            older += [e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"]
            if "end" not in page:
                break
            token = page["end"]
        assert older == [f"n{i}" for i in range(19, -1, -1)]
        # Forwards from the first page's start gives the same events in order.
        status, page = await call(matrix_server, bob, "GET",
                                  f"{CLIENT}/rooms/{quote(room_id)}/messages?dir=f&limit=100&from=s0")
        forward = [e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"]
        assert forward == [f"n{i}" for i in range(25)]
        await close(alice, bob)
    run(go())


def test_stored_filter_full_state_and_lazy_loading(matrix_server):
    async def go():
        alice, bob, carol = (await register(matrix_server), await register(matrix_server),
                             await register(matrix_server))
        room_id = await create(alice, preset="public_chat", name="Lazy")
        await bob.join(room_id)
        await carol.join(room_id)
        await say(bob, room_id, "from bob")
        definition = {"room": {"state": {"lazy_load_members": True},
                               "timeline": {"limit": 1, "types": ["m.room.message"]}}}
        status, body = await call(matrix_server, alice, "POST",
                                  f"{CLIENT}/user/{quote(alice.user_id)}/filter", definition)
        assert status == 200
        filter_id = body["filter_id"]
        status, stored = await call(matrix_server, alice, "GET",
                                    f"{CLIENT}/user/{quote(alice.user_id)}/filter/{filter_id}")
        assert stored == definition
        status, sync = await call(matrix_server, alice, "GET", f"{CLIENT}/sync?filter={filter_id}")
        room = sync["rooms"]["join"][room_id]
        assert [e["content"]["body"] for e in room["timeline"]["events"]] == ["from bob"]
        members = {e["state_key"] for e in room["state"]["events"] if e["type"] == "m.room.member"}
        assert members == {alice.user_id, bob.user_id}  # carol sent nothing: not loaded
        assert room["summary"]["m.joined_member_count"] == 3
        # full_state with a since token returns the whole state again.
        status, again = await call(matrix_server, alice, "GET",
                                   f"{CLIENT}/sync?since={sync['next_batch']}&full_state=true")
        state_types = {e["type"] for e in again["rooms"]["join"][room_id]["state"]["events"]}
        assert {"m.room.create", "m.room.name", "m.room.power_levels"} <= state_types
        status, body = await call(matrix_server, alice, "GET", f"{CLIENT}/sync?filter=9999")
        assert status == 404
        status, body = await call(matrix_server, bob, "GET",
                                  f"{CLIENT}/user/{quote(alice.user_id)}/filter/{filter_id}")
        assert status == 403
        await close(alice, bob, carol)
    run(go())


def test_invite_leave_and_join_sections(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        since = (await bob.sync(timeout=0)).next_batch
        room_id = await create(alice, preset="private_chat", name="Secret", invite=[bob.user_id])
        status, sync = await call(matrix_server, bob, "GET", f"{CLIENT}/sync?since={since}")
        invite_state = sync["rooms"]["invite"][room_id]["invite_state"]["events"]
        assert {"type": "m.room.name", "state_key": "", "content": {"name": "Secret"},
                "sender": alice.user_id} in invite_state
        assert any(e["type"] == "m.room.member" and e["state_key"] == bob.user_id
                   and e["content"]["membership"] == "invite" for e in invite_state)
        since = sync["next_batch"]
        await bob.join(room_id)
        status, sync = await call(matrix_server, bob, "GET", f"{CLIENT}/sync?since={since}")
        joined = sync["rooms"]["join"][room_id]
        assert any(e["type"] == "m.room.name" for e in joined["state"]["events"] +
                   joined["timeline"]["events"])  # a newly joined room comes with its state
        since = sync["next_batch"]
        await call(matrix_server, alice, "POST", f"{CLIENT}/rooms/{quote(room_id)}/kick",
                   {"user_id": bob.user_id, "reason": "bye"})
        status, sync = await call(matrix_server, bob, "GET", f"{CLIENT}/sync?since={since}")
        left = sync["rooms"]["leave"][room_id]["timeline"]["events"]
        assert left[-1]["content"] == {"membership": "leave", "reason": "bye"}
        assert room_id not in sync["rooms"].get("join", {})
        await close(alice, bob)
    run(go())


def test_history_visibility_joined_hides_earlier_messages(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat", initial_state=[
            {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}])
        await say(alice, room_id, "before bob")
        await bob.join(room_id)
        await say(alice, room_id, "after bob")
        sync = await bob.sync(timeout=0)
        assert bodies(sync, room_id) == ["after bob"]
        status, page = await call(matrix_server, bob, "GET",
                                  f"{CLIENT}/rooms/{quote(room_id)}/messages?dir=b&limit=50")
        assert "before bob" not in [e["content"].get("body") for e in page["chunk"]]
        # "shared" (the default) shows history to members who join later.
        shared = await create(alice, preset="public_chat")
        await say(alice, shared, "old news")
        await bob.join(shared)
        status, page = await call(matrix_server, bob, "GET",
                                  f"{CLIENT}/rooms/{quote(shared)}/messages?dir=b&limit=50")
        assert "old news" in [e["content"].get("body") for e in page["chunk"]]
        await close(alice, bob)
    run(go())


def test_history_visibility_invited_and_world_readable(matrix_server):
    async def go():
        alice, bob, stranger = (await register(matrix_server), await register(matrix_server),
                                await register(matrix_server))
        invited_room = await create(alice, preset="private_chat", initial_state=[
            {"type": "m.room.history_visibility", "content": {"history_visibility": "invited"}}])
        await say(alice, invited_room, "before the invite")
        await alice.room_invite(invited_room, bob.user_id)
        await say(alice, invited_room, "after the invite")
        await bob.join(invited_room)
        status, page = await call(matrix_server, bob, "GET",
                                  f"{CLIENT}/rooms/{quote(invited_room)}/messages?dir=b&limit=50")
        seen = [e["content"].get("body") for e in page["chunk"]]
        assert "after the invite" in seen and "before the invite" not in seen

        open_room = await create(alice, preset="public_chat", initial_state=[
            {"type": "m.room.history_visibility",
             "content": {"history_visibility": "world_readable"}}])
        await say(alice, open_room, "for everyone")
        # Someone who never joined may read a world-readable room's history.
        status, page = await call(matrix_server, stranger, "GET",
                                  f"{CLIENT}/rooms/{quote(open_room)}/messages?dir=b&limit=50")
        assert status == 200
        assert "for everyone" in [e["content"].get("body") for e in page["chunk"]]
        status, _ = await call(matrix_server, stranger, "GET",
                               f"{CLIENT}/rooms/{quote(invited_room)}/messages?dir=b")
        assert status == 403
        await close(alice, bob, stranger)
    run(go())


def test_knock_appears_in_the_knock_section(matrix_server):
    async def go():
        admin, knocker = await register(matrix_server), await register(matrix_server)
        room_id = await create(admin, preset="private_chat", name="Knock here", initial_state=[
            {"type": "m.room.join_rules", "content": {"join_rule": "knock"}}])
        since = (await knocker.sync(timeout=0)).next_batch
        status, _ = await call(matrix_server, knocker, "POST", f"{CLIENT}/knock/{quote(room_id)}",
                               {"reason": "hello"})
        assert status == 200
        status, sync = await call(matrix_server, knocker, "GET", f"{CLIENT}/sync?since={since}")
        knock_state = sync["rooms"]["knock"][room_id]["knock_state"]["events"]
        assert {"type": "m.room.name", "state_key": "", "content": {"name": "Knock here"},
                "sender": admin.user_id} in knock_state
        assert any(e["type"] == "m.room.member" and e["content"]["membership"] == "knock"
                   for e in knock_state)
        await close(admin, knocker)
    run(go())
