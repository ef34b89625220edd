"""Push rules: the server-default rule set, and a compiled evaluator.

A user's rule set is the spec's five kinds, each an ordered list: override,
content, room, sender, underride. User-defined rules come before the
server-default rules of their kind, except ``.m.rule.master``, which comes
before everything. The first enabled rule whose conditions all hold decides
the actions.

Rules are compiled once per user (patterns into regexes, dotted paths into
tuples). Conditions that do not depend on the user are interned, so one event
evaluated for every member of a room checks each of them once (``EvalContext``
memoises results per event).
"""

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from homeserver.errors import MatrixError

KINDS = ("override", "content", "room", "sender", "underride")
MAIN = "main"
MAX_SAFE_INT = 2**53 - 1

# --- server-default rules (spec v1.19 "Predefined Rules", in order) ----------------------
_SOUND_DEFAULT = {"set_tweak": "sound", "value": "default"}
_HIGHLIGHT = {"set_tweak": "highlight"}


def _match(key: str, pattern: str) -> dict[str, Any]:
    return {"kind": "event_match", "key": key, "pattern": pattern}


def default_override_rules(user_id: str) -> list[dict[str, Any]]:
    return [
        {"rule_id": ".m.rule.master", "conditions": [], "actions": [], "enabled": False},
        {
            "rule_id": ".m.rule.suppress_notices",
            "conditions": [_match("content.msgtype", "m.notice")],
            "actions": [],
        },
        {
            "rule_id": ".m.rule.invite_for_me",
            "conditions": [
                _match("type", "m.room.member"),
                _match("content.membership", "invite"),
                _match("state_key", user_id),
            ],
            "actions": ["notify", _SOUND_DEFAULT],
        },
        {
            "rule_id": ".m.rule.member_event",
            "conditions": [_match("type", "m.room.member")],
            "actions": [],
        },
        {
            "rule_id": ".m.rule.is_user_mention",
            "conditions": [
                {
                    "kind": "event_property_contains",
                    "key": "content.m\\.mentions.user_ids",
                    "value": user_id,
                }
            ],
            "actions": ["notify", _SOUND_DEFAULT, _HIGHLIGHT],
        },
        {
            "rule_id": ".m.rule.is_room_mention",
            "conditions": [
                {"kind": "event_property_is", "key": "content.m\\.mentions.room", "value": True},
                {"kind": "sender_notification_permission", "key": "room"},
            ],
            "actions": ["notify", _HIGHLIGHT],
        },
        {
            "rule_id": ".m.rule.tombstone",
            "conditions": [_match("type", "m.room.tombstone"), _match("state_key", "")],
            "actions": ["notify", _HIGHLIGHT],
        },
        {
            "rule_id": ".m.rule.reaction",
            "conditions": [_match("type", "m.reaction")],
            "actions": [],
        },
        {
            "rule_id": ".m.rule.room.server_acl",
            "conditions": [_match("type", "m.room.server_acl"), _match("state_key", "")],
            "actions": [],
        },
        {
            "rule_id": ".m.rule.suppress_edits",
            "conditions": [
                {
                    "kind": "event_property_is",
                    "key": "content.m\\.relates_to.rel_type",
                    "value": "m.replace",
                }
            ],
            "actions": [],
        },
    ]


def default_underride_rules() -> list[dict[str, Any]]:
    one_to_one = {"kind": "room_member_count", "is": "2"}
    return [
        {
            "rule_id": ".m.rule.call",
            "conditions": [_match("type", "m.call.invite")],
            "actions": ["notify", {"set_tweak": "sound", "value": "ring"}],
        },
        {
            "rule_id": ".m.rule.encrypted_room_one_to_one",
            "conditions": [one_to_one, _match("type", "m.room.encrypted")],
            "actions": ["notify", _SOUND_DEFAULT],
        },
        {
            "rule_id": ".m.rule.room_one_to_one",
            "conditions": [one_to_one, _match("type", "m.room.message")],
            "actions": ["notify", _SOUND_DEFAULT],
        },
        {
            "rule_id": ".m.rule.message",
            "conditions": [_match("type", "m.room.message")],
            "actions": ["notify"],
        },
        {
            "rule_id": ".m.rule.encrypted",
            "conditions": [_match("type", "m.room.encrypted")],
            "actions": ["notify"],
        },
    ]


def default_rules(user_id: str) -> dict[str, list[dict[str, Any]]]:
    """kind -> the server-default rules of that kind for ``user_id`` (fresh copies)."""
    return {
        "override": default_override_rules(user_id),
        "content": [],
        "room": [],
        "sender": [],
        "underride": default_underride_rules(),
    }


MASTER_RULE = ".m.rule.master"


# --- actions -------------------------------------------------------------------------------
HISTORICAL_ACTIONS = ("dont_notify", "coalesce")


def normalize_actions(actions: Iterable[Any]) -> list[Any]:
    """The actions with the historical ``dont_notify`` / ``coalesce`` stripped."""
    return [a for a in actions if a not in HISTORICAL_ACTIONS]


def check_actions(actions: Any) -> list[Any]:
    """Validated, normalised actions from a client, or 400 M_INVALID_PARAM."""
    if not isinstance(actions, list):
        raise MatrixError("M_INVALID_PARAM", "actions must be a list")
    for action in actions:
        if isinstance(action, str):
            if action != "notify" and action not in HISTORICAL_ACTIONS:
                raise MatrixError("M_INVALID_PARAM", f"Unrecognised action {action!r}")
        elif isinstance(action, dict):
            if not isinstance(action.get("set_tweak"), str):
                raise MatrixError("M_INVALID_PARAM", "An action object needs a set_tweak string")
        else:
            raise MatrixError("M_INVALID_PARAM", "Actions are strings or objects")
    return normalize_actions(actions)


def actions_notify(actions: Iterable[Any]) -> bool:
    return "notify" in actions


def actions_highlight(actions: Iterable[Any]) -> bool:
    for action in actions:
        if isinstance(action, dict) and action.get("set_tweak") == "highlight":
            return action.get("value", True) is True
    return False


# --- glob patterns and dotted paths ------------------------------------------------------------
_WORD = "A-Za-z0-9_"


def glob_to_regex(pattern: str, word_boundary: bool = False) -> re.Pattern[str]:
    """A case-insensitive regex for a glob: ``*`` any run of characters, ``?`` one.

    Without ``word_boundary`` the glob must match the whole value; with it, any
    substring that starts and ends at a word boundary (start or end of the value,
    or a character outside ``[A-Za-z0-9_]``), as for ``content.body``.
    """
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    body = "".join(parts)
    if word_boundary:
        body = f"(?<![{_WORD}])(?:{body})(?![{_WORD}])"
    else:
        body = f"(?:{body})\\Z"
    return re.compile(body, re.IGNORECASE | re.DOTALL)


@functools.lru_cache(maxsize=4096)
def _cached_glob(pattern: str, word_boundary: bool) -> re.Pattern[str]:
    return glob_to_regex(pattern, word_boundary)


def glob_matches(pattern: str, value: str, word_boundary: bool = False) -> bool:
    regex = _cached_glob(pattern, word_boundary)
    return (regex.search(value) if word_boundary else regex.match(value)) is not None


def split_path(key: str) -> tuple[str, ...]:
    """A dot-separated property path: ``\\.`` is a literal dot, ``\\\\`` a backslash."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(key):
        ch = key[i]
        if ch == "\\" and i + 1 < len(key) and key[i + 1] in ".\\":
            current.append(key[i + 1])
            i += 2
            continue
        if ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return tuple(parts)


_MISSING = object()


def resolve_path(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = data
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _is_scalar(value: Any) -> bool:
    if value is None or isinstance(value, str | bool):
        return True
    return type(value) is int and -MAX_SAFE_INT <= value <= MAX_SAFE_INT


def _same_scalar(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


# --- evaluation context --------------------------------------------------------------------------
@attrs.define(slots=True)
class EvalContext:
    """One event in its room, evaluated for any number of users."""

    event: Mapping[str, Any]  # the event as a dict (type, sender, state_key, content, ...)
    member_count: int  # joined members of the room
    sender_power: int = 0  # the sender's power level
    notification_levels: Mapping[str, Any] = attrs.Factory(dict)  # power_levels.notifications
    display_names: Mapping[str, str] = attrs.Factory(dict)  # user -> display name in the room
    memo: dict[Any, Any] = attrs.Factory(dict)  # per-condition results for this event


# --- conditions ----------------------------------------------------------------------------------
class Condition:
    """A compiled condition; ``matches`` memoises its result per event."""

    user_dependent = False

    def matches(self, ctx: EvalContext, user_id: str) -> bool:
        memo = ctx.memo
        result = memo.get(self)
        if result is None:
            result = memo[self] = self.check(ctx, user_id)
        return result

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        raise NotImplementedError


class Never(Condition):
    """An unrecognised or malformed condition: never matches."""

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        return False


class EventMatch(Condition):
    def __init__(self, key: str, pattern: str) -> None:
        self.path = split_path(key)
        self.word_boundary = key == "content.body"
        self.pattern = pattern
        self._regex: re.Pattern[str] | None = None  # compiled on first use
        # A pattern without wildcards on a plain key is an exact, case-insensitive compare
        # (no regex to compile: most conditions, and the per-user ones, are like that).
        self.literal = (
            None if ("*" in pattern or "?" in pattern or self.word_boundary) else pattern.lower()
        )

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        value = resolve_path(ctx.event, self.path)
        if not isinstance(value, str):
            return False
        if self.literal is not None:
            return value.lower() == self.literal
        regex = self._regex
        if regex is None:
            regex = self._regex = glob_to_regex(self.pattern, self.word_boundary)
        found = regex.search(value) if self.word_boundary else regex.match(value)
        return found is not None


class PropertyIs(Condition):
    def __init__(self, key: str, value: Any) -> None:
        self.path = split_path(key)
        self.value = value

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        found = resolve_path(ctx.event, self.path)
        return found is not _MISSING and _is_scalar(found) and _same_scalar(found, self.value)


class PropertyContains(Condition):
    def __init__(self, key: str, value: Any) -> None:
        self.path = split_path(key)
        self.value = value

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        found = resolve_path(ctx.event, self.path)
        if not isinstance(found, list):
            return False
        return any(_is_scalar(v) and _same_scalar(v, self.value) for v in found)


_MEMBER_COUNT = re.compile(r"^(==|<=|>=|<|>)?([0-9]+)$")
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "==": lambda a, b: a == b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


class RoomMemberCount(Condition):
    def __init__(self, op: str, number: int) -> None:
        self.compare = _COMPARE[op]
        self.number = number

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        return self.compare(ctx.member_count, self.number)


class SenderNotificationPermission(Condition):
    def __init__(self, key: str) -> None:
        self.key = key

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        required: Any = ctx.notification_levels.get(self.key, 50)
        if isinstance(required, str):
            try:
                required = int(required.strip())
            except ValueError:
                required = 50
        elif type(required) is not int:
            required = 50
        return ctx.sender_power >= required


class ContainsDisplayName(Condition):
    user_dependent = True

    def matches(self, ctx: EvalContext, user_id: str) -> bool:
        return self.check(ctx, user_id)

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        name = ctx.display_names.get(user_id)
        content = ctx.event.get("content")
        body = content.get("body") if isinstance(content, dict) else None
        if not name or not isinstance(body, str):
            return False
        # The name is matched literally (a "*" in it is not a wildcard), at word boundaries.
        return _literal_word_match(name, body)


@functools.lru_cache(maxsize=4096)
def _literal_word_regex(text: str) -> re.Pattern[str]:
    return re.compile(f"(?<![{_WORD}]){re.escape(text)}(?![{_WORD}])", re.IGNORECASE)


def _literal_word_match(text: str, body: str) -> bool:
    return _literal_word_regex(text).search(body) is not None


class SameString(Condition):
    """The predefined condition of room and sender rules: an exact property value."""

    def __init__(self, key: str, value: str) -> None:
        self.key = key
        self.value = value

    def check(self, ctx: EvalContext, user_id: str) -> bool:
        return ctx.event.get(self.key) == self.value


# Interned compiled conditions, by their canonical JSON: rules of different users
# share a condition object, so an event checks it once for all of them.
_interned: dict[Any, Condition] = {}
MAX_INTERNED = 100_000


def _compile_condition_uncached(cond: Any) -> Condition:
    if not isinstance(cond, dict):
        return Never()
    kind = cond.get("kind")
    key = cond.get("key")
    if kind == "event_match":
        pattern = cond.get("pattern")
        if isinstance(key, str) and isinstance(pattern, str):
            return EventMatch(key, pattern)
    elif kind == "event_property_is":
        if isinstance(key, str) and "value" in cond and _is_scalar(cond["value"]):
            return PropertyIs(key, cond["value"])
    elif kind == "event_property_contains":
        if isinstance(key, str) and "value" in cond and _is_scalar(cond["value"]):
            return PropertyContains(key, cond["value"])
    elif kind == "room_member_count":
        m = _MEMBER_COUNT.match(cond.get("is") or "") if isinstance(cond.get("is"), str) else None
        if m:
            return RoomMemberCount(m.group(1) or "==", int(m.group(2)))
    elif kind == "sender_notification_permission":
        if isinstance(key, str):
            return SenderNotificationPermission(key)
    elif kind == "contains_display_name":
        return ContainsDisplayName()
    return Never()


def _intern_key(cond: Any) -> Any:
    """A hashable key equal for equal conditions (True and 1 stay apart)."""
    if isinstance(cond, dict) and all(_is_scalar(v) for v in cond.values()):
        return tuple(sorted((k, type(v).__name__, v) for k, v in cond.items()))
    try:
        return json.dumps(cond, sort_keys=True)
    except (TypeError, ValueError):
        return None


def compile_condition(cond: Any) -> Condition:
    key = _intern_key(cond)
    if key is None:
        return Never()
    compiled = _interned.get(key)
    if compiled is None:
        compiled = _compile_condition_uncached(cond)
        if len(_interned) >= MAX_INTERNED:
            _interned.clear()
        _interned[key] = compiled
    return compiled


# --- rule sets ---------------------------------------------------------------------------------
@attrs.frozen
class CompiledRule:
    kind: str
    rule_id: str
    conditions: tuple[Condition, ...]
    actions: tuple[Any, ...]
    notify: bool
    highlight: bool
    actions_json: str  # the actions as stored with each notification


def rule_conditions(kind: str, rule: Mapping[str, Any]) -> list[Any]:
    """The conditions a rule of ``kind`` stands for, in JSON."""
    if kind in ("override", "underride"):
        conditions = rule.get("conditions")
        return conditions if isinstance(conditions, list) else []
    if kind == "content":
        return [_match("content.body", rule.get("pattern") or "")]
    return []


def compile_rule(kind: str, rule: Mapping[str, Any]) -> CompiledRule:
    rule_id = rule["rule_id"]
    if kind == "room":
        conditions: tuple[Condition, ...] = (SameString("room_id", rule_id),)
    elif kind == "sender":
        conditions = (SameString("sender", rule_id),)
    else:
        conditions = tuple(compile_condition(c) for c in rule_conditions(kind, rule))
    actions = tuple(normalize_actions(rule.get("actions") or []))
    return CompiledRule(
        kind,
        rule_id,
        conditions,
        actions,
        actions_notify(actions),
        actions_highlight(actions),
        json.dumps(list(actions), ensure_ascii=False, separators=(",", ":")),
    )


@attrs.frozen(eq=False)  # hashed by identity: a key of per-event memos
class CompiledRuleSet:
    rules: tuple[CompiledRule, ...]  # enabled rules only, in evaluation order

    def candidates(self, ctx: EvalContext) -> tuple[CompiledRule, ...]:
        """The rules that can still match this event for some user, once per event.

        A rule drops out when a condition that does not depend on the user fails; the
        list ends at the first rule without user-dependent conditions that matches,
        since it matches for everyone.
        """
        found = ctx.memo.get(self)
        if found is None:
            kept = []
            for rule in self.rules:
                depends = False
                for cond in rule.conditions:
                    if cond.user_dependent:
                        depends = True
                    elif not cond.matches(ctx, ""):
                        break
                else:
                    kept.append(rule)
                    if not depends:
                        break
            found = ctx.memo[self] = tuple(kept)
        return found

    def evaluate(self, ctx: EvalContext, user_id: str) -> CompiledRule | None:
        """The first enabled rule that matches, or None."""
        for rule in self.candidates(ctx):
            for cond in rule.conditions:
                if cond.user_dependent and not cond.matches(ctx, user_id):
                    break
            else:
                return rule
        return None

    def evaluate_many(self, ctx: EvalContext, user_ids: list[str]) -> dict[str, CompiledRule]:
        """``evaluate`` for many users of this rule set at once: user -> the first
        rule that matches (users matching none are left out)."""
        found: dict[str, CompiledRule] = {}
        remaining = user_ids
        for rule in self.candidates(ctx):
            dependent = [cond for cond in rule.conditions if cond.user_dependent]
            if not dependent:  # matches everyone still unmatched
                for user_id in remaining:
                    found[user_id] = rule
                return found
            unmatched = []
            for user_id in remaining:
                for cond in dependent:
                    if not cond.matches(ctx, user_id):
                        unmatched.append(user_id)
                        break
                else:
                    found[user_id] = rule
            remaining = unmatched
            if not remaining:
                break
        return found


def ordered_ruleset(
    user_id: str,
    user_rules: Mapping[str, list[Mapping[str, Any]]],
    default_changes: Mapping[tuple[str, str], tuple[bool | None, list[Any] | None]],
) -> dict[str, list[dict[str, Any]]]:
    """The user's whole rule set in the API's shape, every rule in evaluation order.

    ``user_rules``: kind -> rules the user defined (``rule_id``, ``actions``,
    ``enabled``, ``conditions`` / ``pattern``), most important first.
    ``default_changes``: (kind, rule_id) -> (enabled, actions) set on server-default rules.
    """
    defaults = default_rules(user_id)
    result: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        rules: list[dict[str, Any]] = []
        for rule in user_rules.get(kind, []):
            entry: dict[str, Any] = {
                "rule_id": rule["rule_id"],
                "default": False,
                "enabled": bool(rule.get("enabled", True)),
                "actions": list(rule["actions"]),
            }
            if kind in ("override", "underride"):
                entry["conditions"] = list(rule.get("conditions") or [])
            elif kind == "content":
                entry["pattern"] = rule.get("pattern") or ""
            rules.append(entry)
        builtin = []
        for rule in defaults[kind]:
            enabled, actions = default_changes.get((kind, rule["rule_id"]), (None, None))
            entry = {
                "rule_id": rule["rule_id"],
                "default": True,
                "enabled": rule.get("enabled", True) if enabled is None else enabled,
                "actions": rule["actions"] if actions is None else list(actions),
            }
            if kind in ("override", "underride"):
                entry["conditions"] = rule["conditions"]
            elif kind == "content":
                entry["pattern"] = rule["pattern"]
            builtin.append(entry)
        if kind == "override" and builtin and builtin[0]["rule_id"] == MASTER_RULE:
            # The master rule always comes first, even before user-defined overrides.
            rules.insert(0, builtin.pop(0))
        result[kind] = rules + builtin
    return result


def compile_ruleset(ruleset: Mapping[str, list[Mapping[str, Any]]]) -> CompiledRuleSet:
    compiled = []
    for kind in KINDS:
        for rule in ruleset.get(kind, []):
            if rule.get("enabled", True):
                compiled.append(compile_rule(kind, rule))
    return CompiledRuleSet(tuple(compiled))


# Server-default rules that name their user. For users who changed nothing they are
# compiled once with conditions that read the user from the evaluation, so every such
# user shares one compiled rule set.
USER_SPECIFIC_DEFAULTS = frozenset({".m.rule.invite_for_me", ".m.rule.is_user_mention"})
_PLACEHOLDER = "@\x00:\x00"
_MENTIONS_PATH = split_path("content.m\\.mentions.user_ids")


class StateKeyIsUser(Condition):
    """``event_match`` of ``state_key`` against the user's own id (case-insensitive)."""

    user_dependent = True

    def matches(self, ctx: EvalContext, user_id: str) -> bool:
        state_key = ctx.event.get("state_key")
        return isinstance(state_key, str) and state_key.lower() == user_id.lower()


class MentionsUser(Condition):
    """``event_property_contains`` of the user's id in ``content.m.mentions.user_ids``."""

    user_dependent = True

    def matches(self, ctx: EvalContext, user_id: str) -> bool:
        mentioned = ctx.memo.get(self)
        if mentioned is None:
            found = resolve_path(ctx.event, _MENTIONS_PATH)
            ids = found if isinstance(found, list) else ()
            mentioned = ctx.memo[self] = frozenset(v for v in ids if isinstance(v, str))
        return user_id in mentioned


@functools.cache
def _shared_default_ruleset() -> CompiledRuleSet:
    rules = []
    for rule in compile_ruleset(ordered_ruleset(_PLACEHOLDER, {}, {})).rules:
        if rule.rule_id == ".m.rule.invite_for_me":
            rule = attrs.evolve(rule, conditions=rule.conditions[:2] + (StateKeyIsUser(),))
        elif rule.rule_id == ".m.rule.is_user_mention":
            rule = attrs.evolve(rule, conditions=(MentionsUser(),))
        rules.append(rule)
    return CompiledRuleSet(tuple(rules))


def compile_default_ruleset(user_id: str) -> CompiledRuleSet:
    """The compiled rule set of a user who changed nothing (the same for everyone)."""
    return _shared_default_ruleset()
