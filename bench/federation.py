"""Phase 12: federation between our server and Synapse, measured in both directions.

Both servers run with a TLS federation listener and server names
``127.0.0.1:<port>`` (``federation=True`` in bench.servers). Everything here is
client-server traffic to the two servers; what crosses between them is their
own federation.

12a, ``fed_join``: each server hosts ``fed_joins`` public rooms of ``fed_members``
local members each (set up untimed: registered and joined through the client
API, a few at a time). A fresh user of the *other* server then joins each by room
id with ``server_name=<host>``, one join at a time, alternating which server
joins first: timed from ``POST /join`` to its 200, and to the joiner's ``/sync``
(long-polling from a token taken before the join) showing the room under
``rooms.join``; the median over the joins is reported. Both rooms have the same
room version
(``fed_room_version``) and the same state, so each server does the same work:
make_join, send_join, checking and storing a state of ``fed_members + 1``
members and its auth chain. Verified: the joiner's server then lists
``fed_members + 1`` joined members, the host lists the joiner, and the sync
that showed the room carried every member.

12b, ``fed_messages``: a user of one server sends ``fed_messages`` messages
sequentially (each PUT waits for its 200, not for delivery; with ``fed_rate``, at
most that many a second) into a room it hosts
and a user of the other server is in; that user long-polls ``/sync`` and the
arrival of each message is timed. Figures: events/s (messages / first send to
last arrival) and each message's latency from the start of its PUT to the sync
response that carried it. Verified: every message arrives exactly once, in the
order sent, with the event id the sender got; a stall (nothing new for
``STALL_S`` after the last send) ends the run with an error naming what is
missing, whether the receiver's timeline was gappy (``limited``), how many events
Synapse's log says it pruned from its inbound queue, and how many of the missing
ones the receiver's ``/messages`` then returns (backfilled from the sender).

Results use the other phases' shape (results[label][key]); a measurement with
errors shows no figure, and what it measured is kept apart in the JSON
(``unverified``). The column (label) is the server whose work is measured:
- ``fed_join``: the *joining* server (ours joining Synapse's room, Synapse
  joining ours);
- ``fed_messages``: the *receiving* server (ours receiving from Synapse,
  Synapse receiving from ours). The sender's share is in the metrics too
  (``send_per_s``, ``sender_cpu_s``).
"""

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from bench.workload import (
    EXPECTED_FAILURES,
    V3,
    Api,
    PhaseContext,
    PhaseResult,
    RequestFailed,
    Scale,
    Server,
    User,
    VerifyFailed,
    World,
    _progress,
    ms,
    percentile,
    rate,
    text,
    verify,
)

STALL_S = 60.0  # no new message for this long after the last send: give up
# ... or this long once the receiver's sync has reported a gap (limited: true):
# what fell into it comes back only by paging back, not by waiting.
GAP_STALL_S = 10.0
JOIN_SYNC_S = 180.0  # the joiner's /sync must show the room within this
SETUP_CONCURRENCY = 4  # registrations and joins in flight while filling a room


def q(value: str) -> str:
    return quote(value, safe="")


class Side:
    """One server as phase 12 sees it: its client API and a counter for names."""

    def __init__(self, session: aiohttp.ClientSession, server: Server) -> None:
        self.server = server
        self.api = Api(session, server)
        self.label = server.label
        self.names = 0

    def name(self, prefix: str) -> str:
        self.names += 1
        return f"fed{prefix}{self.names:05d}"

    def cpu(self) -> float:
        return self.server.stats().cpu_s


async def joined_members(side: Side, user: User, room: str) -> dict[str, Any]:
    body = await side.api.request(
        "GET", f"{V3}/rooms/{q(room)}/joined_members", "joined_members", user=user
    )
    joined = body.get("joined")
    verify(isinstance(joined, dict), f"joined_members: {str(body)[:200]}")
    return joined


async def wait_members(
    side: Side, user: User, room: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """joined_members until ``check`` holds (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            joined = await joined_members(side, user, room)
        except RequestFailed:
            joined = {}
            if time.monotonic() > deadline:
                raise
        if check(joined):
            return joined
        if time.monotonic() > deadline:
            raise VerifyFailed(f"{side.label}: {what} (joined_members lists {len(joined)})")
        await asyncio.sleep(0.5)


async def gather_all(*aws: Any) -> list[Any]:
    """Like asyncio.gather, but lets every awaitable finish before raising the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


async def populated_room(side: Side, members: int, version: str) -> tuple[str, User]:
    """A public room on ``side`` with ``members`` local members; (room id, its creator)."""
    api = side.api
    owner = await api.register(side.name("owner"))
    room = await api.create_room(
        owner, name=f"bench federated room of {members}", room_version=version
    )
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def member() -> None:
        async with gate:
            user = await api.register(side.name("member"))
            await api.join(user, room)

    await gather_all(*(member() for _ in range(members - 1)))
    await wait_members(
        side, owner, room, lambda j: len(j) == members, f"room set up with {members} members"
    )
    return room, owner


async def remote_join(side: Side, user: User, room: str, host: Server) -> None:
    done = await side.api.request(
        "POST",
        f"{V3}/join/{q(room)}",
        "federated join",
        user=user,
        body={},
        query={"server_name": host.server_name},
    )
    verify(done.get("room_id") == room, f"join: {done}")


# --- 12a --------------------------------------------------------------------------------


async def measure_join(
    ctx: PhaseContext, joiner: Side, host: Side, room: str, owner: User, members: int
) -> dict[str, Any]:
    user = await joiner.api.register(joiner.name("joiner"))
    since = (await joiner.api.sync(user, timeout=0))["next_batch"]
    host_cpu0 = host.cpu()
    async with ctx.timed() as span:
        t0 = time.perf_counter()
        await remote_join(joiner, user, room, host.server)
        join_s = time.perf_counter() - t0
        shown = None
        while shown is None:
            if time.perf_counter() - t0 > JOIN_SYNC_S:
                raise VerifyFailed(
                    f"{joiner.label}: the joiner's /sync did not show the room within "
                    f"{JOIN_SYNC_S:.0f}s of the join (which answered 200 after {join_s:.1f}s)"
                )
            body = await joiner.api.sync(user, since=since, timeout=10000)
            since = body["next_batch"]
            shown = body.get("rooms", {}).get("join", {}).get(room)
        sync_s = time.perf_counter() - t0
    host_cpu = host.cpu() - host_cpu0
    # Verified after the clock stops; every check runs, and a failure names the
    # times measured (the table shows no figure for a phase with errors).
    timings = f"(join answered 200 after {join_s:.2f}s, room in /sync after {sync_s:.2f}s)"
    state = (shown.get("state") or {}).get("events", [])
    timeline = (shown.get("timeline") or {}).get("events", [])
    seen = {
        e.get("state_key")
        for e in state + timeline
        if e.get("type") == "m.room.member" and (e.get("content") or {}).get("membership") == "join"
    }
    if len(seen) < members + 1:
        ctx.fail(
            VerifyFailed(
                f"{joiner.label}: the joiner's /sync showed the room with {len(seen)} joined "
                f"members, {members + 1} expected ({len(state)} state and {len(timeline)} "
                f"timeline events) {timings}"
            )
        )
    checks = (
        (
            joiner,
            user,
            lambda j: len(j) == members + 1 and user.user_id in j,
            f"joiner's server does not list {members + 1} members {timings}",
        ),
        (host, owner, lambda j: user.user_id in j, f"the host does not list the joiner {timings}"),
    )
    for side, member, check, what in checks:
        try:
            await wait_members(side, member, room, check, what)
        except EXPECTED_FAILURES as e:
            ctx.fail(e)
    return {
        "join_s": join_s,
        "sync_s": sync_s,
        "joiner_cpu_s": span.cpu_s,
        "host_cpu_s": host_cpu,
    }


# --- 12b --------------------------------------------------------------------------------


async def message_room(sender: Side, receiver: Side, version: str) -> tuple[str, User, User]:
    """A room on ``sender``'s server that a user of ``receiver``'s is in, with one
    message already across (so connections and keys are in place before timing)."""
    s_user = await sender.api.register(sender.name("sender"))
    r_user = await receiver.api.register(receiver.name("receiver"))
    room = await sender.api.create_room(
        s_user, name="bench federated messages", room_version=version
    )
    await remote_join(receiver, r_user, room, sender.server)
    await wait_members(sender, s_user, room, lambda j: r_user.user_id in j, "receiver not seen")
    marker = f"warm-up {uuid.uuid4().hex}"
    await sender.api.send(s_user, room, text(marker))
    since = (await receiver.api.sync(r_user, timeout=0))["next_batch"]
    deadline = time.monotonic() + 60
    body = await receiver.api.sync(r_user, timeout=0)  # initial: may hold it already
    while True:
        timeline = body.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {})
        if any((e.get("content") or {}).get("body") == marker for e in timeline.get("events", [])):
            return room, s_user, r_user
        if time.monotonic() > deadline:
            raise VerifyFailed(f"{receiver.label}: the warm-up message never arrived")
        body = await receiver.api.sync(r_user, since=since, timeout=5000)
        since = body["next_batch"]


async def recover_by_paging(
    receiver: Side, user: User, room: str, prefix: str, wanted: set[int]
) -> set[int]:
    """Which of ``wanted`` the receiver's ``/messages`` (backwards from the end) returns:
    what a client does on a gap in its timeline. The server backfills the gap from the
    sender, Synapse in the background while it answers, so this pages back from the
    end again (up to 5 times, 2 s apart) while that brings more of them."""
    found: set[int] = set()
    for attempt in range(5):
        before = len(found)
        query: dict[str, Any] = {"dir": "b", "limit": 100}
        for _ in range(1000):
            body = await receiver.api.request(
                "GET", f"{V3}/rooms/{q(room)}/messages", "messages", user=user, query=query
            )
            chunk = body.get("chunk", [])
            for e in chunk:
                message = (e.get("content") or {}).get("body")
                if isinstance(message, str) and message.startswith(prefix):
                    found.add(int(message[len(prefix) :]))
            if wanted <= found or not chunk or not body.get("end"):
                break
            query["from"] = body["end"]
        if wanted <= found or (attempt and len(found) == before):
            break
        await asyncio.sleep(2)
    return found & wanted


def synapse_pruned(server: Server, room: str) -> int:
    """Events Synapse's log says it pruned from its inbound federation queue for ``room``
    (it does so when 100 events of a room are waiting; the rest must be backfilled)."""
    workdir = getattr(server, "workdir", None)
    if server.label != "synapse" or workdir is None:
        return 0
    log = workdir / "homeserver.log"
    pruned = 0
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if "from federation queue" in line and f" {room} " in line:
                    words = line.split("Pruning ", 1)[1].split()
                    pruned += int(words[0])
    except (OSError, IndexError, ValueError):
        pass
    return pruned


async def measure_messages(
    ctx: PhaseContext,
    sender: Side,
    receiver: Side,
    count: int,
    version: str,
    pace: float = 0.0,
) -> dict[str, Any]:
    """``pace`` > 0: at most that many sends a second (sequential all the same)."""
    room, s_user, r_user = await message_room(sender, receiver, version)
    created = await receiver.api.request(
        "POST",
        f"{V3}/user/{q(r_user.user_id)}/filter",
        "create filter",
        user=r_user,
        body={
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "rooms": [room],
                "timeline": {"limit": count + 10, "types": ["m.room.message"]},
                "state": {"lazy_load_members": True},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
        },
    )
    filter_id = created["filter_id"]
    since = (await receiver.api.sync(r_user, timeout=0, filter=filter_id))["next_batch"]
    tag = uuid.uuid4().hex[:8]
    prefix = f"fed {tag} #"
    arrivals: list[tuple[int, str, float]] = []  # (index, event id, arrival time)
    distinct: set[int] = set()
    limited = 0
    last_progress = time.perf_counter()

    async def receive() -> None:
        nonlocal since, limited, last_progress
        while len(distinct) < count:
            body = await receiver.api.sync(r_user, since=since, timeout=5000, filter=filter_id)
            now = time.perf_counter()
            since = body["next_batch"]
            timeline = body.get("rooms", {}).get("join", {}).get(room, {}).get("timeline", {})
            if timeline.get("limited"):
                limited += 1
            for e in timeline.get("events", []):
                message = (e.get("content") or {}).get("body")
                if isinstance(message, str) and message.startswith(prefix):
                    index = int(message[len(prefix) :])
                    arrivals.append((index, e.get("event_id", ""), now))
                    if index not in distinct:
                        distinct.add(index)
                        last_progress = now

    receiving = asyncio.ensure_future(receive())
    await asyncio.sleep(0.1)  # let the long poll reach the server and park
    sent_at: list[float] = []
    event_ids: list[str | None] = []
    sender_cpu0 = sender.cpu()
    stalled = False
    try:
        async with ctx.timed() as span:
            first = time.perf_counter()
            for i in range(count):
                if pace > 0:
                    ahead = first + i / pace - time.perf_counter()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                sent_at.append(time.perf_counter())
                event_ids.append(
                    await ctx.attempt(sender.api.send(s_user, room, text(f"{prefix}{i}")))
                )
            sending_s = time.perf_counter() - first
            last_progress = max(last_progress, time.perf_counter())
            while not receiving.done():
                await asyncio.wait({receiving}, timeout=1)
                patience = GAP_STALL_S if limited else STALL_S
                if not receiving.done() and time.perf_counter() - last_progress > patience:
                    stalled = True
                    break
    finally:
        if not receiving.done():
            receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
    sender_cpu = sender.cpu() - sender_cpu0
    if not receiving.cancelled() and receiving.exception() is not None:
        error = receiving.exception()
        if isinstance(error, EXPECTED_FAILURES):
            ctx.fail(error)
        else:
            raise error  # type: ignore[misc]

    # Exactly once, in order, with the sender's event ids.
    times = Counter(index for index, _, _ in arrivals)
    duplicates = sorted(i for i, n in times.items() if n > 1)
    missing = [i for i in range(count) if i not in times and event_ids[i] is not None]
    pruned = synapse_pruned(receiver.server, room)
    recovered: set[int] = set()
    if missing:
        # A gap is what a client pages back over: does the receiver have them at all?
        try:
            recovered = await recover_by_paging(receiver, r_user, room, prefix, set(missing))
        except EXPECTED_FAILURES as e:
            ctx.fail(e)
        ctx.fail(
            VerifyFailed(
                f"{len(missing)} of {count} messages sent by {sender.label} never reached "
                f"{receiver.label}'s /sync"
                + (
                    f" (nothing new for {GAP_STALL_S if limited else STALL_S:.0f}s)"
                    if stalled
                    else ""
                )
                + f"; first missing: {missing[:10]}; limited (gappy) timelines: {limited}"
                + (
                    f"; Synapse's log: it pruned {pruned} events of the room from its "
                    "inbound federation queue (it does once 100 wait)"
                    if pruned
                    else ""
                )
                + f"; /messages on {receiver.label} then returned {len(recovered)} of the "
                f"{len(missing)} (backfilled from {sender.label})"
            )
        )
    if duplicates:
        ctx.fail(VerifyFailed(f"messages delivered more than once: {duplicates[:10]}"))
    order = [index for index, _, _ in arrivals]
    if order != sorted(order):
        out = next(k for k in range(1, len(order)) if order[k] < order[k - 1])
        ctx.fail(
            VerifyFailed(
                f"out of order at arrival {out}: {order[max(0, out - 3) : out + 3]} "
                f"({sum(1 for k in range(1, len(order)) if order[k] < order[k - 1])} inversions)"
            )
        )
    wrong = [i for i, eid, _ in arrivals if event_ids[i] is not None and eid != event_ids[i]]
    if wrong:
        ctx.fail(VerifyFailed(f"event ids differ from the sender's for messages {wrong[:10]}"))
    first_arrival: dict[int, float] = {}
    for index, _, at in arrivals:
        first_arrival.setdefault(index, at)
    latencies = [at - sent_at[i] for i, at in first_arrival.items() if i < len(sent_at)]
    last = max(first_arrival.values(), default=first)
    return {
        "per_s": rate(len(first_arrival), last - first),
        "p50_ms": ms(percentile(latencies, 50)),
        "p95_ms": ms(percentile(latencies, 95)),
        "max_ms": ms(max(latencies, default=None)),
        "send_per_s": rate(sum(1 for e in event_ids if e), sending_s),
        "receiver_cpu_s": span.cpu_s,
        "sender_cpu_s": sender_cpu,
        "limited_timelines": float(limited),
        "pruned_by_synapse": float(pruned),
        "pace_per_s": pace or None,
    }


# --- running both ---------------------------------------------------------------------


def _result(key: str, ctx: PhaseContext, metrics: dict[str, Any]) -> PhaseResult:
    result = PhaseResult(key, metrics)
    result.errors, result.error_samples = ctx.errors, ctx.samples
    result.timed_s = ctx.timed_s
    result.cpu_s = ctx.cpu_s if ctx.timed_any else None
    if result.errors:
        # No figure for failed work; what was measured stays in the JSON, apart.
        result.unverified = {k: v for k, v in result.metrics.items() if v is not None} or None
        result.metrics = {k: None for k in result.metrics}
    return result


def _join_figures(joins: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the joins (and the spread of the join times)."""
    figures: dict[str, Any] = {
        key: percentile([j[key] for j in joins], 50)
        for key in ("join_s", "sync_s", "joiner_cpu_s", "host_cpu_s")
    }
    figures["join_min_s"] = min((j["join_s"] for j in joins), default=None)
    figures["join_max_s"] = max((j["join_s"] for j in joins), default=None)
    figures["joins"] = float(len(joins))
    return figures


async def _run(
    key: str,
    column: Side,
    scale: Scale,
    body: Callable[[PhaseContext], Any],
) -> PhaseResult:
    """One measurement as a PhaseResult of ``column``'s server (errors, CPU, elapsed)."""
    ctx = PhaseContext(column.api, column.server, World(), scale)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    try:
        metrics = await body(ctx)
    except EXPECTED_FAILURES as e:
        ctx.fail(e)
    result = _result(key, ctx, metrics)
    result.elapsed_s = time.perf_counter() - t0
    return result


async def run_federation(
    ours: Server,
    synapse: Server,
    scale: Scale,
    *,
    settle_s: float = 0.5,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, PhaseResult]]:
    """12a and 12b in both directions; results keyed like run_workload's."""
    results: dict[str, dict[str, PhaseResult]] = {ours.label: {}, synapse.label: {}}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=64)
    ) as session:
        o, s = Side(session, ours), Side(session, synapse)
        n, version = scale.fed_members, scale.fed_room_version

        # 12a: every room filled first (untimed; the two servers at once), then
        # one join at a time, alternating which server joins first.
        k = scale.fed_joins
        log(f"  federation: filling {k} room(s) of {n} members on each server (untimed)")
        t0 = time.perf_counter()
        rooms: dict[str, list[tuple[str, User]] | BaseException] = {}

        async def fill(side: Side) -> None:
            try:
                rooms[side.label] = [await populated_room(side, n, version) for _ in range(k)]
            except EXPECTED_FAILURES as e:
                rooms[side.label] = e

        await asyncio.gather(fill(o), fill(s))
        log(f"  federation: rooms filled in {time.perf_counter() - t0:.1f}s")
        contexts: dict[str, PhaseContext] = {}
        joins: dict[str, list[dict[str, Any]]] = {o.label: [], s.label: []}
        started: dict[str, float] = {}
        for i in range(k):
            for joiner, host in ((o, s), (s, o)) if i % 2 == 0 else ((s, o), (o, s)):
                ctx = contexts.setdefault(
                    joiner.label, PhaseContext(joiner.api, joiner.server, World(), scale)
                )
                started.setdefault(joiner.label, time.perf_counter())
                await asyncio.sleep(settle_s)
                prepared = rooms[host.label]
                try:
                    if isinstance(prepared, BaseException):
                        raise VerifyFailed(
                            f"setting up {host.label}'s {n}-member rooms failed: "
                            f"{type(prepared).__name__}: {prepared}"
                        )
                    room, owner = prepared[i]
                    joins[joiner.label].append(
                        await measure_join(ctx, joiner, host, room, owner, n)
                    )
                except EXPECTED_FAILURES as e:
                    ctx.fail(e)
        for side in (o, s):
            result = _result("fed_join", contexts[side.label], _join_figures(joins[side.label]))
            result.elapsed_s = time.perf_counter() - started[side.label]
            results[side.label]["fed_join"] = result
            log(_progress(side.label, result))

        # 12b: ours -> Synapse first (the synapse column), then Synapse -> ours.
        for sender, receiver in ((o, s), (s, o)):

            async def messages(
                ctx: PhaseContext, sender: Side = sender, receiver: Side = receiver
            ) -> dict[str, Any]:
                return await measure_messages(
                    ctx, sender, receiver, scale.fed_messages, version, scale.fed_rate
                )

            await asyncio.sleep(settle_s)
            result = await _run("fed_messages", receiver, scale, messages)
            results[receiver.label]["fed_messages"] = result
            log(_progress(receiver.label, result))
    return results
