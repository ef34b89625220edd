"""The workload: the same verified client-server traffic against any homeserver.

Driven with aiohttp directly (no Matrix SDK) so the client's overhead is small
and the same for every server. Every response is checked (status and shape, and
for media the bytes); a failed request counts as an error of its phase and a
phase with errors reports no speed. Phases run one server after the other,
alternating which goes first, so load from elsewhere hits both.

Each phase returns its figures from the *timed* part only: set-up it needs
(registering extra users, filling rooms with history) is done first, untimed,
and the servers' CPU seconds are read from /proc around the timed part.
"""

import asyncio
import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

V3 = "/_matrix/client/v3"
V1 = "/_matrix/client/v1"
MB = 1_000_000
MIB = 1024 * 1024
PASSWORD = "bench password, not secret"
MEDIA_MIB = (1, 10)  # sizes uploaded and downloaded in phase 8


@dataclass
class Scale:
    users: int = 20  # registered in phase 1, all joined to the main room
    messages: int = 200  # sequential sends; also the total of each concurrent run
    concurrency: int = 8  # clients in the concurrent phases
    delivery: int = 50  # messages timed from send to a long-polling /sync
    rooms: int = 20  # rooms of the initial-sync user
    history: int = 20  # messages in each of those rooms
    devices: int = 8  # devices of the initial-sync user: one uncached sync each
    members: int = 200  # members of the room joined one by one
    reactions: int = 200  # reactions to one message
    reactors: int = 10  # users sending them
    media_reps: int = 10  # a 1 MiB transfer takes milliseconds: 3 were too few to time
    page_limit: int = 100  # /messages page size
    # Phase 12 (federation, bench/federation.py; only with --federation):
    fed_members: int = 500  # members of each server's room that the other server joins
    fed_joins: int = 3  # such joins in each direction (a fresh room each), median reported
    fed_messages: int = 1000  # messages sent across, in each direction
    fed_room_version: str = "10"  # of the rooms of phase 12, the same on both servers
    fed_rate: float = 0.0  # > 0: phase 12's senders send at most this many messages/s

    @classmethod
    def quick(cls) -> "Scale":
        return cls(
            users=8,
            messages=32,
            delivery=8,
            rooms=4,
            history=5,
            devices=2,
            members=12,
            reactions=24,
            reactors=4,
            media_reps=1,
            fed_members=20,
            fed_joins=1,
            fed_messages=50,
        )

    def check(self) -> None:
        if self.users < max(2, self.concurrency):
            raise ValueError(
                f"--users must be at least {max(2, self.concurrency)} "
                "(the concurrent phases use one user per client)"
            )
        if self.members < 2 or self.rooms < 1 or self.devices < 1 or self.reactors < 1:
            raise ValueError("--members must be >= 2 and --rooms, devices, reactors >= 1")
        if min(self.fed_members, self.fed_joins, self.fed_messages) < 1 or self.fed_rate < 0:
            raise ValueError(
                "--fed-members, --fed-joins and --fed-messages must be >= 1, --fed-rate >= 0"
            )
        self.reactors = min(self.reactors, self.users)


class Server(Protocol):
    label: str
    base_url: str
    server_name: str

    def stats(self) -> Any: ...


# --- errors --------------------------------------------------------------------------------


class RequestFailed(Exception):
    def __init__(self, what: str, status: int, body: bytes) -> None:
        self.status = status
        try:
            self.errcode = json.loads(body).get("errcode")
        except (ValueError, AttributeError):
            self.errcode = None
        super().__init__(f"{what}: HTTP {status} {body[:200]!r}")


class VerifyFailed(Exception):
    """The server answered 2xx but not with what the spec (and the workload) expects."""


class Unavailable(Exception):
    """The server does not serve this feature: the phase reports 'not available'."""


class MissingPrerequisite(Exception):
    """An earlier phase failed to produce what this one needs."""


EXPECTED_FAILURES = (
    RequestFailed,
    VerifyFailed,
    MissingPrerequisite,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    KeyError,
    TypeError,
    ValueError,
)


def verify(condition: bool, message: str) -> None:
    if not condition:
        raise VerifyFailed(message)


# --- HTTP ------------------------------------------------------------------------------------


@dataclass
class User:
    user_id: str
    localpart: str
    token: str
    device_id: str


class Api:
    """Requests against one server, each checked for its status code."""

    def __init__(self, session: aiohttp.ClientSession, server: Server) -> None:
        self.session = session
        self.base_url = server.base_url
        self.server_name = server.server_name

    async def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        user: User | None = None,
        body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        query: dict[str, Any] | None = None,
        expect: int = 200,
        raw: bool = False,
    ) -> Any:
        headers = {}
        if user is not None:
            headers["Authorization"] = f"Bearer {user.token}"
        if body is not None:
            data = json.dumps(body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        url = self.base_url + path
        if query:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
        async with self.session.request(
            method, URL(url, encoded=True), data=data, headers=headers
        ) as response:
            payload = await response.read()
            status = response.status
        if status != expect:
            raise RequestFailed(what, status, payload)
        if raw:
            return payload
        try:
            return json.loads(payload)
        except ValueError:
            raise VerifyFailed(f"{what}: response is not JSON: {payload[:100]!r}") from None

    # --- the client-server calls the workload makes ---

    async def register(self, localpart: str) -> User:
        """The user-interactive flow: a 401 with a session, then m.login.dummy."""
        body: dict[str, Any] = {
            "username": localpart,
            "password": PASSWORD,
            "initial_device_display_name": "bench",
        }
        first = await self.request(
            "POST", V3 + "/register", "register (stage 1)", body=body, expect=401
        )
        session = first.get("session")
        verify(isinstance(session, str), "register: 401 without a session")
        stages = [s for flow in first.get("flows", []) for s in flow.get("stages", [])]
        verify("m.login.dummy" in stages, f"register: no m.login.dummy flow in {stages}")
        body["auth"] = {"type": "m.login.dummy", "session": session}
        done = await self.request("POST", V3 + "/register", "register (m.login.dummy)", body=body)
        verify(done.get("user_id", "").startswith(f"@{localpart}:"), f"register: {done}")
        verify(
            bool(done.get("access_token")) and bool(done.get("device_id")),
            "register: no access token or device id",
        )
        return User(done["user_id"], localpart, done["access_token"], done["device_id"])

    async def login(self, user: User) -> User:
        done = await self.request(
            "POST",
            V3 + "/login",
            "login",
            body={
                "type": "m.login.password",
                "password": PASSWORD,
                "identifier": {"type": "m.id.user", "user": user.localpart},
            },
        )
        verify(done.get("user_id") == user.user_id, f"login: {done.get('user_id')}")
        verify(
            bool(done.get("access_token")) and bool(done.get("device_id")),
            "login: no access token or device id",
        )
        return User(user.user_id, user.localpart, done["access_token"], done["device_id"])

    async def create_room(self, user: User, **body: Any) -> str:
        done = await self.request(
            "POST",
            V3 + "/createRoom",
            "createRoom",
            user=user,
            body={"preset": "public_chat", **body},
        )
        room_id = done.get("room_id")
        verify(isinstance(room_id, str) and room_id.startswith("!"), f"createRoom: {done}")
        return room_id

    async def join(self, user: User, room_id: str) -> str:
        done = await self.request(
            "POST", f"{V3}/rooms/{quote(room_id, safe='')}/join", "join", user=user, body={}
        )
        verify(done.get("room_id") == room_id, f"join: {done}")
        return room_id

    async def send(
        self, user: User, room_id: str, content: dict[str, Any], event_type: str = "m.room.message"
    ) -> str:
        path = f"{V3}/rooms/{quote(room_id, safe='')}/send/{event_type}/{uuid.uuid4().hex}"
        done = await self.request("PUT", path, f"send {event_type}", user=user, body=content)
        event_id = done.get("event_id")
        verify(isinstance(event_id, str) and event_id.startswith("$"), f"send: {done}")
        return event_id

    async def sync(self, user: User, **query: Any) -> dict[str, Any]:
        done = await self.request("GET", V3 + "/sync", "sync", user=user, query=query)
        verify(isinstance(done.get("next_batch"), str), "sync: no next_batch")
        return done

    async def upload(self, user: User, data: bytes) -> str:
        done = await self.request(
            "POST",
            "/_matrix/media/v3/upload",
            "media upload",
            user=user,
            data=data,
            content_type="application/octet-stream",
            query={"filename": "bench.bin"},
        )
        uri = done.get("content_uri", "")
        verify(uri.startswith("mxc://") and uri.count("/") == 3, f"upload: {done}")
        return uri

    async def download(self, user: User, mxc: str) -> bytes:
        server, media_id = mxc[len("mxc://") :].split("/")
        return await self.request(
            "GET",
            f"{V1}/media/download/{quote(server, safe='')}/{quote(media_id, safe='')}",
            "media download",
            user=user,
            raw=True,
        )


# --- phases ------------------------------------------------------------------------------------


@dataclass
class World:
    """What the phases build up on one server, for the phases after them."""

    users: list[User] = field(default_factory=list)
    names: int = 0
    main_room: str | None = None
    main_messages: int = 0  # m.room.message events sent into the main room
    big_room: str | None = None
    newcomer: User | None = None
    sync_devices: list[tuple[User, str]] = field(default_factory=list)  # (device, since)

    def next_name(self, prefix: str = "bench") -> str:
        self.names += 1
        return f"{prefix}{self.names:05d}"


@dataclass
class Span:
    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class PhaseResult:
    key: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    note: str | None = None  # e.g. "not available"
    timed_s: float = 0.0  # wall seconds of the timed part
    cpu_s: float | None = None  # server CPU seconds during the timed part
    elapsed_s: float = 0.0  # the whole phase, set-up included
    # Phase 12: what was measured before a check failed (never shown as a figure).
    unverified: dict[str, float | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhaseContext:
    def __init__(self, api: Api, server: Server, world: World, scale: Scale) -> None:
        self.api = api
        self.server = server
        self.world = world
        self.scale = scale
        self.errors = 0
        self.samples: list[str] = []
        self.timed_s = 0.0
        self.cpu_s = 0.0
        self.timed_any = False

    def fail(self, error: BaseException) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(f"{type(error).__name__}: {error}"[:400])

    async def attempt(self, awaitable: Awaitable[Any]) -> Any:
        """The awaitable's result, or None (counted as an error) if it failed."""
        try:
            return await awaitable
        except Unavailable:
            raise
        except EXPECTED_FAILURES as e:
            self.fail(e)
            return None

    def cpu(self) -> float:
        return self.server.stats().cpu_s

    @asynccontextmanager
    async def timed(self) -> AsyncIterator[Span]:
        span = Span()
        cpu0, t0 = self.cpu(), time.perf_counter()
        try:
            yield span
        finally:
            span.wall_s = time.perf_counter() - t0
            span.cpu_s = self.cpu() - cpu0
            self.timed_s += span.wall_s
            self.cpu_s += span.cpu_s
            self.timed_any = True

    def need(self, value: Any, what: str) -> Any:
        if value is None:
            raise MissingPrerequisite(f"no {what}: an earlier phase failed")
        return value

    async def users(self, n: int, concurrency: int = 8) -> list[User]:
        """At least ``n`` users: the world's, plus new ones registered untimed."""
        missing = n - len(self.world.users)
        if missing > 0:
            gate = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with gate:
                    user = await self.attempt(self.api.register(self.world.next_name()))
                if user is not None:
                    self.world.users.append(user)

            await asyncio.gather(*(one() for _ in range(missing)))
        if len(self.world.users) < n:
            raise MissingPrerequisite(f"only {len(self.world.users)} of {n} users registered")
        return self.world.users[:n]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def rate(count: float, seconds: float) -> float | None:
    return count / seconds if count > 0 and seconds > 0 else None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


async def phase_register(ctx: PhaseContext) -> dict[str, Any]:
    latencies = []
    async with ctx.timed() as span:
        for _ in range(ctx.scale.users):
            t0 = time.perf_counter()
            user = await ctx.attempt(ctx.api.register(ctx.world.next_name()))
            if user is not None:
                latencies.append(time.perf_counter() - t0)
                ctx.world.users.append(user)
    return {"per_s": rate(len(latencies), span.wall_s), "p50_ms": ms(percentile(latencies, 50))}


async def phase_create_join(ctx: PhaseContext) -> dict[str, Any]:
    users = ctx.world.users
    if len(users) < ctx.scale.users:
        raise MissingPrerequisite("registration failed")
    joins = []
    async with ctx.timed():
        t0 = time.perf_counter()
        room = await ctx.api.create_room(users[0], name="bench main room")
        create = time.perf_counter() - t0
        for user in users[1:]:
            t0 = time.perf_counter()
            if await ctx.attempt(ctx.api.join(user, room)):
                joins.append(time.perf_counter() - t0)
    ctx.world.main_room = room
    return {"create_ms": ms(create), "join_p50_ms": ms(percentile(joins, 50))}


async def phase_send_sequential(ctx: PhaseContext) -> dict[str, Any]:
    room = ctx.need(ctx.world.main_room, "main room")
    sender = ctx.world.users[0]
    latencies = []
    async with ctx.timed() as span:
        for i in range(ctx.scale.messages):
            t0 = time.perf_counter()
            if await ctx.attempt(ctx.api.send(sender, room, text(f"sequential {i}"))):
                latencies.append(time.perf_counter() - t0)
    ctx.world.main_messages += len(latencies)
    return {
        "per_s": rate(len(latencies), span.wall_s),
        "p50_ms": ms(percentile(latencies, 50)),
        "p95_ms": ms(percentile(latencies, 95)),
        "p99_ms": ms(percentile(latencies, 99)),
    }


async def _concurrent_sends(ctx: PhaseContext, rooms: list[str]) -> tuple[int, Span]:
    clients = ctx.scale.concurrency
    per_client = math.ceil(ctx.scale.messages / clients)
    senders = ctx.world.users[:clients]
    sent = 0

    async def client(k: int) -> None:
        nonlocal sent
        for i in range(per_client):
            if await ctx.attempt(ctx.api.send(senders[k], rooms[k], text(f"client {k} #{i}"))):
                sent += 1

    async with ctx.timed() as span:
        await asyncio.gather(*(client(k) for k in range(clients)))
    return sent, span


async def phase_send_concurrent_one_room(ctx: PhaseContext) -> dict[str, Any]:
    room = ctx.need(ctx.world.main_room, "main room")
    sent, span = await _concurrent_sends(ctx, [room] * ctx.scale.concurrency)
    ctx.world.main_messages += sent
    return {"per_s": rate(sent, span.wall_s)}


async def phase_send_concurrent_rooms(ctx: PhaseContext) -> dict[str, Any]:
    senders = ctx.world.users[: ctx.scale.concurrency]
    rooms = await asyncio.gather(
        *(ctx.api.create_room(u, name=f"bench room of client {k}") for k, u in enumerate(senders))
    )
    sent, span = await _concurrent_sends(ctx, list(rooms))
    return {"per_s": rate(sent, span.wall_s)}


async def phase_delivery(ctx: PhaseContext) -> dict[str, Any]:
    """A receiver long-polls /sync (timeout 30000); time from send start to arrival."""
    room = ctx.need(ctx.world.main_room, "main room")
    sender, receiver = ctx.world.users[0], ctx.world.users[1]
    api = ctx.api
    created = await api.request(
        "POST",
        f"{V3}/user/{quote(receiver.user_id, safe='')}/filter",
        "create filter",
        user=receiver,
        body={
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "rooms": [room],
                "timeline": {"limit": 20},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
                "state": {"lazy_load_members": True},
            },
        },
    )
    filter_id = created["filter_id"]
    since = (await api.sync(receiver, filter=filter_id, timeout=0))["next_batch"]
    latencies = []

    async with ctx.timed():
        for i in range(ctx.scale.delivery):
            marker = f"delivery {i} {uuid.uuid4().hex}"

            async def wait_for(marker: str = marker) -> float:
                nonlocal since
                while True:
                    body = await api.sync(receiver, since=since, timeout=30000, filter=filter_id)
                    arrived = time.perf_counter()
                    since = body["next_batch"]
                    timeline = (
                        body.get("rooms", {})
                        .get("join", {})
                        .get(room, {})
                        .get("timeline", {})
                        .get("events", [])
                    )
                    if any(e.get("content", {}).get("body") == marker for e in timeline):
                        return arrived

            poll = asyncio.ensure_future(wait_for())
            await asyncio.sleep(0.05)  # let the long poll reach the server and park
            t0 = time.perf_counter()
            sent = await ctx.attempt(api.send(sender, room, text(marker)))
            if sent is None:
                poll.cancel()
                continue
            ctx.world.main_messages += 1
            try:
                arrived = await asyncio.wait_for(poll, 40)
            except EXPECTED_FAILURES as e:
                ctx.fail(e)
                continue
            latencies.append(arrived - t0)
    return {"p50_ms": ms(percentile(latencies, 50)), "p95_ms": ms(percentile(latencies, 95))}


async def phase_sync_initial(ctx: PhaseContext) -> dict[str, Any]:
    """A user in ``rooms`` rooms of ``history`` messages each, one initial sync per device.

    Each device syncs once so no response comes from Synapse's sync response
    cache (keyed by user, device, since token and filter).
    """
    api, scale = ctx.api, ctx.scale
    owner = await api.register(ctx.world.next_name("syncer"))
    helper = await api.register(ctx.world.next_name("helper"))
    gate = asyncio.Semaphore(8)

    async def fill(room: str) -> None:
        async with gate:
            await api.join(helper, room)
            for i in range(scale.history):
                await api.send((owner, helper)[i % 2], room, text(f"history {i}"))

    # One createRoom at a time: two identical ones by one user in the same
    # millisecond give the same create event, hence (room v12) the same room id,
    # and our server answers one of them 500 (see docs/performance.md).
    created = [
        await api.create_room(owner, name=f"bench history room {n}") for n in range(scale.rooms)
    ]
    await asyncio.gather(*(fill(room) for room in created))
    rooms = set(created)
    devices = [owner] + [await api.login(owner) for _ in range(scale.devices - 1)]
    latencies = []
    async with ctx.timed():
        for device in devices:
            t0 = time.perf_counter()
            body = await ctx.attempt(api.sync(device, timeout=0))
            if body is None:
                continue
            latencies.append(time.perf_counter() - t0)
            joined = body.get("rooms", {}).get("join", {})
            try:
                verify(
                    rooms <= joined.keys(),
                    f"initial sync has {len(rooms & joined.keys())} of {len(rooms)} rooms",
                )
                verify(
                    all(joined[r].get("timeline", {}).get("events") for r in rooms),
                    "initial sync: a room without timeline events",
                )
            except VerifyFailed as e:
                ctx.fail(e)
                continue
            ctx.world.sync_devices.append((device, body["next_batch"]))
    return {
        "p50_ms": ms(percentile(latencies, 50)),
        "first_ms": ms(latencies[0] if latencies else None),
        "max_ms": ms(max(latencies, default=None)),
    }


async def phase_sync_incremental(ctx: PhaseContext) -> dict[str, Any]:
    """timeout=0 with nothing new since each device's initial sync."""
    devices = ctx.need(ctx.world.sync_devices or None, "synced devices")
    latencies = []
    async with ctx.timed():
        for device, since in devices:
            t0 = time.perf_counter()
            if await ctx.attempt(ctx.api.sync(device, since=since, timeout=0)) is not None:
                latencies.append(time.perf_counter() - t0)
    return {"p50_ms": ms(percentile(latencies, 50))}


async def phase_paging(ctx: PhaseContext) -> dict[str, Any]:
    """/messages backwards from the end of the main room to its creation."""
    room = ctx.need(ctx.world.main_room, "main room")
    user = ctx.world.users[0]
    events = messages = pages = 0
    saw_create = False
    page_times = []
    query: dict[str, Any] = {"dir": "b", "limit": ctx.scale.page_limit}
    async with ctx.timed() as span:
        for _ in range(100_000):
            t0 = time.perf_counter()
            body = await ctx.attempt(
                ctx.api.request(
                    "GET",
                    f"{V3}/rooms/{quote(room, safe='')}/messages",
                    "messages",
                    user=user,
                    query=query,
                )
            )
            if body is None:
                break
            page_times.append(time.perf_counter() - t0)
            chunk = body.get("chunk", [])
            pages += 1
            events += len(chunk)
            messages += sum(1 for e in chunk if e.get("type") == "m.room.message")
            saw_create = saw_create or any(e.get("type") == "m.room.create" for e in chunk)
            if not chunk or not body.get("end"):
                break
            query["from"] = body["end"]
    if ctx.errors == 0 and messages < ctx.world.main_messages:
        ctx.fail(VerifyFailed(f"paged back {messages} messages, {ctx.world.main_messages} sent"))
    if ctx.errors == 0 and not saw_create:
        ctx.fail(VerifyFailed("paging ended before the room's m.room.create"))
    return {
        "per_s": rate(events, span.wall_s),
        "events": events,
        "pages": pages,
        "page_p50_ms": ms(percentile(page_times, 50)),
    }


def phase_media(mib: int) -> Callable[[PhaseContext], Awaitable[dict[str, Any]]]:
    async def media(ctx: PhaseContext) -> dict[str, Any]:
        user = ctx.world.users[0] if ctx.world.users else None
        user = ctx.need(user, "user")
        data = os.urandom(mib * MIB)
        digest = hashlib.sha256(data).digest()
        up, down = [], []
        async with ctx.timed():
            for _ in range(ctx.scale.media_reps):
                t0 = time.perf_counter()
                try:
                    mxc = await ctx.api.upload(user, data)
                except RequestFailed as e:
                    if e.status in (404, 405) and e.errcode in ("M_UNRECOGNIZED", None):
                        raise Unavailable("not available (no media upload endpoint)") from None
                    ctx.fail(e)
                    continue
                except EXPECTED_FAILURES as e:
                    ctx.fail(e)
                    continue
                up.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                body = await ctx.attempt(ctx.api.download(user, mxc))
                if body is None:
                    continue
                down.append(time.perf_counter() - t0)
                if hashlib.sha256(body).digest() != digest:
                    ctx.fail(VerifyFailed(f"downloaded {len(body)} bytes differ from upload"))
        size = mib * MIB / MB
        return {
            "upload_mb_s": rate(size * len(up), sum(up)),
            "download_mb_s": rate(size * len(down), sum(down)),
        }

    return media


async def phase_reactions(ctx: PhaseContext) -> dict[str, Any]:
    """``reactions`` m.reaction annotations to one message, then /relations for them all."""
    room = ctx.need(ctx.world.main_room, "main room")
    api, scale = ctx.api, ctx.scale
    target = await api.send(ctx.world.users[0], room, text("react to me"))
    ctx.world.main_messages += 1
    reactors = ctx.world.users[: scale.reactors]
    # User k sends its share with keys r0, r1, ...: distinct for each user (a
    # server keeps one annotation per user and key), shared between users so the
    # keys aggregate several senders. The users send concurrently.
    counts = [
        scale.reactions // len(reactors) + (k < scale.reactions % len(reactors))
        for k in range(len(reactors))
    ]
    sent = 0

    async def react(user: User, count: int) -> None:
        nonlocal sent
        for key in range(count):
            content = {
                "m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": f"r{key}"}
            }
            if await ctx.attempt(api.send(user, room, content, "m.reaction")):
                sent += 1

    async with ctx.timed() as sending:
        await asyncio.gather(*(react(u, n) for u, n in zip(reactors, counts, strict=True)))
    found = 0
    path = f"{V1}/rooms/{quote(room, safe='')}/relations/{quote(target, safe='')}"
    query: dict[str, Any] = {"limit": 100}
    async with ctx.timed() as fetching:
        for _ in range(10_000):
            body = await ctx.attempt(
                api.request("GET", path, "relations", user=reactors[0], query=query)
            )
            if body is None:
                break
            found += sum(1 for e in body.get("chunk", []) if e.get("type") == "m.reaction")
            if not body.get("next_batch"):
                break
            query["from"] = body["next_batch"]
    if ctx.errors == 0 and found != sent:
        ctx.fail(VerifyFailed(f"/relations returned {found} reactions, {sent} were sent"))
    return {"send_per_s": rate(sent, sending.wall_s), "relations_ms": ms(fetching.wall_s)}


async def phase_big_room(ctx: PhaseContext) -> dict[str, Any]:
    """A room that ``members`` users join one by one."""
    members = await ctx.users(ctx.scale.members)
    newcomer = await ctx.api.register(ctx.world.next_name("newcomer"))
    room = await ctx.api.create_room(members[0], name="bench big room")
    times = []
    async with ctx.timed():
        for user in members[1:]:
            t0 = time.perf_counter()
            if await ctx.attempt(ctx.api.join(user, room)):
                times.append(time.perf_counter() - t0)
    ctx.world.big_room, ctx.world.newcomer = room, newcomer
    tail = times[-max(1, len(times) // 10) :]
    return {
        "join_p50_ms": ms(percentile(times, 50)),
        "join_mean_ms": ms(mean(times)),
        "join_last10pct_ms": ms(mean(tail)),
    }


async def phase_newcomer(ctx: PhaseContext) -> dict[str, Any]:
    """Member ``members + 1`` joins the big room, then does its initial sync."""
    room = ctx.need(ctx.world.big_room, "big room")
    newcomer = ctx.need(ctx.world.newcomer, "newcomer")
    async with ctx.timed() as joining:
        await ctx.api.join(newcomer, room)
    async with ctx.timed() as syncing:
        body = await ctx.api.sync(newcomer, timeout=0)
    joined = body.get("rooms", {}).get("join", {})
    verify(room in joined, "the newcomer's initial sync lacks the big room")
    members = {
        e.get("state_key")
        for section in ("state", "timeline")
        for e in joined[room].get(section, {}).get("events", [])
        if e.get("type") == "m.room.member"
    }
    verify(
        len(members) >= ctx.scale.members + 1,
        f"the newcomer's initial sync holds {len(members)} members",
    )
    return {"join_ms": ms(joining.wall_s), "sync_ms": ms(syncing.wall_s)}


@dataclass(frozen=True)
class Phase:
    key: str
    run: Callable[[PhaseContext], Awaitable[dict[str, Any]]]


PHASES = [
    Phase("register", phase_register),
    Phase("create_join", phase_create_join),
    Phase("send_sequential", phase_send_sequential),
    Phase("send_concurrent_one_room", phase_send_concurrent_one_room),
    Phase("send_concurrent_rooms", phase_send_concurrent_rooms),
    Phase("delivery", phase_delivery),
    Phase("sync_initial", phase_sync_initial),
    Phase("sync_incremental", phase_sync_incremental),
    Phase("paging", phase_paging),
    *(Phase(f"media_{mib}mib", phase_media(mib)) for mib in MEDIA_MIB),
    Phase("reactions", phase_reactions),
    Phase("big_room", phase_big_room),
    Phase("newcomer_sync", phase_newcomer),
]


async def run_phase(phase: Phase, ctx: PhaseContext) -> PhaseResult:
    result = PhaseResult(phase.key)
    t0 = time.perf_counter()
    try:
        result.metrics = await phase.run(ctx)
    except Unavailable as e:
        result.note = str(e)
    except EXPECTED_FAILURES as e:
        ctx.fail(e)
    result.elapsed_s = time.perf_counter() - t0
    result.errors, result.error_samples = ctx.errors, ctx.samples
    result.timed_s = ctx.timed_s
    result.cpu_s = ctx.cpu_s if ctx.timed_any else None
    if result.errors or result.note:
        # No speed for failed work.
        result.metrics = {k: None for k in result.metrics}
    return result


async def run_workload(
    servers: list[Server],
    scale: Scale,
    *,
    settle_s: float = 0.5,
    log: Callable[[str], None] = print,
    only: set[str] | None = None,
) -> dict[str, dict[str, PhaseResult]]:
    """Every phase against every server, alternating which server goes first."""
    scale.check()
    results: dict[str, dict[str, PhaseResult]] = {s.label: {} for s in servers}
    timeout = aiohttp.ClientTimeout(total=300)
    sessions = {
        s.label: aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64))
        for s in servers
    }
    worlds = {s.label: World() for s in servers}
    try:
        phases = [p for p in PHASES if only is None or p.key in only]
        for i, phase in enumerate(phases):
            order = servers if i % 2 == 0 else list(reversed(servers))
            for server in order:
                ctx = PhaseContext(
                    Api(sessions[server.label], server), server, worlds[server.label], scale
                )
                result = await run_phase(phase, ctx)
                results[server.label][phase.key] = result
                log(_progress(server.label, result))
                await asyncio.sleep(settle_s)
    finally:
        await asyncio.gather(*(s.close() for s in sessions.values()))
    return results


def _progress(label: str, r: PhaseResult) -> str:
    figures = ", ".join(f"{k}={v:.4g}" for k, v in r.metrics.items() if v is not None)
    status = r.note or (f"{r.errors} ERRORS: {r.error_samples[0]}" if r.errors else figures)
    cpu = f"cpu {r.cpu_s:.2f}s" if r.cpu_s is not None else "cpu -"
    return f"  {label:<8} {r.key:<25} {status}  [{r.timed_s:.2f}s timed, {cpu}]"
