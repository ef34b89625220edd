"""Read receipts and read markers, end to end on SQLite and PostgreSQL with matrix-nio.

A receipt reaches the other members' /sync as ``m.receipt`` (``m.read.private``
only its owner's), wakes a sleeping /sync at once, only moves forward, carries
its ``thread_id``; ``/read_markers`` sets the receipts and the ``m.fully_read``
room account data.
"""

import asyncio
import json
import time
from typing import Any
from urllib.parse import quote

from nio import (
    ReceiptEvent,
    RoomReadMarkersResponse,
    RoomSendResponse,
    SyncResponse,
    UpdateReceiptMarkerResponse,
)
from nio.api import ReceiptType

from tests.support.clients import CLIENT, call, close, register, run, shared_room


async def send_text(client: Any, room_id: str, body: str, **extra: Any) -> str:
    response = await client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body, **extra}
    )
    assert isinstance(response, RoomSendResponse), response
    return response.event_id


def receipts_in(response: SyncResponse, room_id: str) -> list[Any]:
    room = response.rooms.join.get(room_id)
    if room is None:
        return []
    return [r for e in room.ephemeral if isinstance(e, ReceiptEvent) for r in e.receipts]


def receipt_path(room_id: str, receipt_type: str, event_id: str) -> str:
    return f"{CLIENT}/rooms/{quote(room_id)}/receipt/{receipt_type}/{quote(event_id)}"


async def raw_sync(server: Any, client: Any, since: str | None = None) -> dict[str, Any]:
    path = f"{CLIENT}/sync?timeout=0"
    if since:
        path += f"&since={quote(since)}"
    status, body = await call(server, client, "GET", path)
    assert status == 200, body
    return body


def test_read_receipt_reaches_other_member_and_private_only_owner(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        first = await send_text(bob, room_id, "one")
        second = await send_text(bob, room_id, "two")
        alice_since = (await alice.sync(timeout=0)).next_batch
        bob_since = (await bob.sync(timeout=0)).next_batch

        response = await alice.update_receipt_marker(room_id, first, thread_id=None)
        assert isinstance(response, UpdateReceiptMarkerResponse), response
        seen = await bob.sync(timeout=0, since=bob_since)
        [receipt] = receipts_in(seen, room_id)
        assert (receipt.event_id, receipt.receipt_type, receipt.user_id, receipt.thread_id) == (
            first,
            "m.read",
            alice.user_id,
            None,
        )
        assert abs(receipt.timestamp - time.time() * 1000) < 60_000
        # Nothing new since: no receipt the next time.
        again = await bob.sync(timeout=0, since=seen.next_batch)
        assert receipts_in(again, room_id) == []

        # A private receipt reaches its owner only.
        response = await alice.update_receipt_marker(
            room_id, second, ReceiptType.read_private, thread_id=None
        )
        assert isinstance(response, UpdateReceiptMarkerResponse), response
        mine = await alice.sync(timeout=0, since=alice_since)
        kinds = {(r.event_id, r.receipt_type, r.user_id) for r in receipts_in(mine, room_id)}
        assert kinds == {
            (first, "m.read", alice.user_id),
            (second, "m.read.private", alice.user_id),
        }
        theirs = await bob.sync(timeout=0, since=again.next_batch)
        assert receipts_in(theirs, room_id) == []

        # An initial sync has the latest receipts of everyone, private ones for the owner.
        bob_initial = await raw_sync(matrix_server, bob)
        [event] = bob_initial["rooms"]["join"][room_id]["ephemeral"]["events"]
        assert event["type"] == "m.receipt"
        assert list(event["content"]) == [first]
        assert set(event["content"][first]) == {"m.read"}
        assert set(event["content"][first]["m.read"]) == {alice.user_id}
        assert set(event["content"][first]["m.read"][alice.user_id]) == {"ts"}
        alice_initial = await raw_sync(matrix_server, alice)
        [event] = alice_initial["rooms"]["join"][room_id]["ephemeral"]["events"]
        assert event["content"][second]["m.read.private"][alice.user_id]["ts"] > 0
        await close(alice, bob)

    run(go())


def test_sleeping_sync_wakes_at_once_on_a_receipt(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        event_id = await send_text(bob, room_id, "read me")
        since = (await bob.sync(timeout=0)).next_batch

        async def later():
            await asyncio.sleep(0.3)
            await alice.update_receipt_marker(room_id, event_id)

        started = time.monotonic()
        sleeper = asyncio.ensure_future(bob.sync(timeout=10_000, since=since))
        await later()
        woken = await sleeper
        assert time.monotonic() - started < 5
        [receipt] = receipts_in(woken, room_id)
        assert (receipt.event_id, receipt.user_id, receipt.thread_id) == (
            event_id,
            alice.user_id,
            "main",
        )
        await close(alice, bob)

    run(go())


def test_receipts_only_move_forward_per_thread(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        older = await send_text(bob, room_id, "older")
        newer = await send_text(bob, room_id, "newer")
        for event_id in (newer, older):
            status, body = await call(
                matrix_server, alice, "POST", receipt_path(room_id, "m.read", event_id), {}
            )
            assert (status, body) == (200, {})
        # A threaded ("main") receipt is separate from the unthreaded one.
        status, _ = await call(
            matrix_server,
            alice,
            "POST",
            receipt_path(room_id, "m.read", older),
            {"thread_id": "main"},
        )
        assert status == 200
        initial = await raw_sync(matrix_server, bob)
        [event] = initial["rooms"]["join"][room_id]["ephemeral"]["events"]
        assert event["content"][newer]["m.read"][alice.user_id].keys() == {"ts"}
        assert event["content"][older]["m.read"][alice.user_id]["thread_id"] == "main"
        await close(alice, bob)

    run(go())


def test_read_markers_set_receipts_and_fully_read(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await shared_room(alice, bob)
        first = await send_text(bob, room_id, "one")
        second = await send_text(bob, room_id, "two")
        since = (await alice.sync(timeout=0)).next_batch
        response = await alice.room_read_markers(room_id, first, second, second)
        assert isinstance(response, RoomReadMarkersResponse), response
        body = await raw_sync(matrix_server, alice, since)
        room = body["rooms"]["join"][room_id]
        assert {"type": "m.fully_read", "content": {"event_id": first}} in room["account_data"][
            "events"
        ]
        [event] = room["ephemeral"]["events"]
        assert set(event["content"][second]) == {"m.read", "m.read.private"}
        # m.fully_read through the receipt endpoint too; clients may not set it directly.
        status, _ = await call(
            matrix_server, alice, "POST", receipt_path(room_id, "m.fully_read", second), {}
        )
        assert status == 200
        status, body = await call(
            matrix_server,
            alice,
            "GET",
            f"{CLIENT}/user/{quote(alice.user_id)}/rooms/{quote(room_id)}/account_data/m.fully_read",
        )
        assert (status, body) == (200, {"event_id": second})
        status, body = await call(
            matrix_server,
            alice,
            "PUT",
            f"{CLIENT}/user/{quote(alice.user_id)}/rooms/{quote(room_id)}/account_data/m.fully_read",
            {"event_id": first},
        )
        assert status == 405, body
        # Bob sees alice's public receipt, not the private one or the marker.
        bob_body = await raw_sync(matrix_server, bob)
        [event] = bob_body["rooms"]["join"][room_id]["ephemeral"]["events"]
        assert set(event["content"][second]) == {"m.read"}
        await close(alice, bob)

    run(go())


def test_receipt_errors(matrix_server):
    async def go():
        alice, bob, eve = (
            await register(matrix_server),
            await register(matrix_server),
            await register(matrix_server),
        )
        room_id = await shared_room(alice, bob)
        root = await send_text(bob, room_id, "root")
        in_thread = await send_text(
            bob, room_id, "reply", **{"m.relates_to": {"rel_type": "m.thread", "event_id": root}}
        )
        cases = [
            (alice, "m.bogus", root, {}, 400, "M_INVALID_PARAM"),
            (alice, "m.read", root, {"thread_id": ""}, 400, "M_INVALID_PARAM"),
            (alice, "m.read", root, {"thread_id": 5}, 400, "M_INVALID_PARAM"),
            (alice, "m.fully_read", root, {"thread_id": "main"}, 400, "M_INVALID_PARAM"),
            (alice, "m.read", in_thread, {"thread_id": "main"}, 400, "M_INVALID_PARAM"),
            (alice, "m.read", root, {"thread_id": "$elsewhere"}, 400, "M_INVALID_PARAM"),
            (alice, "m.read", "$nope:example.org", {}, 404, "M_NOT_FOUND"),
            (eve, "m.read", root, {}, 403, "M_FORBIDDEN"),
        ]
        for who, receipt_type, event_id, body, status, errcode in cases:
            got = await call(
                matrix_server, who, "POST", receipt_path(room_id, receipt_type, event_id), body
            )
            assert (got[0], got[1].get("errcode")) == (status, errcode), (receipt_type, body, got)
        # A threaded receipt on an event of its thread, and on the root itself, is fine.
        for event_id in (in_thread, root):
            got = await call(
                matrix_server,
                alice,
                "POST",
                receipt_path(room_id, "m.read", event_id),
                {"thread_id": root},
            )
            assert got == (200, {}), got
        status, body = await call(
            matrix_server,
            alice,
            "POST",
            f"{CLIENT}/rooms/{quote(room_id)}/read_markers",
            raw=json.dumps({"m.read": 3}).encode(),
        )
        assert (status, body["errcode"]) == (400, "M_BAD_JSON")
        status, body = await call(
            matrix_server, None, "POST", f"{CLIENT}/rooms/{quote(room_id)}/read_markers", {}
        )
        assert status == 401
        await close(alice, bob, eve)

    run(go())
