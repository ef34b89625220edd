"""Chain-cover index over a room's auth DAG (see docs/state-resolution.md).

Every indexed event gets a position ``(chain_id, seq)``. A chain is a run of
events with the same (type, state_key) where each event cites the previous
one, so an event reaches every earlier event of its own chain. An auth edge
that crosses chains is kept as a *link* ``(chain, seq) -> (chain', seq')``,
unless an earlier link between the same two chains already reaches as far.
Event A is in the auth chain of B exactly when a path of "previous in chain"
steps and links leads from B's position to A's.

Because events reach everything below them in a chain, the set of events a
set of events reaches is a per-chain maximum sequence number (``Reach``); the
auth chain difference is then, per chain, the seq range between the smallest
and the largest of the state sets' maxima. A query touches chains and links,
never the events of a chain one by one.

Events must be added in topological order (auth events first). ``add_event``
returns the ``ChainEntry`` to persist; ``load`` rebuilds an index from them.
"""

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import attrs

from homeserver.core.state_res.source import StateKey

Position = tuple[int, int]  # (chain_id, seq); seq counts from 1
Reach = dict[int, int]  # chain_id -> highest seq reached (everything below too)


@attrs.frozen
class ChainLink:
    chain_id: int
    seq: int
    target_chain_id: int
    target_seq: int


@attrs.frozen
class ChainEntry:
    """One event's row: its position and the links it added."""

    event_id: str
    state_key: StateKey
    chain_id: int
    seq: int
    links: tuple[ChainLink, ...] = ()


class UnindexedEventError(KeyError):
    """An event (or one of its auth events) is not in the chain index."""

    def __init__(self, event_id: str) -> None:
        super().__init__(event_id)
        self.event_id = event_id


class ChainIndex:
    def __init__(self) -> None:
        self._position: dict[str, Position] = {}
        self._chain_events: dict[int, list[str]] = {}
        self._chain_key: dict[int, StateKey] = {}
        # Forward links per chain, sorted by source seq (parallel seq list for bisect).
        self._links: dict[int, list[tuple[int, int, int]]] = {}
        self._link_seqs: dict[int, list[int]] = {}
        # (chain, target chain) -> highest target seq linked so far.
        self._linked_to: dict[tuple[int, int], int] = {}
        # Reverse links per target chain as (target seq, chain, seq); sorted lazily.
        self._reverse: dict[int, list[tuple[int, int, int]]] = {}
        self._reverse_seqs: dict[int, list[int]] = {}
        self._reverse_dirty: set[int] = set()
        self._next_chain_id = 1

    # --- building ------------------------------------------------------------------
    def __contains__(self, event_id: object) -> bool:
        return event_id in self._position

    def __len__(self) -> int:
        return len(self._position)

    def position(self, event_id: str) -> Position:
        try:
            return self._position[event_id]
        except KeyError:
            raise UnindexedEventError(event_id) from None

    def state_key_of(self, event_id: str) -> StateKey:
        """The (type, state_key) of an indexed event, shared by its whole chain."""
        return self._chain_key[self.position(event_id)[0]]

    def add_event(
        self, event_id: str, state_key: StateKey, auth_event_ids: Iterable[str]
    ) -> ChainEntry:
        """Index a state event whose auth events are all indexed already.

        Pass ``source.effective_auth_event_ids(pdu)`` so room 12's implied
        create event is part of the chain. Re-adding an event is a no-op.
        """
        if event_id in self._position:
            chain_id, seq = self._position[event_id]
            return ChainEntry(event_id, state_key, chain_id, seq)
        auth_positions = [self.position(a) for a in dict.fromkeys(auth_event_ids)]
        chain_id = None
        for auth_chain, auth_seq in auth_positions:
            if (
                self._chain_key[auth_chain] == state_key
                and len(self._chain_events[auth_chain]) == auth_seq
            ):
                chain_id = auth_chain  # extend the chain whose tip we replace
                break
        if chain_id is None:
            chain_id = self._next_chain_id
            self._chain_events[chain_id] = []
            self._chain_key[chain_id] = state_key
        seq = len(self._chain_events[chain_id]) + 1
        links = []
        for target_chain, target_seq in auth_positions:
            if target_chain == chain_id:
                continue  # an earlier event of our own chain: implied
            if self._linked_to.get((chain_id, target_chain), 0) >= target_seq:
                continue  # an earlier link of this chain already reaches it
            links.append(ChainLink(chain_id, seq, target_chain, target_seq))
        entry = ChainEntry(event_id, state_key, chain_id, seq, tuple(links))
        self._store(entry)
        return entry

    def load(self, entries: Iterable[ChainEntry]) -> None:
        """Rebuild from persisted entries (any order; each chain complete from seq 1)."""
        for entry in sorted(entries, key=lambda e: (e.chain_id, e.seq)):
            if entry.event_id in self._position:
                continue
            events = self._chain_events.setdefault(entry.chain_id, [])
            if entry.seq != len(events) + 1:
                raise ValueError(f"chain {entry.chain_id} has a gap before seq {entry.seq}")
            self._chain_key.setdefault(entry.chain_id, entry.state_key)
            self._store(entry)

    def _store(self, entry: ChainEntry) -> None:
        chain_id = entry.chain_id
        self._position[entry.event_id] = (chain_id, entry.seq)
        self._chain_events.setdefault(chain_id, []).append(entry.event_id)
        self._next_chain_id = max(self._next_chain_id, chain_id + 1)
        for link in entry.links:
            target = link.target_chain_id
            self._links.setdefault(chain_id, []).append((link.seq, target, link.target_seq))
            self._link_seqs.setdefault(chain_id, []).append(link.seq)
            key = (chain_id, target)
            self._linked_to[key] = max(self._linked_to.get(key, 0), link.target_seq)
            self._reverse.setdefault(target, []).append((link.target_seq, chain_id, link.seq))
            self._reverse_dirty.add(target)

    # --- reachability ---------------------------------------------------------------
    def _starts(self, event_ids: Iterable[str]) -> Reach:
        starts: Reach = {}
        for event_id in event_ids:
            chain_id, seq = self.position(event_id)
            if seq > starts.get(chain_id, 0):
                starts[chain_id] = seq
        return starts

    def _reach(self, starts: Iterable[Position]) -> Reach:
        """Per chain, the highest seq reachable from ``starts`` (inclusive).

        A chain is revisited only when reached higher up, and then only its
        links above the previous height are followed: each link at most once.
        """
        reach: Reach = {}
        stack = list(starts)
        links, link_seqs = self._links, self._link_seqs
        while stack:
            chain_id, seq = stack.pop()
            done = reach.get(chain_id, 0)
            if seq <= done:
                continue
            reach[chain_id] = seq
            seqs = link_seqs.get(chain_id)
            if seqs:
                chain_links = links[chain_id]
                for i in range(bisect_right(seqs, done), bisect_right(seqs, seq)):
                    _, target, target_seq = chain_links[i]
                    stack.append((target, target_seq))
        return reach

    def _events_in(self, chain_id: int, low: int, high: int) -> list[str]:
        """Events of a chain with low <= seq <= high."""
        return self._chain_events[chain_id][low - 1 : high]

    def reach(self, event_ids: Iterable[str]) -> Reach:
        return self._reach(self._starts(event_ids).items())

    def auth_chain(self, event_ids: Iterable[str]) -> set[str]:
        """The auth chain of the events (their auth events, recursively).

        A given event is included only if another given event reaches it.
        Handy for callers working out what to prefetch.
        """
        starts: list[Position] = []
        for event_id in event_ids:
            chain_id, seq = self.position(event_id)
            starts.append((chain_id, seq - 1))
            seqs = self._link_seqs.get(chain_id, ())
            chain_links = self._links.get(chain_id, ())
            for i in range(bisect_left(seqs, seq), bisect_right(seqs, seq)):
                _, target, target_seq = chain_links[i]
                starts.append((target, target_seq))
        reach = self._reach(s for s in starts if s[1] > 0)
        return {e for c, s in reach.items() for e in self._events_in(c, 1, s)}

    def reachable(self, sources: Iterable[str], candidates: Iterable[str]) -> set[str]:
        """The candidates that are sources or in the auth chain of a source."""
        reach = self.reach(sources)
        found = set()
        for event_id in candidates:
            chain_id, seq = self.position(event_id)
            if seq <= reach.get(chain_id, 0):
                found.add(event_id)
        return found

    # --- state resolution queries -------------------------------------------------------
    def auth_difference(self, state_sets: Sequence[Collection[str]]) -> set[str]:
        """Events reachable from some state set but not from all of them.

        A state set reaches its own events as well as their auth chains, as in
        Synapse; see docs/state-resolution.md for why this reading is used.
        """
        if len(state_sets) < 2:
            return set()
        sets = [s if isinstance(s, set | frozenset) else set(s) for s in state_sets]
        common = sets[0].intersection(*sets[1:])
        tops = self._starts(common)
        return self._difference([s - common for s in sets], tops.get)

    def auth_difference_of(
        self, unconflicted: Mapping[StateKey, str], conflicted_by_set: Sequence[Collection[str]]
    ) -> set[str]:
        """``auth_difference`` of state sets given as their unconflicted state
        map and each set's other (conflicted) events; the fast path used by
        state resolution, which never looks at the unconflicted events one by
        one: a chain holds at most one of them, the one under its state key."""
        position = self._position

        def top(chain_id: int) -> int:
            event_id = unconflicted.get(self._chain_key[chain_id])
            at = position.get(event_id) if event_id is not None else None
            return at[1] if at is not None and at[0] == chain_id else 0

        return self._difference(conflicted_by_set, top)

    def _difference(
        self, extras: Sequence[Collection[str]], common_top: Callable[[int], int | None]
    ) -> set[str]:
        """The difference is that of what the non-common events reach, minus
        whatever the common events reach; that last part is asked position by
        position (``_CommonReach``) for the few chains where it matters."""
        reaches = [self._reach(self._starts(extra).items()) for extra in extras]
        common_reach = _CommonReach(self, common_top)
        difference: set[str] = set()
        for chain_id in set().union(*reaches):
            maxima = [reach.get(chain_id, 0) for reach in reaches]
            low, high = min(maxima), max(maxima)
            if low < high:
                floor = common_reach.highest_reached(chain_id, low, high)
                difference.update(self._events_in(chain_id, floor + 1, high))
        return difference

    def _reverse_links(self, chain_id: int) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Links into a chain sorted by target seq, with those seqs for bisect."""
        links = self._reverse.get(chain_id)
        if not links:
            return [], []
        if chain_id in self._reverse_dirty:
            links.sort()
            self._reverse_seqs[chain_id] = [link[0] for link in links]
            self._reverse_dirty.discard(chain_id)
        return links, self._reverse_seqs[chain_id]

    def _between(self, event_ids: Collection[str]) -> tuple[Reach, Reach]:
        """Per-chain seq ranges [low, high] of events on a path between two
        given events (endpoints included): reached from one, reaching one."""
        starts = self._starts(event_ids)
        high = self._reach(starts.items())
        low: Reach = {}
        stack = [self.position(e) for e in event_ids]
        while stack:
            chain_id, seq = stack.pop()
            previous = low.get(chain_id)
            if previous is not None and seq >= previous:
                continue
            low[chain_id] = seq
            links, target_seqs = self._reverse_links(chain_id)
            stop = len(links) if previous is None else bisect_left(target_seqs, previous)
            for i in range(bisect_left(target_seqs, seq), stop):
                _, source_chain, source_seq = links[i]
                if source_seq <= high.get(source_chain, 0):
                    stack.append((source_chain, source_seq))
        return low, high

    def conflicted_subgraph(self, event_ids: Collection[str]) -> set[str]:
        """Room 12's conflicted state subgraph of the given conflicted events."""
        low, high = self._between(event_ids)
        return {e for c, s in low.items() for e in self._events_in(c, s, high[c])}


class _CommonReach:
    """Answers "do the common state events reach position (chain, seq)?".

    What a set of events reaches is, on each chain, a prefix, so answers are
    remembered as per-chain bounds. A query searches the positions that
    reach the asked one (through reverse links), stopping at the first that
    a common event covers: every event at or below a common event's seq on
    its chain is reached.
    """

    def __init__(self, index: ChainIndex, common_top: Callable[[int], int | None]) -> None:
        self._index = index
        self._common_top = common_top
        self._tops: Reach = {}  # chain -> seq of the common event on it (0: none)
        self._reached: Reach = {}  # chain -> highest seq known reached
        self._unreached: Reach = {}  # chain -> lowest seq known unreached

    def _covered(self, chain_id: int, seq: int) -> bool:
        top = self._tops.get(chain_id)
        if top is None:
            top = self._tops[chain_id] = self._common_top(chain_id) or 0
        return seq <= top or seq <= self._reached.get(chain_id, 0)

    def reaches(self, chain_id: int, seq: int) -> bool:
        if self._covered(chain_id, seq):
            return True
        unreached = self._unreached
        if seq >= unreached.get(chain_id, seq + 1):
            return False
        scanned: Reach = {}  # chain -> lowest seq whose reverse links were scanned
        stack = [(chain_id, seq)]
        while stack:
            chain, position = stack.pop()
            previous = scanned.get(chain)
            if previous is not None and position >= previous:
                continue
            scanned[chain] = position
            if position >= unreached.get(chain, position + 1):
                continue  # known unreached, and so is everything reaching it
            links, target_seqs = self._index._reverse_links(chain)
            stop = len(links) if previous is None else bisect_left(target_seqs, previous)
            for i in range(stop - 1, bisect_left(target_seqs, position) - 1, -1):
                _, source_chain, source_seq = links[i]
                if self._covered(source_chain, source_seq):
                    self._reached[chain_id] = seq
                    return True
                stack.append((source_chain, source_seq))
        for chain, position in scanned.items():
            if position < unreached.get(chain, position + 1):
                unreached[chain] = position
        return False

    def highest_reached(self, chain_id: int, low: int, high: int) -> int:
        """The highest seq in (low, high] the common events reach, else ``low``."""
        if self.reaches(chain_id, high):
            return high
        while high - low > 1:
            middle = (low + high) // 2
            if self.reaches(chain_id, middle):
                low = middle
            else:
                high = middle
        return low
