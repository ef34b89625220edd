"""Hand-built conflicts with the outcome the spec's algorithms give, worked by hand.

Spec: rooms/v1.md "State resolution", rooms/fragments/v2-state-res.md (rooms
2-11), rooms/v12.md "State resolution" (v2.1).
"""

import pytest

from homeserver.core.events import MEMBER
from homeserver.core.state_res import (
    ChainIndex,
    DictEventSource,
    MissingEventError,
    UnindexedEventError,
    resolve_state,
    resolve_state_v2,
    resolve_state_v2_1,
)
from tests.core.state_res_helpers import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    EVE,
    JR_KEY,
    PL_KEY,
    RoomDag,
    member_key,
)

TOPIC_KEY = ("m.room.topic", "")
V2_VERSIONS = ["2", "6", "10", "11", "12"]


def resolve(dag: RoomDag, state_sets: list, **source_kwargs) -> dict:
    events = DictEventSource(dag.pdus(), **source_kwargs)
    return resolve_state(dag.room_version, state_sets, events, dag.chain_index())


def admins(dag: RoomDag) -> dict[str, int]:
    """The creator's entry in ``users`` (room 12 creators may not have one)."""
    return {} if dag.room_version.creators_have_infinite_power else {ALICE: 100}


@pytest.mark.parametrize("version", ["1", *V2_VERSIONS])
def test_one_state_set_or_identical_sets_come_back_unchanged(version: str) -> None:
    dag = RoomDag(version, members=(BOB, CAROL))
    state = dag.trunk.state
    assert resolve(dag, [state]) == state
    assert resolve(dag, [state, dict(state), dict(state)]) == state


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_ban_loses_to_a_concurrent_demotion_by_a_higher_power(version: str) -> None:
    """Alice (100) demotes Bob while Bob (50) bans Carol: power ordering puts
    Alice's change first, and the ban then fails against it."""
    dag = RoomDag(version, members=(BOB, CAROL), power_users={BOB: 50})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    demotion = dag.power_levels(a, ALICE, {**admins(dag), BOB: 0})
    dag.send(b, MEMBER, BOB, {"membership": "ban"}, state_key=CAROL)
    result = resolve(dag, [a.state, b.state])
    assert result[PL_KEY] == demotion
    assert result[member_key(CAROL)] == dag.trunk.state[member_key(CAROL)]


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_topic_by_a_demoted_user_is_dropped_by_mainline_ordering(version: str) -> None:
    dag = RoomDag(version, members=(BOB,), power_users={BOB: 50})
    first_topic = dag.send(dag.trunk, "m.room.topic", ALICE, {"topic": "one"}, state_key="")
    a, b = dag.trunk.fork(), dag.trunk.fork()
    demotion = dag.power_levels(a, ALICE, {**admins(dag), BOB: 0})
    dag.send(b, "m.room.topic", BOB, {"topic": "two"}, state_key="")
    result = resolve(dag, [a.state, b.state])
    assert result[PL_KEY] == demotion
    assert result[TOPIC_KEY] == first_topic


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_join_raced_against_closing_the_room_is_dropped(version: str) -> None:
    """A key only one state set has is conflicted (v2), so Eve's join is
    re-checked against the invite-only join rule and dropped."""
    dag = RoomDag(version, members=(BOB,))
    a, b = dag.trunk.fork(), dag.trunk.fork()
    closed = dag.send(a, "m.room.join_rules", ALICE, {"join_rule": "invite"}, state_key="")
    dag.join(b, EVE)
    result = resolve(dag, [a.state, b.state])
    assert result[JR_KEY] == closed
    assert member_key(EVE) not in result


def test_room_1_keeps_a_key_only_one_state_has() -> None:
    """rooms/v1.md: a conflict is two states with *different* event ids for a
    key; a state without the key does not conflict."""
    dag = RoomDag("1", members=(BOB,))
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.send(a, "m.room.join_rules", ALICE, {"join_rule": "invite"}, state_key="")
    eve_join = dag.join(b, EVE)
    assert resolve(dag, [a.state, b.state])[member_key(EVE)] == eve_join


@pytest.mark.parametrize("version", ["10", "11", "12"])
def test_equal_power_ties_break_on_timestamp_then_event_id(version: str) -> None:
    dag = RoomDag(version, members=(BOB,))
    a, b, c = dag.trunk.fork(), dag.trunk.fork(), dag.trunk.fork()
    later = dag.power_levels(a, ALICE, {**admins(dag), BOB: 10}, ts=2_000_000_000_000)
    earlier = dag.power_levels(b, ALICE, {**admins(dag), BOB: 20}, ts=1_900_000_000_000)
    # The later timestamp is applied last, so it wins.
    assert resolve(dag, [a.state, b.state])[PL_KEY] == later
    assert resolve(dag, [b.state, a.state])[PL_KEY] == later
    # Same timestamp: the larger event id is applied last.
    tie = dag.power_levels(c, ALICE, {**admins(dag), BOB: 30}, ts=2_000_000_000_000)
    assert resolve(dag, [a.state, c.state])[PL_KEY] == max(later, tie)
    assert earlier != later


@pytest.mark.parametrize("version", V2_VERSIONS)
def test_forks_deeper_than_one_event(version: str) -> None:
    """Alice demotes Bob then renames the room; concurrently Bob promotes
    Carol, who kicks Dave and sets the topic. Alice's change sorts first (it
    is in nothing else's auth chain and she outranks Bob), so Bob's promotion
    and everything resting on it fail; the rest of Alice's branch stands."""
    dag = RoomDag(version, members=(BOB, CAROL, DAVE), power_users={BOB: 75})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    demotion = dag.power_levels(a, ALICE, {**admins(dag), BOB: 0})
    name = dag.send(a, "m.room.name", ALICE, {"name": "A"}, state_key="")
    dag.power_levels(b, BOB, {**admins(dag), BOB: 75, CAROL: 50})
    dag.send(b, MEMBER, CAROL, {"membership": "leave"}, state_key=DAVE)
    dag.send(b, "m.room.topic", CAROL, {"topic": "carol's"}, state_key="")
    result = resolve(dag, [a.state, b.state])
    assert result[PL_KEY] == demotion
    assert result[("m.room.name", "")] == name
    assert result[member_key(DAVE)] == dag.trunk.state[member_key(DAVE)]
    assert TOPIC_KEY not in result


def test_room_12_additional_creator_outranks_the_highest_power_level() -> None:
    dag = RoomDag("12", additional_creators=[BOB], members=(BOB, CAROL, DAVE))
    dag.power_levels(dag.trunk, ALICE, {CAROL: 100})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    demotion = dag.power_levels(a, BOB, {CAROL: 0}, ts=2_000_000_000_000)
    dag.send(b, MEMBER, CAROL, {"membership": "ban"}, state_key=DAVE, ts=1_000_000_000_000)
    result = resolve(dag, [a.state, b.state])
    assert result[PL_KEY] == demotion
    assert result[member_key(DAVE)] == dag.trunk.state[member_key(DAVE)]


@pytest.mark.parametrize("version", ["11", "12"])
def test_room_12_replays_power_events_from_the_empty_state(version: str) -> None:
    """rooms/v12.md, Algorithm step 2: the iterative auth checks start from an
    *empty* state map. Bob closed the room while he had power 50; Alice then
    demoted him and later reopened the room on one fork. Rooms 2-11 check
    Bob's change against the newer, unconflicted demotion and drop it; room
    12 checks it against its own auth events, so it passes and, applied after
    Alice's (she outranks him), it is what remains."""
    dag = RoomDag(version, members=(BOB,), power_users={BOB: 50})
    closed = dag.send(dag.trunk, "m.room.join_rules", BOB, {"join_rule": "invite"}, "")
    dag.power_levels(dag.trunk, ALICE, {**admins(dag), BOB: 0})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    reopened = dag.send(b, "m.room.join_rules", ALICE, {"join_rule": "public"}, "")
    events, index = dag.pdus(), dag.chain_index()
    v2 = resolve_state_v2(dag.room_version, [a.state, b.state], events, index)
    v2_1 = resolve_state_v2_1(dag.room_version, [a.state, b.state], events, index)
    assert v2[JR_KEY] == reopened
    assert v2_1[JR_KEY] == closed
    assert resolve(dag, [a.state, b.state])[JR_KEY] == (closed if version == "12" else reopened)


def test_room_1_power_levels_follow_depth_and_stop_at_the_first_failure() -> None:
    """rooms/v1.md: power levels sorted by ascending depth; each next one is
    applied while the auth rules allow it."""
    dag = RoomDag("1", members=(BOB,), power_users={BOB: 50})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    shallow = dag.power_levels(a, ALICE, {ALICE: 100, BOB: 0})
    dag.send(b, "m.room.topic", BOB, {"topic": "x"}, state_key="")
    deep = dag.power_levels(b, BOB, {ALICE: 100, BOB: 50, CAROL: 50})
    result = resolve(dag, [a.state, b.state])
    # Alice's shallower change goes in first; Bob (now 0) cannot follow it.
    assert result[PL_KEY] == shallow
    assert deep != shallow


def test_room_1_ban_racing_a_join() -> None:
    dag = RoomDag("1", members=(BOB,), power_users={BOB: 50})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    ban = dag.send(a, MEMBER, BOB, {"membership": "ban"}, state_key=CAROL)
    dag.join(b, CAROL)
    dag.send(b, MEMBER, CAROL, {"membership": "join", "displayname": "c"}, state_key=CAROL)
    # Oldest first: the ban (depth 6) precedes the joins, which it forbids.
    assert resolve(dag, [a.state, b.state])[member_key(CAROL)] == ban


def test_rejected_events_are_handled_as_usual() -> None:
    """v2-state-res.md "Rejected events": events rejected for failing auth
    against the state at the event "are handled as usual by the algorithm".
    Synapse instead never admits an event it had rejected (see its TODO
    citing this section); we follow the spec."""
    dag = RoomDag("10", members=(BOB,))
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.send(a, "m.room.name", ALICE, {"name": "a"}, state_key="")
    topic = dag.send(b, "m.room.topic", ALICE, {"topic": "b"}, state_key="")
    assert resolve(dag, [a.state, b.state], rejected=[topic])[TOPIC_KEY] == topic


def test_rejected_auth_events_are_not_used() -> None:
    """v2-state-res.md "Iterative auth checks": a key missing from the state
    is taken from the event's auth events only "if the auth event is not
    rejected". Room 12 starts from the empty state, so Bob's topic finds his
    membership only among its auth events; marked rejected, it is ignored and
    the topic fails (Bob is not joined as far as the check can tell)."""
    dag = RoomDag("12", members=(BOB,), power_users={BOB: 50})
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.send(a, "m.room.name", ALICE, {"name": "a"}, state_key="")
    topic = dag.send(b, "m.room.topic", BOB, {"topic": "b"}, state_key="")
    assert resolve(dag, [a.state, b.state])[TOPIC_KEY] == topic
    bob_join = dag.trunk.state[member_key(BOB)]
    assert TOPIC_KEY not in resolve(dag, [a.state, b.state], rejected=[bob_join])


def test_state_set_events_count_as_reached_by_their_own_set() -> None:
    """The auth difference compares each state set's events *together with*
    their auth chains, as Synapse computes it (chain cover and fallback
    alike). A literal reading of v2-state-res.md "Auth difference" (the
    union of the events' auth chains, not the events) differs when an
    unconflicted event is cited only from some sets: here the state after
    Alice's demotion of Bob and the state after her next topic, where only
    the topic cites the demotion."""
    from homeserver.core.state_res.naive import auth_chain
    from homeserver.core.state_res.v2 import full_conflicted_set

    dag = RoomDag("11", members=(BOB,), power_users={BOB: 50})
    old_topic = dag.send(dag.trunk, "m.room.topic", ALICE, {"topic": "old"}, state_key="")
    demotion = dag.power_levels(dag.trunk, ALICE, {ALICE: 100, BOB: 0})
    after_demotion = dict(dag.trunk.state)
    new_topic = dag.send(dag.trunk, "m.room.topic", ALICE, {"topic": "new"}, state_key="")
    sets = [after_demotion, dag.trunk.state]
    _, full = full_conflicted_set(sets, dag.chain_index(), with_conflicted_subgraph=False)
    assert full == {old_topic, new_topic}
    graph = dag.auth_graph()
    chains = [auth_chain(s.values(), graph) for s in sets]
    assert demotion in set.union(*chains) - set.intersection(*chains)
    assert resolve(dag, sets)[TOPIC_KEY] == new_topic


def test_missing_events_and_unindexed_events_are_reported() -> None:
    dag = RoomDag("10", members=(BOB,))
    a, b = dag.trunk.fork(), dag.trunk.fork()
    dag.power_levels(a, ALICE, {ALICE: 100, BOB: 10})
    dag.power_levels(b, ALICE, {ALICE: 100, BOB: 20})
    with pytest.raises(MissingEventError):
        resolve_state(dag.room_version, [a.state, b.state], {}, dag.chain_index())
    with pytest.raises(UnindexedEventError):
        resolve_state(dag.room_version, [a.state, b.state], dag.pdus(), ChainIndex())
    with pytest.raises(ValueError):
        resolve_state(dag.room_version, [a.state, b.state], dag.pdus(), None)
