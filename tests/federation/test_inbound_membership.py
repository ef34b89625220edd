"""Joins, leaves, knocks and invites from a fake remote server "remote.test"
(tests/federation/remote_server.py): make_*/send_* served by our server, the
/invite countersignature, and our users rejecting a remote invite. Rooms 10,
11 and 12.
"""

from twisted.internet import defer
from twisted.trial import unittest

from crypto.signing import verify_signature
from homeserver.core.events import CREATE, MEMBER, Pdu, compute_event_id
from homeserver.core.redaction import redact_pdu
from homeserver.services.federation_client import build_path
from tests.federation.remote_server import (
    BOB,
    KEY,
    MESSAGE,
    NAME,
    POWER,
    REMOTE,
    V1,
    V2,
    RemoteServerFixture,
    text,
)
from tests.support.homeserver import add_user


class InboundMembershipTestsMixin(RemoteServerFixture):
    # --- 1. joins ---------------------------------------------------------------------------
    def test_make_join_send_join(self):
        async def go():
            room_id = await self.local_room()
            token = (await self.sync())["next_batch"]
            room = self.hs.room_states.get_cached(room_id)
            before = room.state_ids()

            template = await self.make_join(room_id)
            self.assertEqual(template["room_version"], self.version)
            event = template["event"]
            self.assertEqual((event["type"], event["state_key"], event["sender"]),
                             (MEMBER, BOB, BOB))
            self.assertEqual(event["content"], {"membership": "join"})
            self.assertEqual(event["prev_events"], room.extremities)

            pdu = await self.sign_template(template)
            answer = await self.remote.put_json(
                self.server.name, build_path(V2 + "/send_join/{}/{}", room_id, pdu.event_id),
                pdu.to_federation_json())
            self.assertIs(answer["members_omitted"], False)
            self.assertEqual(compute_event_id(answer["event"], self.room_version), pdu.event_id)
            # The state before the join, and its whole auth chain.
            self.assertEqual(set(self.ids(answer["state"])), set(before.values()))
            self.assertNotIn(pdu.event_id, self.ids(answer["state"]))
            chain = set(self.ids(answer["auth_chain"]))
            for data in answer["state"]:
                pdu_ = Pdu.from_dict(data, self.room_version)
                self.assertLessEqual(set(pdu_.auth_event_ids), chain)
            self.assertIn(self.hs.server_name, answer["servers_in_room"])
            self.assertEqual(answer["origin"], self.hs.server_name)

            # alice sees bob join; the room knows him.
            body = await self.sync(token)
            joins = [e for e in self.timeline(body, room_id) if e["type"] == MEMBER]
            self.assertEqual([(e["state_key"], e["content"]["membership"]) for e in joins],
                             [(BOB, "join")])
            self.assertEqual(joins[0]["event_id"], pdu.event_id)
            self.assertEqual(room.membership(BOB), "join")
            self.assertEqual(room.extremities, [pdu.event_id])

            # v1 answers [200, {...}]; a second send_join of the same event is harmless.
            v1 = await self.remote.put_json(
                self.server.name, build_path(V1 + "/send_join/{}/{}", room_id, pdu.event_id),
                pdu.to_federation_json())
            self.assertEqual(v1[0], 200)
            self.assertEqual(set(self.ids(v1[1]["state"])), set(before.values()))

            # Refusals.
            self.assertEqual(await self.error(self.make_join(room_id, "@eve:other.test")),
                             (403, "M_FORBIDDEN"))
            self.assertEqual(await self.error(self.make_join("!unknown:" + self.hs.server_name)),
                             (404, "M_NOT_FOUND"))
            self.assertEqual(await self.error(self.make_join(room_id, versions=["1", "2"])),
                             (400, "M_INCOMPATIBLE_ROOM_VERSION"))
            self.assertEqual(await self.error(self.make_join(room_id, versions=[])),
                             (400, "M_INCOMPATIBLE_ROOM_VERSION"))  # no ver: room 1 only

        return defer.ensureDeferred(go())

    def test_send_join_of_a_banned_user_is_refused(self):
        async def go():
            room_id = await self.local_room()
            template = await self.make_join(room_id)
            await self.hs.membership.ban(self.alice, room_id, BOB)
            pdu = await self.sign_template(template)  # built on the state before the ban
            status, errcode = await self.error(self.remote.put_json(
                self.server.name, build_path(V2 + "/send_join/{}/{}", room_id, pdu.event_id),
                pdu.to_federation_json()))
            self.assertEqual((status, errcode), (403, "M_FORBIDDEN"))
            room = self.hs.room_states.get_cached(room_id)
            self.assertEqual(room.membership(BOB), "ban")
            self.assertNotIn(pdu.event_id, room.extremities)
            # Refused outright: not stored (as a soft-failed event would be), not sent on.
            self.assertIsNone(await self.stored(pdu.event_id))
            self.assertEqual(await self.error(self.make_join(room_id)), (403, "M_FORBIDDEN"))

        return defer.ensureDeferred(go())

    # --- leaving and knocking ---------------------------------------------------------------
    def test_make_leave_send_leave(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            token = (await self.sync())["next_batch"]
            template = await self.make("leave", room_id)
            self.assertEqual(template["room_version"], self.version)
            self.assertEqual(template["event"]["content"], {"membership": "leave"})
            self.assertEqual(template["event"]["prev_events"], room.extremities)
            leave = await self.sign_template(template)
            self.assertEqual(await self.send("leave", leave), {})
            self.assertEqual(room.membership(BOB), "leave")
            self.assertEqual(room.extremities, [leave.event_id])
            events = self.timeline(await self.sync(token), room_id)
            self.assertEqual([(e["event_id"], e["content"]) for e in events],
                             [(leave.event_id, {"membership": "leave"})])
            # Sent again (v1 this time): the same event, nothing new.
            self.assertEqual(await self.send("leave", leave, V1), [200, {}])
            self.assertEqual(self.timeline_ids(await self.sync(token), room_id),
                             [leave.event_id])
            # bob is not in the room any more: no template for him to leave again.
            self.assertEqual(await self.error(self.make("leave", room_id)), (403, "M_FORBIDDEN"))
            # A join sent to send_leave is refused.
            template = await self.make_join(room_id)
            join = await self.sign_template(template)
            self.assertEqual(await self.error(self.send("leave", join)), (400, "M_BAD_JSON"))
            # And the join itself, through send_join, takes bob back in.
            await self.send("join", join)
            self.assertEqual(room.membership(BOB), "join")

        return defer.ensureDeferred(go())

    def test_make_knock_send_knock(self):
        async def go():
            room_id = await self.local_room()
            room = self.hs.room_states.get_cached(room_id)
            # Knocking is not allowed in a public room.
            self.assertEqual(await self.error(self.make("knock", room_id)), (403, "M_FORBIDDEN"))
            await self.hs.room_sender.send(self.alice, room_id, "m.room.join_rules",
                                           {"join_rule": "knock"}, "")
            await self.hs.room_sender.send(self.alice, room_id, NAME, {"name": "Knock here"}, "")
            token = (await self.sync())["next_batch"]
            template = await self.make("knock", room_id)
            self.assertEqual(template["event"]["content"], {"membership": "knock"})
            knock = await self.sign_template(template)
            answer = await self.send("knock", knock, V1)
            stripped = {(e["type"], e["state_key"]): e["content"]
                        for e in answer["knock_room_state"]}
            self.assertEqual(stripped[("m.room.join_rules", "")], {"join_rule": "knock"})
            self.assertEqual(stripped[(NAME, "")], {"name": "Knock here"})
            self.assertEqual(room.membership(BOB), "knock")
            events = self.timeline(await self.sync(token), room_id)
            self.assertEqual([(e["state_key"], e["content"]["membership"]) for e in events],
                             [(BOB, "knock")])
            # A knock is not a join: bob cannot send messages.
            msg = await self.build(room_id, MESSAGE, BOB, text("let me in"))
            await self.put_txn([msg.to_federation_json()])
            self.assertEqual(await self.stored(msg.event_id), (False, True))

        return defer.ensureDeferred(go())

    # --- 10. invites -----------------------------------------------------------------------
    async def invite_alice(self):
        """remote.test invites alice into its room over /invite/v2; returns
        (room_id, room state, the invite, the countersigned event)."""
        room_id, state, events = await self.remote_room()
        invite = await self.build(room_id, MEMBER, BOB, {"membership": "invite"},
                                  state_key=self.alice, prev=[events[-1].event_id], state=state)
        stripped = [{"type": p.type, "state_key": p.state_key, "content": p.content,
                     "sender": p.sender} for p in events if p.type in (CREATE, NAME)]
        answer = await self.remote.put_json(
            self.server.name, build_path(V2 + "/invite/{}/{}", room_id, invite.event_id),
            {"event": invite.to_federation_json(), "room_version": self.version,
             "invite_room_state": stripped})
        return room_id, state, invite, answer["event"]

    async def reject_invite(self, room_id, state, invite):
        """alice rejects: make_leave/send_leave through remote.test; returns
        (her leave, what send_leave received)."""

        def make_leave(args, query, content):
            self.assertEqual(args, [room_id, self.alice])
            auth = [state[(POWER, "")], invite.event_id]
            if self.room_version.create_event_in_auth_events:
                auth.insert(0, state[(CREATE, "")])
            return {"room_version": self.version, "event": {
                "type": MEMBER, "room_id": room_id, "sender": self.alice,
                "state_key": self.alice, "content": {"membership": "leave"},
                "depth": invite.depth + 1, "origin_server_ts": 0,
                "prev_events": [invite.event_id], "auth_events": auth}}

        sent = []

        def send_leave(args, query, content):
            sent.append((args, content))
            return {}

        self.fake.handlers["make_leave"] = make_leave
        self.fake.handlers["send_leave"] = send_leave
        leave = await self.hs.membership.leave(self.alice, room_id)
        return leave, sent

    def test_invite_v2_and_rejection(self):
        async def go():
            token = (await self.sync())["next_batch"]
            room_id, state, invite, signed = await self.invite_alice()
            self.assertEqual(compute_event_id(signed, self.room_version), invite.event_id)
            our_key = self.hs.server_keys.signing_key
            verify_signature(redact_pdu(signed, self.room_version), self.hs.server_name,
                             our_key.key_id, our_key.verify_key)
            verify_signature(redact_pdu(signed, self.room_version), REMOTE, KEY.key_id,
                             KEY.verify_key)

            body = await self.sync(token)
            invited = body["rooms"]["invite"][room_id]["invite_state"]["events"]
            by_type = {e["type"]: e for e in invited}
            self.assertEqual(by_type[NAME]["content"], {"name": "Remote room"})
            self.assertEqual(by_type[CREATE]["content"]["room_version"], self.version)
            self.assertEqual(by_type[MEMBER]["state_key"], self.alice)
            self.assertEqual(by_type[MEMBER]["sender"], BOB)
            self.assertEqual(by_type[MEMBER]["event_id"], invite.event_id)
            self.assertNotIn(room_id, body["rooms"].get("join", {}))
            self.assertIn(room_id, (await self.sync())["rooms"]["invite"])
            # Our server is not in the room: the invite is not a timeline event.
            self.assertIsNone(self.hs.room_states.get_cached(room_id))

            leave, sent = await self.reject_invite(room_id, state, invite)
            self.assertEqual(len(sent), 1)
            self.assertEqual(sent[0][0], [room_id, leave.event_id])
            self.assertEqual(sent[0][1]["content"], {"membership": "leave"})
            self.assertEqual(sent[0][1]["sender"], self.alice)
            self.assertEqual(list(leave.prev_event_ids), [invite.event_id])
            [(_, destination, *_)] = [c for c in self.fake.calls if c[2] == "send_leave"]
            self.assertEqual(destination, REMOTE)

            after = await self.sync(body["next_batch"])
            self.assertNotIn(room_id, after.get("rooms", {}).get("invite", {}))
            initial = await self.sync()
            self.assertNotIn(room_id, initial.get("rooms", {}).get("invite", {}))
            self.assertEqual(await self.hs.user_rooms.get(self.alice) and
                             (await self.hs.user_rooms.get(self.alice))[room_id][0], "leave")

        return defer.ensureDeferred(go())

    def test_rejected_remote_invite_is_under_leave_in_sync(self):
        async def go():
            room_id, state, invite, _ = await self.invite_alice()
            token = (await self.sync())["next_batch"]
            await self.reject_invite(room_id, state, invite)
            after = await self.sync(token)
            # A client learns that the invite is gone from the room's leave entry.
            self.assertIn(room_id, after.get("rooms", {}).get("leave", {}))

        return defer.ensureDeferred(go())


    def test_invite_refusals(self):
        async def go():
            room_id, state, events = await self.remote_room()
            invite = await self.build(room_id, MEMBER, BOB, {"membership": "invite"},
                                      state_key=self.alice, prev=[events[-1].event_id],
                                      state=state)

            def put(pdu, version=self.version, event_id=None):
                return self.remote.put_json(
                    self.server.name,
                    build_path(V2 + "/invite/{}/{}", room_id, event_id or pdu.event_id),
                    {"event": pdu.to_federation_json(), "room_version": version,
                     "invite_room_state": []})

            self.assertEqual(await self.error(put(invite, version="999")),
                             (400, "M_INCOMPATIBLE_ROOM_VERSION"))
            self.assertEqual(await self.error(put(invite, event_id="$other")),
                             (400, "M_BAD_JSON"))
            nobody = await self.build(room_id, MEMBER, BOB, {"membership": "invite"},
                                      state_key=f"@nobody:{self.hs.server_name}",
                                      prev=[events[-1].event_id], state=state)
            self.assertEqual(await self.error(put(nobody)), (404, "M_NOT_FOUND"))
            tampered = Pdu(invite.room_version, invite.event_id, {
                **invite.data, "signatures": {REMOTE: {KEY.key_id: "AAAA"}}})
            self.assertEqual(await self.error(put(tampered)), (400, "M_BAD_JSON"))
            self.assertEqual(self.timeline_ids(await self.sync(), room_id), [])
            self.assertNotIn(room_id, (await self.sync()).get("rooms", {}).get("invite", {}))

        return defer.ensureDeferred(go())


    def test_invite_into_a_room_we_are_in(self):
        async def go():
            room_id = await self.room_with_bob()
            room = self.hs.room_states.get_cached(room_id)
            carl = await add_user(self.hs, "carl")
            levels = dict(room.get(POWER).content)
            levels["users"] = {**levels.get("users", {}), BOB: levels["invite"]}
            await self.hs.room_sender.send(self.alice, room_id, POWER, levels, "")
            invite = await self.build(room_id, MEMBER, BOB, {"membership": "invite"},
                                      state_key=carl)
            answer = await self.remote.put_json(
                self.server.name, build_path(V2 + "/invite/{}/{}", room_id, invite.event_id),
                {"event": invite.to_federation_json(), "room_version": self.version,
                 "invite_room_state": []})
            signed = answer["event"]
            our_key = self.hs.server_keys.signing_key
            verify_signature(redact_pdu(signed, self.room_version), self.hs.server_name,
                             our_key.key_id, our_key.verify_key)
            # Our server is in the room: the invite comes in through the room, with
            # our signature on it.
            self.assertIsNone(await self.stored(invite.event_id))
            self.assertIsNone(room.membership(carl))
            answer = await self.put_txn([signed])
            self.assertEqual(answer, {"pdus": {invite.event_id: {}}})
            self.assertEqual(room.membership(carl), "invite")
            body = await self.sync(user=carl)
            invited = body["rooms"]["invite"][room_id]["invite_state"]["events"]
            self.assertEqual({(e["type"], e["state_key"]) for e in invited} >= {
                (CREATE, ""), ("m.room.join_rules", ""), (MEMBER, carl)}, True)
            # carl joins locally.
            join = await self.hs.membership.join(carl, room_id)
            self.assertEqual(room.membership(carl), "join")
            self.assertEqual(list(join.prev_event_ids), [invite.event_id])

        return defer.ensureDeferred(go())


class Room12InboundMembershipTests(InboundMembershipTestsMixin, unittest.TestCase):
    version = "12"


class Room11InboundMembershipTests(InboundMembershipTestsMixin, unittest.TestCase):
    version = "11"


class Room10InboundMembershipTests(InboundMembershipTestsMixin, unittest.TestCase):
    version = "10"
