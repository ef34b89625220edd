"""Our state resolution against Synapse's (synapse.state.v1 / v2) on the same rooms.

Rooms come from ``state_res_helpers``: random power-level changes, bans and
kicks racing joins, join-rule flips, (room 12) additional creators, on forks
that fork again before merging. Every merge is resolved by both; any
difference fails the test.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeserver.core.state_res import resolve_state
from tests.core.state_res_helpers import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    EVE,
    MEMBER,
    PL_KEY,
    RoomDag,
    SynapseOracle,
    member_key,
    random_forks,
    random_room,
)

pytest.importorskip("synapse")


def resolve_both(dag: RoomDag, state_sets: list) -> dict:
    ours = resolve_state(dag.room_version, state_sets, dag.pdus(), dag.chain_index())
    theirs = SynapseOracle(dag).resolve(state_sets)
    differing = {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs)}
    differing = {k: v for k, v in differing.items() if v[0] != v[1]}
    assert not differing, f"room {dag.version}: (ours, synapse) differ at {differing}"
    return ours


@pytest.mark.parametrize("version", ["1", "10", "11", "12"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_forks_match_synapse(version: str, seed: int) -> None:
    rng = random.Random(seed)
    dag = random_room(version, rng)
    random_forks(dag, rng, resolve_both)


@pytest.mark.parametrize("version", ["1", "2", "3", "6", "10", "11", "12"])
def test_competing_power_level_changes(version: str) -> None:
    dag = RoomDag(version, members=(BOB, CAROL), power_users={BOB: 75, CAROL: 50})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    admins = {} if dag.room_version.creators_have_infinite_power else {ALICE: 100}
    dag.power_levels(a, ALICE, {**admins, BOB: 0, CAROL: 50})
    dag.power_levels(b, BOB, {**admins, BOB: 75, CAROL: 75})
    dag.send(b, "m.room.topic", CAROL, {"topic": "carol"}, state_key="")
    resolve_both(dag, [a.state, b.state])


@pytest.mark.parametrize("version", ["1", "10", "11", "12"])
def test_ban_racing_a_join(version: str) -> None:
    dag = RoomDag(version, members=(BOB,), power_users={BOB: 50})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.send(a, MEMBER, BOB, {"membership": "ban"}, state_key=CAROL)
    dag.join(b, CAROL)
    dag.send(b, MEMBER, CAROL, {"membership": "join", "displayname": "C"}, state_key=CAROL)
    result = resolve_both(dag, [a.state, b.state])
    if version != "1":
        assert result[member_key(CAROL)] == a.state[member_key(CAROL)]


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_join_rule_flips(version: str) -> None:
    dag = RoomDag(version, members=(BOB,), power_users={BOB: 100})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.send(a, "m.room.join_rules", ALICE, {"join_rule": "invite"}, state_key="")
    dag.join(b, CAROL)
    dag.join(b, DAVE)
    dag.send(b, "m.room.join_rules", BOB, {"join_rule": "invite"}, state_key="")
    dag.send(b, "m.room.join_rules", BOB, {"join_rule": "public"}, state_key="")
    dag.join(b, EVE)
    resolve_both(dag, [a.state, b.state])


def test_room_12_additional_creators_outrank_power_levels() -> None:
    dag = RoomDag("12", additional_creators=[BOB], members=(BOB, CAROL), power_users={CAROL: 100})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.send(a, MEMBER, BOB, {"membership": "ban"}, state_key=CAROL)
    dag.power_levels(b, CAROL, {CAROL: 100, DAVE: 100})
    result = resolve_both(dag, [a.state, b.state])
    # Bob's ban sorts first (a creator outranks 100) and Carol, banned, may
    # no longer change the power levels.
    assert result[member_key(CAROL)] == a.state[member_key(CAROL)]
    assert result[PL_KEY] == a.state[PL_KEY]
