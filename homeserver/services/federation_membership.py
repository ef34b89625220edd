"""Joins, leaves, knocks and invites across servers (spec "Joining Rooms",
"Leaving Rooms", "Knocking", "Inviting to a room").

Both sides:

- serving: ``make_join``/``make_leave``/``make_knock`` give another server a
  template event built on our tip; ``send_join``/``send_leave``/
  ``send_knock`` take its signed event through the checks on receipt and
  answer (for a join: the state before it and its auth chain); ``invite``
  countersigns an invite for one of our users.
- our users: joining, leaving or knocking on a room this server is not in
  asks one of the given servers for a template, signs it, sends it, and (for
  a join) stores the room's state and auth chain and becomes a resident;
  inviting a user of another server sends the invite there to countersign
  before it enters the room.
"""

import logging
from typing import Any

from homeserver.core.auth_events import select_auth_events
from homeserver.core.builder import build_event, countersign
from homeserver.core.events import CREATE, MEMBER, Pdu, StateKey, compute_event_id
from homeserver.core.power_levels import domain_of
from homeserver.core.room_versions import KNOWN_ROOM_VERSIONS, get_room_version
from homeserver.errors import MatrixError
from homeserver.services.federation_client import FederationError, build_path
from homeserver.services.federation_events import PduRejected, list_field, topological
from homeserver.services.federation_reads import acl_allows
from homeserver.services.rooms.state import STRIPPED_STATE_TYPES, RoomState, stripped
from storage.events import NO_STATE_GROUP, EventToPersist

logger = logging.getLogger(__name__)

V1 = "/_matrix/federation/v1"
V2 = "/_matrix/federation/v2"
AUTHORISING_USER = "join_authorised_via_users_server"


class FederationMembership:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    def is_mine(self, user_id: str) -> bool:
        return domain_of(user_id) == self.hs.server_name

    def is_resident(self, room: RoomState | None) -> bool:
        """Whether one of our users is joined (so our copy of the room is live)."""
        return room is not None and any(
            m == "join" and self.is_mine(u) for u, m in room.members.items()
        )

    # --- serving other servers ------------------------------------------------------------------
    async def _room(self, origin: str, room_id: str) -> RoomState:
        room = await self.hs.room_states.get(room_id)
        if room is None or not self.is_resident(room):
            raise MatrixError("M_NOT_FOUND", f"This server is not in room {room_id}")
        if not acl_allows(room.get("m.room.server_acl"), origin):
            raise MatrixError("M_FORBIDDEN", "Server is banned from the room by its ACL")
        return room

    async def make_membership(
        self, origin: str, room_id: str, user_id: str, membership: str,
        versions: list[str] | None = None,
    ) -> dict[str, Any]:
        """A template ``m.room.member`` event for another server's user."""
        room = await self._room(origin, room_id)
        if domain_of(user_id) != origin:
            raise MatrixError("M_FORBIDDEN", "The user does not belong to the requesting server")
        version = room.room_version
        if versions is not None and version.identifier not in versions:
            raise MatrixError(
                "M_INCOMPATIBLE_ROOM_VERSION",
                f"The room is version {version.identifier}, which your server does not support",
                400, room_version=version.identifier,
            )
        content: dict[str, Any] = {"membership": membership}
        if membership == "join" and room.room_version.restricted_join_rule and room.join_rule in (
            "restricted", "knock_restricted"
        ) and room.membership(user_id) not in ("invite", "join"):
            authoriser = self.hs.membership.restricted_join_authoriser(room, user_id)
            if authoriser is None:
                raise MatrixError("M_UNABLE_TO_AUTHORISE_JOIN",
                                  "No member of an allowed room could be found", 400)
            content[AUTHORISING_USER] = authoriser
        state_ids = room.state_ids()
        event: dict[str, Any] = {
            "type": MEMBER, "room_id": room_id, "sender": user_id, "state_key": user_id,
            "content": content, "depth": room.depth + 1,
            "origin_server_ts": self.hs.clock.time_msec(),
            "prev_events": list(room.extremities),
            "auth_events": select_auth_events(version, MEMBER, user_id, user_id, content,
                                              state_ids),
        }
        if not version.create_event_in_auth_events:
            event["auth_events"] = [
                a for a in event["auth_events"] if a != room.create_event.event_id
            ]
        # Would it be allowed? (The auth rules read only the fields set here, and
        # the signature of the authorising server, which send_join will add.)
        signatures = {self.hs.server_name: {"ed25519:probe": ""}} if AUTHORISING_USER in content \
            else {}
        probe = Pdu(version, "$probe", {**event, "hashes": {}, "signatures": signatures})
        reason = self.hs.federation_events.auth_against_state(probe, room.state)
        if reason is not None:
            raise MatrixError("M_FORBIDDEN", reason)
        return {"event": event, "room_version": version.identifier}

    async def send_membership(
        self, origin: str, room_id: str, event_id: str, data: Any, membership: str
    ) -> tuple[RoomState, Pdu]:
        """Take another server's signed join/leave/knock into the room."""
        room = await self._room(origin, room_id)
        content = data.get("content") if isinstance(data, dict) else None
        authoriser = content.get(AUTHORISING_USER) if isinstance(content, dict) else None
        if membership == "join" and isinstance(authoriser, str) and self.is_mine(authoriser):
            # A restricted join one of our users authorises: our server must sign it
            # before its signatures are checked (the auth rules require ours).
            try:
                unsigned_pdu = Pdu(room.room_version,
                                   compute_event_id(data, room.room_version), data)
                data = countersign(unsigned_pdu, self.hs.server_name,
                                   self.hs.server_keys.signing_key).data
            except Exception as e:
                raise MatrixError("M_BAD_JSON", f"Bad event: {e}") from e
        try:
            pdu = await self.hs.federation_events.check_signed(data, room.room_version)
        except PduRejected as e:
            raise MatrixError("M_BAD_JSON", f"Bad event: {e}") from e
        if pdu.event_id != event_id or pdu.room_id != room_id:
            raise MatrixError("M_BAD_JSON", "The event does not match the path")
        if pdu.type != MEMBER or pdu.membership != membership:
            raise MatrixError("M_BAD_JSON", f"Not an m.room.member event with membership {membership}")
        if pdu.sender != pdu.state_key or domain_of(pdu.sender) != origin:
            raise MatrixError("M_FORBIDDEN", "The event's sender is not a user of your server")
        events = self.hs.federation_events
        async with events.room_lock(room_id):
            if not await self.hs.events_store.have_events([pdu.event_id]):
                # One the current state refuses (a join built before a ban) would be
                # soft-failed: stored, but not in the room. Refuse it rather than
                # answer (and forward it) as if it had taken effect.
                reason = events.auth_against_state(pdu, room.state)
                if reason is not None:
                    raise MatrixError("M_FORBIDDEN", f"Not allowed in the room now: {reason}")
            try:
                await events.handle_new_pdu(origin, room, pdu)
            except PduRejected as e:
                raise MatrixError("M_FORBIDDEN", str(e)) from e
        have = await self.hs.events_store.have_events([pdu.event_id])
        if have.get(pdu.event_id, (False, True))[1]:
            raise MatrixError("M_FORBIDDEN", "The event is not allowed in the room")
        positions = await self.hs.events_store.get_event_positions([pdu.event_id])
        if pdu.event_id in positions:
            self.hs.federation_sender.forward(positions[pdu.event_id][0], pdu, origin)
        return room, pdu

    async def send_join(self, origin: str, room_id: str, event_id: str, data: Any) -> dict[str, Any]:
        room, pdu = await self.send_membership(origin, room_id, event_id, data, "join")
        reads = self.hs.federation_reads
        state_ids = list((await reads.state_ids_before(pdu)).values())
        chain_ids = await reads.auth_chain_ids(state_ids)
        state = await reads.ordered(state_ids)
        chain = await reads.ordered(chain_ids)
        servers = sorted({domain_of(u) for u, m in room.members.items() if m == "join"})
        return {
            "origin": self.hs.server_name,
            "event": pdu.to_federation_json(),
            "state": [p.to_federation_json() for p in state],
            "auth_chain": [p.to_federation_json() for p in chain],
            "members_omitted": False,
            "servers_in_room": servers,
        }

    async def send_knock(self, origin: str, room_id: str, event_id: str, data: Any) -> dict[str, Any]:
        room, _ = await self.send_membership(origin, room_id, event_id, data, "knock")
        return {"knock_room_state": room.stripped_state()}

    async def on_invite(
        self, origin: str, room_id: str, event_id: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """``PUT /invite/v2``: countersign an invite for one of our users."""
        version_id = body.get("room_version", "1")
        if not isinstance(version_id, str) or version_id not in KNOWN_ROOM_VERSIONS:
            raise MatrixError("M_INCOMPATIBLE_ROOM_VERSION",
                              f"Room version {version_id!r} is not supported", 400,
                              room_version=version_id)
        version = get_room_version(version_id)
        try:
            pdu = await self.hs.federation_events.check_signed(body.get("event"), version)
        except PduRejected as e:
            raise MatrixError("M_BAD_JSON", f"Bad event: {e}") from e
        if pdu.event_id != event_id or pdu.room_id != room_id:
            raise MatrixError("M_BAD_JSON", "The event does not match the path")
        if pdu.type != MEMBER or pdu.membership != "invite":
            raise MatrixError("M_BAD_JSON", "Not an invite")
        if domain_of(pdu.sender) != origin:
            raise MatrixError("M_FORBIDDEN", "The inviter is not a user of your server")
        target = pdu.state_key or ""
        if not self.is_mine(target) or not await self.hs.accounts.user_exists(target):
            raise MatrixError("M_NOT_FOUND", f"Unknown user {target}")
        signed = countersign(pdu, self.hs.server_name, self.hs.server_keys.signing_key)
        room = await self.hs.room_states.get(room_id)
        if not self.is_resident(room):
            # Not in the room: keep the invite (and what the invitee may see of
            # the room) for the invitee's /sync; it reaches the room through the
            # inviting server.
            invite_state = body.get("invite_room_state")
            if not isinstance(invite_state, list):
                invite_state = (pdu.data.get("unsigned") or {}).get("invite_room_state", [])
            stored = Pdu(version, signed.event_id, {
                **signed.data,
                "unsigned": {"invite_room_state": [stripped(e) for e in invite_state
                                                   if isinstance(e, dict)]},
            })
            await self._persist_out_of_room(stored)
        return {"event": signed.to_federation_json()}

    async def _persist_out_of_room(self, pdu: Pdu) -> None:
        if await self.hs.events_store.have_events([pdu.event_id]):
            return
        self.hs.event_cache.put(pdu)
        await self.hs.persister.persist(EventToPersist(
            pdu=pdu, stream_ordering=self.hs.stream_ids.next(), state_group=NO_STATE_GROUP,
            prev_state_group=None, prev_chain_length=0, outlier=True,
            out_of_room_membership=True, room_version_id=pdu.room_version.identifier,
        ))

    # --- our users in rooms elsewhere -----------------------------------------------------------
    async def _make(
        self, servers: list[str], room_id: str, user_id: str, membership: str
    ) -> tuple[str, dict[str, Any]]:
        """(server, make_* answer) from the first of ``servers`` that gives one."""
        query = {"ver": sorted(KNOWN_ROOM_VERSIONS)} if membership in ("join", "knock") else None
        last: Exception | None = None
        for server in servers:
            if server == self.hs.server_name:
                continue
            path = build_path(V1 + f"/make_{membership}/{{}}/{{}}", room_id, user_id)
            try:
                answer = await self.hs.federation_client.get_json(server, path, query)
            except FederationError as e:
                logger.info("make_%s via %s failed: %s", membership, server, e)
                last = e
                continue
            if isinstance(answer, dict) and isinstance(answer.get("event"), dict):
                return server, answer
        if isinstance(last, FederationError) and last.status is not None:
            raise last.to_matrix_error()
        raise MatrixError("M_NOT_FOUND", f"No server could help with room {room_id}", 404)

    def _sign_template(
        self, answer: dict[str, Any], user_id: str, content: dict[str, Any]
    ) -> Pdu:
        version_id = answer.get("room_version", "1")
        if version_id not in KNOWN_ROOM_VERSIONS:
            raise MatrixError("M_UNSUPPORTED_ROOM_VERSION",
                              f"Room version {version_id!r} is not supported")
        version = get_room_version(version_id)
        if version.event_id_in_pdu:
            raise MatrixError("M_UNSUPPORTED_ROOM_VERSION", "Rooms 1 and 2 cannot be joined")
        template = answer["event"]
        merged = dict(template.get("content") or {})
        merged.update(content)
        try:
            return build_event(
                version, server_name=self.hs.server_name,
                signing_key=self.hs.server_keys.signing_key, event_type=MEMBER, sender=user_id,
                content=merged, room_id=template.get("room_id"),
                prev_events=list(template.get("prev_events") or []),
                auth_events=list(template.get("auth_events") or []),
                depth=int(template.get("depth") or 1),
                origin_server_ts=self.hs.clock.time_msec(), state_key=user_id,
            )
        except (ValueError, TypeError) as e:
            raise MatrixError("M_BAD_JSON", f"The remote server's template is unusable: {e}",
                              502) from e

    async def join_remote(
        self, user_id: str, room_id: str, servers: list[str], content: dict[str, Any]
    ) -> Pdu:
        """Join a room through another server, becoming a resident of it."""
        server, answer = await self._make(servers, room_id, user_id, "join")
        pdu = self._sign_template(answer, user_id, content)
        path = build_path(V2 + "/send_join/{}/{}", room_id, pdu.event_id)
        try:
            sent = await self.hs.federation_client.put_json(server, path, pdu.to_federation_json())
        except FederationError as e:
            raise e.to_matrix_error() from e
        if not isinstance(sent, dict):
            raise MatrixError("M_UNKNOWN", "Bad send_join answer", 502)
        version = pdu.room_version
        event = sent.get("event")
        if isinstance(event, dict) and event.get("type") == MEMBER:
            # A restricted join comes back countersigned by the resident's server.
            try:
                remote = await self.hs.federation_events.check_signed(event, version)
                if remote.event_id == pdu.event_id:
                    pdu = remote
            except PduRejected as e:
                logger.warning("the countersigned join from %s is bad: %s", server, e)
        return await self._become_resident(pdu, sent, server)

    async def _become_resident(self, pdu: Pdu, sent: dict[str, Any], server: str) -> Pdu:
        hs = self.hs
        events = hs.federation_events
        version = pdu.room_version
        room_id = pdu.room_id
        async with events.room_lock(room_id):
            state = await events.check_all_for_room(list_field(sent, "state"), room_id, version)
            chain = await events.check_all_for_room(list_field(sent, "auth_chain"), room_id, version)
            rejected = await events.persist_outliers(version, chain + state)
            state_map: dict[StateKey, Pdu] = {}
            for p in topological(state):
                if p.is_state and p.event_id not in rejected:
                    state_map[p.state_tuple] = p
            if (CREATE, "") not in state_map:
                raise MatrixError("M_BAD_JSON", "The room's state has no create event", 502)
            reason = events.auth_against_state(pdu, state_map)
            if reason is not None:
                raise MatrixError("M_FORBIDDEN", f"The join is not allowed: {reason}")
            room = RoomState(room_id, version)
            for p in state_map.values():
                room.apply_state(p)
            room.apply_state(pdu)
            room.extremities = [pdu.event_id]
            room.depth = pdu.depth
            stream = hs.stream_ids.next()
            room.state_group = stream
            room.chain_length = 0
            state_after = room.state_ids()
            hs.state_groups.put(stream, state_after)
            hs.event_cache.put(pdu)
            hs.room_states.add(room)
            await hs.persister.persist(EventToPersist(
                pdu=pdu, stream_ordering=stream, state_group=stream, prev_state_group=None,
                prev_chain_length=0, state_after=state_after,
                current_state_delta=dict(room.state), room_version_id=version.identifier,
            ))
        logger.info("joined %s through %s (%d state events)", room_id, server, len(state_map))
        return pdu

    async def leave_remote(
        self, user_id: str, room_id: str, servers: list[str], content: dict[str, Any],
        membership: str = "leave",
    ) -> Pdu:
        """Reject an invite (or knock) to a room we are not in: make_leave/send_leave
        (or make_knock/send_knock) through a server in it."""
        server, answer = await self._make(servers, room_id, user_id, membership)
        pdu = self._sign_template(answer, user_id, content)
        path = build_path(V2 + f"/send_{membership}/{{}}/{{}}", room_id, pdu.event_id)
        if membership == "knock":
            path = build_path(V1 + "/send_knock/{}/{}", room_id, pdu.event_id)
        try:
            sent = await self.hs.federation_client.put_json(server, path, pdu.to_federation_json())
        except FederationError as e:
            raise e.to_matrix_error() from e
        if membership == "knock" and isinstance(sent, dict):
            knock_state = [stripped(e) for e in list_field(sent, "knock_room_state")
                           if isinstance(e, dict)]
            pdu = Pdu(pdu.room_version, pdu.event_id,
                      {**pdu.data, "unsigned": {"knock_room_state": knock_state}})
        await self._persist_out_of_room(pdu)
        return pdu

    async def invite_remote(self, room: RoomState, invite: Pdu) -> Pdu:
        """Send an invite we built to the invitee's server; the countersigned event."""
        destination = domain_of(invite.state_key or "")
        body = {
            "event": invite.to_federation_json(),
            "room_version": room.room_version.identifier,
            # Full PDUs (spec 1.16+: the invitee's server may check them), among
            # them the inviter's membership.
            "invite_room_state": [
                e.to_federation_json() for e in (
                    *(room.get(t) for t in STRIPPED_STATE_TYPES),
                    room.get(MEMBER, invite.sender),
                ) if e is not None
            ],
        }
        path = build_path(V2 + "/invite/{}/{}", room.room_id, invite.event_id)
        try:
            answer = await self.hs.federation_client.put_json(destination, path, body)
        except FederationError as e:
            raise e.to_matrix_error() from e
        event = answer.get("event") if isinstance(answer, dict) else None
        try:
            signed = await self.hs.federation_events.check_signed(event, room.room_version)
        except PduRejected as e:
            raise MatrixError("M_UNKNOWN", f"The invitee's server answered badly: {e}", 502) from e
        if signed.event_id != invite.event_id or destination not in signed.signatures:
            raise MatrixError("M_UNKNOWN", "The invitee's server did not countersign", 502)
        return signed
