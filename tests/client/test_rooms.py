"""Rooms end to end with matrix-nio: creation presets, power levels, membership, state."""

from urllib.parse import quote

import pytest
from nio import (
    JoinError,
    RoomInviteError,
    RoomPutStateError,
    RoomSendError,
    RoomSendResponse,
)

from tests.support.clients import CLIENT, call, close, create, register, run, say


def room_path(room_id: str, rest: str = "") -> str:
    return f"{CLIENT}/rooms/{quote(room_id)}{rest}"


def test_channel_only_admins_post_until_raised(matrix_server):
    async def go():
        admin, member = await register(matrix_server), await register(matrix_server)
        room_id = await create(admin, visibility="public", name="News",
                               power_level_content_override={"events_default": 50})
        assert not isinstance(await member.join(room_id), JoinError)
        refused = await say(member, room_id)
        assert isinstance(refused, RoomSendError)
        assert refused.status_code == "M_FORBIDDEN"
        assert isinstance(await say(admin, room_id), RoomSendResponse)
        # The member may not promote themself...
        status, levels = await call(matrix_server, admin, "GET",
                                    room_path(room_id, "/state/m.room.power_levels"))
        assert status == 200 and levels["events_default"] == 50
        promoted = {**levels, "users": {**levels["users"], member.user_id: 50}}
        status, body = await call(matrix_server, member, "PUT",
                                  room_path(room_id, "/state/m.room.power_levels/"), promoted)
        assert status == 403 and body["errcode"] == "M_FORBIDDEN" and body["error"]
        # ...but the admin can, and then the member posts.
        status, _ = await call(matrix_server, admin, "PUT",
                               room_path(room_id, "/state/m.room.power_levels"), promoted)
        assert status == 200
        assert isinstance(await say(member, room_id), RoomSendResponse)
        await close(admin, member)
    run(go())


def test_group_everyone_posts_and_invites(matrix_server):
    async def go():
        alice, bob, carol = (await register(matrix_server), await register(matrix_server),
                             await register(matrix_server))
        room_id = await create(alice, preset="private_chat", invite=[bob.user_id])
        assert not isinstance(await bob.join(room_id), JoinError)
        assert isinstance(await say(bob, room_id), RoomSendResponse)
        assert not isinstance(await bob.room_invite(room_id, carol.user_id), RoomInviteError)
        assert not isinstance(await carol.join(room_id), JoinError)
        members = await alice.joined_members(room_id)
        assert {m.user_id for m in members.members} == {alice.user_id, bob.user_id, carol.user_id}
        await close(alice, bob, carol)
    run(go())


def test_direct_message_refuses_a_third_person(matrix_server):
    async def go():
        alice, bob, carol = (await register(matrix_server), await register(matrix_server),
                             await register(matrix_server))
        room_id = await create(alice, preset="trusted_private_chat", is_direct=True,
                               invite=[bob.user_id])
        status, invite = await call(matrix_server, bob, "GET",
                                    room_path(room_id, f"/state/m.room.member/{bob.user_id}"))
        assert status == 403  # not joined yet: the invitee cannot read room state
        assert not isinstance(await bob.join(room_id), JoinError)
        status, member = await call(matrix_server, bob, "GET",
                                    room_path(room_id, f"/state/m.room.member/{bob.user_id}"))
        assert status == 200 and member["membership"] == "join"
        for inviter in (alice, bob):
            refused = await inviter.room_invite(room_id, carol.user_id)
            assert isinstance(refused, RoomInviteError) and refused.status_code == "M_FORBIDDEN"
        # Both people are equal: the invitee got the creator's power.
        status, levels = await call(matrix_server, alice, "GET",
                                    room_path(room_id, "/state/m.room.power_levels"))
        assert levels["users"][bob.user_id] == 100
        await close(alice, bob, carol)
    run(go())


def test_ban_kick_unban_and_rejoin(matrix_server):
    async def go():
        admin, user = await register(matrix_server), await register(matrix_server)
        room_id = await create(admin, preset="public_chat")
        assert not isinstance(await user.join(room_id), JoinError)
        # A plain member may not kick or ban.
        status, body = await call(matrix_server, user, "POST", room_path(room_id, "/kick"),
                                  {"user_id": admin.user_id})
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        status, _ = await call(matrix_server, admin, "POST", room_path(room_id, "/kick"),
                               {"user_id": user.user_id, "reason": "cool down"})
        assert status == 200
        assert not isinstance(await user.join(room_id), JoinError)  # kicked may rejoin
        status, _ = await call(matrix_server, admin, "POST", room_path(room_id, "/ban"),
                               {"user_id": user.user_id, "reason": "spam"})
        assert status == 200
        refused = await user.join(room_id)
        assert isinstance(refused, JoinError) and refused.status_code == "M_FORBIDDEN"
        status, member = await call(matrix_server, admin, "GET",
                                    room_path(room_id, f"/state/m.room.member/{user.user_id}"))
        assert member == {"membership": "ban", "reason": "spam"}
        status, _ = await call(matrix_server, admin, "POST", room_path(room_id, "/unban"),
                               {"user_id": user.user_id})
        assert status == 200
        assert not isinstance(await user.join(room_id), JoinError)
        await close(admin, user)
    run(go())


def test_leave_forget_and_joined_rooms(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        assert room_id in (await bob.joined_rooms()).rooms
        status, _ = await call(matrix_server, bob, "POST", room_path(room_id, "/forget"), {})
        assert status == 400  # must leave first
        await bob.room_leave(room_id)
        assert room_id not in (await bob.joined_rooms()).rooms
        status, _ = await call(matrix_server, bob, "POST", room_path(room_id, "/forget"), {})
        assert status == 200
        # Left members read the state as it was when they left.
        status, _ = await call(matrix_server, bob, "GET", room_path(room_id, "/state"))
        assert status == 200
        await close(alice, bob)
    run(go())


def test_knock_then_accept(matrix_server):
    async def go():
        admin, knocker = await register(matrix_server), await register(matrix_server)
        room_id = await create(admin, preset="private_chat",
                               initial_state=[{"type": "m.room.join_rules",
                                               "content": {"join_rule": "knock"}}])
        refused = await knocker.join(room_id)
        assert isinstance(refused, JoinError) and refused.status_code == "M_FORBIDDEN"
        status, body = await call(matrix_server, knocker, "POST",
                                  f"{CLIENT}/knock/{quote(room_id)}", {"reason": "let me in"})
        assert status == 200 and body == {"room_id": room_id}
        status, knocks = await call(matrix_server, admin, "GET",
                                    room_path(room_id, "/members?membership=knock"))
        assert [e["state_key"] for e in knocks["chunk"]] == [knocker.user_id]
        await admin.room_invite(room_id, knocker.user_id)
        assert not isinstance(await knocker.join(room_id), JoinError)
        await close(admin, knocker)
    run(go())


def test_members_filters_and_at(matrix_server):
    async def go():
        alice, bob, carol = (await register(matrix_server), await register(matrix_server),
                             await register(matrix_server))
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        sync = await alice.sync(timeout=0)
        before_carol = sync.next_batch
        await carol.join(room_id)
        await bob.room_leave(room_id)
        status, body = await call(matrix_server, alice, "GET", room_path(room_id, "/members"))
        assert {e["state_key"]: e["content"]["membership"] for e in body["chunk"]} == {
            alice.user_id: "join", bob.user_id: "leave", carol.user_id: "join"}
        status, body = await call(matrix_server, alice, "GET",
                                  room_path(room_id, "/members?not_membership=leave"))
        assert {e["state_key"] for e in body["chunk"]} == {alice.user_id, carol.user_id}
        status, body = await call(matrix_server, alice, "GET",
                                  room_path(room_id, f"/members?at={before_carol}"))
        assert {e["state_key"]: e["content"]["membership"] for e in body["chunk"]} == {
            alice.user_id: "join", bob.user_id: "join"}
        status, body = await call(matrix_server, carol, "GET", room_path(room_id, "/joined_members"))
        assert set(body["joined"]) == {alice.user_id, carol.user_id}
        await close(alice, bob, carol)
    run(go())


def test_state_put_get_with_and_without_trailing_slash(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat", name="One", topic="First")
        status, body = await call(matrix_server, alice, "PUT",
                                  room_path(room_id, "/state/m.room.name/"), {"name": "Two"})
        assert status == 200 and body["event_id"].startswith("$")
        for suffix in ("/state/m.room.name", "/state/m.room.name/"):
            status, body = await call(matrix_server, alice, "GET", room_path(room_id, suffix))
            assert (status, body) == (200, {"name": "Two"})
        status, body = await call(matrix_server, alice, "GET",
                                  room_path(room_id, "/state/m.room.topic?format=event"))
        assert body["type"] == "m.room.topic" and body["content"]["topic"] == "First"
        status, body = await call(matrix_server, alice, "GET",
                                  room_path(room_id, "/state/m.room.nothing"))
        assert status == 404 and body["errcode"] == "M_NOT_FOUND"
        status, state = await call(matrix_server, alice, "GET", room_path(room_id, "/state"))
        assert {e["type"] for e in state} >= {"m.room.create", "m.room.name", "m.room.topic",
                                              "m.room.power_levels", "m.room.join_rules"}
        # A state key that looks like another user's id is theirs alone.
        await bob.join(room_id)
        status, body = await call(matrix_server, bob, "PUT",
                                  room_path(room_id, f"/state/m.custom/{alice.user_id}"), {})
        assert status == 403
        # Non-members see nothing.
        stranger = await register(matrix_server)
        status, body = await call(matrix_server, stranger, "GET", room_path(room_id, "/state"))
        assert status == 403 and body["errcode"] == "M_FORBIDDEN"
        refused = await stranger.room_put_state(room_id, "m.room.name", {"name": "x"})
        assert isinstance(refused, RoomPutStateError) and refused.status_code == "M_FORBIDDEN"
        await close(alice, bob, stranger)
    run(go())


def test_create_room_options_and_errors(matrix_server):
    async def go():
        alice = await register(matrix_server)
        status, body = await call(matrix_server, alice, "POST", f"{CLIENT}/createRoom", {
            "room_version": "10", "creation_content": {"m.federate": False},
            "initial_state": [{"type": "m.room.topic", "content": {"topic": "from initial_state"}}],
            "power_level_content_override": {"kick": 75},
        })
        assert status == 200
        room_id = body["room_id"]
        assert room_id.endswith(":" + matrix_server.server_name)  # room 10: "!x:server"
        status, create_event = await call(matrix_server, alice, "GET",
                                          room_path(room_id, "/state/m.room.create"))
        assert create_event == {"creator": alice.user_id, "m.federate": False, "room_version": "10"}
        status, levels = await call(matrix_server, alice, "GET",
                                    room_path(room_id, "/state/m.room.power_levels"))
        assert levels["kick"] == 75 and levels["users"] == {alice.user_id: 100}
        status, topic = await call(matrix_server, alice, "GET",
                                   room_path(room_id, "/state/m.room.topic"))
        assert topic == {"topic": "from initial_state"}
        status, body = await call(matrix_server, alice, "POST", f"{CLIENT}/createRoom",
                                  {"room_version": "99"})
        assert status == 400 and body["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"
        status, body = await call(matrix_server, alice, "POST", f"{CLIENT}/createRoom",
                                  raw=b"{not json")
        assert status == 400 and body["errcode"] == "M_NOT_JSON"
        status, body = await call(matrix_server, alice, "POST", f"{CLIENT}/createRoom",
                                  {"preset": "party"})
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        status, body = await call(matrix_server, alice, "POST", f"{CLIENT}/createRoom",
                                  {"invite": "not-a-list"})
        assert status == 400 and body["errcode"] == "M_BAD_JSON"
        status, body = await call(matrix_server, None, "POST", f"{CLIENT}/createRoom", {})
        assert status == 401 and body["errcode"] == "M_MISSING_TOKEN"
        # Unknown rooms: joining 404s, reading state 403s (no existence leak).
        status, body = await call(matrix_server, alice, "POST",
                                  f"{CLIENT}/join/{quote('!nowhere:' + matrix_server.server_name)}")
        assert status == 404
        status, body = await call(matrix_server, alice, "GET",
                                  room_path("!nowhere:" + matrix_server.server_name, "/state"))
        assert status == 403
        await close(alice)
    run(go())


@pytest.mark.parametrize("version", ["1", "3", "9", "11"])
def test_older_room_versions_work(matrix_server, version):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, room_version=version, preset="public_chat")
        assert not isinstance(await bob.join(room_id), JoinError)
        assert isinstance(await say(bob, room_id), RoomSendResponse)
        await close(alice, bob)
    run(go())


def test_per_room_nickname_but_no_membership_by_state_put(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        path = room_path(room_id, f"/state/m.room.member/{bob.user_id}")
        status, _ = await call(matrix_server, bob, "PUT", path,
                               {"membership": "join", "displayname": "Bobby here"})
        assert status == 200
        members = await alice.joined_members(room_id)
        assert {m.user_id: m.display_name for m in members.members}[bob.user_id] == "Bobby here"
        status, body = await call(matrix_server, bob, "PUT", path, {"membership": "leave"})
        assert status == 403
        status, body = await call(matrix_server, alice, "PUT", path,
                                  {"membership": "join", "displayname": "hijacked"})
        assert status == 403
        await close(alice, bob)
    run(go())


def test_deactivated_user_leaves_their_rooms(matrix_server):
    async def go():
        alice, bob = await register(matrix_server), await register(matrix_server)
        room_id = await create(alice, preset="public_chat")
        await bob.join(room_id)
        status, flows = await call(matrix_server, bob, "POST", f"{CLIENT}/account/deactivate", {})
        assert status == 401
        status, _ = await call(matrix_server, bob, "POST", f"{CLIENT}/account/deactivate", {
            "auth": {"type": "m.login.password", "session": flows["session"],
                     "identifier": {"type": "m.id.user", "user": bob.user_id},
                     "password": "correct horse battery"}})
        assert status == 200
        members = await alice.joined_members(room_id)
        assert [m.user_id for m in members.members] == [alice.user_id]
        await close(alice, bob)
    run(go())


def test_rc_message_limits_sends_with_retry_after(tmp_path):
    from contextlib import ExitStack

    from tests.support.clients import start_e2e_server

    async def go(server):
        alice = await register(server)
        room_id = await create(alice, preset="public_chat")  # createRoom counts too
        statuses = []
        for i in range(4):
            status, body = await call(server, alice, "PUT",
                                      room_path(room_id, f"/send/m.room.message/rl{i}"),
                                      {"msgtype": "m.text", "body": str(i)})
            statuses.append(status)
        assert statuses[0] == 200 and statuses[-1] == 429
        assert body["errcode"] == "M_LIMIT_EXCEEDED" and body["retry_after_ms"] > 0
        await close(alice)

    with ExitStack() as stack:
        server = start_e2e_server(stack, tmp_path, "sqlite3",
                                  rc_message={"per_second": 0.1, "burst_count": 2})
        run(go(server))
