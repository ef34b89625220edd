"""Benchmark: state resolution over a room with 5,000 state events and 200
conflicted entries, ours against Synapse's v2 resolver on the same inputs.

The room (version 11) has ~4,990 joined members. Two forks then change 120
state keys each (40 in common, so 200 conflicted keys): display names, kicks,
bans, a power-level change, a join-rule flip, topic and name.

Synapse gets an in-memory store whose auth difference is precomputed (its
real one runs SQL over its own chain cover), so its figure is the resolver
alone; ours includes computing the auth difference from our chain index.
Runs alternate between the two so both see the same machine load.
Run from the repository root: ``.venv/bin/python scripts/bench_state_res.py``.
"""

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from homeserver.core.events import MEMBER  # noqa: E402
from homeserver.core.state_res import DictEventSource, resolve_state  # noqa: E402
from homeserver.core.state_res.v2 import full_conflicted_set  # noqa: E402
from tests.core.state_res_helpers import ALICE, BOB, RoomDag, _Clock, _run  # noqa: E402

STATE_EVENTS = 5_000
REPEATS = 15


def build_room() -> tuple[RoomDag, list[dict]]:
    members = [f"@user{i}:s{i % 50}.test" for i in range(STATE_EVENTS - 6)]
    dag = RoomDag("11", members=[BOB, *members], power_users={BOB: 100})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    changed_a, changed_b = members[:118], members[78:196]  # 40 members changed on both
    for branch, changed, admin in ((a, changed_a, ALICE), (b, changed_b, BOB)):
        for user in changed[:108]:
            content = {"membership": "join", "displayname": f"{user} on {admin}"}
            dag.send(branch, MEMBER, user, content, state_key=user)
        for user in changed[108:116]:
            dag.send(branch, MEMBER, admin, {"membership": "leave"}, state_key=user)
        for user in changed[116:]:
            dag.send(branch, MEMBER, admin, {"membership": "ban"}, state_key=user)
    dag.power_levels(a, ALICE, {ALICE: 100, BOB: 100, members[0]: 50})
    dag.send(b, "m.room.join_rules", BOB, {"join_rule": "invite"}, state_key="")
    dag.send(a, "m.room.topic", ALICE, {"topic": "a"}, state_key="")
    dag.send(b, "m.room.name", BOB, {"name": "b"}, state_key="")
    return dag, [a.state, b.state]


class _PrecomputedStore:
    def __init__(self, events: dict[str, Any], auth_difference: set[str]) -> None:
        self.events = events
        self.auth_difference = auth_difference

    async def get_events(self, event_ids: Any, allow_rejected: bool = False) -> dict:
        return {e: self.events[e] for e in event_ids if e in self.events}

    async def get_auth_chain_difference(self, room_id: str, *args: Any) -> Any:
        from synapse.storage.databases.main.event_federation import StateDifference

        return StateDifference(auth_difference=set(self.auth_difference), conflicted_subgraph=None)


def _timed(function: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return (time.perf_counter() - start) * 1000, result


def run() -> dict:
    import synapse.event_auth  # noqa: F401  (import order: breaks a cycle in synapse.state)
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
    from synapse.state import v2

    dag, state_sets = build_room()
    events, index = dag.pdus(), dag.chain_index()
    unconflicted, full = full_conflicted_set(state_sets, index, with_conflicted_subgraph=False)
    conflicted_keys = len(set().union(*state_sets)) - len(unconflicted)
    store = _PrecomputedStore(
        dag.synapse_events(), index.auth_difference([set(s.values()) for s in state_sets])
    )
    room_version = KNOWN_ROOM_VERSIONS["11"]

    def ours() -> dict:
        return resolve_state(dag.room_version, state_sets, DictEventSource(events), index)

    def synapse() -> dict:
        coroutine = v2.resolve_events_with_store(
            _Clock(), dag.room_id, room_version, state_sets, None, store
        )
        return dict(_run(coroutine))

    ours_times, synapse_times = [], []
    for _ in range(REPEATS):
        elapsed, ours_result = _timed(ours)
        ours_times.append(elapsed)
        elapsed, synapse_result = _timed(synapse)
        synapse_times.append(elapsed)
    ours_ms, synapse_ms = min(ours_times), min(synapse_times)
    return {
        "name": "state_res_v2_5000_state_200_conflicted",
        "state_events": len(state_sets[0]),
        "conflicted_keys": conflicted_keys,
        "full_conflicted_set": len(full),
        "ours_ms": round(ours_ms, 2),
        "ours_median_ms": round(statistics.median(ours_times), 2),
        "synapse_ms": round(synapse_ms, 2),
        "synapse_median_ms": round(statistics.median(synapse_times), 2),
        "speedup": round(synapse_ms / ours_ms, 2),
        "same_result": ours_result == synapse_result,
    }


if __name__ == "__main__":
    result = run()
    print(
        f"state resolution, room 11, {result['state_events']} state events, "
        f"{result['conflicted_keys']} conflicted keys "
        f"(full conflicted set {result['full_conflicted_set']}), best of {REPEATS}:"
    )
    print(f"  ours     {result['ours_ms']:8.2f} ms (median {result['ours_median_ms']:.2f})")
    print(f"  synapse  {result['synapse_ms']:8.2f} ms (median {result['synapse_median_ms']:.2f})")
    print(f"  synapse/ours = {result['speedup']}x; same result: {result['same_result']}")
