"""Inbound PDUs in process: transactions from a fake remote server "remote.test"
(tests/federation/remote_server.py) through the receipt checks (format,
signatures, hashes, auth, soft fail), forks and state resolution, missing
events, and backfill; asserting what a local client sees (/sync, /messages)
and the /send answers. Rooms 10, 11 and 12.
"""


from twisted.internet import defer
from twisted.trial import unittest

from crypto.keys import generate_signing_key
from homeserver.core.auth_events import select_auth_events
from homeserver.core.builder import build_event
from homeserver.core.events import CREATE, MEMBER, Pdu, compute_event_id
from homeserver.services.rooms.dag import RoomDag
from tests.federation.remote_server import (
    BOB,
    CAROL,
    MESSAGE,
    NAME,
    POWER,
    REMOTE,
    RemoteServerFixture,
    text,
)


class InboundEventsTestsMixin(RemoteServerFixture):
    # --- 2. a message in a transaction ---------------------------------------------------
    def test_message_delivered_once(self):
        async def go():
            room_id = await self.room_with_bob()
            token = (await self.sync())["next_batch"]
            msg = await self.build(room_id, MESSAGE, BOB, text("hello"))
            answer = await self.put_txn([msg.to_federation_json()], "txn1")
            self.assertEqual(answer, {"pdus": {msg.event_id: {}}})
            body = await self.sync(token)
            self.assertEqual(self.timeline_ids(body, room_id), [msg.event_id])
            self.assertEqual(self.timeline(body, room_id)[0]["content"], text("hello"))
            # A retry of the transaction: the same answer, nothing new.
            self.assertEqual(await self.put_txn([msg.to_federation_json()], "txn1"), answer)
            again = await self.sync(body["next_batch"])
            self.assertEqual(self.timeline_ids(again, room_id), [])
            # The same event in another transaction: accepted once only.
            self.assertEqual(await self.put_txn([msg.to_federation_json()], "txn2"),
                             {"pdus": {msg.event_id: {}}})
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [msg.event_id])
            rows = await self.hs.events_store.get_room_events(room_id, None, None, 100, False)
            self.assertEqual([r[1] for r in rows].count(msg.event_id), 1)
            self.assertEqual(self.hs.room_states.get_cached(room_id).extremities, [msg.event_id])

        return defer.ensureDeferred(go())

    def test_concurrent_retry_of_a_transaction(self):
        async def go():
            room_id = await self.room_with_bob()
            token = (await self.sync())["next_batch"]
            msgs = []
            for i in range(3):
                msgs.append(await self.build(room_id, MESSAGE, BOB, text(str(i)),
                                             prev=[msgs[-1].event_id] if msgs else None))
            datas = [m.to_federation_json() for m in msgs]
            answers = await defer.gatherResults([
                defer.ensureDeferred(self.put_txn(datas, "same")) for _ in range(3)])
            expected = {"pdus": {m.event_id: {} for m in msgs}}
            self.assertEqual(answers, [expected] * 3)
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [m.event_id for m in msgs])

        return defer.ensureDeferred(go())

    def test_first_pdu_after_a_restart_is_answered(self):
        async def go():
            room_id = await self.room_with_bob()
            token = (await self.sync())["next_batch"]
            await self.restart()
            state = (await self.hs.room_states.get(room_id)).state_ids()
            msg = await self.build(room_id, MESSAGE, BOB, text("hello again"), state=state)
            self.hs.room_states.invalidate(room_id)  # as after the restart: not loaded yet
            self.assertEqual(await self.put_txn([msg.to_federation_json()]),
                             {"pdus": {msg.event_id: {}}})
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [msg.event_id])

        return defer.ensureDeferred(go())

    # --- 3. bad PDUs beside a good one -----------------------------------------------------
    def test_bad_pdus_do_not_spoil_the_transaction(self):
        async def go():
            room_id = await self.room_with_bob()
            token = (await self.sync())["next_batch"]
            good = await self.build(room_id, MESSAGE, BOB, text("good"))

            malformed_pdu = await self.build(room_id, MESSAGE, BOB, text("no sender"))
            malformed = dict(malformed_pdu.to_federation_json())
            del malformed["sender"]

            other_key = generate_signing_key("remote")  # same key id, another key
            forged_pdu = build_event(
                self.room_version, server_name=REMOTE, signing_key=other_key,
                event_type=MESSAGE, sender=BOB, content=text("forged"), room_id=room_id,
                prev_events=list(good.prev_event_ids), auth_events=list(good.auth_event_ids),
                depth=good.depth, origin_server_ts=self.hs.clock.time_msec())

            unknown_room = await self.build(
                "!elsewhere:" + REMOTE, MESSAGE, BOB, text("where?"),
                prev=[good.event_id], auth=list(good.auth_event_ids))

            answer = await self.put_txn([
                malformed, forged_pdu.to_federation_json(),
                unknown_room.to_federation_json(), good.to_federation_json()])
            results = answer["pdus"]
            self.assertEqual(results[good.event_id], {})
            self.assertIn("error", results[forged_pdu.event_id])
            malformed_id = compute_event_id(malformed, self.room_version)
            self.assertIn("error", results[malformed_id])
            # An event of a room we do not know: its id cannot be known without the
            # room's version, so it is left out (as Synapse does); never a success.
            self.assertNotEqual(results.get(unknown_room.event_id), {})

            body = await self.sync(token)
            self.assertEqual(self.timeline_ids(body, room_id), [good.event_id])
            for bad in (forged_pdu.event_id, malformed_id, unknown_room.event_id):
                self.assertIsNone(await self.stored(bad))
            self.assertEqual(self.hs.room_states.get_cached(room_id).extremities,
                             [good.event_id])

            # Not JSON objects at all, and too many PDUs.
            answer = await self.put_txn(["x", 3, None, {"room_id": 7}])
            self.assertEqual(answer, {"pdus": {}})
            status, errcode = await self.error(self.put_txn([good.to_federation_json()] * 51))
            self.assertEqual((status, errcode), (400, "M_BAD_JSON"))

        return defer.ensureDeferred(go())

    # --- 4. content hash mismatch ----------------------------------------------------------
    def test_content_hash_mismatch_is_stored_redacted(self):
        async def go():
            room_id = await self.room_with_bob()
            token = (await self.sync())["next_batch"]
            pdu = await self.build(room_id, MESSAGE, BOB, text("original"))
            tampered = {**pdu.to_federation_json(), "content": text("tampered")}
            # The signature covers the redacted event only: still valid, same id.
            self.assertEqual(compute_event_id(tampered, self.room_version), pdu.event_id)
            answer = await self.put_txn([tampered])
            self.assertEqual(answer, {"pdus": {pdu.event_id: {}}})
            events = self.timeline(await self.sync(token), room_id)
            self.assertEqual([(e["event_id"], e["content"]) for e in events],
                             [(pdu.event_id, {})])
            self.assertEqual((await self.hs.events.get_event(pdu.event_id)).content, {})
            self.assertEqual((await self.hs.events_store.get_events([pdu.event_id]))
                             [pdu.event_id].content, {})

        return defer.ensureDeferred(go())

    # --- 5. auth failures ------------------------------------------------------------------
    def test_auth_failures_are_rejected(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            token = (await self.sync())["next_batch"]
            tip = list(room.extremities)
            # carol of remote.test never joined.
            stranger = await self.build(room_id, MESSAGE, CAROL, text("let me in"))
            # bob cites alice's membership, not his own.
            state = room.state_ids()
            wrong_auth = [a for a in select_auth_events(
                self.room_version, MESSAGE, BOB, None, {}, state)
                if a != state[(MEMBER, BOB)]] + [state[(MEMBER, self.alice)]]
            if not self.room_version.create_event_in_auth_events:
                wrong_auth = [a for a in wrong_auth if a != state[(CREATE, "")]]
            wrong = await self.build(room_id, MESSAGE, BOB, text("wrong auth"), auth=wrong_auth)
            # A state event bob has not the power to send.
            name = await self.build(room_id, NAME, BOB, {"name": "bob's"}, state_key="")
            answer = await self.put_txn([p.to_federation_json() for p in (stranger, wrong, name)])
            self.assertEqual(set(answer["pdus"]),
                             {stranger.event_id, wrong.event_id, name.event_id})
            for pdu in (stranger, wrong, name):
                self.assertEqual(await self.stored(pdu.event_id), (False, True), pdu.content)
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [])
            self.assertEqual(room.extremities, tip)
            self.assertNotEqual(room.get(NAME) and room.get(NAME).event_id, name.event_id)
            # An event citing a rejected one as prev is checked on its own merits (the
            # state after a rejected event is the state before it): bob's reply is
            # fine. Rejected events have no state group here, so the server asks
            # the origin for the state at it.
            reply = await self.build(room_id, MESSAGE, BOB, text("ok"),
                                     prev=[wrong.event_id], state=state)
            self.serve_state(state, wrong)
            self.assertEqual(await self.put_txn([reply.to_federation_json()]),
                             {"pdus": {reply.event_id: {}}})
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [reply.event_id])

        return defer.ensureDeferred(go())

    def test_child_of_a_rejected_state_event(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            state = room.state_ids()
            [tip] = room.extremities
            # bob (power 0) renames the room: rejected. His next message cites it.
            name = await self.build(room_id, NAME, BOB, {"name": "bob's"}, state_key="")
            reply = await self.build(room_id, MESSAGE, BOB, text("and?"), prev=[name.event_id],
                                     state=state)
            await self.put_txn([name.to_federation_json()])
            self.assertEqual(await self.stored(name.event_id), (False, True))
            self.serve_state(state, name)  # /state at it: the state before it
            self.assertEqual(await self.put_txn([reply.to_federation_json()]),
                             {"pdus": {reply.event_id: {}}})
            # The state after a rejected event is the state before it: the name is
            # in neither the reply's state nor the room's.
            group = (await self.hs.events_store.get_event_positions(
                [reply.event_id]))[reply.event_id][1]
            self.assertEqual(await self.hs.state_groups.get(group), state)
            self.assertIsNone(room.get(NAME))
            self.assertEqual(set(room.extremities), {tip, reply.event_id})
            merge = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("m"))
            self.assertEqual(set(merge.prev_event_ids), {tip, reply.event_id})
            self.assertEqual(room.state_ids(), state)

        return defer.ensureDeferred(go())

    # --- ACL, redactions, auth events fetched with /event_auth --------------------------------
    def test_server_acl_drops_pdus_of_a_denied_origin(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            await self.hs.room_sender.send(
                self.alice, room_id, "m.room.server_acl",
                {"allow": ["*"], "deny": [REMOTE], "allow_ip_literals": True}, "")
            token = (await self.sync())["next_batch"]
            tip = list(room.extremities)
            msg = await self.build(room_id, MESSAGE, BOB, text("denied"))
            answer = await self.put_txn([msg.to_federation_json()])
            self.assertIn("error", answer["pdus"][msg.event_id])
            self.assertIsNone(await self.stored(msg.event_id))
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [])
            self.assertEqual(room.extremities, tip)

        return defer.ensureDeferred(go())

    def test_redactions_from_the_remote(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            own = await self.build(room_id, MESSAGE, BOB, text("oops"))
            await self.put_txn([own.to_federation_json()])
            mine = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("alice's"))
            token = (await self.sync())["next_batch"]
            r1 = await self.redaction(own)
            # bob (power 0) cannot redact alice's event: accepted, but it takes no effect.
            r2 = await self.redaction(mine, prev=[r1.event_id])
            answer = await self.put_txn([r1.to_federation_json(), r2.to_federation_json()])
            self.assertEqual(answer, {"pdus": {r1.event_id: {}, r2.event_id: {}}})
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [r1.event_id, r2.event_id])
            self.assertEqual(room.extremities, [r2.event_id])
            self.assertEqual((await self.hs.events.get_event(own.event_id)).content, {})
            self.assertEqual((await self.hs.events.get_event(mine.event_id)).content,
                             text("alice's"))
            page = {e["event_id"]: e for e in (await self.messages(room_id, 20))["chunk"]}
            self.assertEqual(page[own.event_id]["content"], {})
            self.assertEqual(page[mine.event_id]["content"], text("alice's"))

        return defer.ensureDeferred(go())

    def test_redaction_before_its_target(self):
        async def go():
            room_id = await self.room_with_bob()
            tip = list(self.hs.room_states.get_cached(room_id).extremities)
            target = await self.build(room_id, MESSAGE, BOB, text("secret"), prev=tip)
            redaction = await self.redaction(target, prev=tip)
            await self.put_txn([redaction.to_federation_json()])
            await self.put_txn([target.to_federation_json()])
            self.assertEqual(await self.stored(target.event_id), (True, False))
            self.assertEqual((await self.hs.events.get_event(target.event_id)).content, {})

        return defer.ensureDeferred(go())

    def test_unknown_auth_events_are_fetched_with_event_auth(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            state = room.state_ids()
            token = (await self.sync())["next_batch"]
            renamed = await self.displayname_change(room_id, "Bobby")
            auth = [a if a != state[(MEMBER, BOB)] else renamed.event_id
                    for a in select_auth_events(self.room_version, MESSAGE, BOB, None, {}, state)
                    if self.room_version.create_event_in_auth_events
                    or a != state[(CREATE, "")]]
            msg = await self.build(room_id, MESSAGE, BOB, text("as Bobby"), auth=auth)

            def event_auth(args, query, body):
                self.assertEqual(args, [room_id, msg.event_id])
                return {"auth_chain": [renamed.to_federation_json()]}

            self.fake.handlers["event_auth"] = event_auth
            self.assertEqual(await self.put_txn([msg.to_federation_json()]),
                             {"pdus": {msg.event_id: {}}})
            self.assertEqual(len(self.fake.called("event_auth")), 1)
            # The auth event is an outlier: not in the timeline, not the room's state.
            self.assertEqual(await self.stored(renamed.event_id), (False, False))
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [msg.event_id])
            self.assertEqual(room.state_ids(), state)

            # When /event_auth fails, the event is dropped (and reported).
            other = await self.displayname_change(room_id, "Robert")
            auth = [other.event_id if a == renamed.event_id else a for a in auth]
            lost = await self.build(room_id, MESSAGE, BOB, text("as Robert"), auth=auth)
            del self.fake.handlers["event_auth"]
            answer = await self.put_txn([lost.to_federation_json()])
            self.assertIn("error", answer["pdus"][lost.event_id])
            self.assertIsNone(await self.stored(lost.event_id))

        return defer.ensureDeferred(go())

    def test_event_citing_a_rejected_auth_event_is_rejected(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            state = room.state_ids()
            # bob gives himself power he does not have: rejected on its own auth events.
            levels = dict(room.get(POWER).content)
            levels["users"] = {**levels.get("users", {}), BOB: 100}
            grab = await self.build(room_id, POWER, BOB, levels, state_key="")
            auth = [a if a != state[(POWER, "")] else grab.event_id
                    for a in select_auth_events(self.room_version, NAME, BOB, "", {}, state)
                    if self.room_version.create_event_in_auth_events
                    or a != state[(CREATE, "")]]
            name = await self.build(room_id, NAME, BOB, {"name": "mine now"}, state_key="",
                                    auth=auth)
            self.fake.handlers["event_auth"] = lambda args, query, body: {
                "auth_chain": [grab.to_federation_json()]}
            await self.put_txn([name.to_federation_json()])
            self.assertEqual(await self.stored(grab.event_id), (False, True))
            self.assertEqual(await self.stored(name.event_id), (False, True))
            self.assertIsNone(room.get(NAME))
            self.assertEqual(room.state_ids(), state)

        return defer.ensureDeferred(go())

    # --- 6. a fork ---------------------------------------------------------------------------
    def test_fork_two_extremities_then_merged(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            m1 = await self.build(room_id, MESSAGE, BOB, text("m1"))
            await self.put_txn([m1.to_federation_json()])
            token = (await self.sync())["next_batch"]
            local = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("local"))
            self.assertEqual(list(local.prev_event_ids), [m1.event_id])
            m2 = await self.build(room_id, MESSAGE, BOB, text("m2"), prev=[m1.event_id])
            self.assertEqual(await self.put_txn([m2.to_federation_json()]),
                             {"pdus": {m2.event_id: {}}})
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [local.event_id, m2.event_id])
            self.assertEqual(set(room.extremities), {local.event_id, m2.event_id})
            merge = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("merge"))
            self.assertEqual(set(merge.prev_event_ids), {local.event_id, m2.event_id})
            self.assertEqual(room.extremities, [merge.event_id])
            self.assertEqual(merge.depth, max(local.depth, m2.depth) + 1)
            # The merge went out to remote.test.
            await self._settle()
            self.assertIn(merge.event_id, self.ids(self.fake.pdus_sent()))

        return defer.ensureDeferred(go())

    # --- 7. state resolution -----------------------------------------------------------------
    async def name_fork(self, remote_later: bool):
        """bob (power 50) renames on one branch, alice on the other; returns
        (room_id, alice's name event, bob's name event, the state sets)."""
        room_id = await self.room_with_bob()
        room = self.hs.room_states.get_cached(room_id)
        levels = dict(room.get(POWER).content)
        levels["users"] = {**levels.get("users", {}), BOB: 50}
        await self.hs.room_sender.send(self.alice, room_id, POWER, levels, "")
        fork_point = list(room.extremities)
        state_at_fork = room.state_ids()
        local = await self.hs.room_sender.send(self.alice, room_id, NAME, {"name": "alice's"}, "")
        state_local = room.state_ids()
        ts = local.origin_server_ts + (5000 if remote_later else -5000)
        remote = await self.build(room_id, NAME, BOB, {"name": "bob's"}, state_key="",
                                  prev=fork_point, state=state_at_fork, ts=ts)
        self.assertEqual(await self.put_txn([remote.to_federation_json()]),
                         {"pdus": {remote.event_id: {}}})
        state_remote = {**state_at_fork, (NAME, ""): remote.event_id}
        return room_id, local, remote, [state_local, state_remote]

    async def expected_resolution(self, room_id, state_sets):
        events, rejected = await self.hs.events_store.get_room_state_events(room_id)
        dag = RoomDag()
        dag.add(events, rejected)
        return dag.resolve(self.room_version, state_sets)

    def test_state_resolution_of_a_name_fork(self):
        async def go():
            for remote_later in (True, False):
                room_id, local, remote, state_sets = await self.name_fork(remote_later)
                room = self.hs.room_states.get_cached(room_id)
                expected = await self.expected_resolution(room_id, state_sets)
                # Same power level for both (one mainline): the later timestamp wins.
                winner = remote if remote_later else local
                self.assertEqual(expected[(NAME, "")], winner.event_id)
                self.assertEqual(room.state_ids(), expected)
                self.assertEqual(room.get(NAME).content["name"], winner.content["name"])
                self.assertEqual(set(room.extremities), {local.event_id, remote.event_id})
                # The next local event merges the fork, on the resolved state.
                merge = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("m"))
                self.assertEqual(set(merge.prev_event_ids), {local.event_id, remote.event_id})
                group = (await self.hs.events_store.get_event_positions(
                    [merge.event_id]))[merge.event_id][1]
                self.assertEqual(await self.hs.state_groups.get(group), expected)

        return defer.ensureDeferred(go())

    def test_state_resolution_survives_a_restart(self):
        async def go():
            room_id, local, remote, state_sets = await self.name_fork(remote_later=True)
            expected = await self.expected_resolution(room_id, state_sets)
            self.assertEqual(expected[(NAME, "")], remote.event_id)
            await self.restart()
            room = await self.hs.room_states.get(room_id)
            self.assertEqual(room.state_ids(), expected)
            self.assertEqual(set(room.extremities), {local.event_id, remote.event_id})
            body = await self.sync()
            state = {(e["type"], e["state_key"]): e["event_id"]
                     for e in body["rooms"]["join"][room_id]["state"]["events"]
                     + self.timeline(body, room_id) if "state_key" in e}
            self.assertEqual(state[(NAME, "")], remote.event_id)
            # After the restart: bob's next message on his branch keeps the choice.
            reply = await self.build(room_id, MESSAGE, BOB, text("after"),
                                     prev=[remote.event_id], state=state_sets[1])
            self.assertEqual(await self.put_txn([reply.to_federation_json()]),
                             {"pdus": {reply.event_id: {}}})
            self.assertEqual(set(room.extremities), {local.event_id, reply.event_id})
            self.assertEqual(room.state_ids(), expected)
            merge = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("m"))
            self.assertEqual(set(merge.prev_event_ids), {local.event_id, reply.event_id})
            self.assertEqual(room.get(NAME).event_id, remote.event_id)

        return defer.ensureDeferred(go())

    # --- 8. soft fail ----------------------------------------------------------------------
    def test_soft_failed_event(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            fork_point = list(room.extremities)
            state_before_ban = room.state_ids()
            token = (await self.sync())["next_batch"]
            ban = await self.hs.membership.ban(self.alice, room_id, BOB)
            msg = await self.build(room_id, MESSAGE, BOB, text("I was not banned yet"),
                                   prev=fork_point, state=state_before_ban)
            self.assertEqual(await self.put_txn([msg.to_federation_json()]),
                             {"pdus": {msg.event_id: {}}})
            # Stored and accepted, but not shown and not an extremity.
            self.assertEqual(await self.stored(msg.event_id), (True, False))
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [ban.event_id])
            self.assertEqual(room.extremities, [ban.event_id])
            self.assertEqual(room.membership(BOB), "ban")
            page = await self.messages(room_id, 10)
            self.assertNotIn(msg.event_id, [e["event_id"] for e in page["chunk"]])
            nxt = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("after"))
            self.assertEqual(list(nxt.prev_event_ids), [ban.event_id])
            # Sending it again changes nothing.
            self.assertEqual(await self.put_txn([msg.to_federation_json()]),
                             {"pdus": {msg.event_id: {}}})
            self.assertEqual(room.extremities, [nxt.event_id])

        return defer.ensureDeferred(go())

    # --- 9. missing prev events --------------------------------------------------------------
    def test_missing_prev_events_are_fetched(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            tip = list(room.extremities)
            token = (await self.sync())["next_batch"]
            b = await self.build(room_id, MESSAGE, BOB, text("B"))
            c = await self.build(room_id, MESSAGE, BOB, text("C"), prev=[b.event_id])

            def get_missing_events(args, query, body):
                self.assertEqual(args, [room_id])
                return {"events": [b.to_federation_json()]}

            self.fake.handlers["get_missing_events"] = get_missing_events
            self.assertEqual(await self.put_txn([c.to_federation_json()]),
                             {"pdus": {c.event_id: {}}})
            calls = self.fake.called("get_missing_events")
            self.assertEqual(len(calls), 1)
            self.assertEqual(calls[0][1]["earliest_events"], tip)
            self.assertEqual(calls[0][1]["latest_events"], [c.event_id])
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [b.event_id, c.event_id])
            self.assertEqual(room.extremities, [c.event_id])
            self.assertEqual(self.fake.called("state"), [])

        return defer.ensureDeferred(go())

    def test_gap_too_big_uses_the_state_at_the_prev_event(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            state = room.state_ids()
            [tip] = room.extremities
            token = (await self.sync())["next_batch"]
            b = await self.build(room_id, MESSAGE, BOB, text("B (never sent)"))
            c = await self.build(room_id, MESSAGE, BOB, text("C"), prev=[b.event_id])
            self.fake.handlers["get_missing_events"] = lambda a, q, body: {"events": []}
            self.serve_state(state, b)
            self.assertEqual(await self.put_txn([c.to_federation_json()]),
                             {"pdus": {c.event_id: {}}})
            self.assertEqual(self.fake.called("state")[0][0], [room_id])
            self.assertEqual(self.fake.called("state")[0][1], {"event_id": b.event_id})
            # C is in the room, B is not (it was never sent to us, only referred to).
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id), [c.event_id])
            # B is an outlier: our old tip is still an extremity beside C, and the
            # next event merges them (the same state: nothing to resolve).
            self.assertEqual(set(room.extremities), {tip, c.event_id})
            self.assertEqual(room.state_ids(), state)
            merge = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("m"))
            self.assertEqual(set(merge.prev_event_ids), {tip, c.event_id})
            self.assertEqual(room.state_ids(), state)

        return defer.ensureDeferred(go())

    def test_second_child_of_an_outlier_prev(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            state = room.state_ids()
            token = (await self.sync())["next_batch"]
            b = await self.build(room_id, MESSAGE, BOB, text("B (never sent)"))
            c = await self.build(room_id, MESSAGE, BOB, text("C"), prev=[b.event_id])
            d = await self.build(room_id, MESSAGE, BOB, text("D"), prev=[b.event_id])
            self.fake.handlers["get_missing_events"] = lambda a, q, body: {"events": []}
            self.serve_state(state, b)
            await self.put_txn([c.to_federation_json()])
            self.assertEqual(await self.stored(b.event_id), (False, False))  # an outlier
            # D cites B too: B has no state of its own here, whether or not it is in
            # the event cache; the state at it is asked for again.
            self.assertEqual(await self.put_txn([d.to_federation_json()]),
                             {"pdus": {d.event_id: {}}})
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [c.event_id, d.event_id])
            self.assertEqual(len(self.fake.called("state")), 2)

        return defer.ensureDeferred(go())

    # --- 11. backfill ------------------------------------------------------------------------
    async def join_remote_room(self, history: int = 5):
        """alice joins a public room of remote.test that has ``history`` messages,
        through make_join/send_join answered by the fake remote (which also
        answers /backfill from everything it has). Returns (room_id, the room's
        state events oldest first, the messages, alice's join)."""
        room_id, state, events = await self.remote_room(join_rule="public")
        messages = []
        for i in range(history):
            messages.append(await self.build(
                room_id, MESSAGE, BOB, text(f"old {i}"),
                prev=[(messages or events)[-1].event_id], state=state))
        everything = {p.event_id: p for p in events + messages}

        def make_join(args, query, content):
            self.assertEqual(args, [room_id, self.alice])
            self.assertIn(self.version, query["ver"])
            auth = select_auth_events(self.room_version, MEMBER, self.alice, self.alice,
                                      {"membership": "join"}, state)
            if not self.room_version.create_event_in_auth_events:
                auth = [a for a in auth if a != state[(CREATE, "")]]
            last = (messages or events)[-1]
            return {"room_version": self.version, "event": {
                "type": MEMBER, "room_id": room_id, "sender": self.alice,
                "state_key": self.alice, "content": {"membership": "join"},
                "depth": last.depth + 1, "origin_server_ts": 0,
                "prev_events": [last.event_id], "auth_events": auth}}

        def send_join(args, query, content):
            join = Pdu.from_dict(content, self.room_version)
            everything[join.event_id] = join
            self.remote_events[join.event_id] = join
            return {"origin": REMOTE, "members_omitted": False, "servers_in_room": [REMOTE],
                    "event": content,
                    "state": [everything[e].to_federation_json() for e in state.values()],
                    "auth_chain": [p.to_federation_json() for p in events
                                   if p.type not in (NAME, "m.room.history_visibility")]}

        def backfill(args, query, content):
            """What a real server answers: from the given events back, by depth."""
            self.assertEqual(args, [room_id])
            limit = int(query["limit"])
            todo, seen, out = list(query["v"]), set(), []
            while todo and len(out) < limit:
                todo.sort(key=lambda e: everything[e].depth)
                event_id = todo.pop()
                if event_id in seen or event_id not in everything:
                    continue
                seen.add(event_id)
                out.append(everything[event_id])
                todo.extend(everything[event_id].prev_event_ids)
            return {"origin": REMOTE, "origin_server_ts": 0,
                    "pdus": [p.to_federation_json() for p in out]}

        self.fake.handlers.update(make_join=make_join, send_join=send_join, backfill=backfill)
        join = await self.hs.membership.join(self.alice, room_id, servers=[REMOTE])
        return room_id, events, messages, join

    def test_live_events_after_joining_a_remote_room(self):
        async def go():
            room_id, events, _, join = await self.join_remote_room(history=0)
            room = self.hs.room_states.get_cached(room_id)
            self.assertEqual(room.membership(self.alice), "join")
            self.assertEqual(room.membership(BOB), "join")
            self.assertEqual(room.extremities, [join.event_id])
            token = (await self.sync())["next_batch"]
            msg = await self.build(room_id, MESSAGE, BOB, text("welcome"))
            self.assertEqual(list(msg.prev_event_ids), [join.event_id])
            self.assertEqual(await self.put_txn([msg.to_federation_json()]),
                             {"pdus": {msg.event_id: {}}})
            body = await self.sync(token)
            self.assertEqual(self.timeline_ids(body, room_id), [msg.event_id])
            reply = await self.hs.room_sender.send(self.alice, room_id, MESSAGE, text("thanks"))
            self.assertEqual(list(reply.prev_event_ids), [msg.event_id])
            await self._settle()
            self.assertIn(reply.event_id, self.ids(self.fake.pdus_sent()))
            # bob renames the room (he has the power): the name changes for alice.
            name = await self.build(room_id, NAME, BOB, {"name": "Renamed"}, state_key="")
            await self.put_txn([name.to_federation_json()])
            self.assertEqual(room.get(NAME).event_id, name.event_id)
            # And alice leaves: the leave goes out, the room is no longer ours.
            leave = await self.hs.membership.leave(self.alice, room_id)
            await self._settle()
            self.assertIn(leave.event_id, self.ids(self.fake.pdus_sent()))
            self.assertEqual(room.membership(self.alice), "leave")

        return defer.ensureDeferred(go())

    def test_backfill_after_joining_a_remote_room(self):
        async def go():
            room_id, events, messages, join = await self.join_remote_room()
            room = self.hs.room_states.get_cached(room_id)
            self.assertEqual(room.membership(self.alice), "join")
            self.assertEqual(room.get(NAME).content["name"], "Remote room")

            # Sync: the join only (history is for /messages).
            body = await self.sync()
            self.assertEqual(self.timeline_ids(body, room_id), [join.event_id])

            page = await self.messages(room_id, 6)
            # Each /backfill starts from the oldest event we have: the join, then (the
            # page not being full with what the first brought) the oldest message.
            asked = lambda: [q["v"] for _, q in self.fake.called("backfill")]  # noqa: E731
            self.assertEqual(asked(), [[join.event_id], [messages[0].event_id]])
            self.assertEqual([e["event_id"] for e in page["chunk"]],
                             [join.event_id] + [m.event_id for m in reversed(messages)])
            self.assertEqual([e["content"].get("body") for e in page["chunk"][1:]],
                             [f"old {i}" for i in reversed(range(5))])
            backfills = len(asked())

            # Again from the end: what we have now suffices, no more /backfill.
            again = await self.messages(room_id, 6)
            self.assertEqual(len(self.fake.called("backfill")), backfills)
            self.assertEqual([e["event_id"] for e in again["chunk"]],
                             [e["event_id"] for e in page["chunk"]])
            # And on to the start of the room: the state events, the create last.
            rest, token = [], page.get("end")
            while token is not None:
                more = await self.messages(room_id, 6, token)
                rest += more["chunk"]
                token = more.get("end")
            self.assertEqual(rest[-1]["type"], CREATE)
            self.assertEqual([e["event_id"] for e in rest],
                             [e.event_id for e in reversed(events)])
            # The second /backfill stopped short of the create event (limit 6): one
            # more, from bob's join, brought it; then the room's history is complete.
            self.assertEqual(asked(), [[join.event_id], [messages[0].event_id],
                                       [events[1].event_id]])
            again = await self.messages(room_id, 100)
            self.assertEqual(len(asked()), 3)
            self.assertEqual([e["event_id"] for e in again["chunk"]],
                             [e["event_id"] for e in page["chunk"] + rest])
            # Backfilled events never reach an incremental sync.
            self.assertEqual(self.timeline_ids(await self.sync(body["next_batch"]), room_id),
                             [])

        return defer.ensureDeferred(go())


class Room12InboundEventsTests(InboundEventsTestsMixin, unittest.TestCase):
    version = "12"


class Room11InboundEventsTests(InboundEventsTestsMixin, unittest.TestCase):
    version = "11"


class Room10InboundEventsTests(InboundEventsTestsMixin, unittest.TestCase):
    version = "10"
