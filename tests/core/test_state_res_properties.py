"""Properties every state resolution must have, on random rooms with conflicts."""

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from homeserver.core.state_res import resolve_state
from tests.core.state_res_helpers import RoomDag, random_forks, random_room

VERSIONS = ["1", "2", "10", "11", "12"]


def merges(version: str, seed: int) -> tuple[RoomDag, list[list[dict]]]:
    """A random room and every list of state sets its forks were merged from."""
    rng = random.Random(seed)
    dag = random_room(version, rng)
    seen: list[list[dict]] = []

    def record(dag: RoomDag, state_sets: list[dict]) -> dict:
        seen.append([dict(s) for s in state_sets])
        return resolve_state(dag.room_version, state_sets, dag.pdus(), dag.chain_index())

    random_forks(dag, rng, record)
    return dag, seen


def shuffled(state: dict, rng: random.Random) -> dict:
    items = list(state.items())
    rng.shuffle(items)
    return dict(items)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
@example(seed=2056)  # v10: a merge resolves to a state without power levels
def test_order_of_state_sets_and_of_their_entries_does_not_matter(version: str, seed: int) -> None:
    dag, all_sets = merges(version, seed)
    events, index, rng = dag.pdus(), dag.chain_index(), random.Random(seed)
    for state_sets in all_sets:
        expected = resolve_state(dag.room_version, state_sets, events, index)
        reordered = [shuffled(s, rng) for s in state_sets]
        rng.shuffle(reordered)
        assert resolve_state(dag.room_version, reordered, events, index) == expected
        # Repeating a state set changes nothing either.
        repeated = [*state_sets, state_sets[0]]
        assert resolve_state(dag.room_version, repeated, events, index) == expected


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
@example(seed=2056)  # v10: a merge resolves to a state without power levels
def test_single_and_identical_state_sets_resolve_to_themselves(version: str, seed: int) -> None:
    dag, all_sets = merges(version, seed)
    events, index = dag.pdus(), dag.chain_index()
    for state in {frozenset(s.items()) for sets in all_sets for s in sets}:
        state_map = dict(state)
        assert resolve_state(dag.room_version, [state_map], events, index) == state_map
        same = [state_map, dict(state_map), shuffled(state_map, random.Random(seed))]
        assert resolve_state(dag.room_version, same, events, index) == state_map


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
@example(seed=2056)  # v10: a merge resolves to a state without power levels
def test_result_keeps_unconflicted_state_and_is_a_fixed_point(version: str, seed: int) -> None:
    dag, all_sets = merges(version, seed)
    events, index = dag.pdus(), dag.chain_index()
    for state_sets in all_sets:
        result = resolve_state(dag.room_version, state_sets, events, index)
        common = set.intersection(*(set(s.items()) for s in state_sets))
        assert common <= set(result.items())
        assert set(result) <= set().union(*state_sets)
        assert resolve_state(dag.room_version, [result, result], events, index) == result
