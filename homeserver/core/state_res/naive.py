"""Whole-chain reference computations, for tests to cross-check ``ChainIndex``.

These walk every auth chain event by event: fine for small test rooms, far too
slow to run per resolution in a real room. Nothing outside tests uses them.
"""

from collections.abc import Collection, Iterable, Mapping, Sequence

AuthGraph = Mapping[str, Iterable[str]]  # event id -> its auth event ids


def auth_chain(event_ids: Iterable[str], auth_graph: AuthGraph) -> set[str]:
    """The events reachable through auth_events links (the events themselves
    only if reachable from another one)."""
    seen: set[str] = set()
    stack = [a for e in event_ids for a in auth_graph[e]]
    while stack:
        event_id = stack.pop()
        if event_id not in seen:
            seen.add(event_id)
            stack.extend(auth_graph[event_id])
    return seen


def auth_difference(state_sets: Sequence[Collection[str]], auth_graph: AuthGraph) -> set[str]:
    """Union minus intersection of each state set's events plus their auth chains."""
    chains = [set(s) | auth_chain(s, auth_graph) for s in state_sets]
    if len(chains) < 2:
        return set()
    return set.union(*chains) - set.intersection(*chains)


def conflicted_subgraph(conflicted: Collection[str], auth_graph: AuthGraph) -> set[str]:
    """Events on an auth path from one conflicted event to another (ends included)."""
    below = set(conflicted) | auth_chain(conflicted, auth_graph)
    reaches: dict[str, bool] = {}
    conflicted_set = set(conflicted)

    def reaches_conflicted(event_id: str) -> bool:
        # Iterative post-order so long chains do not hit the recursion limit.
        stack = [event_id]
        while stack:
            current = stack[-1]
            if current in reaches:
                stack.pop()
                continue
            pending = [a for a in auth_graph[current] if a not in reaches]
            if pending:
                stack.extend(pending)
                continue
            reaches[current] = current in conflicted_set or any(
                reaches[a] for a in auth_graph[current]
            )
            stack.pop()
        return reaches[event_id]

    return {e for e in below if reaches_conflicted(e)}
