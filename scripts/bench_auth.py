"""Auth-rule throughput: ours against Synapse's on the same events, same run.

    .venv/bin/python scripts/bench_auth.py [n] [room_version]

A public room of a few hundred members receives ``n`` events - mostly
messages, plus joins and state changes (some of which fail auth) - each
checked against its own auth events, as on receipt of a PDU. ``run(n)``
returns the figures for the lead's combined benchmark.
"""

import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto.b64 import encode_base64  # noqa: E402
from homeserver.core.auth import AuthError, check_auth_rules  # noqa: E402
from homeserver.core.auth_events import auth_state_keys  # noqa: E402
from homeserver.core.events import CREATE, MEMBER, POWER_LEVELS, Pdu  # noqa: E402
from homeserver.core.room_versions import get_room_version  # noqa: E402

SIGNATURE = {"ed25519:a": encode_base64(bytes(64))}
HASHES = {"sha256": encode_base64(bytes(32))}


def _build_inputs(n: int, version: str, seed: int = 1) -> list[tuple[Pdu, dict]]:
    """``n`` events, each with the auth-event state map it is checked against."""
    rng = random.Random(seed)
    room_version = get_room_version(version)
    creator = "@creator:hs0.example"
    state: dict[tuple[str, str], Pdu] = {}
    counter = iter(range(10**9))
    room_id = "!bench:hs0.example"

    def make(etype: str, sender: str, content: dict, state_key: str | None = None) -> Pdu:
        data: dict[str, Any] = {
            "type": etype,
            "sender": sender,
            "content": content,
            "depth": next(counter),
            "origin_server_ts": 1_700_000_000_000,
            "hashes": HASHES,
            "signatures": {sender.partition(":")[2]: SIGNATURE},
        }
        if not (etype == CREATE and room_version.room_id_is_create_event_hash):
            data["room_id"] = room_id
        if state_key is not None:
            data["state_key"] = state_key
        if room_version.event_id_in_pdu:
            data["event_id"] = f"${data['depth']}:hs0.example"
        keys = auth_state_keys(room_version, etype, sender, state_key, content)
        auth_ids = [state[k].event_id for k in keys if k in state]
        prev = [state[(CREATE, "")].event_id] if state else []
        if room_version.event_id_in_pdu:
            auth_ids = [[e, HASHES] for e in auth_ids]  # type: ignore[misc]
            prev = [[e, HASHES] for e in prev]  # type: ignore[misc]
        data["auth_events"] = auth_ids
        data["prev_events"] = prev
        return Pdu.from_dict(data, room_version)

    def auth_map(event: Pdu) -> dict:
        keys = auth_state_keys(
            room_version, event.type, event.sender, event.state_key, event.content
        )
        chosen = {k: state[k] for k in keys if k in state}
        chosen[(CREATE, "")] = state[(CREATE, "")]  # room 12: implied by the room id
        return chosen

    create_content: dict[str, Any] = {"room_version": version}
    if not room_version.implicit_room_creator:
        create_content["creator"] = creator
    create = make(CREATE, creator, create_content, "")
    state[(CREATE, "")] = create
    if room_version.room_id_is_create_event_hash:
        room_id = create.room_id
    state[(MEMBER, creator)] = make(MEMBER, creator, {"membership": "join"}, creator)
    members = [f"@user{i}:hs{i % 7}.example" for i in range(300)]
    mods = members[:10]
    users = {m: 50 for m in mods}
    if not room_version.creators_have_infinite_power:
        users[creator] = 100
    state[(POWER_LEVELS, "")] = make(POWER_LEVELS, creator, {"users": users}, "")
    state[("m.room.join_rules", "")] = make(
        "m.room.join_rules", creator, {"join_rule": "public"}, ""
    )
    for user in members:
        state[(MEMBER, user)] = make(MEMBER, user, {"membership": "join"}, user)

    inputs = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.7:
            event = make("m.room.message", rng.choice(members), {"body": f"message {i}"})
        elif roll < 0.85:
            joiner = f"@new{i}:hs{i % 11}.example"
            event = make(MEMBER, joiner, {"membership": "join"}, joiner)
        else:  # state: accepted from moderators, rejected from others
            sender = rng.choice(mods if rng.random() < 0.7 else members)
            event = make("m.room.topic", sender, {"topic": f"topic {i}"}, "")
        inputs.append((event, auth_map(event)))
        if event.type == MEMBER:
            state[(MEMBER, event.state_key)] = event
            members.append(event.sender)
    return inputs


def _time_ours(inputs: list[tuple[Pdu, dict]]) -> tuple[float, int]:
    accepted = 0
    start = time.perf_counter()
    for event, auth_events in inputs:
        try:
            check_auth_rules(event, auth_events)
            accepted += 1
        except AuthError:
            pass
    return time.perf_counter() - start, accepted


def _time_synapse(inputs: list[tuple[Any, list]]) -> tuple[float, int]:
    from synapse.api.errors import SynapseError
    from synapse.event_auth import check_state_dependent_auth_rules

    accepted = 0
    start = time.perf_counter()
    for event, auth_events in inputs:
        try:
            check_state_dependent_auth_rules(event, auth_events)
            accepted += 1
        except SynapseError:
            pass
    return time.perf_counter() - start, accepted


def _to_synapse(inputs: list[tuple[Pdu, dict]]) -> list[tuple[Any, list]]:
    import copy

    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
    from synapse.events import make_event_from_dict

    converted: dict[str, Any] = {}

    def convert(pdu: Pdu) -> Any:
        if pdu.event_id not in converted:
            version = KNOWN_ROOM_VERSIONS[pdu.room_version.identifier]
            converted[pdu.event_id] = make_event_from_dict(copy.deepcopy(pdu.data), version)
        return converted[pdu.event_id]

    return [(convert(e), [convert(a) for a in auth.values()]) for e, auth in inputs]


def run(n: int = 10_000, version: str = "12", repeats: int = 5) -> dict:
    """Best-of-``repeats`` throughput of both implementations on ``n`` events
    (runs interleaved, so machine noise hits both alike)."""
    import logging

    logging.getLogger("synapse").setLevel(logging.WARNING)  # as in production
    inputs = _build_inputs(n, version)
    try:
        synapse_inputs: list | None = _to_synapse(inputs)
    except ImportError:
        synapse_inputs = None
    ours_times, synapse_times = [], []
    for _ in range(repeats):
        elapsed, ours_accepted = _time_ours(inputs)
        ours_times.append(elapsed)
        if synapse_inputs is not None:
            elapsed, synapse_accepted = _time_synapse(synapse_inputs)
            synapse_times.append(elapsed)
            if synapse_accepted != ours_accepted:
                raise AssertionError(f"accepted: ours {ours_accepted}, Synapse {synapse_accepted}")
    ours_time = min(ours_times)
    result: dict[str, Any] = {
        "benchmark": "auth_rules",
        "room_version": version,
        "events": n,
        "accepted": ours_accepted,
        "ours_events_per_s": round(n / ours_time),
        "ours_us_per_event": round(ours_time / n * 1e6, 2),
    }
    if synapse_times:
        synapse_time = min(synapse_times)
        result.update(
            synapse_events_per_s=round(n / synapse_time),
            synapse_us_per_event=round(synapse_time / n * 1e6, 2),
            speedup_vs_synapse=round(synapse_time / ours_time, 2),
        )
    return result


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    version = sys.argv[2] if len(sys.argv) > 2 else "12"
    result = run(n, version)
    for key, value in result.items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
