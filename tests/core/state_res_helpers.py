"""Room DAGs for state resolution tests, as wire dicts for both implementations.

A ``RoomDag`` records events in the order they are made (a topological order)
and ``Branch``es: the state and tip of one fork. ``send`` selects auth events
from the branch's state and only keeps events that pass the auth rules against
them (unless ``check=False``), so state sets look like real servers' states.
Hashes are real content hashes; signatures are placeholders neither side
checks. ``pdus()`` wraps events with our ``Pdu``; ``synapse_events()`` with
Synapse's ``make_event_from_dict``; ``SynapseOracle`` runs Synapse's resolver.
"""

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from crypto.b64 import encode_base64
from crypto.hashes import add_content_hash
from homeserver.core.auth import AuthError, check_auth_rules
from homeserver.core.auth_events import select_auth_events
from homeserver.core.events import (
    CREATE,
    JOIN_RULES,
    MEMBER,
    POWER_LEVELS,
    Pdu,
    StateKey,
    reference_hash,
)
from homeserver.core.room_versions import get_room_version
from homeserver.core.state_res import ChainIndex, effective_auth_event_ids, index_event
from homeserver.core.state_res.naive import auth_chain, conflicted_subgraph

ALICE = "@alice:a.test"
BOB = "@bob:b.test"
CAROL = "@carol:c.test"
DAVE = "@dave:a.test"
EVE = "@eve:b.test"
USERS = (ALICE, BOB, CAROL, DAVE, EVE)

PL_KEY: StateKey = (POWER_LEVELS, "")
JR_KEY: StateKey = (JOIN_RULES, "")
_FAKE_SIGNATURE = encode_base64(bytes(64))
_BASE_TS = 1_700_000_000_000


def member_key(user: str) -> StateKey:
    return (MEMBER, user)


class Rejected(Exception):
    """``send`` made an event that fails the auth rules against its auth events."""


class Branch:
    def __init__(self, state: dict[StateKey, str], tips: list[str], depth: int) -> None:
        self.state = state
        self.tips = tips
        self.depth = depth

    def fork(self) -> "Branch":
        return Branch(dict(self.state), list(self.tips), self.depth)


class RoomDag:
    def __init__(
        self,
        version: str,
        creator: str = ALICE,
        *,
        additional_creators: Sequence[str] = (),
        power_users: Mapping[str, int] | None = None,
        join_rule: str = "public",
        members: Sequence[str] = (),
    ) -> None:
        """A room with create, the creator's join, power levels, join rules,
        and ``members`` joined; ``trunk`` is the branch after all that."""
        self.version = version
        self.room_version = get_room_version(version)
        self.events: dict[str, dict[str, Any]] = {}  # in creation order
        self.order: list[str] = []
        self._pdus: dict[str, Pdu] = {}
        self._ids = itertools.count(1)
        self._ts = itertools.count(_BASE_TS, 1000)
        self.room_id = f"!room:{creator.partition(':')[2]}"  # deterministic ids
        trunk = Branch({}, [], 0)
        create_content: dict[str, Any] = {"room_version": version}
        if not self.room_version.implicit_room_creator:
            create_content["creator"] = creator
        if additional_creators:
            create_content["additional_creators"] = list(additional_creators)
        self.create_id = self.send(trunk, CREATE, creator, create_content, state_key="")
        if self.room_version.room_id_is_create_event_hash:
            self.room_id = "!" + self.create_id[1:]
        self.join(trunk, creator)
        users = {creator: 100} if not self.room_version.creators_have_infinite_power else {}
        users.update(power_users or {})
        self.send(trunk, POWER_LEVELS, creator, {"users": users}, state_key="")
        self.send(trunk, JOIN_RULES, creator, {"join_rule": join_rule}, state_key="")
        for user in members:
            if join_rule != "public":
                self.send(trunk, MEMBER, creator, {"membership": "invite"}, state_key=user)
            self.join(trunk, user)
        self.trunk = trunk

    # --- events ---------------------------------------------------------------------
    def send(
        self,
        branch: Branch,
        event_type: str,
        sender: str,
        content: dict[str, Any],
        state_key: str | None = None,
        *,
        ts: int | None = None,
        check: bool = True,
        prev_events: list[str] | None = None,
    ) -> str:
        """Make an event on ``branch``, update the branch, return the event id."""
        rv = self.room_version
        auth_ids = select_auth_events(rv, event_type, sender, state_key, content, branch.state)
        prevs = list(branch.tips if prev_events is None else prev_events)
        data: dict[str, Any] = {
            "type": event_type,
            "sender": sender,
            "content": content,
            "depth": branch.depth + 1,
            "origin_server_ts": next(self._ts) if ts is None else ts,
            "prev_events": prevs,
            "auth_events": auth_ids,
        }
        if state_key is not None:
            data["state_key"] = state_key
        if not (event_type == CREATE and rv.room_id_is_create_event_hash):
            data["room_id"] = self.room_id
        if rv.event_id_in_pdu:
            data["event_id"] = f"${next(self._ids)}:{sender.partition(':')[2]}"
            data["prev_events"] = [[e, self._ref(e)] for e in prevs]
            data["auth_events"] = [[e, self._ref(e)] for e in auth_ids]
        data = add_content_hash(data)
        data["signatures"] = {sender.partition(":")[2]: {"ed25519:k": _FAKE_SIGNATURE}}
        pdu = Pdu.from_dict(data, rv)
        if check:
            self._check(pdu)
        self.events[pdu.event_id] = data
        self._pdus[pdu.event_id] = pdu
        self.order.append(pdu.event_id)
        if state_key is not None:
            branch.state[(event_type, state_key)] = pdu.event_id
        branch.tips = [pdu.event_id]
        branch.depth += 1
        return pdu.event_id

    def _ref(self, event_id: str) -> dict[str, str]:
        return {"sha256": encode_base64(reference_hash(self.events[event_id], self.room_version))}

    def _check(self, pdu: Pdu) -> None:
        auth = {}
        for auth_id in effective_auth_event_ids(pdu):
            auth_pdu = self.pdu(auth_id)
            auth[auth_pdu.state_tuple] = auth_pdu
        try:
            check_auth_rules(pdu, auth)
        except AuthError as e:
            raise Rejected(str(e)) from None

    def join(self, branch: Branch, user: str, **kwargs: Any) -> str:
        return self.send(branch, MEMBER, user, {"membership": "join"}, state_key=user, **kwargs)

    def power_levels(self, branch: Branch, sender: str, users: Mapping[str, int], **kw: Any) -> str:
        content = dict(self.pdu(branch.state[PL_KEY]).content)
        content["users"] = dict(users)
        return self.send(branch, POWER_LEVELS, sender, content, state_key="", **kw)

    def merge(self, branches: Sequence[Branch], state: Mapping[StateKey, str]) -> Branch:
        """A branch continuing from all ``branches`` with the resolved ``state``."""
        tips = [t for b in branches for t in b.tips]
        return Branch(dict(state), list(dict.fromkeys(tips)), max(b.depth for b in branches))

    # --- views ----------------------------------------------------------------------
    def pdu(self, event_id: str) -> Pdu:
        return self._pdus[event_id]

    def pdus(self) -> dict[str, Pdu]:
        return dict(self._pdus)

    def chain_index(self) -> ChainIndex:
        index = ChainIndex()
        for event_id in self.order:
            pdu = self.pdu(event_id)
            if pdu.is_state:
                index_event(index, pdu)
        return index

    def auth_graph(self) -> dict[str, tuple[str, ...]]:
        return {e: effective_auth_event_ids(p) for e, p in self.pdus().items()}

    def synapse_events(self) -> dict[str, Any]:
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
        from synapse.events import make_event_from_dict

        rv = KNOWN_ROOM_VERSIONS[self.version]
        return {e: make_event_from_dict(self.events[e], rv) for e in self.order}


# --- Synapse as an oracle -----------------------------------------------------------


def _run(coroutine: Any) -> Any:
    """Run a coroutine that never really waits, via a Twisted Deferred."""
    from twisted.internet import defer

    results: list[Any] = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    if not results:
        raise RuntimeError("the coroutine waited on something")
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


class _Clock:
    async def sleep(self, duration: Any) -> None:
        return None


class _Store:
    """Synapse's StateResolutionStore, in memory; the auth difference and the
    conflicted subgraph are Synapse's definitions, computed naively."""

    def __init__(self, events: Mapping[str, Any]) -> None:
        self.events = events
        self.graph = {e: tuple(ev.auth_event_ids()) for e, ev in events.items()}

    async def get_events(self, event_ids: Any, allow_rejected: bool = False) -> dict[str, Any]:
        return {e: self.events[e] for e in event_ids if e in self.events}

    async def get_auth_chain_difference(
        self,
        room_id: str,
        state_sets: list[set[str]],
        conflicted_state: set[str] | None,
        additional_backwards_reachable_conflicted_events: set[str] | None,
    ) -> Any:
        from synapse.storage.databases.main.event_federation import StateDifference

        chains = [set(s) | auth_chain(s, self.graph) for s in state_sets]
        difference = set.union(*chains) - set.intersection(*chains)
        subgraph = None
        if conflicted_state is not None:
            subgraph = conflicted_subgraph(conflicted_state, self.graph)
        return StateDifference(auth_difference=difference, conflicted_subgraph=subgraph)


async def _spec_power_event_closure(
    graph: dict[str, set[str]],
    room_id: str,
    event_id: str,
    event_map: dict[str, Any],
    store: Any,
    full_conflicted_set: set[str],
) -> None:
    """Stands in for synapse.state.v2._add_event_and_auth_chain_to_graph.

    Spec (rooms/fragments/v2-state-res.md, "Algorithm" step 1): "enlarge X by
    adding the events in the auth chain of P which also belong to the full
    conflicted set". Synapse only follows auth events that are themselves in
    the full conflicted set, so it misses a full-conflicted-set event reached
    through an unconflicted one (say a kick citing the kicker's unconflicted
    join, which cites a conflicted invite). This walks the whole auth chain;
    edges stay the direct auth events within the set, as in Synapse.
    """
    seen: set[str] = set()
    stack = [event_id]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        event = event_map.get(current) or (await store.get_events([current]))[current]
        if current in full_conflicted_set:
            graph.setdefault(current, set()).update(
                a for a in event.auth_event_ids() if a in full_conflicted_set
            )
        stack.extend(event.auth_event_ids())


class SynapseOracle:
    def __init__(self, dag: RoomDag) -> None:
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

        self.dag = dag
        self.room_version = KNOWN_ROOM_VERSIONS[dag.version]
        self.events = dag.synapse_events()

    def resolve(self, state_sets: Sequence[Mapping[StateKey, str]]) -> dict[StateKey, str]:
        import synapse.event_auth  # noqa: F401  (breaks an import cycle in synapse.state)
        from synapse.state import v1, v2

        sets = [dict(s) for s in state_sets]
        if self.dag.version == "1":

            async def factory(ids: Any) -> dict[str, Any]:
                return {e: self.events[e] for e in ids if e in self.events}

            coroutine = v1.resolve_events_with_store(
                self.dag.room_id, self.room_version, sets, None, factory
            )
            return dict(_run(coroutine))
        original = v2._add_event_and_auth_chain_to_graph
        v2._add_event_and_auth_chain_to_graph = _spec_power_event_closure
        try:
            coroutine = v2.resolve_events_with_store(
                _Clock(), self.dag.room_id, self.room_version, sets, None, _Store(self.events)
            )
            return dict(_run(coroutine))
        finally:
            v2._add_event_and_auth_chain_to_graph = original


# --- random rooms with real conflicts -----------------------------------------------

Resolve = Any  # Callable[[RoomDag, list[dict[StateKey, str]]], dict[StateKey, str]]


def _random_event(dag: RoomDag, branch: Branch, rng: Any) -> None:
    """Try random plausible state changes until one passes the auth rules."""
    for _ in range(30):
        sender, target = rng.choice(USERS), rng.choice(USERS)
        kind = rng.choice(
            ("power", "power", "ban", "kick", "join", "leave", "invite", "rules", "topic", "name")
        )
        ts = _BASE_TS + rng.randint(0, 40) * 1000 if rng.random() < 0.5 else None
        try:
            if kind == "power":
                if PL_KEY not in branch.state:
                    # A merge can resolve to a state without power levels: when
                    # every candidate fails the auth checks against the partial
                    # state (its sender left or was kicked there). Synapse
                    # resolves such sets the same way (seed 2056, room v10).
                    continue
                content = dict(dag.pdu(branch.state[PL_KEY]).content)
                users = dict(content.get("users", {}))
                users[target] = rng.choice((0, 50, 75, 100))
                if dag.room_version.creators_have_infinite_power and target in _creators(dag):
                    continue
                content["users"] = users
                if rng.random() < 0.3:
                    content["ban"] = rng.choice((50, 75))
                dag.send(branch, POWER_LEVELS, sender, content, state_key="", ts=ts)
            elif kind in ("ban", "kick", "invite"):
                membership = {"kick": "leave"}.get(kind, kind)
                dag.send(branch, MEMBER, sender, {"membership": membership}, target, ts=ts)
            elif kind in ("join", "leave"):
                dag.send(branch, MEMBER, sender, {"membership": kind}, sender, ts=ts)
            elif kind == "rules":
                rule = rng.choice(("public", "invite"))
                dag.send(branch, JOIN_RULES, sender, {"join_rule": rule}, state_key="", ts=ts)
            else:
                event_type = f"m.room.{kind}"
                dag.send(branch, event_type, sender, {kind: f"{kind} {rng.random()}"}, "", ts=ts)
            return
        except Rejected:
            continue


def _creators(dag: RoomDag) -> set[str]:
    create = dag.pdu(dag.create_id)
    return {create.sender, *create.content.get("additional_creators", ())}


def random_room(version: str, rng: Any) -> RoomDag:
    creators = {"additional_creators": [BOB]} if version == "12" and rng.random() < 0.5 else {}
    power = {u: rng.choice((0, 50, 100)) for u in (CAROL, DAVE) if rng.random() < 0.7}
    if not creators:
        power[BOB] = rng.choice((50, 100))
    dag = RoomDag(version, members=(BOB, CAROL, DAVE, EVE), power_users=power, **creators)
    for _ in range(rng.randint(0, 3)):
        _random_event(dag, dag.trunk, rng)
    return dag


def random_forks(dag: RoomDag, rng: Any, resolve: Resolve, depth: int = 2) -> Branch:
    """Fork the trunk into 2-3 branches of 1-4 events each; a branch may fork
    again (up to ``depth``) and be merged back with ``resolve``. Returns the
    merged branch; every merge goes through ``resolve``."""

    def grow(branch: Branch, level: int) -> Branch:
        for _ in range(rng.randint(1, 4)):
            _random_event(dag, branch, rng)
        if level < depth and rng.random() < 0.4:
            return fork_and_merge(branch, level + 1)
        return branch

    def fork_and_merge(start: Branch, level: int) -> Branch:
        branches = [grow(start.fork(), level) for _ in range(rng.randint(2, 3))]
        state = resolve(dag, [b.state for b in branches])
        merged = dag.merge(branches, state)
        _random_event(dag, merged, rng)
        return merged

    return fork_and_merge(dag.trunk, 1)
