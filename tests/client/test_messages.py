"""Sending, redacting and reading single events end to end with matrix-nio."""

from urllib.parse import quote

from nio import RoomSendResponse

from tests.support.clients import CLIENT, call, close, create, register, run, say


def room_path(room_id: str, rest: str) -> str:
    return f"{CLIENT}/rooms/{quote(room_id)}{rest}"


def test_retried_send_returns_the_same_event_and_creates_nothing(matrix_server):
    async def go():
        alice = await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        content = {"msgtype": "m.text", "body": "only once"}
        first = await alice.room_send(room_id, "m.room.message", content, tx_id="txn-1")
        retry = await alice.room_send(room_id, "m.room.message", content, tx_id="txn-1")
        assert isinstance(first, RoomSendResponse) and retry.event_id == first.event_id
        other = await alice.room_send(room_id, "m.room.message", content, tx_id="txn-2")
        assert other.event_id != first.event_id
        status, page = await call(matrix_server, alice, "GET",
                                  room_path(room_id, "/messages?dir=b&limit=50"))
        assert [e["event_id"] for e in page["chunk"] if e["type"] == "m.room.message"] == [
            other.event_id, first.event_id]
        # The sending device sees its transaction id; nobody else does.
        sync = await alice.sync(timeout=0)
        mine = [e for e in sync.rooms.join[room_id].timeline.events
                if e.event_id == first.event_id]
        assert mine[0].source["unsigned"]["transaction_id"] == "txn-1"
        await close(alice)
    run(go())


def test_redactions_own_others_and_refused(matrix_server):
    async def go():
        admin, bob, carol = (await register(matrix_server), await register(matrix_server),
                             await register(matrix_server))
        room_id = await create(admin, preset="public_chat")
        await bob.join(room_id)
        await carol.join(room_id)
        bob_message = (await say(bob, room_id, "secret from bob")).event_id
        carol_message = (await say(carol, room_id, "carol's words")).event_id
        # Bob may not redact Carol's message (redact needs 50; he has 0).
        status, body = await call(matrix_server, bob, "PUT",
                                  room_path(room_id, f"/redact/{quote(carol_message)}/r1"),
                                  {"reason": "no"})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        # Bob redacts his own; the admin redacts Carol's.
        status, own = await call(matrix_server, bob, "PUT",
                                 room_path(room_id, f"/redact/{quote(bob_message)}/r2"),
                                 {"reason": "oops"})
        assert status == 200
        status, again = await call(matrix_server, bob, "PUT",
                                   room_path(room_id, f"/redact/{quote(bob_message)}/r2"),
                                   {"reason": "oops"})
        assert again == own  # idempotent by transaction id
        status, _ = await call(matrix_server, admin, "PUT",
                               room_path(room_id, f"/redact/{quote(carol_message)}/r3"), {})
        assert status == 200
        # The original content is never served again, by any endpoint.
        for viewer in (admin, bob, carol):
            status, event = await call(matrix_server, viewer, "GET",
                                       room_path(room_id, f"/event/{quote(bob_message)}"))
            assert status == 200 and event["content"] == {}
            assert event["unsigned"]["redacted_because"]["event_id"] == own["event_id"]
            # Room 11+ carries "redacts" in the content too (spec: room v11 event format).
            assert event["unsigned"]["redacted_because"]["content"] == {
                "reason": "oops", "redacts": bob_message}
            status, page = await call(matrix_server, viewer, "GET",
                                      room_path(room_id, "/messages?dir=b&limit=50"))
            assert "secret from bob" not in str(page) and "carol's words" not in str(page)
            sync = await viewer.sync(timeout=0)
            assert "secret from bob" not in str(sync.rooms.join[room_id].timeline.events)
        await close(admin, bob, carol)
    run(go())


def test_event_and_context(matrix_server):
    async def go():
        alice, stranger = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="private_chat")
        ids = [(await say(alice, room_id, f"c{i}")).event_id for i in range(7)]
        status, event = await call(matrix_server, alice, "GET", room_path(room_id, f"/event/{ids[3]}"))
        assert status == 200 and event["content"]["body"] == "c3" and "age" in event["unsigned"]
        status, body = await call(matrix_server, stranger, "GET",
                                  room_path(room_id, f"/event/{ids[3]}"))
        assert status == 404 and body["errcode"] == "M_NOT_FOUND"
        status, body = await call(matrix_server, alice, "GET",
                                  room_path(room_id, "/event/$unknown"))
        assert status == 404
        status, context = await call(matrix_server, alice, "GET",
                                     room_path(room_id, f"/context/{ids[3]}?limit=4"))
        assert status == 200
        assert context["event"]["event_id"] == ids[3]
        assert [e["event_id"] for e in context["events_before"]] == [ids[2], ids[1]]
        assert [e["event_id"] for e in context["events_after"]] == [ids[4], ids[5]]
        assert any(e["type"] == "m.room.create" for e in context["state"])
        # The tokens continue the timeline both ways.
        status, page = await call(matrix_server, alice, "GET",
                                  room_path(room_id, f"/messages?dir=f&limit=1&from={context['end']}"))
        assert [e["event_id"] for e in page["chunk"]] == [ids[6]]
        status, page = await call(matrix_server, alice, "GET",
                                  room_path(room_id, f"/messages?dir=b&limit=1&from={context['start']}"))
        assert [e["event_id"] for e in page["chunk"]] == [ids[0]]
        await close(alice, stranger)
    run(go())


def test_call_signalling_is_relayed_intact_with_age(matrix_server):
    async def go():
        caller, callee = await register(matrix_server), await register(matrix_server)
        room_id = await create(caller, preset="trusted_private_chat", is_direct=True,
                               invite=[callee.user_id])
        await callee.join(room_id)
        since = (await callee.sync(timeout=0)).next_batch
        invite = {"call_id": "c1", "party_id": "p1", "version": "1", "lifetime": 60000,
                  "offer": {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}}
        candidates = {"call_id": "c1", "party_id": "p1", "version": "1",
                      "candidates": [{"candidate": "candidate:1 1 UDP 1 127.0.0.1 5000 typ host",
                                      "sdpMid": "0", "sdpMLineIndex": 0}]}
        hangup = {"call_id": "c1", "party_id": "p1", "version": "1", "reason": "user_hangup"}
        for event_type, content in (("m.call.invite", invite), ("m.call.candidates", candidates),
                                    ("m.call.hangup", hangup)):
            assert isinstance(await caller.room_send(room_id, event_type, content),
                              RoomSendResponse)
        status, sync = await call(matrix_server, callee, "GET", f"{CLIENT}/sync?since={since}")
        events = sync["rooms"]["join"][room_id]["timeline"]["events"]
        assert [(e["type"], e["content"]) for e in events] == [
            ("m.call.invite", invite), ("m.call.candidates", candidates), ("m.call.hangup", hangup)]
        assert all(e["unsigned"]["age"] >= 0 for e in events)
        await close(caller, callee)
    run(go())
