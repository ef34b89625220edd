"""Room aliases and the published room directory, end to end on the real server.

Driven by matrix-nio where it has the call, by raw HTTP with the user's access
token where it does not. Every scenario runs on SQLite and on PostgreSQL.
"""

import hashlib
import hmac
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from urllib.parse import quote, urlencode

import pytest
import yaml
from nio import (
    AsyncClient,
    JoinResponse,
    RegisterResponse,
    RoomCreateResponse,
    RoomGetVisibilityResponse,
    RoomPutStateResponse,
    RoomResolveAliasError,
    RoomResolveAliasResponse,
    RoomVisibility,
)
from nio.responses import PublicRoomsResponse

from tests.support.clients import run
from tests.support.http import request
from tests.support.postgres import throwaway_database
from tests.support.server import start_server

FAST = {"per_second": 1000, "burst_count": 1000}
BASE_CONFIG = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
    "rc_message": FAST,
    "rc_registration": FAST,
    "rc_login": {"address": FAST, "account": FAST, "failed_attempts": FAST},
    "rc_joins": {"local": FAST, "remote": FAST},
}
OPEN_CONFIG = {
    **BASE_CONFIG,
    "allow_public_rooms_without_auth": True,
    "room_list_publication_rules": [
        {"user_id": "@mallory*", "action": "deny"},
        {"alias": "#secret*", "action": "deny"},
        {"action": "allow"},
    ],
}
APPSERVICE = {
    "id": "irc",
    "url": None,
    "as_token": "as-token-for-directory-tests",
    "hs_token": "hs-token-for-directory-tests",
    "sender_localpart": "ircbot",
    "namespaces": {
        "users": [{"exclusive": True, "regex": "@irc_.*"}],
        "aliases": [{"exclusive": True, "regex": "#irc_.*"}],
        "rooms": [],
    },
}
CLIENT = "/_matrix/client/v3"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def servers(request, tmp_path_factory):
    """Per database: a server with the default directory settings (and an
    application service reserving #irc_* aliases) and one with
    allow_public_rooms_without_auth and publication rules, started side by side."""
    with ExitStack() as stack:
        configs = []
        for config in (BASE_CONFIG, OPEN_CONFIG):
            directory = tmp_path_factory.mktemp(f"directory-{request.param}")
            overrides = dict(config)
            if config is BASE_CONFIG:
                appservice = directory / "irc.yaml"
                appservice.write_text(yaml.safe_dump(APPSERVICE))
                overrides["app_service_config_files"] = [str(appservice)]
            if request.param == "postgres":
                args = stack.enter_context(throwaway_database())
                overrides["database"] = {"name": "psycopg", "args": args}
            configs.append((directory, overrides))
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(start_server, path, **overrides) for path, overrides in configs]
            started, failures = [], []
            for future in futures:
                try:
                    started.append(future.result())
                    stack.callback(started[-1].stop)
                except Exception as e:  # stop the other server before failing
                    failures.append(e)
        if failures:
            raise failures[0]
        yield started
        for server in started:
            assert "Traceback" not in server.log()


@pytest.fixture
def server(servers):
    return servers[0]


@pytest.fixture
def open_server(servers):
    return servers[1]


# --- helpers ---------------------------------------------------------------------------
class User:
    def __init__(self, server, client: AsyncClient) -> None:
        self.server = server
        self.client = client
        self.user_id = client.user_id

    def api(self, method: str, path: str, body=None, query=None, auth: bool = True):
        url = self.server.base_url + CLIENT + path
        if query:
            url += "?" + urlencode(query)
        headers = {"Authorization": f"Bearer {self.client.access_token}"} if auth else {}
        return request(method, url, body=body, headers=headers)

    async def create_room(self, **kwargs) -> str:
        r = await self.client.room_create(**kwargs)
        assert isinstance(r, RoomCreateResponse), r
        return r.room_id


async def register(server, name: str) -> User:
    localpart = f"{name}-{uuid.uuid4().hex[:8]}"
    client = AsyncClient(server.base_url)
    r = await client.register(localpart, "correct horse battery staple")
    assert isinstance(r, RegisterResponse), r
    return User(server, client)


async def register_admin(server, name: str) -> User:
    """A server admin, through the shared-secret registration admin API."""
    localpart = f"{name}-{uuid.uuid4().hex[:8]}"
    password = "correct horse battery staple"
    merged: dict = {}
    for path in server.config_paths:
        merged.update(yaml.safe_load(path.read_text()))
    url = server.base_url + "/_synapse/admin/v1/register"
    nonce = request("GET", url).json()["nonce"]
    fields = [nonce, localpart, password, "admin"]
    mac = hmac.new(
        merged["registration_shared_secret"].encode(),
        b"\x00".join(f.encode() for f in fields),
        hashlib.sha1,
    ).hexdigest()
    body = {"nonce": nonce, "username": localpart, "password": password, "admin": True, "mac": mac}
    r = request("POST", url, body=body)
    assert r.status == 200, r.body
    client = AsyncClient(server.base_url, r.json()["user_id"])
    client.access_token = r.json()["access_token"]
    return User(server, client)


async def close(*users: User) -> None:
    for u in users:
        await u.client.close()


def alias_path(alias: str) -> str:
    return "/directory/room/" + quote(alias, safe="")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"




# --- aliases ---------------------------------------------------------------------------
def test_alias_create_resolve_delete(server):
    async def go():
        alice, bob = await register(server, "alice"), await register(server, "bob")
        hs = server.server_name
        lobby = unique("lobby")
        room_id = await alice.create_room(
            alias=lobby, visibility=RoomVisibility.private, name="Lobby"
        )
        r = await bob.client.room_resolve_alias(f"#{lobby}:{hs}")
        assert isinstance(r, RoomResolveAliasResponse), r
        assert r.room_id == room_id and r.servers == [hs]

        # createRoom with a taken alias: 400 M_ROOM_IN_USE, and no room is made.
        r = alice.api("POST", "/createRoom", {"room_alias_name": lobby})
        assert (r.status, r.json()["errcode"]) == (400, "M_ROOM_IN_USE")

        second = f"#{unique('second')}:{hs}"
        # Bob is not in the room: he may not give it an address.
        r = bob.api("PUT", alias_path(second), {"room_id": room_id})
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        r = await alice.client.room_put_alias(second, room_id)
        assert r.transport_response.status == 200, r
        r = alice.api("PUT", alias_path(second), {"room_id": room_id})
        assert (r.status, r.json()["errcode"]) == (409, "M_ROOM_IN_USE")
        for bad_alias, status, errcode in [
            (f"#{unique('x')}:elsewhere.example", 400, "M_INVALID_PARAM"),
            ("#no-server-part", 400, "M_INVALID_PARAM"),
            (f"#with space:{hs}", 400, "M_INVALID_PARAM"),
        ]:
            r = alice.api("PUT", alias_path(bad_alias), {"room_id": room_id})
            assert (r.status, r.json()["errcode"]) == (status, errcode), bad_alias
        r = alice.api("PUT", alias_path(f"#{unique('x')}:{hs}"), {"room_id": "!nope:" + hs})
        assert (r.status, r.json()["errcode"]) == (404, "M_NOT_FOUND")
        r = alice.api("PUT", alias_path(f"#{unique('x')}:{hs}"), {"room": room_id})
        assert (r.status, r.json()["errcode"]) == (400, "M_BAD_JSON")

        # The room's local aliases: members only (the room is not world-readable).
        r = alice.api("GET", f"/rooms/{quote(room_id)}/aliases")
        assert r.status == 200 and sorted(r.json()["aliases"]) == sorted([f"#{lobby}:{hs}", second])
        r = bob.api("GET", f"/rooms/{quote(room_id)}/aliases")
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")

        # Only the creator (or a room admin / server admin) may delete an alias.
        r = bob.api("DELETE", alias_path(second))
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        r = await alice.client.room_delete_alias(second)
        assert r.transport_response.status == 200, r
        r = await alice.client.room_resolve_alias(second)
        assert isinstance(r, RoomResolveAliasError) and r.status_code == "M_NOT_FOUND"
        r = alice.api("DELETE", alias_path(second))
        assert (r.status, r.json()["errcode"]) == (404, "M_NOT_FOUND")

        # Unknown aliases: 404; aliases of a server that cannot be reached: 502.
        r = request("GET", server.base_url + CLIENT + alias_path(f"#{unique('nope')}:{hs}"))
        assert (r.status, r.json()["errcode"]) == (404, "M_NOT_FOUND")
        r = request("GET", server.base_url + CLIENT + alias_path("#room:10.0.0.1:8448"))
        assert (r.status, r.json()["errcode"]) == (502, "M_UNKNOWN")
        assert "10.0.0.1:8448" in r.json()["error"]
        r = request("GET", server.base_url + CLIENT + alias_path("not-an-alias"))
        assert (r.status, r.json()["errcode"]) == (400, "M_INVALID_PARAM")
        await close(alice, bob)

    run(go())


def test_alias_deletion_by_members_and_room_admins(server):
    async def go():
        alice, bob = await register(server, "alice"), await register(server, "bob")
        hs = server.server_name
        room_id = await alice.create_room(visibility=RoomVisibility.public)
        assert isinstance(await bob.client.join(room_id), JoinResponse)
        bobs, alices = f"#{unique('bobs')}:{hs}", f"#{unique('alices')}:{hs}"
        # Any member may add an address; bob (power 0) may not delete alice's.
        assert bob.api("PUT", alias_path(bobs), {"room_id": room_id}).status == 200
        assert alice.api("PUT", alias_path(alices), {"room_id": room_id}).status == 200
        r = bob.api("DELETE", alias_path(alices))
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        # Alice may send m.room.canonical_alias, so she may delete bob's alias.
        assert alice.api("DELETE", alias_path(bobs)).status == 200
        r = bob.api("GET", f"/rooms/{quote(room_id)}/aliases")
        assert r.json() == {"aliases": [alices]}
        # A user who left may no longer add addresses.
        await bob.client.room_leave(room_id)
        r = bob.api("PUT", alias_path(bobs), {"room_id": room_id})
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        await close(alice, bob)

    run(go())


def test_canonical_alias_validation(server):
    async def go():
        alice = await register(server, "alice")
        hs = server.server_name
        canon = unique("canon")
        room_id = await alice.create_room(alias=canon)
        other_room = await alice.create_room(alias=unique("other"))
        other_alias = alice.api("GET", f"/rooms/{quote(other_room)}/aliases").json()["aliases"][0]
        extra = f"#{unique('extra')}:{hs}"
        assert alice.api("PUT", alias_path(extra), {"room_id": room_id}).status == 200
        path = f"/rooms/{quote(room_id)}/state/m.room.canonical_alias"
        canonical = f"#{canon}:{hs}"
        for content, status, errcode in [
            ({"alias": other_alias}, 400, "M_BAD_ALIAS"),  # points to another room
            (
                {"alias": canonical, "alt_aliases": [f"#{unique('ghost')}:{hs}"]},
                400,
                "M_BAD_ALIAS",
            ),  # points nowhere
            ({"alias": "no-sigil"}, 400, "M_INVALID_PARAM"),
            ({"alias": canonical, "alt_aliases": ["#no-server"]}, 400, "M_INVALID_PARAM"),
            ({"alias": canonical, "alt_aliases": "#not-a-list:" + hs}, 400, "M_INVALID_PARAM"),
        ]:
            r = alice.api("PUT", path, content)
            assert (r.status, r.json()["errcode"]) == (status, errcode), content
        # Valid: our aliases of this room; another server's alias cannot be checked yet.
        good = {"alias": canonical, "alt_aliases": [extra, "#elsewhere:remote.example"]}
        r = await alice.client.room_put_state(room_id, "m.room.canonical_alias", good)
        assert isinstance(r, RoomPutStateResponse), r
        # Deleting an advertised alias also drops it from the event.
        assert alice.api("DELETE", alias_path(extra)).status == 200
        r = alice.api("GET", path)
        assert r.json() == {"alias": canonical, "alt_aliases": ["#elsewhere:remote.example"]}
        # The published directory shows the canonical alias.
        assert alice.api("PUT", f"/directory/list/room/{quote(room_id)}", {}).status == 200
        r = alice.api("POST", "/publicRooms", {"filter": {"generic_search_term": canon.upper()}})
        assert [e["canonical_alias"] for e in r.json()["chunk"]] == [canonical]
        await close(alice)

    run(go())


# --- published room directory -------------------------------------------------------------
def test_room_visibility(server):
    async def go():
        alice, bob = await register(server, "alice"), await register(server, "bob")
        room_id = await alice.create_room(visibility=RoomVisibility.private)
        r = await bob.client.room_get_visibility(room_id)
        assert isinstance(r, RoomGetVisibilityResponse) and r.visibility == "private"
        path = f"/directory/list/room/{quote(room_id)}"
        r = bob.api("PUT", path, {"visibility": "public"})
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        r = alice.api("PUT", path, {"visibility": "public"}, auth=False)
        assert (r.status, r.json()["errcode"]) == (401, "M_MISSING_TOKEN")
        assert alice.api("PUT", path, {"visibility": "public"}).status == 200
        assert request("GET", server.base_url + CLIENT + path).json() == {"visibility": "public"}
        assert alice.api("PUT", path, {"visibility": "private"}).status == 200
        assert alice.api("GET", path).json() == {"visibility": "private"}
        assert alice.api("PUT", path, {}).status == 200  # visibility defaults to public
        assert alice.api("GET", path).json() == {"visibility": "public"}
        r = alice.api("PUT", path, {"visibility": "hidden"})
        assert (r.status, r.json()["errcode"]) == (400, "M_BAD_JSON")
        unknown = f"/directory/list/room/{quote('!unknown:' + server.server_name)}"
        r = alice.api("GET", unknown)
        assert (r.status, r.json()["errcode"]) == (404, "M_NOT_FOUND")
        r = alice.api("PUT", unknown, {"visibility": "public"})
        assert (r.status, r.json()["errcode"]) == (404, "M_NOT_FOUND")
        # createRoom with visibility=public publishes the room.
        public_room = await alice.create_room(visibility=RoomVisibility.public)
        r = await alice.client.room_get_visibility(public_room)
        assert r.visibility == "public"
        await close(alice, bob)

    run(go())


def test_public_rooms_listing_filter_and_pagination(server):
    async def go():
        alice, bob = await register(server, "alice"), await register(server, "bob")
        tag = unique("needle")
        rooms = []
        for i in range(5):
            rooms.append(
                await alice.create_room(
                    visibility=RoomVisibility.public,
                    name=f"{tag} room {i}",
                    topic=f"topic {i}",
                    alias=f"{tag}-{i}",
                )
            )
        space = await alice.create_room(
            visibility=RoomVisibility.public, name="A space", topic=f"all about {tag}", space=True
        )
        hidden = await alice.create_room(visibility=RoomVisibility.private, name=f"{tag} hidden")
        assert isinstance(await bob.client.join(rooms[3]), JoinResponse)

        # Without a token: refused (allow_public_rooms_without_auth is off).
        r = alice.api("GET", "/publicRooms", auth=False)
        assert (r.status, r.json()["errcode"]) == (401, "M_MISSING_TOKEN")
        r = alice.api("GET", "/publicRooms", query={"server": "10.0.0.1:8448"})
        assert r.status == 502 and "10.0.0.1:8448" in r.json()["error"]
        r = alice.api("GET", "/publicRooms", query={"server": server.server_name, "since": "zz"})
        assert (r.status, r.json()["errcode"]) == (400, "M_INVALID_PARAM")

        # The whole directory, then page by page with limit 2, both ways.
        everything = alice.api("GET", "/publicRooms").json()
        all_ids = [e["room_id"] for e in everything["chunk"]]
        assert everything["total_room_count_estimate"] == len(all_ids)
        assert set(rooms) | {space} <= set(all_ids) and hidden not in all_ids
        counts = [e["num_joined_members"] for e in everything["chunk"]]
        assert counts == sorted(counts, reverse=True)  # largest rooms first

        pages, since = [], None
        while True:
            r = await alice.client.list_public_rooms(limit=2, since=since)
            assert isinstance(r, PublicRoomsResponse), r
            assert len(r.public_rooms) <= 2
            assert (r.prev_batch is None) == (not pages)
            pages.append(r)
            if r.next_batch is None:
                break
            since = r.next_batch
        assert [room.room_id for p in pages for room in p.public_rooms] == all_ids
        # Back from the last page to the first through prev_batch.
        backwards, token = [], pages[-1].prev_batch
        while token is not None:
            r = alice.api("GET", "/publicRooms", query={"limit": 2, "since": token}).json()
            backwards = [e["room_id"] for e in r["chunk"]] + backwards
            token = r.get("prev_batch")
        last_page = [room.room_id for room in pages[-1].public_rooms]
        assert backwards + last_page == all_ids

        # Filter: name, topic or alias, case-insensitively; paginated too.
        r = alice.api("POST", "/publicRooms", {"filter": {"generic_search_term": tag.upper()}})
        body = r.json()
        assert r.status == 200
        assert {e["room_id"] for e in body["chunk"]} == set(rooms) | {space}
        assert body["total_room_count_estimate"] == 6
        by_id = {e["room_id"]: e for e in body["chunk"]}
        assert body["chunk"][0]["room_id"] == rooms[3]  # two members: first
        entry = by_id[rooms[0]]
        assert entry == {
            "room_id": rooms[0],
            "name": f"{tag} room 0",
            "topic": "topic 0",
            "canonical_alias": f"#{tag}-0:{server.server_name}",
            "num_joined_members": 1,
            "world_readable": False,
            "guest_can_join": False,
            "join_rule": "public",
        }
        assert by_id[space]["room_type"] == "m.space"
        r = await alice.client.list_public_rooms(limit=2, filter_generic_search_term=tag)
        seen = [room.room_id for room in r.public_rooms]
        while r.next_batch:
            r = await alice.client.list_public_rooms(
                limit=2, filter_generic_search_term=tag, since=r.next_batch
            )
            seen += [room.room_id for room in r.public_rooms]
        assert sorted(seen) == sorted(by_id) and len(seen) == 6
        # room_types: only spaces; only rooms without a type.
        r = alice.api(
            "POST",
            "/publicRooms",
            {"filter": {"generic_search_term": tag, "room_types": ["m.space"]}},
        )
        assert [e["room_id"] for e in r.json()["chunk"]] == [space]
        r = await alice.client.list_public_rooms(
            filter_generic_search_term=tag, filter_room_types=[None]
        )
        assert {room.room_id for room in r.public_rooms} == set(rooms)
        r = alice.api("POST", "/publicRooms", {"filter": {"generic_search_term": "no such " + tag}})
        assert r.json() == {"chunk": [], "total_room_count_estimate": 0}
        r = alice.api("POST", "/publicRooms", {"third_party_instance_id": "irc"})
        assert r.json()["chunk"] == []
        r = alice.api("POST", "/publicRooms", {"limit": "two"})
        assert (r.status, r.json()["errcode"]) == (400, "M_BAD_JSON")
        r = alice.api("POST", "/publicRooms", {}, auth=False)
        assert (r.status, r.json()["errcode"]) == (401, "M_MISSING_TOKEN")

        # Unpublishing takes a room out of the list.
        path = f"/directory/list/room/{quote(rooms[1])}"
        assert alice.api("PUT", path, {"visibility": "private"}).status == 200
        r = alice.api("POST", "/publicRooms", {"filter": {"generic_search_term": tag}})
        assert rooms[1] not in {e["room_id"] for e in r.json()["chunk"]}
        await close(alice, bob)

    run(go())


def test_publication_rules_and_unauthenticated_listing(open_server):
    server = open_server

    async def go():
        alice, mallory = await register(server, "alice"), await register(server, "mallory")
        tag = unique("rules")
        # Mallory's public room is created but not published (the rules deny him).
        room = await mallory.create_room(visibility=RoomVisibility.public, name=tag)
        r = await mallory.client.room_get_visibility(room)
        assert r.visibility == "private"
        r = mallory.api("PUT", f"/directory/list/room/{quote(room)}", {"visibility": "public"})
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        # A room with a #secret* alias may not be published; others may.
        secret = await alice.create_room(alias=unique("secret"), name=tag)
        r = alice.api("PUT", f"/directory/list/room/{quote(secret)}", {"visibility": "public"})
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        fine = await alice.create_room(alias=unique("fine"), name=tag)
        r = alice.api("PUT", f"/directory/list/room/{quote(fine)}", {"visibility": "public"})
        assert r.status == 200
        # Unpublishing is never refused by the rules.
        r = alice.api("PUT", f"/directory/list/room/{quote(secret)}", {"visibility": "private"})
        assert r.status == 200

        # allow_public_rooms_without_auth: GET needs no token (a bad one still fails).
        r = request("GET", f"{server.base_url}{CLIENT}/publicRooms")
        assert r.status == 200
        assert [e["room_id"] for e in r.json()["chunk"] if e.get("name") == tag] == [fine]
        r = request(
            "GET",
            f"{server.base_url}{CLIENT}/publicRooms",
            headers={"Authorization": "Bearer nonsense"},
        )
        assert (r.status, r.json()["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        r = request("GET", f"{server.base_url}/_matrix/client/r0/publicRooms?limit=1")
        assert r.status == 200 and len(r.json()["chunk"]) == 1
        # POST is always authenticated.
        r = request("POST", f"{server.base_url}{CLIENT}/publicRooms", body={})
        assert (r.status, r.json()["errcode"]) == (401, "M_MISSING_TOKEN")
        await close(alice, mallory)

    run(go())


def test_server_admins_and_application_service_aliases(server):
    async def go():
        alice, bob = await register(server, "alice"), await register(server, "bob")
        admin = await register_admin(server, "admin")
        hs = server.server_name
        room_id = await alice.create_room(visibility=RoomVisibility.private)
        alias = f"#{unique('alices')}:{hs}"
        assert alice.api("PUT", alias_path(alias), {"room_id": room_id}).status == 200
        # A server admin outside the room may see its aliases, add and delete
        # them, and publish the room; an ordinary outsider may do none of it.
        r = bob.api("GET", f"/rooms/{quote(room_id)}/aliases")
        assert (r.status, r.json()["errcode"]) == (403, "M_FORBIDDEN")
        assert admin.api("GET", f"/rooms/{quote(room_id)}/aliases").json() == {"aliases": [alias]}
        admins = f"#{unique('admins')}:{hs}"
        assert admin.api("PUT", alias_path(admins), {"room_id": room_id}).status == 200
        assert admin.api("DELETE", alias_path(alias)).status == 200
        path = f"/directory/list/room/{quote(room_id)}"
        assert admin.api("PUT", path, {"visibility": "public"}).status == 200
        assert alice.api("GET", path).json() == {"visibility": "public"}
        # The room creator may delete the admin's alias: she can set the canonical alias.
        assert alice.api("DELETE", alias_path(admins)).status == 200

        # #irc_* is reserved by the application service for its users.
        r = alice.api("PUT", alias_path(f"#irc_{unique('x')}:{hs}"), {"room_id": room_id})
        assert (r.status, r.json()["errcode"]) == (400, "M_EXCLUSIVE")
        await close(alice, bob, admin)

    run(go())
