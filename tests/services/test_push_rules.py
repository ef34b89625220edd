"""The push rule evaluator in process: the spec's conditions, glob semantics, the
server-default rules in their order, and what the defaults do with typical events."""

import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from homeserver.errors import MatrixError
from homeserver.services.push_rules import (
    EvalContext,
    check_actions,
    compile_condition,
    compile_ruleset,
    default_rules,
    glob_matches,
    ordered_ruleset,
    split_path,
)
from tests.support.homeserver import add_user, make_homeserver

ALICE = "@alice:example.org"
BOB = "@bob:example.org"


def event(type_: str = "m.room.message", content=None, **extra):
    return {
        "type": type_,
        "sender": BOB,
        "room_id": "!r:example.org",
        "content": {} if content is None else content,
        **extra,
    }


def ctx(ev, members=3, sender_power=0, notifications=None, names=None):
    return EvalContext(
        event=ev,
        member_count=members,
        sender_power=sender_power,
        notification_levels=notifications or {},
        display_names=names or {},
    )


def holds(condition, ev, user=ALICE, **kw):
    return compile_condition(condition).matches(ctx(ev, **kw), user)


def match(key, pattern):
    return {"kind": "event_match", "key": key, "pattern": pattern}


# --- event_match -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("Lunch plans", True),
        ("LUNCH", True),
        ("lunch", True),
        (" lunch", False),
        ("lunc", False),
        (None, False),
        (5, False),
    ],
)
def test_event_match_spec_example_whole_value(topic, expected):
    ev = event("m.room.topic", {"topic": topic}, state_key="")
    assert holds(match("content.topic", "lunc?*"), ev) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("An example event.", True),
        ("exple", True),  # at the start and end of the body
        ("An exciting triple-whammy", True),  # spans words; "-" separates words
        ("EXAMPLE", True),  # case-insensitive
        ("examples", False),  # must end at a word boundary
        ("counterexample", False),  # must start at a word boundary
        ("an_example", False),  # "_" is a word character
        ("ex ple", True),  # "*" matches any characters, spaces included
        ("exp", False),
    ],
)
def test_event_match_content_body_word_boundaries(body, expected):
    assert holds(match("content.body", "ex*ple"), event(content={"body": body})) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("cake", True),
        ("I like cake!", True),
        ("Cake.", True),
        ("(cake)", True),
        ("cakes", False),
        ("pancake", False),
        ("a_cake", False),
        ("cake2", False),
        ("caf\u00e9 cake", True),
        ("caf", False),
    ],
)
def test_content_body_literal_pattern(body, expected):
    assert holds(match("content.body", "cake"), event(content={"body": body})) is expected


def test_question_mark_matches_exactly_one_character():
    assert holds(match("content.body", "c?t"), event(content={"body": "a cat"}))
    assert not holds(match("content.body", "c?t"), event(content={"body": "a ct"}))
    assert not holds(match("content.body", "c?t"), event(content={"body": "a coat"}))


def test_regex_characters_in_patterns_are_literal():
    assert holds(match("content.body", "a.b"), event(content={"body": "x a.b y"}))
    assert not holds(match("content.body", "a.b"), event(content={"body": "x acb y"}))
    assert holds(match("type", "m.room.*"), event())
    assert not holds(match("type", "m(room)"), event())


def test_event_match_absent_or_not_string_never_matches_even_star():
    ev = event(content={"n": 1, "obj": {"a": "b"}})
    assert not holds(match("content.missing", "*"), ev)
    assert not holds(match("content.n", "*"), ev)
    assert not holds(match("content.obj", "*"), ev)
    assert not holds(match("state_key", "*"), ev)  # a message has no state_key
    assert holds(match("state_key", ""), event("m.room.tombstone", state_key=""))


def test_event_match_body_newlines():
    assert holds(match("content.body", "hello*world"), event(content={"body": "hello\nbig\nworld"}))


def test_glob_matches_helper():
    assert glob_matches("a*", "ABC")
    assert not glob_matches("a?", "abc")
    assert glob_matches("tea", "time for tea", word_boundary=True)


# --- dotted paths ----------------------------------------------------------------------
def test_split_path_escapes():
    assert split_path("content.body") == ("content", "body")
    assert split_path("content.m\\.relates_to.rel_type") == ("content", "m.relates_to", "rel_type")
    assert split_path("content.m\\\\foo") == ("content", "m\\foo")
    assert split_path("content.a\\xb") == ("content", "a\\xb")  # other escapes are literal


def test_escaped_dots_reach_dotted_keys():
    ev = event(content={"m.relates_to": {"rel_type": "m.replace"}, "m": {"relates_to": "no"}})
    cond = {
        "kind": "event_property_is",
        "key": "content.m\\.relates_to.rel_type",
        "value": "m.replace",
    }
    assert holds(cond, ev)
    assert not holds({**cond, "key": "content.m.relates_to.rel_type"}, ev)


# --- event_property_is / contains -------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        ("true", False),
        (1, False),
        (None, False),
    ],
)
def test_event_property_is_exact_types(value, expected):
    ev = event("m.room.create", {"m.federate": value}, state_key="")
    cond = {"kind": "event_property_is", "key": "content.m\\.federate", "value": True}
    assert holds(cond, ev) is expected


def test_event_property_is_null_integer_and_compound():
    ev = event(content={"a": None, "n": 5, "l": [1], "f": 1.5})
    assert holds({"kind": "event_property_is", "key": "content.a", "value": None}, ev)
    assert holds({"kind": "event_property_is", "key": "content.n", "value": 5}, ev)
    assert not holds({"kind": "event_property_is", "key": "content.n", "value": "5"}, ev)
    assert not holds({"kind": "event_property_is", "key": "content.l", "value": 1}, ev)
    assert not holds({"kind": "event_property_is", "key": "content.missing", "value": None}, ev)
    assert not holds({"kind": "event_property_is", "key": "content.f", "value": 1}, ev)


def test_event_property_contains():
    ev = event(
        "m.room.canonical_alias",
        {
            "alias": "#somewhere:localhost",
            "alt_aliases": ["#somewhere:example.org", "#myroom:example.com", {"x": 1}, True],
        },
        state_key="",
    )
    cond = {"kind": "event_property_contains", "key": "content.alt_aliases"}
    assert holds({**cond, "value": "#myroom:example.com"}, ev)
    assert not holds({**cond, "value": ":example.com"}, ev)  # partial values do not match
    assert holds({**cond, "value": True}, ev)
    assert not holds({**cond, "value": 1}, ev)
    assert not holds({**cond, "key": "content.alias", "value": "#somewhere:localhost"}, ev)


# --- room_member_count / sender_notification_permission / contains_display_name ------------
@pytest.mark.parametrize(
    ("is_", "members", "expected"),
    [
        ("2", 2, True),
        ("2", 3, False),
        ("==2", 2, True),
        ("<3", 2, True),
        ("<3", 3, False),
        (">3", 4, True),
        (">=3", 3, True),
        ("<=10", 11, False),
        ("abc", 2, False),
        ("=2", 2, False),
    ],
)
def test_room_member_count(is_, members, expected):
    assert holds({"kind": "room_member_count", "is": is_}, event(), members=members) is expected


def test_sender_notification_permission():
    cond = {"kind": "sender_notification_permission", "key": "room"}
    assert not holds(cond, event(), sender_power=0)
    assert holds(cond, event(), sender_power=50)  # the default level for "room" is 50
    assert holds(cond, event(), sender_power=10, notifications={"room": 10})
    assert not holds(cond, event(), sender_power=10, notifications={"room": 20})


def test_contains_display_name():
    cond = {"kind": "contains_display_name"}
    names = {ALICE: "Alice Liddell", BOB: "B*b"}
    assert holds(cond, event(content={"body": "hi alice liddell!"}), names=names)
    assert not holds(cond, event(content={"body": "hi alice"}), names=names)
    assert not holds(cond, event(content={"body": "hi alice liddells"}), names=names)
    assert holds(cond, event(content={"body": "hi B*b"}), user=BOB, names=names)
    assert not holds(cond, event(content={"body": "hi Bob"}), user=BOB, names=names)
    assert not holds(cond, event(content={"body": "hi"}), user="@nobody:x", names=names)


def test_unknown_or_malformed_conditions_never_match():
    assert not holds({"kind": "org.example.unknown"}, event())
    assert not holds({"kind": "event_match", "key": "type"}, event())  # no pattern
    assert not holds({"kind": "event_property_is", "key": "type", "value": ["x"]}, event())
    assert not holds({"kind": "room_member_count"}, event())
    rules = compile_ruleset(
        {
            "override": [
                {
                    "rule_id": "u",
                    "enabled": True,
                    "conditions": [{"kind": "nope"}],
                    "actions": ["notify"],
                }
            ]
        }
    )
    assert rules.evaluate(ctx(event()), ALICE) is None


# --- the server-default rules ------------------------------------------------------------
SPEC_OVERRIDE = [
    ".m.rule.master",
    ".m.rule.suppress_notices",
    ".m.rule.invite_for_me",
    ".m.rule.member_event",
    ".m.rule.is_user_mention",
    ".m.rule.is_room_mention",
    ".m.rule.tombstone",
    ".m.rule.reaction",
    ".m.rule.room.server_acl",
    ".m.rule.suppress_edits",
]
SPEC_UNDERRIDE = [
    ".m.rule.call",
    ".m.rule.encrypted_room_one_to_one",
    ".m.rule.room_one_to_one",
    ".m.rule.message",
    ".m.rule.encrypted",
]


def test_default_rules_in_spec_order():
    rules = default_rules(ALICE)
    assert [r["rule_id"] for r in rules["override"]] == SPEC_OVERRIDE
    assert [r["rule_id"] for r in rules["underride"]] == SPEC_UNDERRIDE
    assert rules["content"] == rules["room"] == rules["sender"] == []
    full = ordered_ruleset(ALICE, {}, {})
    master = full["override"][0]
    assert master == {
        "rule_id": ".m.rule.master",
        "default": True,
        "enabled": False,
        "conditions": [],
        "actions": [],
    }
    mention = next(r for r in full["override"] if r["rule_id"] == ".m.rule.is_user_mention")
    assert mention["conditions"] == [
        {"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids", "value": ALICE}
    ]
    invite = next(r for r in full["override"] if r["rule_id"] == ".m.rule.invite_for_me")
    assert {"key": "state_key", "kind": "event_match", "pattern": ALICE} in invite["conditions"]
    assert all(r["default"] and r["enabled"] for r in full["override"][1:] + full["underride"])


def outcome(ev, user=ALICE, members=3, sender_power=0, user_rules=None, changes=None):
    rules = compile_ruleset(ordered_ruleset(user, user_rules or {}, changes or {}))
    rule = rules.evaluate(ctx(ev, members=members, sender_power=sender_power), user)
    if rule is None:
        return None, False, False
    return rule.rule_id, rule.notify, rule.highlight


def test_defaults_on_typical_events():
    text = {"msgtype": "m.text", "body": "hello"}
    assert outcome(event(content=text)) == (".m.rule.message", True, False)
    assert outcome(event(content=text), members=2) == (".m.rule.room_one_to_one", True, False)
    assert outcome(event(content={"msgtype": "m.notice", "body": "bot"}), members=2) == (
        ".m.rule.suppress_notices",
        False,
        False,
    )
    mention = {**text, "m.mentions": {"user_ids": [ALICE]}}
    assert outcome(event(content=mention)) == (".m.rule.is_user_mention", True, True)
    assert outcome(event(content=mention), user="@carol:example.org") == (
        ".m.rule.message",
        True,
        False,
    )
    room_mention = {**text, "m.mentions": {"room": True}}
    assert outcome(event(content=room_mention), sender_power=50) == (
        ".m.rule.is_room_mention",
        True,
        True,
    )
    assert outcome(event(content=room_mention), sender_power=0) == (".m.rule.message", True, False)
    edit = {**text, "m.relates_to": {"rel_type": "m.replace", "event_id": "$x"}}
    assert outcome(event(content=edit))[0] == ".m.rule.suppress_edits"
    assert outcome(
        event(
            "m.reaction",
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$x", "key": "+"}},
        )
    )[1:] == (False, False)
    assert (
        outcome(event("m.room.encrypted", {"algorithm": "x"}), members=2)[0]
        == ".m.rule.encrypted_room_one_to_one"
    )
    assert outcome(event("m.room.encrypted", {"algorithm": "x"}))[0] == ".m.rule.encrypted"
    assert outcome(event("m.call.invite", {}))[0] == ".m.rule.call"
    assert outcome(event("m.room.tombstone", {"body": "moved"}, state_key="")) == (
        ".m.rule.tombstone",
        True,
        True,
    )
    invite = event("m.room.member", {"membership": "invite"}, state_key=ALICE)
    assert outcome(invite)[:2] == (".m.rule.invite_for_me", True)
    join = event("m.room.member", {"membership": "join"}, state_key=BOB)
    assert outcome(join) == (".m.rule.member_event", False, False)
    acl = event("m.room.server_acl", {"allow": ["*"]}, state_key="")
    assert outcome(acl) == (".m.rule.room.server_acl", False, False)
    assert outcome(event("m.room.topic", {"topic": "x"}, state_key="")) == (None, False, False)


def test_display_name_in_body_alone_no_longer_highlights():
    # Spec v1.17 removed .m.rule.contains_display_name: only m.mentions highlights.
    ev = event(content={"msgtype": "m.text", "body": "hi Alice"})
    rules = compile_ruleset(ordered_ruleset(ALICE, {}, {}))
    rule = rules.evaluate(ctx(ev, names={ALICE: "Alice"}), ALICE)
    assert (rule.rule_id, rule.highlight) == (".m.rule.message", False)


def test_master_rule_enabled_silences_everything():
    changes = {("override", ".m.rule.master"): (True, None)}
    mention = {"body": "x", "m.mentions": {"user_ids": [ALICE]}}
    assert outcome(event(content=mention), changes=changes) == (".m.rule.master", False, False)


def test_user_rules_before_defaults_master_first():
    user_rules = {
        "override": [
            {
                "rule_id": "mine",
                "enabled": True,
                "actions": ["notify"],
                "conditions": [match("content.body", "beer")],
            }
        ],
        "content": [
            {
                "rule_id": "cake",
                "enabled": True,
                "pattern": "cake",
                "actions": ["notify", {"set_tweak": "highlight"}],
            }
        ],
        "room": [{"rule_id": "!r:example.org", "enabled": True, "actions": []}],
    }
    full = ordered_ruleset(ALICE, user_rules, {})
    assert [r["rule_id"] for r in full["override"][:3]] == [
        ".m.rule.master",
        "mine",
        ".m.rule.suppress_notices",
    ]
    assert full["content"] == [
        {
            "rule_id": "cake",
            "default": False,
            "enabled": True,
            "pattern": "cake",
            "actions": ["notify", {"set_tweak": "highlight"}],
        }
    ]
    assert outcome(event(content={"body": "beer?"}), user_rules=user_rules)[0] == "mine"
    assert outcome(event(content={"body": "cake!"}), user_rules=user_rules) == ("cake", True, True)
    # The room rule (no actions) silences the room's other messages.
    assert outcome(event(content={"body": "hi"}), user_rules=user_rules) == (
        "!r:example.org",
        False,
        False,
    )
    assert (
        outcome(event(content={"body": "hi"}, room_id="!other:x"), user_rules=user_rules)[0]
        == ".m.rule.message"
    )


def test_disabled_rules_and_changed_default_actions():
    changes = {("underride", ".m.rule.message"): (False, None)}
    assert outcome(event(content={"body": "hi"}), changes=changes) == (None, False, False)
    changes = {("underride", ".m.rule.message"): (None, ["notify", {"set_tweak": "highlight"}])}
    assert outcome(event(content={"body": "hi"}), changes=changes) == (
        ".m.rule.message",
        True,
        True,
    )
    user_rules = {"sender": [{"rule_id": BOB, "enabled": False, "actions": []}]}
    assert outcome(event(content={"body": "hi"}), user_rules=user_rules)[0] == ".m.rule.message"


def test_actions_checked_and_historical_ones_stripped():
    assert check_actions(["dont_notify"]) == []
    assert check_actions(["notify", "coalesce", {"set_tweak": "sound", "value": "x"}]) == [
        "notify",
        {"set_tweak": "sound", "value": "x"},
    ]
    for bad in ("notify", ["explode"], [{"value": 1}], [3]):
        with pytest.raises(MatrixError) as e:
            check_actions(bad)
        assert e.value.errcode == "M_INVALID_PARAM"
    rules = compile_ruleset(
        {
            "underride": [
                {"rule_id": "x", "enabled": True, "conditions": [], "actions": ["dont_notify"]}
            ]
        }
    )
    rule = rules.evaluate(ctx(event()), ALICE)
    assert (rule.notify, rule.actions) == (False, ())


def test_highlight_value_false_does_not_highlight():
    rules = compile_ruleset(
        {
            "underride": [
                {
                    "rule_id": "x",
                    "enabled": True,
                    "conditions": [],
                    "actions": ["notify", {"set_tweak": "highlight", "value": False}],
                }
            ]
        }
    )
    assert not rules.evaluate(ctx(event()), ALICE).highlight


def test_user_independent_conditions_are_checked_once_per_event():
    calls = []
    cond = compile_condition(match("type", "m.room.message"))
    original = cond.check
    cond.check = lambda c, u: calls.append(u) or original(c, u)  # type: ignore[method-assign]
    try:
        shared = ctx(event(content={"body": "hi"}))
        for user in (ALICE, BOB, "@carol:example.org"):
            compile_ruleset(ordered_ruleset(user, {}, {})).evaluate(shared, user)
        assert len(calls) == 1
    finally:
        del cond.check


# --- PushService and ReceiptsService in process (SQLite) ---------------------------------------
class _InProcess(unittest.TestCase):
    def setUp(self):
        self.stack = ExitStack()
        self.directory = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        self.hs = make_homeserver(self.stack, self.directory, "sqlite3")

    def tearDown(self):
        d = defer.ensureDeferred(self.hs.database.close())
        d.addBoth(lambda r: (self.stack.close(), r)[1])
        return d

    async def _room(self):
        alice = await add_user(self.hs, "alice")
        bob = await add_user(self.hs, "bob")
        carol = await add_user(self.hs, "carol")
        room_id = await self.hs.room_creator.create_room(
            alice, {"preset": "public_chat", "invite": [bob, carol]}
        )
        await self.hs.membership.join(bob, room_id)
        await self.hs.membership.join(carol, room_id)
        return alice, bob, carol, room_id

    async def _say(self, sender, room_id, body, **extra):
        pdu = await self.hs.room_sender.send(
            sender, room_id, "m.room.message", {"msgtype": "m.text", "body": body, **extra}
        )
        # Counts are announced right after the sender's response, in the same
        # reactor turn; a client's next request comes in a later one.
        await deferLater(reactor, 0, lambda: None)
        return pdu.event_id


class PushServiceTests(_InProcess):
    """Counts straight from the services: main-timeline only counts, survival of a
    restart, and events landing while a user's counts load."""

    def test_thread_counts_and_restart(self):
        async def go():
            alice, bob, carol, room_id = await self._room()
            root = await self._say(bob, room_id, "root")
            thread = {"m.relates_to": {"rel_type": "m.thread", "event_id": root}}
            await self._say(bob, room_id, "t1", **thread)
            # A reaction to a thread event is in the thread (and does not notify).
            last = await self._say(bob, room_id, "t2", **thread)
            await self.hs.room_sender.send(
                bob,
                room_id,
                "m.reaction",
                {"m.relates_to": {"rel_type": "m.annotation", "event_id": last, "key": "x"}},
            )
            await self._say(bob, room_id, "@alice", **{"m.mentions": {"user_ids": [alice]}})
            push = self.hs.push
            counts = await push.unread_counts(alice, room_id, thread_counts=True)
            self.assertEqual(
                counts,
                {
                    "unread_notifications": {"notification_count": 2, "highlight_count": 1},
                    "unread_thread_notifications": {
                        root: {"notification_count": 2, "highlight_count": 0}
                    },
                },
            )
            total = await push.unread_counts(alice, room_id)
            self.assertEqual(
                total["unread_notifications"], {"notification_count": 4, "highlight_count": 1}
            )
            await self.hs.receipts.send_receipt(carol, room_id, "m.read", last, root)
            await push.flushed()

            # A new server on the same database: counts and receipts are durable.
            restarted = make_homeserver(self.stack, self.directory, "sqlite3")
            again = await restarted.push.unread_counts(alice, room_id, thread_counts=True)
            self.assertEqual(again, counts)
            carol_counts = await restarted.push.unread_counts(carol, room_id, thread_counts=True)
            self.assertEqual(carol_counts["unread_thread_notifications"], {})
            self.assertEqual(carol_counts["unread_notifications"]["notification_count"], 2)
            event = await restarted.receipts.receipt_event(
                alice, room_id, None, restarted.receipts.position
            )
            self.assertEqual(event["content"][last]["m.read"][carol]["thread_id"], root)
            await restarted.database.close()

        return defer.ensureDeferred(go())

    def test_events_landing_while_counts_load_are_counted(self):
        async def go():
            alice, bob, carol, room_id = await self._room()
            await self._say(bob, room_id, "before")
            await self.hs.push.flushed()
            # Alice's counts are not loaded yet: load them while more events land.
            loading = defer.ensureDeferred(self.hs.push.unread_counts(alice, room_id))
            sends = [defer.ensureDeferred(self._say(bob, room_id, f"m{i}")) for i in range(5)]
            await defer.gatherResults(sends)
            await loading
            counts = await self.hs.push.unread_counts(alice, room_id)
            self.assertEqual(counts["unread_notifications"]["notification_count"], 6)
            # Sending reads: alice's own message clears her main timeline.
            await self._say(alice, room_id, "caught up")
            counts = await self.hs.push.unread_counts(alice, room_id)
            self.assertEqual(counts["unread_notifications"]["notification_count"], 0)

        return defer.ensureDeferred(go())


def test_shared_default_ruleset_behaves_like_the_users_own():
    from homeserver.services.push_rules import compile_default_ruleset

    events = [
        event(content={"body": "x", "m.mentions": {"user_ids": [ALICE, 3]}}),
        event(content={"body": "x", "m.mentions": {"user_ids": "not a list"}}),
        event(content={"body": "x", "m.mentions": {"room": True}}),
        event("m.room.member", {"membership": "invite"}, state_key=ALICE),
        event("m.room.member", {"membership": "invite"}, state_key=ALICE.upper()),
        event("m.room.member", {"membership": "invite"}, state_key=BOB),
        event("m.room.member", {"membership": "join"}, state_key=ALICE),
        event(content={"msgtype": "m.notice", "body": "n"}),
        event("m.room.encrypted", {}),
    ]
    assert compile_default_ruleset(ALICE) is compile_default_ruleset(BOB)
    for ev in events:
        for members in (2, 5):
            shared = ctx(ev, members=members, sender_power=100)
            for user in (ALICE, BOB, "@carol:example.org"):
                own = compile_ruleset(ordered_ruleset(user, {}, {})).evaluate(
                    ctx(ev, members=members, sender_power=100), user
                )
                got = compile_default_ruleset(user).evaluate(shared, user)
                assert (got and got.rule_id, got and got.actions) == (
                    own and own.rule_id,
                    own and own.actions,
                ), (ev, user)


class PushFlushTests(_InProcess):
    def test_rows_of_a_burst_are_written_by_the_timer_once_started(self):
        async def go():
            from twisted.internet import reactor, task

            alice, bob, carol, room_id = await self._room()
            push = self.hs.push
            await push.flushed()  # the invites' rows
            writes = []
            original = push.store.write_notifications

            async def counting(rows, marks):
                writes.append(len(rows))
                await original(rows, marks)

            push.store.write_notifications = counting
            push.start()
            try:
                sent = [await self._say(bob, room_id, f"m{i}") for i in range(5)]
                await task.deferLater(reactor, 0.6, lambda: None)
                # Every row is written without anyone asking, in fewer transactions than
                # events (the first at once, the rest of the burst together).
                self.assertEqual(sum(writes), 10)
                self.assertLessEqual(len(writes), 5)
                marks = ",".join("?" * len(sent))
                rows = await self.hs.database.select(
                    "n",
                    f"SELECT COUNT(*) FROM event_push_actions WHERE event_id IN ({marks})",
                    sent,
                )
                self.assertEqual(rows[0][0], 10)
            finally:
                push.stop()

        return defer.ensureDeferred(go())


def test_evaluating_many_users_at_once_matches_one_at_a_time():
    """The shared rule set evaluated for many users gives each the rule it would alone."""
    from homeserver.services.push_rules import compile_default_ruleset

    users = [ALICE, BOB, "@carol:example.org", "@dave:example.org"]
    events = [
        event(content={"body": "x"}),
        event(content={"body": "x", "m.mentions": {"user_ids": [BOB, "@dave:example.org"]}}),
        event(content={"body": "hi @room", "m.mentions": {"room": True}}),
        event("m.room.member", {"membership": "invite"}, state_key=BOB),
        event(content={"msgtype": "m.notice", "body": "n"}),
        event("m.room.encrypted", {}),
        event("m.reaction", {}),
    ]
    shared = compile_default_ruleset(ALICE)
    for ev in events:
        for members in (2, 5):
            alone = {}
            for user in users:
                rule = shared.evaluate(ctx(ev, members=members, sender_power=100), user)
                if rule is not None:
                    alone[user] = rule.rule_id
            together = shared.evaluate_many(ctx(ev, members=members, sender_power=100), users)
            assert {u: r.rule_id for u, r in together.items()} == alone, (ev, members)
