"""The chain-cover index agrees with whole-chain walks on random auth DAGs."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from homeserver.core.state_res import ChainIndex
from homeserver.core.state_res.naive import (
    auth_chain,
    auth_difference,
    conflicted_subgraph,
)

KEYS = [("m.room.create", ""), ("m.room.power_levels", ""), ("m.room.join_rules", "")] + [
    ("m.room.member", f"@u{i}:x") for i in range(5)
]


def random_dag(rng: random.Random, size: int) -> tuple[list[str], dict[str, tuple], dict]:
    """Events in topological order with random keys and auth events; often an
    event cites the latest event of its own key, as real state updates do."""
    order = ["e0"]
    graph: dict[str, tuple[str, ...]] = {"e0": ()}
    keys = {"e0": KEYS[0]}
    latest = {KEYS[0]: "e0"}
    for n in range(1, size):
        event_id = f"e{n}"
        key = rng.choice(KEYS[1:])
        auth = {"e0"} if rng.random() < 0.9 else set()
        auth.update(rng.sample(order, min(len(order), rng.randint(0, 3))))
        if key in latest and rng.random() < 0.7:
            auth.add(latest[key])
        elif key in latest and rng.random() < 0.5:
            # Cite an older event of the same key: a fork in that key's chain.
            auth.add(rng.choice([e for e in order if keys[e] == key]))
        order.append(event_id)
        graph[event_id] = tuple(sorted(auth))
        keys[event_id] = key
        latest[key] = event_id
    return order, graph, keys


def build(order: list[str], graph: dict, keys: dict) -> ChainIndex:
    index = ChainIndex()
    for event_id in order:
        index.add_event(event_id, keys[event_id], graph[event_id])
    return index


def subsets(rng: random.Random, order: list[str], count: int) -> list[set[str]]:
    common = set(rng.sample(order, rng.randint(0, len(order) // 3)))
    return [common | set(rng.sample(order, rng.randint(1, len(order)))) for _ in range(count)]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 60))
def test_index_matches_naive_walks(seed: int, size: int) -> None:
    rng = random.Random(seed)
    order, graph, keys = random_dag(rng, size)
    index = build(order, graph, keys)
    for _ in range(3):
        sets = subsets(rng, order, rng.randint(2, 4))
        assert index.auth_difference(sets) == auth_difference(sets, graph)
        conflicted = set(rng.sample(order, rng.randint(1, min(6, len(order)))))
        assert index.conflicted_subgraph(conflicted) == conflicted_subgraph(conflicted, graph)
        assert index.auth_chain(conflicted) == auth_chain(conflicted, graph)
        reached = index.reachable(conflicted, order)
        assert reached == conflicted | auth_chain(conflicted, graph)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 60))
def test_difference_from_state_maps_matches_naive(seed: int, size: int) -> None:
    """The fast path state resolution uses: state maps split into their
    unconflicted map and each map's conflicted events."""
    from homeserver.core.state_res.common import separate

    rng = random.Random(seed)
    order, graph, keys = random_dag(rng, size)
    index = build(order, graph, keys)
    by_key: dict = {}
    for event_id in order:
        by_key.setdefault(keys[event_id], []).append(event_id)
    base = {k: rng.choice(v) for k, v in by_key.items()}
    maps = []
    for _ in range(rng.randint(2, 4)):
        state = dict(base)
        for key in rng.sample(sorted(by_key), rng.randint(0, len(by_key))):
            if rng.random() < 0.2:
                del state[key]
            else:
                state[key] = rng.choice(by_key[key])
        maps.append(state)
    unconflicted, conflicted = separate(maps)
    own = [{m[k] for k in conflicted if k in m} for m in maps]
    expected = auth_difference([set(m.values()) for m in maps], graph)
    assert index.auth_difference_of(unconflicted, own) == expected


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_reloaded_index_answers_the_same(seed: int) -> None:
    rng = random.Random(seed)
    order, graph, keys = random_dag(rng, 40)
    index = ChainIndex()
    entries = [index.add_event(e, keys[e], graph[e]) for e in order]
    rng.shuffle(entries)
    reloaded = ChainIndex()
    reloaded.load(entries)
    sets = subsets(rng, order, 3)
    assert reloaded.auth_difference(sets) == index.auth_difference(sets)
    # New events extend the reloaded index exactly as they extend the original.
    extra = reloaded.add_event("new", KEYS[1], [order[-1], order[0]])
    assert extra == index.add_event("new", KEYS[1], [order[-1], order[0]])


def test_hand_built_example() -> None:
    """Two members' joins and two power levels; each state set's events count
    as reached by that set, so only the two newest memberships differ."""
    c, pl1, a_join, b_join1, pl2, a_inv, a_join2, b_join2 = (
        "create",
        "pl1",
        "alice_join",
        "bob_join",
        "pl2",
        "alice_invite",
        "alice_join2",
        "bob_join2",
    )
    index = ChainIndex()
    add = index.add_event
    add(c, ("m.room.create", ""), [])
    add(a_join, ("m.room.member", "@a:x"), [c])
    add(pl1, ("m.room.power_levels", ""), [c, a_join])
    add(b_join1, ("m.room.member", "@b:x"), [c, pl1])
    add(pl2, ("m.room.power_levels", ""), [c, pl1, a_join])
    add(a_inv, ("m.room.member", "@a2:x"), [c, pl1, b_join1])
    add(b_join2, ("m.room.member", "@b:x"), [c, pl2, b_join1])
    add(a_join2, ("m.room.member", "@a2:x"), [c, pl2, a_inv])
    graph = {
        c: (),
        a_join: (c,),
        pl1: (c, a_join),
        b_join1: (c, pl1),
        pl2: (c, pl1, a_join),
        a_inv: (c, pl1, b_join1),
        b_join2: (c, pl2, b_join1),
        a_join2: (c, pl2, a_inv),
    }
    sets = [{a_inv, b_join2}, {a_join2, b_join1}]
    assert index.auth_difference(sets) == auth_difference(sets, graph)
    # pl2 and alice's invite are cited by the other set's newer events.
    assert index.auth_difference(sets) == {b_join2, a_join2}


def test_chains_follow_state_keys() -> None:
    index = ChainIndex()
    create = index.add_event("c", ("m.room.create", ""), [])
    pl1 = index.add_event("p1", ("m.room.power_levels", ""), ["c"])
    pl2 = index.add_event("p2", ("m.room.power_levels", ""), ["c", "p1"])
    fork = index.add_event("p3", ("m.room.power_levels", ""), ["c", "p1"])  # p1 is no tip
    assert (pl2.chain_id, pl2.seq) == (pl1.chain_id, 2)
    assert fork.chain_id not in (create.chain_id, pl1.chain_id)
    # p2's link to the create event is implied by p1's: not stored again.
    assert pl2.links == ()
    assert [(link.target_chain_id, link.target_seq) for link in pl1.links] == [(1, 1)]
