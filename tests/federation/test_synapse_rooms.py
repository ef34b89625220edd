"""Rooms shared with a real Synapse, end to end, through the client-server API only.

Every scenario runs in both directions: the room hosted on Synapse and joined from
our server ("syn_hosts"), and hosted on ours and joined from Synapse ("ours_hosts");
most also for room versions 10, 11 and 12. The tests are Matrix clients of both
servers (blocking HTTP through ``client_call``): one user on each side, registered
fresh for every test, so the tests do not depend on each other.

``User.wait_for`` polls ``/sync`` (incremental, ``timeout=1000``) until a matching
event shows up in a room's timeline, invite state, ephemeral events, leave section
or to-device events. Everything a user's syncs returned is kept, so an event
that came in while waiting for something else is still found; ``User.mark()``
limits a wait to what arrived after the mark.

One Synapse and one of our servers serve the module (the module-scoped fixtures
of tests/support/synapse.py). The restart tests stop and start both; they come
last and always bring the servers back up.
"""

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tests.support.synapse import client_call, register

# One worker owns the Synapse of this module and of test_synapse_interop.py.
pytestmark = pytest.mark.xdist_group("synapse-interop")

CLIENT = "/_matrix/client/v3"
DIRECTIONS = ("syn_hosts", "ours_hosts")
VERSIONS = ("10", "11", "12")
CASES = [pytest.param(d, v, id=f"{d}-{v}") for d in DIRECTIONS for v in VERSIONS]
# A timeline limit large enough for every burst below: a limited sync is the exception.
SYNC_FILTER = json.dumps({"room": {"timeline": {"limit": 100}}}, separators=(",", ":"))

Event = dict[str, Any]
Predicate = Callable[[Event], bool]


def q(value: str) -> str:
    return quote(value, safe="")


def canonical(value: Any) -> str:
    """Canonical JSON: equal strings mean byte-identical content (1 and true differ)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def brief(event: Event) -> dict[str, Any]:
    out = {k: event[k] for k in ("type", "sender", "state_key", "event_id") if k in event}
    content = canonical(event.get("content"))
    out["content"] = content if len(content) <= 160 else content[:160] + "..."
    return out


class User:
    """A Matrix client of one server, with everything its syncs have returned."""

    def __init__(self, server: Any, localpart: str, label: str) -> None:
        self.server = server
        self.label = label  # "synapse" or "ours", for failure messages
        self.user_id, self.token = register(server, localpart)
        self.device_id = self.ok("GET", "/account/whoami")["device_id"]
        self.since: str | None = None
        # (section, room id or None for to-device, event); section is one of
        # timeline, state, ephemeral, invite, leave, to_device, or "limited" (a
        # limited timeline for that room: events were left out of the sync).
        self.seen: list[tuple[str, str | None, Event]] = []
        self.sync(timeout=0)

    def __repr__(self) -> str:
        return f"{self.user_id} ({self.label})"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return client_call(self.server, method, CLIENT + path, self.token, body)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        assert status == 200, f"{method} {path} as {self!r}: {status} {answer}"
        return answer

    # --- sync ------------------------------------------------------------------------
    def sync(self, timeout: int = 1000) -> None:
        query = {"filter": SYNC_FILTER, "timeout": str(timeout)}
        if self.since is not None:
            query["since"] = self.since
        body = self.ok("GET", "/sync?" + urlencode(query))
        self.since = body["next_batch"]
        rooms = body.get("rooms") or {}
        for room_id, room in (rooms.get("join") or {}).items():
            self._record("state", room_id, (room.get("state") or {}).get("events"))
            timeline = room.get("timeline") or {}
            if timeline.get("limited"):
                self.seen.append(("limited", room_id, {"prev_batch": timeline.get("prev_batch")}))
            self._record("timeline", room_id, timeline.get("events"))
            self._record("ephemeral", room_id, (room.get("ephemeral") or {}).get("events"))
        for room_id, room in (rooms.get("invite") or {}).items():
            self._record("invite", room_id, (room.get("invite_state") or {}).get("events"))
        for room_id, room in (rooms.get("leave") or {}).items():
            self._record("leave", room_id, (room.get("state") or {}).get("events"))
            self._record("leave", room_id, (room.get("timeline") or {}).get("events"))
        self._record("to_device", None, (body.get("to_device") or {}).get("events"))

    def _record(self, section: str, room_id: str | None, events: list[Event] | None) -> None:
        for event in events or []:
            self.seen.append((section, room_id, event))

    def mark(self) -> int:
        """A position in what this user has seen: ``wait_for(after=mark)`` looks past it."""
        return len(self.seen)

    def events(self, room_id: str | None, section: str = "timeline", after: int = 0) -> list[Event]:
        return [e for s, r, e in self.seen[after:] if s == section and r == room_id]

    def wait_for(
        self,
        room_id: str | None,
        predicate: Predicate,
        *,
        section: str = "timeline",
        after: int = 0,
        timeout: float = 20,
        what: str = "a matching event",
    ) -> Event:
        """The first event of ``section`` in ``room_id`` (seen after ``after``) that
        matches, syncing until one comes or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        checked = after
        while True:
            for section_, room_, event in self.seen[checked:]:
                if section_ == section and room_ == room_id and predicate(event):
                    return event
            checked = len(self.seen)
            if time.monotonic() > deadline:
                seen = [brief(e) for e in self.events(room_id, section, after)]
                elsewhere = Counter(
                    f"{s} {r}" for s, r, _ in self.seen[after:] if (s, r) != (section, room_id)
                )
                raise AssertionError(
                    f"{self!r} never saw {what} in {section} of {room_id} within {timeout}s.\n"
                    f"Seen there ({len(seen)}): {seen[-40:]}\n"
                    f"Seen elsewhere: {dict(elsewhere)}"
                )
            self.sync(timeout=1000)


# --- event helpers ---------------------------------------------------------------------


def text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


def has_body(body: str) -> Predicate:
    return lambda e: e.get("type") == "m.room.message" and (e.get("content") or {}).get(
        "body"
    ) == body


def is_member(user_id: str, membership: str, sender: str | None = None) -> Predicate:
    def match(e: Event) -> bool:
        return (
            e.get("type") == "m.room.member"
            and e.get("state_key") == user_id
            and (e.get("content") or {}).get("membership") == membership
            and (sender is None or e.get("sender") == sender)
        )

    return match


def has_id(event_id: str) -> Predicate:
    return lambda e: e.get("event_id") == event_id


def send(user: User, room_id: str, content: Any, event_type: str = "m.room.message") -> str:
    path = f"/rooms/{q(room_id)}/send/{q(event_type)}/{uuid.uuid4().hex}"
    return user.ok("PUT", path, content)["event_id"]


def create_room(user: User, version: str, **extra: Any) -> str:
    body = {"preset": "private_chat", "room_version": version, **extra}
    return user.ok("POST", "/createRoom", body)["room_id"]


def invite_and_join(host: User, remote: User, room_id: str) -> None:
    """host invites remote, who sees the invite and joins; both see the join."""
    remote_mark, host_mark = remote.mark(), host.mark()
    host.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": remote.user_id})
    remote.wait_for(
        room_id, is_member(remote.user_id, "invite"), section="invite", after=remote_mark,
        what="its invite",
    )
    joined = remote.ok("POST", f"/join/{q(room_id)}", {})
    assert joined.get("room_id") == room_id, joined
    remote.wait_for(room_id, is_member(remote.user_id, "join"), after=remote_mark,
                    what="its own join")
    host.wait_for(room_id, is_member(remote.user_id, "join"), after=host_mark,
                  what=f"the join of {remote.user_id}")


def joined_room(pair: "Pair", version: str, **extra: Any) -> str:
    room_id = create_room(pair.host, version, name=f"Room {pair.tag}", **extra)
    invite_and_join(pair.host, pair.remote, room_id)
    return room_id


def room_history(user: User, room_id: str, max_pages: int = 30) -> list[Event]:
    """The room's timeline on the user's server, oldest first: GET /messages dir=b from
    the end until the server omits ``end`` (the start of what the user may see)."""
    events: list[Event] = []
    token: str | None = None
    for _ in range(max_pages):
        query = {"dir": "b", "limit": "100"}
        if token is not None:
            query["from"] = token
        page = user.ok("GET", f"/rooms/{q(room_id)}/messages?{urlencode(query)}")
        events.extend(page.get("chunk") or [])
        if not page.get("end") or page["end"] == token:
            break
        token = page["end"]
    events.reverse()
    return events


def bodies(events: list[Event], prefix: str) -> list[str]:
    """Bodies of the m.room.message events starting with ``prefix``, each event once."""
    out, ids = [], set()
    for e in events:
        body = (e.get("content") or {}).get("body")
        if e.get("type") != "m.room.message" or not isinstance(body, str):
            continue
        if body.startswith(prefix) and e.get("event_id") not in ids:
            ids.add(e.get("event_id"))
            out.append(body)
    return out


def expect_burst(user: User, room_id: str, prefix: str, n: int, after: int,
                 timeout: float = 30, gaps_ok: bool = False) -> None:
    """``user`` gets "<prefix> 0" .. "<prefix> n-1", all and in order: from its syncs,
    or where a sync was limited (left events out), from /messages. ``gaps_ok``: events
    missing from the syncs may be in /messages only (backfilled rather than fetched)."""
    expected = [f"{prefix} {i}" for i in range(n)]
    user.wait_for(room_id, has_body(expected[-1]), after=after, timeout=timeout,
                  what=repr(expected[-1]))
    from_sync = bodies(user.events(room_id, after=after), prefix + " ")
    limited = any(s == "limited" and r == room_id for s, r, _ in user.seen[after:])
    if from_sync == expected:
        return
    if not limited and not gaps_ok:
        assert from_sync == expected, f"{user!r}'s syncs (not limited) gave {from_sync}"
        return
    from_history = bodies(room_history(user, room_id), prefix + " ")
    assert from_history == expected, (
        f"{user!r}: syncs gave {from_sync} (limited: {limited}); /messages gave {from_history}"
    )


def eventually(fetch: Callable[[], Any], check: Callable[[Any], bool], what: str,
               timeout: float = 20, interval: float = 0.2) -> Any:
    """Poll ``fetch()`` until ``check`` accepts its answer; the last answer otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        answer = fetch()
        if check(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout}s; last answer: {answer}")
        time.sleep(interval)


# --- the pair of users ----------------------------------------------------------------


class Pair:
    """``host`` is on the server that creates the room, ``remote`` on the other one."""

    def __init__(self, direction: str, synapse: Any, ours: Any) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.syn = User(synapse, f"sam{self.tag}", "synapse")
        self.ours = User(ours, f"olivia{self.tag}", "ours")
        if direction == "syn_hosts":
            self.host, self.remote = self.syn, self.ours
        else:
            assert direction == "ours_hosts", direction
            self.host, self.remote = self.ours, self.syn


@pytest.fixture
def pair(direction: str, synapse_server: Any, federating_server: Any) -> Pair:
    return Pair(direction, synapse_server, federating_server)


def both_ways(p: Pair) -> tuple[tuple[User, User], tuple[User, User]]:
    """(sender, receiver): remote to host, then host to remote."""
    return (p.remote, p.host), (p.host, p.remote)


# --- 1. invite and join -----------------------------------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_invite_and_join(pair: Pair, room_version: str) -> None:
    host, remote = pair.host, pair.remote
    name = f"Private {pair.tag}"
    room_id = create_room(host, room_version, name=name)
    mark = remote.mark()
    host.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": remote.user_id})

    invite = remote.wait_for(room_id, is_member(remote.user_id, "invite"), section="invite",
                             after=mark, what="its invite")
    assert invite["sender"] == host.user_id, invite
    stripped = {(e["type"], e.get("state_key")): e for e in remote.events(room_id, "invite", mark)}
    assert ("m.room.create", "") in stripped, list(stripped)
    create = stripped[("m.room.create", "")]
    assert create["content"].get("room_version", "1") == room_version, create
    assert stripped.get(("m.room.name", ""), {}).get("content") == {"name": name}, list(stripped)

    host_mark, remote_mark = host.mark(), remote.mark()
    assert remote.ok("POST", f"/join/{q(room_id)}", {}) == {"room_id": room_id}
    host.wait_for(room_id, is_member(remote.user_id, "join"), after=host_mark,
                  what="the remote user's join")
    # The joined room's state reaches the joiner's /sync (name and creator's membership).
    remote.wait_for(room_id, lambda e: e.get("type") == "m.room.name", section="state",
                    after=remote_mark, what="the room's name in the state of its sync")
    assert any(is_member(host.user_id, "join")(e)
               for e in remote.events(room_id, "state", remote_mark)), "host's membership"
    both = {host.user_id, remote.user_id}
    for user in (host, remote):
        eventually(
            lambda user=user: user.ok("GET", f"/rooms/{q(room_id)}/joined_members"),
            lambda answer: set(answer.get("joined", {})) == both,
            f"{user!r}'s /joined_members lists both users",
        )

    # Join by alias: the remote server resolves the alias on the host's server.
    alias_name = f"alias{pair.tag}"
    public_name = f"Public {pair.tag}"
    public_id = create_room(host, room_version, preset="public_chat", name=public_name,
                            room_alias_name=alias_name)
    alias = f"#{alias_name}:{host.server.server_name}"
    host_mark = host.mark()
    assert remote.ok("POST", f"/join/{q(alias)}", {}) == {"room_id": public_id}
    assert remote.ok("GET", f"/rooms/{q(public_id)}/state/m.room.name") == {"name": public_name}
    host.wait_for(public_id, is_member(remote.user_id, "join"), after=host_mark,
                  what="the remote user's join by alias")


# --- 2. messages both ways ---------------------------------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_messages_both_ways(pair: Pair, room_version: str) -> None:
    room_id = joined_room(pair, room_version)
    for sender, receiver in both_ways(pair):
        body = f"hello from {sender.label} {pair.tag}"
        event_id = send(sender, room_id, text(body))
        got = receiver.wait_for(room_id, has_id(event_id), what=repr(body))
        assert (got["type"], got["sender"], got["content"]) == (
            "m.room.message", sender.user_id, text(body)), got

    for sender, receiver in ((pair.host, pair.remote), (pair.remote, pair.host)):
        prefix = f"burst from {sender.label}"
        mark = receiver.mark()
        for i in range(20):
            send(sender, room_id, text(f"{prefix} {i}"))
        expect_burst(receiver, room_id, prefix, 20, after=mark)


# --- 3. reactions, edits, redactions -----------------------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_reaction_edit_redaction(pair: Pair, room_version: str) -> None:
    room_id = joined_room(pair, room_version)
    for sender, receiver in both_ways(pair):
        original = send(sender, room_id, text(f"original from {sender.label}"))
        receiver.wait_for(room_id, has_id(original), what="the original message")

        reaction = {"m.relates_to": {"rel_type": "m.annotation", "event_id": original,
                                     "key": "\N{THUMBS UP SIGN}"}}
        reaction_id = send(sender, room_id, reaction, "m.reaction")
        got = receiver.wait_for(room_id, has_id(reaction_id), what="the reaction")
        assert (got["type"], got["sender"]) == ("m.reaction", sender.user_id), got
        assert canonical(got["content"]) == canonical(reaction), got

        edit = {
            "msgtype": "m.text",
            "body": f"* edited by {sender.label}",
            "m.new_content": {"msgtype": "m.text", "body": f"edited by {sender.label}"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        }
        edit_id = send(sender, room_id, edit)
        got = receiver.wait_for(room_id, has_id(edit_id), what="the edit")
        assert (got["type"], got["sender"]) == ("m.room.message", sender.user_id), got
        assert canonical(got["content"]) == canonical(edit), got

        path = f"/rooms/{q(room_id)}/redact/{q(original)}/{uuid.uuid4().hex}"
        redaction_id = sender.ok("PUT", path, {"reason": "test"})["event_id"]
        got = receiver.wait_for(room_id, has_id(redaction_id), what="the redaction")
        assert got["type"] == "m.room.redaction", got
        # v11 moved "redacts" into the content; servers also serve it at the top level.
        assert original in (got.get("redacts"), got["content"].get("redacts")), got
        event_path = f"/rooms/{q(room_id)}/event/{q(original)}"
        redacted = eventually(
            lambda receiver=receiver, path=event_path: receiver.ok("GET", path),
            lambda event: event.get("content") == {},
            f"{receiver!r} serves the redacted message with empty content",
        )
        assert (redacted["event_id"], redacted["sender"]) == (original, sender.user_id), redacted


# --- 4. power levels ---------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_power_levels_refuse_remote_message(pair: Pair, room_version: str) -> None:
    host, remote = pair.host, pair.remote
    room_id = joined_room(pair, room_version)
    levels_path = f"/rooms/{q(room_id)}/state/m.room.power_levels"
    levels = host.ok("GET", levels_path)
    assert levels.get("users", {}).get(remote.user_id, levels.get("users_default", 0)) == 0
    levels["events_default"] = 50
    levels_id = host.ok("PUT", levels_path, levels)["event_id"]
    got = remote.wait_for(room_id, has_id(levels_id), what="the new power levels")
    assert got["content"]["events_default"] == 50, got
    assert remote.ok("GET", levels_path)["events_default"] == 50

    forbidden = f"forbidden {pair.tag}"
    host_mark = host.mark()
    status, answer = remote.call(
        "PUT", f"/rooms/{q(room_id)}/send/m.room.message/{uuid.uuid4().hex}", text(forbidden))
    assert (status, answer.get("errcode") if isinstance(answer, dict) else answer) == (
        403, "M_FORBIDDEN"), f"{remote!r} sent at power 0 < events_default 50: {status} {answer}"

    # A barrier the remote user may still send (its own member event): had the message
    # been created, it would precede the barrier in the room's graph.
    barrier = remote.ok("PUT", f"/rooms/{q(room_id)}/state/m.room.member/{q(remote.user_id)}",
                        {"membership": "join", "displayname": f"barrier {pair.tag}"})
    host.wait_for(room_id, has_id(barrier["event_id"]), after=host_mark, what="the barrier")
    assert bodies(host.events(room_id, after=host_mark), forbidden) == []
    assert bodies(room_history(host, room_id), forbidden) == []


# --- 5. call signalling ------------------------------------------------------------------

SDP_OFFER = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=group:BUNDLE 0\r\na=msid-semantic: WMS stream\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 103\r\nc=IN IP4 0.0.0.0\r\n"
    "a=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:Fz3a\r\na=ice-pwd:qWb+Ln7+xkZ9c2cNr1bW3gPv\r\n"
    "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:"
    "24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\na=setup:actpass\r\na=mid:0\r\na=sendrecv\r\n"
    "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n"
)
SDP_ANSWER = SDP_OFFER.replace("a=setup:actpass", "a=setup:active").replace(
    "4611731400430051336", "8029523720301478472")


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_call_signalling(pair: Pair, room_version: str) -> None:
    caller, callee = pair.remote, pair.host
    room_id = joined_room(pair, room_version)
    call_id = f"call-{pair.tag}"
    caller_party, callee_party = f"{caller.device_id}-p1", f"{callee.device_id}-p2"
    candidate = "candidate:842163049 1 udp 1677729535 127.0.0.1 49203 typ srflx raddr 0.0.0.0"
    steps = [
        (caller, "m.call.invite", {
            "call_id": call_id, "party_id": caller_party, "version": "1", "lifetime": 60000,
            "invitee": callee.user_id, "offer": {"type": "offer", "sdp": SDP_OFFER},
        }),
        (callee, "m.call.answer", {
            "call_id": call_id, "party_id": callee_party, "version": "1",
            "answer": {"type": "answer", "sdp": SDP_ANSWER},
        }),
        (caller, "m.call.candidates", {
            "call_id": call_id, "party_id": caller_party, "version": "1",
            "candidates": [
                {"candidate": candidate, "sdpMid": "0", "sdpMLineIndex": 0},
                {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0},
            ],
        }),
        (callee, "m.call.candidates", {
            "call_id": call_id, "party_id": callee_party, "version": "1",
            "candidates": [{"candidate": candidate.replace("49203", "50111"),
                            "sdpMid": "0", "sdpMLineIndex": 0}],
        }),
        (caller, "m.call.hangup", {
            "call_id": call_id, "party_id": caller_party, "version": "1",
            "reason": "user_hangup",
        }),
    ]
    for sender, event_type, content in steps:
        receiver = callee if sender is caller else caller
        event_id = send(sender, room_id, content, event_type)
        got = receiver.wait_for(room_id, has_id(event_id), what=f"{event_type} {event_id}")
        assert (got["type"], got["sender"]) == (event_type, sender.user_id), got
        assert canonical(got["content"]) == canonical(content), (
            f"{event_type} content changed on the way:\nsent {canonical(content)}\n"
            f"got  {canonical(got['content'])}")


# --- 6. typing, receipts, to-device ------------------------------------------------------


def typing_users(event: Event) -> list[str]:
    return (event.get("content") or {}).get("user_ids") or []


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_typing_receipts_to_device(pair: Pair, room_version: str) -> None:
    room_id = joined_room(pair, room_version)
    for sender, receiver in both_ways(pair):
        typing_path = f"/rooms/{q(room_id)}/typing/{q(sender.user_id)}"
        mark = receiver.mark()
        sender.ok("PUT", typing_path, {"typing": True, "timeout": 30000})
        receiver.wait_for(
            room_id, lambda e, s=sender: e.get("type") == "m.typing" and s.user_id in
            typing_users(e), section="ephemeral", after=mark, what=f"{sender!r} typing")
        mark = receiver.mark()
        sender.ok("PUT", typing_path, {"typing": False})
        receiver.wait_for(
            room_id, lambda e, s=sender: e.get("type") == "m.typing" and s.user_id not in
            typing_users(e), section="ephemeral", after=mark,
            what=f"{sender!r} no longer typing")

        # The receiver's message, read by the sender: the receipt goes back to it.
        read_id = send(receiver, room_id, text(f"read me, {sender.label}"))
        sender.wait_for(room_id, has_id(read_id), what="the message to read")
        mark = receiver.mark()
        sender.ok("POST", f"/rooms/{q(room_id)}/receipt/m.read/{q(read_id)}", {})

        def is_receipt(e: Event, s: User = sender, read_id: str = read_id) -> bool:
            reads = ((e.get("content") or {}).get(read_id) or {}).get("m.read") or {}
            return e.get("type") == "m.receipt" and isinstance(reads.get(s.user_id), dict)

        got = receiver.wait_for(room_id, is_receipt, section="ephemeral", after=mark,
                                what=f"{sender!r}'s read receipt")
        assert isinstance(got["content"][read_id]["m.read"][sender.user_id].get("ts"), int), got

        message_type = "com.example.fedtest.ping"
        content = {"from": sender.label, "tag": pair.tag, "n": 1, "nested": {"ok": True}}
        mark = receiver.mark()
        sender.ok("PUT", f"/sendToDevice/{q(message_type)}/{uuid.uuid4().hex}",
                  {"messages": {receiver.user_id: {receiver.device_id: content}}})
        got = receiver.wait_for(
            None, lambda e, s=sender, t=message_type: e.get("type") == t and e.get("sender") ==
            s.user_id, section="to_device", after=mark, what=f"the to-device message of {sender!r}")
        assert canonical(got["content"]) == canonical(content), got


# --- 7. backfill -------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_backfill_history_before_join(pair: Pair, room_version: str) -> None:
    host, remote = pair.host, pair.remote
    room_id = create_room(host, room_version, name=f"History {pair.tag}")
    visibility = host.ok("GET", f"/rooms/{q(room_id)}/state/m.room.history_visibility")
    assert visibility == {"history_visibility": "shared"}, visibility
    for i in range(50):
        send(host, room_id, text(f"old {i}"))
    invite_and_join(host, remote, room_id)
    history = room_history(remote, room_id)
    got = bodies(history, "old ")
    assert got == [f"old {i}" for i in range(50)], (
        f"{remote!r}'s /messages gave {len(got)} of 50: {got}; "
        f"types: {Counter(e.get('type') for e in history)}")


# --- 8. profiles and the public room directory ---------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_remote_profile_and_public_rooms(pair: Pair) -> None:
    host, remote = pair.host, pair.remote
    display = f"Host {host.label} {pair.tag}"
    host.ok("PUT", f"/profile/{q(host.user_id)}/displayname", {"displayname": display})
    profile = remote.ok("GET", f"/profile/{q(host.user_id)}")
    assert profile.get("displayname") == display, profile

    name = f"Directory {pair.tag}"
    room_id = host.ok("POST", "/createRoom", {
        "preset": "public_chat", "visibility": "public", "name": name,
        "topic": "federated directory"})["room_id"]
    server = q(host.server.server_name)
    listing = eventually(
        lambda: remote.ok("POST", f"/publicRooms?server={server}",
                          {"filter": {"generic_search_term": pair.tag}, "limit": 10}),
        lambda answer: room_id in [r.get("room_id") for r in answer.get("chunk", [])],
        f"{remote!r} lists {room_id} in the directory of {host.server.server_name}",
    )
    [entry] = [r for r in listing["chunk"] if r["room_id"] == room_id]
    assert (entry.get("name"), entry.get("topic")) == (name, "federated directory"), entry
    assert entry.get("num_joined_members") == 1, entry


# --- 9. leave and kick -------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_leave_and_kick(pair: Pair, room_version: str) -> None:
    host, remote = pair.host, pair.remote
    room_id = joined_room(pair, room_version)

    host_mark, remote_mark = host.mark(), remote.mark()
    remote.ok("POST", f"/rooms/{q(room_id)}/leave", {})
    host.wait_for(room_id, is_member(remote.user_id, "leave", sender=remote.user_id),
                  after=host_mark, what="the remote user's leave")
    remote.wait_for(room_id, is_member(remote.user_id, "leave"), section="leave",
                    after=remote_mark, what="its own leave")
    eventually(lambda: host.ok("GET", f"/rooms/{q(room_id)}/joined_members"),
               lambda answer: set(answer.get("joined", {})) == {host.user_id},
               f"{host!r}'s /joined_members without the remote user")

    invite_and_join(host, remote, room_id)
    remote_mark = remote.mark()
    host.ok("POST", f"/rooms/{q(room_id)}/kick", {"user_id": remote.user_id, "reason": "bye"})
    kick = remote.wait_for(room_id, is_member(remote.user_id, "leave", sender=host.user_id),
                           section="leave", after=remote_mark, what="the kick")
    assert kick["content"].get("reason") == "bye", kick
    assert room_id not in remote.ok("GET", "/joined_rooms")["joined_rooms"]
    members = host.ok("GET", f"/rooms/{q(room_id)}/joined_members")
    assert set(members.get("joined", {})) == {host.user_id}, members


# --- 9b. knocks, rejected invites, restricted joins -----------------------------------------


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_knock_then_admitted(pair: Pair, room_version: str) -> None:
    """The remote user knocks; the host sees the knock and invites; the remote joins."""
    host, remote = pair.host, pair.remote
    room_id = create_room(host, room_version, name=f"Knock {pair.tag}", initial_state=[
        {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}])
    host_mark = host.mark()
    via = urlencode({"via": host.server.server_name})
    assert remote.ok("POST", f"/knock/{q(room_id)}?{via}", {"reason": "let me in"}) == {
        "room_id": room_id}
    knock = host.wait_for(room_id, is_member(remote.user_id, "knock"), after=host_mark,
                          what="the knock")
    assert knock["content"].get("reason") == "let me in", knock
    invite_and_join(host, remote, room_id)


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_invite_rejected(pair: Pair, room_version: str) -> None:
    """Rejecting an invite to a room on the other server reaches that server."""
    host, remote = pair.host, pair.remote
    room_id = create_room(host, room_version)
    remote_mark, host_mark = remote.mark(), host.mark()
    host.ok("POST", f"/rooms/{q(room_id)}/invite", {"user_id": remote.user_id})
    remote.wait_for(room_id, is_member(remote.user_id, "invite"), section="invite",
                    after=remote_mark, what="its invite")
    remote.ok("POST", f"/rooms/{q(room_id)}/leave", {})
    host.wait_for(room_id, is_member(remote.user_id, "leave", sender=remote.user_id),
                  after=host_mark, what="the rejection")
    eventually(lambda: remote.ok("GET", "/joined_rooms"),
               lambda answer: room_id not in answer["joined_rooms"], "not joined")


@pytest.mark.parametrize(("direction", "room_version"), CASES)
def test_restricted_join(pair: Pair, room_version: str) -> None:
    """A member of an allowed room joins a restricted room on the other server without
    an invite: the host's server authorises (and countersigns) the join."""
    host, remote = pair.host, pair.remote
    space_id = joined_room(pair, room_version)
    room_id = create_room(host, room_version, initial_state=[{
        "type": "m.room.join_rules", "state_key": "", "content": {
            "join_rule": "restricted",
            "allow": [{"type": "m.room_membership", "room_id": space_id}]}}])
    host_mark = host.mark()
    via = urlencode({"via": host.server.server_name})
    assert remote.ok("POST", f"/join/{q(room_id)}?{via}", {}) == {"room_id": room_id}
    join = host.wait_for(room_id, is_member(remote.user_id, "join"), after=host_mark,
                         what="the restricted join")
    assert join["content"].get("join_authorised_via_users_server") == host.user_id, join


# --- 10. restarts (last: they stop and start the module's servers) -------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_restart_catch_up(pair: Pair, synapse_server: Any, federating_server: Any) -> None:
    room_id = joined_room(pair, "12")
    syn, ours = pair.syn, pair.ours

    # Our server down while the Synapse user talks: Synapse queues and catches up.
    mark = ours.mark()
    federating_server.stop()
    try:
        for i in range(5):
            send(syn, room_id, text(f"while ours was down {i}"))
    finally:
        federating_server.start()
    # Synapse retries a destination that failed when it next hears from it (any signed
    # request resets its back-off and wakes its queue), otherwise on its 60 s catch-up
    # timer: our user starts typing, which our server sends to Synapse.
    ours.ok("PUT", f"/rooms/{q(room_id)}/typing/{q(ours.user_id)}",
            {"typing": True, "timeout": 30000})
    expect_burst(ours, room_id, "while ours was down", 5, after=mark, timeout=60,
                 gaps_ok=True)

    # Synapse down while our user talks: our server keeps the events and retries.
    mark = syn.mark()
    synapse_server.stop()
    try:
        for i in range(5):
            send(ours, room_id, text(f"while synapse was down {i}"))
    finally:
        synapse_server.start()
    expect_burst(syn, room_id, "while synapse was down", 5, after=mark, timeout=60,
                 gaps_ok=True)
