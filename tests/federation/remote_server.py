"""A fake remote server, "remote.test", for in-process tests of inbound federation.

It drives our federation endpoints over a loopback TLS listener (signed
requests, PDUs signed with its own ed25519 key built with
``homeserver.core.builder.build_event``), and answers our server's own
requests through ``FakeFederationClient``, which replaces both
``hs.federation_client`` and the federation sender's client: everything our
server sends (transactions, make_*/send_*, get_missing_events, /state,
/event_auth, /backfill) is recorded there and answered by handlers the test
sets. "remote.test"'s key is stored in ``remote_server_keys`` before the
server looks it up, so the real keyring verifies its requests and PDUs
without network. What a local client would see is read from the services
(/sync, /messages) and the room's in-memory state.
"""

import re
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer, reactor, task

from crypto.b64 import encode_base64
from crypto.keys import generate_signing_key
from federation import register_federation_resources
from homeserver.core.auth_events import select_auth_events
from homeserver.core.builder import build_event
from homeserver.core.events import CREATE, MEMBER, Pdu, compute_event_id
from homeserver.core.room_versions import get_room_version
from homeserver.services.clock import Clock
from homeserver.services.federation_client import (
    Backoff,
    HttpResponseError,
    build_path,
)
from homeserver.services.federation_sender import FederationSender
from homeserver.services.filtering import EventFilter, SyncFilter
from homeserver.services.server import HomeServer
from homeserver.services.sync import SyncRequest
from homeserver.services.tokens import StreamToken
from storage import Database, DatabaseConfig
from storage.server_keys import ServerKeyStore, StoredServerKey
from tests.federation.helpers import LoopbackServer, loopback_client
from tests.support.homeserver import add_user, close_homeserver, make_homeserver

REMOTE = "remote.test"
KEY = generate_signing_key("remote")
BOB = f"@bob:{REMOTE}"
CAROL = f"@carol:{REMOTE}"  # never joins
V1 = "/_matrix/federation/v1"
V2 = "/_matrix/federation/v2"
MESSAGE = "m.room.message"
NAME = "m.room.name"
POWER = "m.room.power_levels"


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


class FakeFederationClient:
    """Our server's federation client: requests go to handlers the test sets,
    by endpoint name (``"get_missing_events"``, ``"make_leave"``...); PUT /send
    transactions are recorded and acknowledged."""

    def __init__(self, clock: Clock) -> None:
        self.backoff = Backoff(clock.time_msec)
        self.calls: list[tuple[str, str, str, list[str], Any]] = []
        self.handlers: dict[str, Any] = {}
        self.transactions: list[tuple[str, dict[str, Any]]] = []

    def called(self, endpoint: str) -> list[tuple[list[str], Any]]:
        return [(args, body) for _, _, name, args, body in self.calls if name == endpoint]

    async def request(self, method, destination, path, *, query=None, content=None, **kwargs):
        m = re.fullmatch(r"/_matrix/(?:federation|key)/v\d+/([^/]+)(.*)", path)
        name = m.group(1) if m else path
        args = [unquote(a) for a in m.group(2).split("/")[1:]] if m else []
        self.calls.append((method, destination, name, args, content if content else query))
        if name == "send" and method == "PUT":
            self.transactions.append((destination, content))
            return {"pdus": {}}
        handler = self.handlers.get(name)
        if handler is None:
            raise HttpResponseError(destination, f"{method} {path}: 404", status=404,
                                    errcode="M_UNRECOGNIZED")
        answer = handler(args, query, content)
        if isinstance(answer, defer.Deferred) or hasattr(answer, "__await__"):
            answer = await answer
        return answer

    async def get_json(self, destination, path, query=None, **kwargs):
        return await self.request("GET", destination, path, query=query, **kwargs)

    async def put_json(self, destination, path, content, query=None, **kwargs):
        return await self.request("PUT", destination, path, query=query, content=content, **kwargs)

    async def post_json(self, destination, path, content, query=None, **kwargs):
        return await self.request("POST", destination, path, query=query, content=content,
                                  **kwargs)

    async def close(self) -> None:
        pass

    def pdus_sent(self) -> list[dict[str, Any]]:
        return [p for _, body in self.transactions for p in body.get("pdus", [])]


class RemoteServerFixture:
    """setUp/tearDown and helpers; the room version is ``version`` ("10", "11", "12")."""

    version = "12"
    timeout = 60

    def setUp(self):
        self.stack = ExitStack()
        self.directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.server = LoopbackServer(self.directory)
        self.hs = make_homeserver(self.stack, self.directory, "sqlite3",
                                  server_name=self.server.name)
        self._attach()
        self.remote = loopback_client(REMOTE, KEY)
        self.room_version = get_room_version(self.version)
        self.remote_events: dict[str, Pdu] = {}  # everything remote.test built
        self.txn_counter = 0
        return defer.ensureDeferred(self._setup())

    async def _setup(self):
        await ServerKeyStore(self.hs.database).store_server_keys([StoredServerKey(
            REMOTE, KEY.key_id, encode_base64(bytes(KEY.verify_key)), 2**62, None, REMOTE, "{}",
        )])
        self.alice = await add_user(self.hs, "alice")
        await self.hs.accounts.store.create_device(self.alice, "ADEV", None, 0)

    def _attach(self):
        """Our federation client and sender talk to the fake remote (no timers on
        the real reactor: the sender's clock is a fake one)."""
        self.hs.federation_sender.detach()
        self.fake = FakeFederationClient(self.hs.clock)
        self.hs.federation_client = self.fake
        self.hs.federation_sender = FederationSender(self.hs, client=self.fake,
                                                     clock=Clock(task.Clock()))
        register_federation_resources(self.server.router, self.hs)

    async def _settle(self):
        """Let the federation sender finish (it writes positions to the database)."""
        sender = self.hs.federation_sender
        for _ in range(500):
            busy = sender._processing or any(d.in_flight for d in sender._destinations.values())
            if not busy:
                await task.deferLater(reactor, 0.01, lambda: None)
                busy = sender._processing or any(
                    d.in_flight for d in sender._destinations.values())
                if not busy:
                    return
            await task.deferLater(reactor, 0.01, lambda: None)

    async def _teardown(self):
        await self._settle()
        self.hs.federation_sender.detach()
        await self.remote.close()
        await self.server.stop()
        await close_homeserver(self.hs)

    def tearDown(self):
        d = defer.ensureDeferred(self._teardown())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    async def restart(self):
        """A new HomeServer on the same database (everything reloaded from it)."""
        old = self.hs
        await self._settle()
        old.federation_sender.detach()
        await close_homeserver(old)
        db = Database(reactor, DatabaseConfig(old.config.database_engine,
                                              old.config.database_args))
        db.open()
        max_stream = db.run_blocking(
            lambda txn: txn.execute("SELECT MAX(stream_ordering) FROM events").fetchone()[0] or 0
        )
        self.hs = HomeServer(old.config, reactor, db, [old.server_keys.signing_key], max_stream)
        self._attach()

    # --- what a local client sees ---------------------------------------------------------
    async def sync(self, since: str | None = None, user: str | None = None) -> dict[str, Any]:
        return await self.hs.sync.sync(SyncRequest(
            user_id=user or self.alice, device_id="ADEV",
            since=StreamToken.parse(since) if since else None, timeout_ms=0,
            full_state=False, filter=SyncFilter(),
        ))

    @staticmethod
    def timeline(body: dict[str, Any], room_id: str) -> list[dict[str, Any]]:
        room = body.get("rooms", {}).get("join", {}).get(room_id, {})
        return room.get("timeline", {}).get("events", [])

    def timeline_ids(self, body: dict[str, Any], room_id: str) -> list[str]:
        return [e["event_id"] for e in self.timeline(body, room_id)]

    async def messages(self, room_id: str, limit: int, from_token: str | None = None):
        return await self.hs.pagination.messages(
            self.alice, "ADEV", room_id, from_token, None, "b", limit, EventFilter())

    # --- the remote server ----------------------------------------------------------------
    async def put_txn(self, pdus: list[dict[str, Any]], txn_id: str | None = None):
        if txn_id is None:
            self.txn_counter += 1
            txn_id = f"t{self.txn_counter}"
        body = {"origin": REMOTE, "origin_server_ts": self.hs.clock.time_msec(),
                "pdus": pdus, "edus": []}
        return await self.remote.put_json(self.server.name, build_path(V1 + "/send/{}", txn_id),
                                          body)

    async def depth_of(self, event_id: str) -> int:
        if event_id in self.remote_events:
            return self.remote_events[event_id].depth
        return (await self.hs.events.get_event(event_id)).depth

    async def build(self, room_id: str | None, event_type: str, sender: str,
                    content: dict[str, Any], *, state_key: str | None = None,
                    prev: list[str] | None = None, state: dict | None = None,
                    auth: list[str] | None = None, ts: int | None = None,
                    redacts: str | None = None) -> Pdu:
        """An event signed by remote.test; prev events and state default to our
        room's extremities and current state, auth events to those the state gives."""
        version = self.room_version
        room = self.hs.room_states.get_cached(room_id) if room_id else None
        if prev is None:
            prev = list(room.extremities)
        if state is None:
            state = room.state_ids() if room is not None else {}
        if auth is None:
            auth = select_auth_events(version, event_type, sender, state_key, content, state)
            if not version.create_event_in_auth_events:
                auth = [a for a in auth if a != state.get((CREATE, ""))]
        depth = max([await self.depth_of(p) for p in prev], default=0) + 1
        pdu = build_event(
            version, server_name=REMOTE, signing_key=KEY, event_type=event_type, sender=sender,
            content=content, room_id=room_id, prev_events=prev, auth_events=auth, depth=depth,
            origin_server_ts=ts if ts is not None else self.hs.clock.time_msec(),
            state_key=state_key, redacts=redacts,
        )
        self.remote_events[pdu.event_id] = pdu
        return pdu

    # --- fixtures ------------------------------------------------------------------------
    async def local_room(self, **body: Any) -> str:
        return await self.hs.room_creator.create_room(
            self.alice, {"preset": "public_chat", "room_version": self.version, **body})

    async def make_join(self, room_id: str, user_id: str = BOB, versions=None):
        query = {"ver": versions if versions is not None else ["10", "11", "12"]}
        if not query["ver"]:
            query = None
        return await self.remote.get_json(
            self.server.name, build_path(V1 + "/make_join/{}/{}", room_id, user_id), query)

    async def make(self, membership: str, room_id: str, user_id: str = BOB):
        """make_leave / make_knock (make_knock with every version we know)."""
        query = {"ver": ["10", "11", "12"]} if membership == "knock" else None
        return await self.remote.get_json(
            self.server.name, build_path(V1 + f"/make_{membership}/{{}}/{{}}", room_id, user_id),
            query)

    async def send(self, membership: str, pdu: Pdu, prefix: str = V2):
        """send_join / send_leave (v1 or v2) / send_knock (v1) of a signed event."""
        return await self.remote.put_json(
            self.server.name,
            build_path(prefix + f"/send_{membership}/{{}}/{{}}", pdu.room_id, pdu.event_id),
            pdu.to_federation_json())

    async def sign_template(self, template: dict[str, Any]) -> Pdu:
        event = template["event"]
        pdu = build_event(
            self.room_version, server_name=REMOTE, signing_key=KEY, event_type=event["type"],
            sender=event["sender"], content=event["content"], room_id=event["room_id"],
            prev_events=event["prev_events"], auth_events=event["auth_events"],
            depth=event["depth"], origin_server_ts=self.hs.clock.time_msec(),
            state_key=event["state_key"],
        )
        self.remote_events[pdu.event_id] = pdu
        return pdu

    async def join_bob(self, room_id: str) -> tuple[dict[str, Any], Pdu]:
        template = await self.make_join(room_id)
        pdu = await self.sign_template(template)
        answer = await self.remote.put_json(
            self.server.name, build_path(V2 + "/send_join/{}/{}", room_id, pdu.event_id),
            pdu.to_federation_json())
        return answer, pdu

    async def room_with_bob(self, **body: Any) -> str:
        room_id = await self.local_room(**body)
        await self.join_bob(room_id)
        return room_id

    def serve_state(self, state: dict, event: Pdu) -> None:
        """remote.test answers /state and /event: ``state`` at ``event``."""

        async def state_answer(args, query, body):
            events = await self.hs.events.get_events(state.values())
            chain = await self.hs.events.get_events(
                await self.hs.federation_reads.auth_chain_ids(list(state.values())))
            return {"pdus": [p.to_federation_json() for p in events.values()],
                    "auth_chain": [p.to_federation_json() for p in chain.values()]}

        self.fake.handlers["state"] = state_answer
        self.fake.handlers["event"] = lambda args, query, body: {
            "origin": REMOTE, "origin_server_ts": 0, "pdus": [event.to_federation_json()]}

    async def error(self, coro) -> tuple[int, str | None]:
        try:
            await coro
        except HttpResponseError as e:
            return e.status, e.errcode
        self.fail("not refused")

    def ids(self, datas: list[dict[str, Any]]) -> list[str]:
        return [compute_event_id(d, self.room_version) for d in datas]

    async def stored(self, event_id: str) -> tuple[bool, bool] | None:
        """(has state, rejected), or None if unknown."""
        return (await self.hs.events_store.have_events([event_id])).get(event_id)

    # --- more of remote.test ---------------------------------------------------------------
    async def remote_room(self, join_rule: str = "invite", history: str = "shared"):
        """A room of remote.test that we are not in: (room_id, state ids, events)."""
        content: dict[str, Any] = {"room_version": self.version}
        if self.version == "10":
            content["creator"] = BOB
        v12 = self.room_version.room_id_is_create_event_hash
        create = await self.build(None if v12 else "!remote:" + REMOTE, CREATE, BOB, content,
                                  state_key="", prev=[], state={}, auth=[])
        room_id = create.room_id
        state = {(CREATE, ""): create.event_id}
        events = [create]

        async def add(event_type, content, state_key):
            pdu = await self.build(room_id, event_type, BOB, content, state_key=state_key,
                                   prev=[events[-1].event_id], state=state)
            events.append(pdu)
            state[(event_type, state_key)] = pdu.event_id
            return pdu

        await add(MEMBER, {"membership": "join"}, BOB)
        levels = {"users_default": 0, "events_default": 0, "state_default": 50,
                  "invite": 0, "users": {} if self.room_version.room_id_is_create_event_hash
                  else {BOB: 100}}
        await add(POWER, levels, "")
        await add("m.room.join_rules", {"join_rule": join_rule}, "")
        await add("m.room.history_visibility", {"history_visibility": history}, "")
        await add(NAME, {"name": "Remote room"}, "")
        return room_id, state, events

    async def redaction(self, target: Pdu, **kwargs: Any) -> Pdu:
        """bob's redaction of ``target``."""
        return await self.build(target.room_id, "m.room.redaction", BOB, {},
                                redacts=target.event_id, **kwargs)

    async def displayname_change(self, room_id: str, name: str) -> Pdu:
        """bob's new member event, built on our tip but never sent to us."""
        return await self.build(room_id, MEMBER, BOB, {"membership": "join", "displayname": name},
                                state_key=BOB)
