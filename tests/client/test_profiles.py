"""Profiles and the user directory.

End to end: the real server (SQLite and PostgreSQL) driven by matrix-nio and
raw HTTP. In process: the propagation of a profile change into rooms and the
directory index, against fakes, for what a client cannot provoke (one room
refusing the update, events committing while the index loads).
"""

import asyncio
import uuid
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import aiohttp
import attrs
import pytest
from nio import (
    AsyncClient,
    JoinedMembersResponse,
    ProfileGetAvatarResponse,
    ProfileGetDisplayNameResponse,
    ProfileGetResponse,
    ProfileSetAvatarResponse,
    ProfileSetDisplayNameResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomVisibility,
)
from twisted.internet import defer
from twisted.python.failure import Failure

from homeserver.errors import MatrixError
from homeserver.services.federation_client import DestinationBlockedError
from homeserver.services.profiles import ProfileService
from homeserver.services.user_directory import UserDirectory
from storage.profiles import DirectorySnapshot, StoredProfile
from tests.support.clients import E2E_CONFIG, run
from tests.support.postgres import throwaway_database
from tests.support.server import start_server

CLIENT = "/_matrix/client/v3"
# The shared end-to-end settings, plus guests (profile rules for guests are tested).
OVERRIDES: dict[str, Any] = {**E2E_CONFIG, "allow_guest_access": True}


# --- end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    overrides = dict(OVERRIDES)
    with ExitStack() as stack:
        if request.param == "postgres":
            args = stack.enter_context(throwaway_database())
            overrides["database"] = {"name": "psycopg", "args": args}
        s = start_server(tmp_path_factory.mktemp(request.param), **overrides)
        stack.callback(s.stop)
        yield s




def tag() -> str:
    return uuid.uuid4().hex[:8]


async def register(server, name: str) -> AsyncClient:
    client = AsyncClient(server.base_url, name)
    response = await client.register(name, f"password-{name}-0123")
    assert isinstance(response, RegisterResponse), response
    return client


async def call(
    server, method: str, path: str, client: Any = None, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {client.access_token}"} if client else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.base_url + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def profile_path(user_id: str, key: str | None = None, prefix: str = CLIENT) -> str:
    path = f"{prefix}/profile/{quote(user_id, safe='')}"
    return path + (f"/{quote(key, safe='')}" if key else "")


def member_path(room_id: str, user_id: str) -> str:
    return f"{CLIENT}/rooms/{quote(room_id, safe='')}/state/m.room.member/{quote(user_id, safe='')}"


async def member_content(server, client: AsyncClient, room_id: str, user_id: str) -> dict:
    status, body = await call(server, "GET", member_path(room_id, user_id), client)
    assert status == 200, body
    return body


async def create_room(client: AsyncClient, public: bool = False, invite: tuple = ()) -> str:
    response = await client.room_create(
        visibility=RoomVisibility.public if public else RoomVisibility.private,
        invite=list(invite),
    )
    assert isinstance(response, RoomCreateResponse), response
    return response.room_id


async def search(server, client: AsyncClient, term: str, limit: int | None = None) -> dict:
    body: dict[str, Any] = {"search_term": term}
    if limit is not None:
        body["limit"] = limit
    status, result = await call(server, "POST", f"{CLIENT}/user_directory/search", client, body)
    assert status == 200, result
    return result


def test_set_get_and_refusals(server):
    async def scenario() -> None:
        t = tag()
        alice = await register(server, f"alice{t}")
        bob = await register(server, f"bob{t}")
        try:
            assert isinstance(
                await alice.set_displayname(f"Alice {t}"), ProfileSetDisplayNameResponse
            )
            assert isinstance(
                await alice.set_avatar("mxc://example.org/Avatar_1"), ProfileSetAvatarResponse
            )
            name = await bob.get_displayname(alice.user_id)
            assert isinstance(name, ProfileGetDisplayNameResponse)
            assert name.displayname == f"Alice {t}"
            avatar = await bob.get_avatar(alice.user_id)
            assert isinstance(avatar, ProfileGetAvatarResponse)
            assert avatar.avatar_url == "mxc://example.org/Avatar_1"
            profile = await bob.get_profile(alice.user_id)
            assert isinstance(profile, ProfileGetResponse)
            assert (profile.displayname, profile.avatar_url) == (
                f"Alice {t}",
                "mxc://example.org/Avatar_1",
            )
            # The old r0 prefix, and no access token needed to read.
            assert await call(
                server, "GET", profile_path(alice.user_id, prefix="/_matrix/client/r0")
            ) == (200, {"displayname": f"Alice {t}", "avatar_url": "mxc://example.org/Avatar_1"})

            # Custom fields (spec v1.16): m.tz and a namespaced key, then DELETE.
            assert await call(
                server, "PUT", profile_path(alice.user_id, "m.tz"), alice, {"m.tz": "Europe/London"}
            ) == (200, {})
            assert await call(
                server,
                "PUT",
                profile_path(alice.user_id, "org.example.pets"),
                alice,
                {"org.example.pets": ["cat", {"name": "Dinah"}]},
            ) == (200, {})
            status, body = await call(server, "GET", profile_path(alice.user_id))
            assert body == {
                "displayname": f"Alice {t}",
                "avatar_url": "mxc://example.org/Avatar_1",
                "m.tz": "Europe/London",
                "org.example.pets": ["cat", {"name": "Dinah"}],
            }
            assert await call(server, "GET", profile_path(alice.user_id, "m.tz")) == (
                200,
                {"m.tz": "Europe/London"},
            )
            assert await call(server, "DELETE", profile_path(alice.user_id, "m.tz"), alice) == (
                200,
                {},
            )
            status, body = await call(server, "GET", profile_path(alice.user_id, "m.tz"))
            assert (status, body["errcode"]) == (404, "M_NOT_FOUND")

            async def refused(method: str, path: str, client: Any, body: Any = None) -> tuple:
                status, result = await call(server, method, path, client, body)
                return status, result.get("errcode")

            # Only yourself.
            assert await refused(
                "PUT", profile_path(alice.user_id, "displayname"), bob, {"displayname": "Mallory"}
            ) == (403, "M_FORBIDDEN")
            assert await refused(
                "PUT",
                profile_path(alice.user_id, "avatar_url"),
                bob,
                {"avatar_url": "mxc://evil.example/x"},
            ) == (403, "M_FORBIDDEN")
            assert await refused("DELETE", profile_path(alice.user_id, "displayname"), bob) == (
                403,
                "M_FORBIDDEN",
            )
            status, _ = await call(
                server,
                "PUT",
                profile_path(alice.user_id, "displayname"),
                None,
                {"displayname": "Nobody"},
            )
            assert status == 401
            # Bad values.
            own = profile_path(alice.user_id, "avatar_url")
            for bad in ("https://example.org/a.png", "mxc://", "mxc://example.org/", 7):
                status, errcode = await refused("PUT", own, alice, {"avatar_url": bad})
                assert status == 400 and errcode in ("M_INVALID_PARAM", "M_BAD_JSON"), bad
            own = profile_path(alice.user_id, "displayname")
            assert (await refused("PUT", own, alice, {"displayname": "x" * 257}))[0] == 400
            assert await refused("PUT", own, alice, {"displayname": 12}) == (400, "M_BAD_JSON")
            assert await refused("PUT", own, alice, {"name": "x"}) == (400, "M_MISSING_PARAM")
            assert await refused(
                "PUT", profile_path(alice.user_id, "Not A Key"), alice, {"Not A Key": 1}
            ) == (400, "M_INVALID_PARAM")
            # Unknown users, and users of other servers.
            assert await refused("GET", profile_path(f"@nobody{t}:{server.server_name}"), None) == (
                404,
                "M_NOT_FOUND",
            )
            assert await refused(
                "GET", profile_path(f"@nobody{t}:{server.server_name}", "displayname"), None
            ) == (404, "M_NOT_FOUND")
            # Another server that cannot be reached (a blocked address: nothing is sent).
            assert await refused("GET", profile_path("@someone:10.0.0.1:8448"), None) == (
                502,
                "M_UNKNOWN",
            )
            # Guests may change their display name, and nothing else.
            status, guest = await call(server, "POST", f"{CLIENT}/register?kind=guest", None, {})
            assert status == 200, guest
            as_guest = SimpleNamespace(access_token=guest["access_token"])
            assert await call(
                server,
                "PUT",
                profile_path(guest["user_id"], "displayname"),
                as_guest,
                {"displayname": "Guest"},
            ) == (200, {})
            assert await refused(
                "PUT",
                profile_path(guest["user_id"], "avatar_url"),
                as_guest,
                {"avatar_url": "mxc://a.example/b"},
            ) == (403, "M_GUEST_ACCESS_FORBIDDEN")
            # Nothing changed.
            assert (await bob.get_displayname(alice.user_id)).displayname == f"Alice {t}"

            # Clearing: null (or "") removes the field.
            assert await call(
                server,
                "PUT",
                profile_path(alice.user_id, "avatar_url"),
                alice,
                {"avatar_url": None},
            ) == (200, {})
            status, body = await call(server, "GET", profile_path(alice.user_id, "avatar_url"))
            assert status == 404
            assert (await call(server, "GET", profile_path(alice.user_id)))[1] == {
                "displayname": f"Alice {t}",
                "org.example.pets": ["cat", {"name": "Dinah"}],
            }
        finally:
            await asyncio.gather(alice.close(), bob.close())

    run(scenario())


def test_changes_reach_every_joined_room(server):
    async def scenario() -> None:
        t = tag()
        alice = await register(server, f"alice{t}")
        bob = await register(server, f"bob{t}")
        try:
            await alice.set_displayname("Alice One")
            public = await create_room(alice, public=True)
            shared = await create_room(alice, invite=(bob.user_id,))
            left = await create_room(alice)
            assert (await bob.join(shared)).room_id == shared
            await bob.join(public)
            await alice.room_leave(left)
            for room_id in (public, shared):
                assert (await member_content(server, alice, room_id, alice.user_id))[
                    "displayname"
                ] == "Alice One"

            await alice.set_displayname("Alice Two")
            await alice.set_avatar("mxc://example.org/AliceTwo")
            for room_id in (public, shared):
                content = await member_content(server, bob, room_id, alice.user_id)
                assert content == {
                    "membership": "join",
                    "displayname": "Alice Two",
                    "avatar_url": "mxc://example.org/AliceTwo",
                }
            members = await bob.joined_members(shared)
            assert isinstance(members, JoinedMembersResponse)
            by_id = {m.user_id: m for m in members.members}
            assert by_id[alice.user_id].display_name == "Alice Two"
            assert by_id[alice.user_id].avatar_url == "mxc://example.org/AliceTwo"
            assert bob.user_id in by_id  # bob's own membership is untouched
            # Not in rooms she has left.
            status, body = await call(server, "GET", member_path(left, alice.user_id), alice)
            if status == 200:
                assert body["membership"] == "leave" and body.get("displayname") != "Alice Two"

            # Clearing the name removes it from the member events.
            await call(
                server,
                "PUT",
                profile_path(alice.user_id, "displayname"),
                alice,
                {"displayname": None},
            )
            for room_id in (public, shared):
                content = await member_content(server, bob, room_id, alice.user_id)
                assert content == {"membership": "join", "avatar_url": "mxc://example.org/AliceTwo"}
            # A custom field is no member event's business.
            await call(
                server, "PUT", profile_path(alice.user_id, "m.tz"), alice, {"m.tz": "Europe/Paris"}
            )
            assert "m.tz" not in await member_content(server, bob, shared, alice.user_id)
            # A new join carries the current profile.
            later = await create_room(bob, invite=(alice.user_id,))
            await alice.join(later)
            assert await member_content(server, bob, later, alice.user_id) == {
                "membership": "join",
                "avatar_url": "mxc://example.org/AliceTwo",
            }
        finally:
            await asyncio.gather(alice.close(), bob.close())

    run(scenario())


def test_user_directory_visibility(server):
    async def scenario() -> None:
        t = tag()
        names = ("alice", "carol", "dave", "erin", "frank")
        c = dict(
            zip(
                names,
                await asyncio.gather(*(register(server, f"{n}{t}") for n in names)),
                strict=True,
            )
        )
        alice, carol, dave, erin, frank = (c[n] for n in names)
        try:
            await carol.set_displayname(f"Carol Hidden{t}")
            await dave.set_displayname(f"Dave Open{t}")
            await dave.set_avatar("mxc://example.org/Dave")
            await erin.set_displayname(f"Erin Shared{t}")
            await frank.set_displayname(f"Frank Nowhere{t}")  # in no room at all
            await create_room(carol)  # private, alone
            public = await create_room(dave, public=True)
            shared = await create_room(erin, invite=(alice.user_id,))
            await alice.join(shared)

            def ids(result: dict) -> set[str]:
                return {r["user_id"] for r in result["results"]}

            result = await search(server, alice, t)
            assert ids(result) == {dave.user_id, erin.user_id}
            assert result["limited"] is False
            dave_entry = next(r for r in result["results"] if r["user_id"] == dave.user_id)
            assert dave_entry == {
                "user_id": dave.user_id,
                "display_name": f"Dave Open{t}",
                "avatar_url": "mxc://example.org/Dave",
            }
            # Case-insensitive, on display names and user ids.
            assert ids(await search(server, alice, f"ERIN shared{t.upper()}")) == {erin.user_id}
            assert ids(await search(server, alice, f"@erin{t}")) == {erin.user_id}
            assert ids(await search(server, alice, f"carol{t}")) == set()
            assert ids(await search(server, alice, f"frank{t}")) == set()
            # Carol sees Dave (public room) but not Erin (they share nothing).
            assert ids(await search(server, carol, t)) == {dave.user_id}
            # limit / limited
            result = await search(server, alice, t, limit=1)
            assert len(result["results"]) == 1 and result["limited"] is True

            # Memberships and names change; the directory follows.
            await carol.join(public)
            assert ids(await search(server, alice, t)) == {
                carol.user_id,
                dave.user_id,
                erin.user_id,
            }
            await dave.set_displayname(f"Dave Renamed{t}")
            assert ids(await search(server, alice, f"renamed{t}")) == {dave.user_id}
            assert ids(await search(server, alice, f"open{t}")) == set()
            await dave.room_leave(public)
            assert ids(await search(server, alice, t)) == {carol.user_id, erin.user_id}
            await erin.room_leave(shared)
            assert ids(await search(server, alice, t)) == {carol.user_id}
        finally:
            await asyncio.gather(*(x.close() for x in c.values()))

        # The index is rebuilt from the database after a restart.
        server.stop()
        server.start()
        other = await register(server, f"other{t}")
        try:
            assert ids(await search(server, other, t)) == {carol.user_id}
            assert (await search(server, other, f"hidden{t}"))["results"] == [
                {"user_id": carol.user_id, "display_name": f"Carol Hidden{t}"}
            ]
        finally:
            await other.close()

    run(scenario())


# --- in process ---------------------------------------------------------------------
def result_of(coro: Any) -> Any:
    """Run a coroutine whose awaits all complete at once (fakes only)."""
    d = defer.ensureDeferred(coro)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the coroutine waited on something"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def member(user_id: str, room_id: str, content: dict) -> SimpleNamespace:
    return SimpleNamespace(
        type="m.room.member",
        state_key=user_id,
        room_id=room_id,
        content=content,
        membership=content.get("membership"),
    )


def state(event_type: str, room_id: str, content: dict) -> SimpleNamespace:
    return SimpleNamespace(type=event_type, state_key="", room_id=room_id, content=content)


class FakeProfileStore:
    def __init__(self, users: dict[str, StoredProfile]) -> None:
        self.users = users
        self.reads = 0

    async def get_profile(self, user_id: str) -> StoredProfile | None:
        self.reads += 1
        return self.users.get(user_id)

    async def set_standard_field(self, user_id: str, field: str, value: Any) -> bool:
        if user_id not in self.users:
            return False
        self.users[user_id] = attrs.evolve(self.users[user_id], **{field: value})
        return True


async def unreachable(destination, path, query=None, **kwargs):
    raise DestinationBlockedError(destination, "blocked by the test")


def fake_profile_service(rooms: dict[str, SimpleNamespace], failing: set[str]) -> Any:
    sent: list[tuple[str, dict]] = []

    class Room:
        def __init__(self, pdu: SimpleNamespace) -> None:
            self.pdu = pdu

        def get(self, event_type: str, state_key: str) -> Any:
            return self.pdu if state_key == self.pdu.state_key else None

    async def get_room(room_id: str) -> Any:
        return Room(rooms[room_id])

    async def send(sender, room_id, event_type, content, state_key=None):
        if room_id in failing:
            raise MatrixError("M_FORBIDDEN", "this room refuses")
        sent.append((room_id, content))

    async def is_suspended(user_id):
        return user_id == "@suspended:test"

    async def get_rooms_for_user(user_id, membership):
        return [r for r, pdu in rooms.items() if pdu.membership == membership]

    hs = SimpleNamespace(
        database=None,
        server_name="test",
        persister=SimpleNamespace(on_persisted=[]),
        room_states=SimpleNamespace(get=get_room),
        room_sender=SimpleNamespace(send=send),
        events_store=SimpleNamespace(get_rooms_for_user=get_rooms_for_user),
        accounts=SimpleNamespace(is_suspended=is_suspended),
        federation_client=SimpleNamespace(get_json=unreachable),
    )
    service = ProfileService(hs)
    service.store = FakeProfileStore({"@a:test": StoredProfile("Old", None, {})})
    return service, sent


def test_one_failing_room_does_not_stop_the_others():
    rooms = {
        f"!{i}:test": member("@a:test", f"!{i}:test", {"membership": "join", "displayname": "Old"})
        for i in range(40)
    }
    rooms["!custom:test"] = member(
        "@a:test",
        "!custom:test",
        {
            "membership": "join",
            "displayname": "Room nick",
            "reason": "hello",
            "org.example.flair": "gold",
        },
    )
    rooms["!gone:test"] = member("@a:test", "!gone:test", {"membership": "leave"})
    failing = {"!3:test", "!17:test"}
    service, sent = fake_profile_service(rooms, failing)

    result_of(service.set_displayname("@a:test", "@a:test", "New"))

    assert {room_id for room_id, _ in sent} == set(rooms) - failing - {"!gone:test"}
    contents = dict(sent)
    assert contents["!5:test"] == {"membership": "join", "displayname": "New"}
    # Other content is kept; what described the old join is not.
    assert contents["!custom:test"] == {
        "membership": "join",
        "displayname": "New",
        "org.example.flair": "gold",
    }
    assert result_of(service.get_local_profile("@a:test")) == {"displayname": "New"}


def test_profile_reads_come_from_memory_and_refusals():
    service, _ = fake_profile_service({}, set())
    store = service.store
    for _ in range(3):
        assert result_of(service.get_local_profile("@a:test")) == {"displayname": "Old"}
    assert store.reads == 1
    assert result_of(service.get_local_profile("@nobody:test")) == {}
    with pytest.raises(MatrixError) as e:
        result_of(service.set_displayname("@b:test", "@a:test", "Mallory"))
    assert e.value.errcode == "M_FORBIDDEN"
    with pytest.raises(MatrixError) as e:
        result_of(service.set_avatar_url("@a:test", "@a:test", "http://x/y"))
    assert (e.value.status, e.value.errcode) == (400, "M_INVALID_PARAM")
    with pytest.raises(MatrixError) as e:
        result_of(service.set_displayname("@suspended:test", "@suspended:test", "Hi"))
    assert (e.value.status, e.value.errcode) == (403, "M_USER_SUSPENDED")
    with pytest.raises(MatrixError) as e:
        result_of(service.get_profile("@x:other.example"))
    # Users of other servers are asked over federation; an unreachable one is 502.
    assert e.value.status == 502 and "other.example" in e.value.message


class FakeDirectoryStore:
    def __init__(self, snapshot: DirectorySnapshot) -> None:
        self.snapshot = snapshot
        self.loading: defer.Deferred[DirectorySnapshot] | None = None

    async def load_directory(self) -> DirectorySnapshot:
        self.loading = defer.Deferred()
        return await self.loading


class FakeProfiles:
    def cached_standard_profile(self, user_id: str) -> tuple | None:
        return {"@new:test": ("Newcomer", None)}.get(user_id)

    async def get_standard_profile(self, user_id: str) -> tuple | None:
        return None


def test_directory_index_loads_and_follows_events():
    snapshot = DirectorySnapshot(
        joined=[
            ("!pub:test", "@dave:test"),
            ("!priv:test", "@carol:test"),
            ("!shared:test", "@alice:test"),
            ("!shared:test", "@erin:remote.example"),
        ],
        room_settings=[
            ("!pub:test", "m.room.join_rules", {"join_rule": "public"}),
            ("!priv:test", "m.room.join_rules", {"join_rule": "invite"}),
        ],
        local_profiles={
            "@dave:test": ("Dave", "mxc://test/d"),
            "@carol:test": ("Carol", None),
            "@alice:test": ("Alice", None),
        },
        remote_profiles={"@erin:remote.example": ("Erin", None)},
    )
    store = FakeDirectoryStore(snapshot)
    directory = UserDirectory(store, "test", FakeProfiles())
    directory.on_persisted(
        [SimpleNamespace(pdu=member("@x:test", "!pub:test", {"membership": "join"}))]
    )  # before any search: the load will read it

    searching = defer.ensureDeferred(directory.search("@alice:test", "e", limit=10))
    # Events that commit while the snapshot is being read are replayed on top of it.
    directory.on_persisted(
        [
            SimpleNamespace(pdu=state("m.room.join_rules", "!priv:test", {"join_rule": "public"})),
            SimpleNamespace(
                pdu=member(
                    "@new:test",
                    "!priv:test",
                    {"membership": "join", "displayname": "room nickname"},
                )
            ),
            SimpleNamespace(pdu=member("@dave:test", "!pub:test", {"membership": "leave"})),
        ]
    )
    directory.on_local_profile_changed("@carol:test", "Caroline", None)
    store.loading.callback(snapshot)
    result = result_of(searching)
    # erin starts a name part ("erin"); the others only contain an "e". The
    # searcher is not in a public room, so not among the results.
    assert [r["user_id"] for r in result["results"]] == [
        "@erin:remote.example",
        "@carol:test",
        "@new:test",
    ]
    assert result["results"][1]["display_name"] == "Caroline"
    # A local user's entry is the global profile, not a room nickname.
    assert result["results"][2]["display_name"] == "Newcomer"

    # Ranking: whole name first, then word prefixes, then the rest.
    assert [
        r["user_id"] for r in result_of(directory.search("@alice:test", "erin"))["results"]
    ] == ["@erin:remote.example"]
    directory.on_persisted(
        [
            SimpleNamespace(
                pdu=member(
                    "@zerina:remote.example",
                    "!shared:test",
                    {"membership": "join", "displayname": "Zerina"},
                )
            )
        ]
    )
    directory.on_persisted(
        [
            SimpleNamespace(
                pdu=member(
                    "@erinson:remote.example",
                    "!shared:test",
                    {"membership": "join", "displayname": "Someone"},
                )
            )
        ]
    )
    assert [
        r["user_id"] for r in result_of(directory.search("@alice:test", "erin"))["results"]
    ] == ["@erin:remote.example", "@erinson:remote.example", "@zerina:remote.example"]
    assert result_of(directory.search("@alice:test", "erin", limit=2))["limited"] is True
    assert result_of(directory.search("@alice:test", "   "))["results"] == []
    # A deactivated user is gone for good, even if a join event follows.
    directory.remove_user("@carol:test")
    directory.on_persisted(
        [SimpleNamespace(pdu=member("@carol:test", "!shared:test", {"membership": "join"}))]
    )
    assert result_of(directory.search("@alice:test", "carol"))["results"] == []
    # Leaving the last shared room hides a remote user again.
    directory.on_persisted(
        [SimpleNamespace(pdu=member("@alice:test", "!shared:test", {"membership": "leave"}))]
    )
    assert result_of(directory.search("@alice:test", "erin"))["results"] == []
