"""Edits, reactions, threads and references end to end: bundles, /relations, /threads."""

from urllib.parse import quote

from tests.support.clients import CLIENT, call, close, create, register, run, say

V1 = "/_matrix/client/v1"




async def send(server, client, room_id, event_type, content, txn):
    status, body = await call(server, client, "PUT",
                              f"{CLIENT}/rooms/{quote(room_id)}/send/{event_type}/{txn}", content)
    return status, body


def reaction(target, key):
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}}


def test_reactions_one_per_key_per_user_and_listed(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        target = (await say(alice, room_id, "react to me")).event_id
        status, first = await send(matrix_server, bob, room_id, "m.reaction",
                                   reaction(target, "👍"), "r1")
        assert status == 200
        status, retry = await send(matrix_server, bob, room_id, "m.reaction",
                                   reaction(target, "👍"), "r1")
        assert (status, retry) == (200, first)  # a retry is not a second reaction
        status, body = await send(matrix_server, bob, room_id, "m.reaction",
                                  reaction(target, "👍"), "r2")
        assert status == 400 and body["errcode"] == "M_DUPLICATE_ANNOTATION"
        assert (await send(matrix_server, bob, room_id, "m.reaction",
                           reaction(target, "🎉"), "r3"))[0] == 200
        assert (await send(matrix_server, alice, room_id, "m.reaction",
                           reaction(target, "👍"), "r4"))[0] == 200
        status, page = await call(matrix_server, alice, "GET",
                                  f"{V1}/rooms/{quote(room_id)}/relations/{quote(target)}"
                                  "/m.annotation/m.reaction?limit=2")
        assert status == 200 and len(page["chunk"]) == 2 and "next_batch" in page
        status, rest = await call(matrix_server, alice, "GET",
                                  f"{V1}/rooms/{quote(room_id)}/relations/{quote(target)}"
                                  f"/m.annotation?limit=10&from={page['next_batch']}")
        keys = [e["content"]["m.relates_to"]["key"] for e in page["chunk"] + rest["chunk"]]
        assert sorted(keys) == sorted(["👍", "🎉", "👍"]) and "next_batch" not in rest
        # Redacting a reaction frees its key.
        status, _ = await call(matrix_server, bob, "PUT",
                               f"{CLIENT}/rooms/{quote(room_id)}/redact/{quote(first['event_id'])}/x",
                               {})
        assert status == 200
        assert (await send(matrix_server, bob, room_id, "m.reaction",
                           reaction(target, "👍"), "r5"))[0] == 200
        await close(alice, bob)
    run(go())


def test_edits_threads_and_references_are_bundled(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        original = (await say(alice, room_id, "helo")).event_id
        edit = {"msgtype": "m.text", "body": "* hello", "m.new_content": {
            "msgtype": "m.text", "body": "hello"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}}
        status, edit_event = await send(matrix_server, alice, room_id, "m.room.message", edit, "e1")
        assert status == 200
        # Bob's "edit" of Alice's message is not an edit of it.
        await send(matrix_server, bob, room_id, "m.room.message", {**edit, "body": "* hijack"}, "e2")
        root = (await say(alice, room_id, "thread root")).event_id
        for i, (client, txn) in enumerate(((bob, "t1"), (bob, "t2"), (alice, "t3"))):
            await send(matrix_server, client, room_id, "m.room.message", {
                "msgtype": "m.text", "body": f"in thread {i}",
                "m.relates_to": {"rel_type": "m.thread", "event_id": root}}, txn)
        await send(matrix_server, bob, room_id, "m.room.message", {
            "msgtype": "m.text", "body": "see above",
            "m.relates_to": {"rel_type": "m.reference", "event_id": original}}, "ref1")

        status, event = await call(matrix_server, bob, "GET",
                                   f"{CLIENT}/rooms/{quote(room_id)}/event/{quote(original)}")
        relations = event["unsigned"]["m.relations"]
        assert relations["m.replace"]["event_id"] == edit_event["event_id"]
        assert relations["m.reference"]["chunk"] == [{"event_id": relations["m.reference"]
                                                      ["chunk"][0]["event_id"]}]
        assert event["content"]["body"] == "helo"  # clients apply edits, the server does not
        status, event = await call(matrix_server, bob, "GET",
                                   f"{CLIENT}/rooms/{quote(room_id)}/event/{quote(root)}")
        thread = event["unsigned"]["m.relations"]["m.thread"]
        assert thread["count"] == 3 and thread["current_user_participated"] is True
        assert thread["latest_event"]["content"]["body"] == "in thread 2"
        # The same bundles arrive in sync.
        sync = await bob.sync(timeout=0)
        by_id = {e.event_id: e.source for e in sync.rooms.join[room_id].timeline.events}
        if root in by_id:
            assert by_id[root]["unsigned"]["m.relations"]["m.thread"]["count"] == 3
        # /threads lists the root; "participated" for someone who never took part is empty.
        status, threads = await call(matrix_server, bob, "GET",
                                     f"{V1}/rooms/{quote(room_id)}/threads")
        assert [e["event_id"] for e in threads["chunk"]] == [root]
        carol = await register(matrix_server)
        await carol.join(room_id)
        status, threads = await call(matrix_server, carol, "GET",
                                     f"{V1}/rooms/{quote(room_id)}/threads?include=participated")
        assert threads["chunk"] == []
        status, thread_page = await call(matrix_server, bob, "GET",
                                         f"{V1}/rooms/{quote(room_id)}/relations/{quote(root)}"
                                         "/m.thread?dir=f")
        assert [e["content"]["body"] for e in thread_page["chunk"]] == [
            "in thread 0", "in thread 1", "in thread 2"]
        stranger = await register(matrix_server)
        status, _ = await call(matrix_server, stranger, "GET",
                               f"{V1}/rooms/{quote(room_id)}/relations/{quote(root)}")
        assert status == 404
        await close(alice, bob, carol, stranger)
    run(go())
