"""Membership changes by local users: join, leave, invite, kick, ban, unban, knock.

Each change is one m.room.member event authorised by the event core; a refusal
is 403 M_FORBIDDEN with the auth rules' reason. Rooms this server is not in
need federation (make_join / send_join), which the federation work adds.
"""

import logging
from typing import Any

from homeserver.core.events import MEMBER, Pdu
from homeserver.core.power_levels import domain_of
from homeserver.errors import MatrixError
from homeserver.services.rooms.creation import ROOM_KIND_DM
from homeserver.services.rooms.state import RoomState

AUTHORISING_USER = "join_authorised_via_users_server"

logger = logging.getLogger(__name__)


class MembershipService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs

    async def _room(self, room_id: str) -> RoomState:
        room = await self.hs.room_states.get(room_id)
        if room is None:
            # Joining rooms on other servers arrives with federation.
            raise MatrixError("M_NOT_FOUND", f"No known servers to join {room_id} through")
        return room

    async def _send(self, room: RoomState, sender: str, target: str, content: dict[str, Any],
                    device_id: str | None = None, txn_id: str | None = None) -> Pdu:
        return await self.hs.room_sender.send(
            sender, room.room_id, MEMBER, content, state_key=target,
            device_id=device_id, txn_id=txn_id,
        )

    def _needs_federation(self, room: RoomState | None) -> bool:
        """Whether the room lives elsewhere: unknown here, or none of our users is in it."""
        return not self.hs.federation_membership.is_resident(room)

    async def _remote_servers(
        self, user_id: str, room_id: str, room: RoomState | None, servers: list[str]
    ) -> list[str]:
        """Servers to ask about a room we are not in: those given, the inviter's,
        then those of the room's members we know of."""
        found = list(servers)
        memberships = await self.hs.user_rooms.get(user_id)
        event_id = memberships.get(room_id, (None, 0, None))[2]
        if event_id is not None:
            event = await self.hs.events.get_event(event_id)
            if event is not None:
                found.append(domain_of(event.sender))
        if room is not None:
            found.extend(domain_of(u) for u, m in room.members.items() if m == "join")
        if ":" in room_id:
            found.append(room_id.split(":", 1)[1])  # rooms before 12 name their creator's server
        return [s for s in dict.fromkeys(found) if s and s != self.hs.server_name]

    async def join(self, user_id: str, room_id: str, reason: str | None = None,
                   device_id: str | None = None, servers: list[str] | None = None) -> Pdu:
        room = await self.hs.room_states.get(room_id)
        if self._needs_federation(room):
            profile = await self.hs.profiles.get_local_profile(user_id)
            content: dict[str, Any] = {"membership": "join", **profile}
            if reason:
                content["reason"] = reason
            remote = await self._remote_servers(user_id, room_id, room, servers or [])
            if not remote and room is None:
                raise MatrixError("M_NOT_FOUND", f"No known servers to join {room_id} through")
            if remote:
                return await self.hs.federation_membership.join_remote(
                    user_id, room_id, remote, content)
        room = await self._room(room_id)
        current = room.get(MEMBER, user_id)
        profile = await self.hs.profiles.get_local_profile(user_id)
        if current is not None and current.membership == "join" and all(
            current.content.get(k) == v for k, v in profile.items()
        ):
            return current  # already joined: nothing to change
        content: dict[str, Any] = {"membership": "join", **profile}
        if reason:
            content["reason"] = reason
        if room.room_version.restricted_join_rule and room.join_rule in (
            "restricted", "knock_restricted"
        ) and room.membership(user_id) not in ("invite", "join"):
            authoriser = self.restricted_join_authoriser(room, user_id)
            if authoriser is None:
                raise MatrixError(
                    "M_FORBIDDEN", "You are not a member of any room this room lets in"
                )
            content[AUTHORISING_USER] = authoriser
        return await self._send(room, user_id, user_id, content, device_id)

    def restricted_join_authoriser(self, room: RoomState, user_id: str) -> str | None:
        """A local member who may invite, if the user is in a room the rule allows."""
        allow = room.content_of("m.room.join_rules", "allow", [])
        allowed = False
        for entry in allow if isinstance(allow, list) else []:
            if isinstance(entry, dict) and entry.get("type") == "m.room_membership":
                other = self.hs.room_states.get_cached(entry.get("room_id", ""))
                if other is not None and other.membership(user_id) == "join":
                    allowed = True
                    break
        if not allowed:
            return None
        power = room.power_levels
        needed = power.named("invite")
        suffix = ":" + self.hs.server_name
        for member in room.users_with_membership("join"):
            if member.endswith(suffix) and power.user_level(member) >= needed:
                return member
        return None

    async def leave(self, user_id: str, room_id: str, reason: str | None = None) -> Pdu:
        room = await self.hs.room_states.get(room_id)
        if self._needs_federation(room):
            # Rejecting an invite (or withdrawing a knock) in a room we are not in.
            memberships = await self.hs.user_rooms.get(user_id)
            membership = memberships.get(room_id, (None, 0, None))[0]
            if membership in ("invite", "knock"):
                content: dict[str, Any] = {"membership": "leave"}
                if reason:
                    content["reason"] = reason
                remote = await self._remote_servers(user_id, room_id, room, [])
                return await self.hs.federation_membership.leave_remote(
                    user_id, room_id, remote, content)
        room = await self._room(room_id)
        if room.membership(user_id) in (None, "leave"):
            raise MatrixError("M_FORBIDDEN", f"{user_id} is not in room {room_id}")
        content: dict[str, Any] = {"membership": "leave"}
        if reason:
            content["reason"] = reason
        return await self._send(room, user_id, user_id, content)

    async def invite(self, sender: str, room_id: str, target: str, reason: str | None = None,
                     is_direct: bool = False) -> Pdu:
        room = await self._room(room_id)
        if room.membership(target) == "ban":
            raise MatrixError("M_FORBIDDEN", f"{target} is banned from the room")
        if room.membership(target) == "join":
            raise MatrixError("M_FORBIDDEN", f"{target} is already in the room")
        if room.kind == ROOM_KIND_DM:
            others = {u for u, m in room.members.items() if m in ("join", "invite")}
            if len(others | {target}) > 2:
                raise MatrixError(
                    "M_FORBIDDEN", "A direct message has two people; nobody else may be invited"
                )
        if not target.endswith(":" + self.hs.server_name):
            return await self._invite_remote(room, sender, target, reason, is_direct)
        if not await self.hs.accounts.user_exists(target):
            raise MatrixError("M_NOT_FOUND", f"Unknown user {target}")
        profile = await self.hs.profiles.get_local_profile(target)
        content: dict[str, Any] = {"membership": "invite", **profile}
        if reason:
            content["reason"] = reason
        if is_direct:
            content["is_direct"] = True
        return await self._send(room, sender, target, content)

    async def _invite_remote(self, room: RoomState, sender: str, target: str,
                             reason: str | None, is_direct: bool) -> Pdu:
        """The invitee's server countersigns the invite before it enters the room."""
        content: dict[str, Any] = {"membership": "invite"}
        if reason:
            content["reason"] = reason
        if is_direct:
            content["is_direct"] = True
        invite = self.hs.room_sender.build_unattached(room, sender, MEMBER, content, target)
        signed = await self.hs.federation_membership.invite_remote(room, invite)
        events = self.hs.federation_events
        async with events.room_lock(room.room_id):
            await events.handle_new_pdu(self.hs.server_name, room, signed, fetch_missing=False)
        return signed

    async def kick(self, sender: str, room_id: str, target: str, reason: str | None = None) -> Pdu:
        room = await self._room(room_id)
        if room.membership(target) not in ("join", "invite", "knock"):
            raise MatrixError("M_FORBIDDEN", f"{target} is not in the room")
        return await self._moderate(room, sender, target, "leave", reason)

    async def ban(self, sender: str, room_id: str, target: str, reason: str | None = None) -> Pdu:
        room = await self._room(room_id)
        return await self._moderate(room, sender, target, "ban", reason)

    async def unban(self, sender: str, room_id: str, target: str, reason: str | None = None) -> Pdu:
        room = await self._room(room_id)
        if room.membership(target) != "ban":
            raise MatrixError("M_FORBIDDEN", f"{target} is not banned")
        return await self._moderate(room, sender, target, "leave", reason)

    async def _moderate(self, room: RoomState, sender: str, target: str, membership: str,
                        reason: str | None) -> Pdu:
        content: dict[str, Any] = {"membership": membership}
        if reason:
            content["reason"] = reason
        return await self._send(room, sender, target, content)

    async def knock(self, user_id: str, room_id: str, reason: str | None = None,
                    servers: list[str] | None = None) -> Pdu:
        profile = await self.hs.profiles.get_local_profile(user_id)
        content: dict[str, Any] = {"membership": "knock", **profile}
        if reason:
            content["reason"] = reason
        maybe_room = await self.hs.room_states.get(room_id)
        if self._needs_federation(maybe_room):
            remote = await self._remote_servers(user_id, room_id, maybe_room, servers or [])
            if remote:
                return await self.hs.federation_membership.leave_remote(
                    user_id, room_id, remote, content, membership="knock")
        room = await self._room(room_id)
        return await self._send(room, user_id, user_id, content)

    async def forget(self, user_id: str, room_id: str) -> None:
        memberships = await self.hs.events_store.get_memberships_for_user(user_id)
        membership = memberships.get(room_id, (None, False))[0]
        if membership in ("join", "invite", "knock"):
            raise MatrixError("M_UNKNOWN", "You must leave the room before forgetting it")
        if membership is None:
            raise MatrixError("M_NOT_FOUND", "You have never been in this room")
        await self.hs.events_store.forget_room(user_id, room_id)
        self.hs.user_rooms.forget(user_id, room_id)

    async def on_user_deactivated(self, user_id: str, erase: bool) -> None:
        """A deactivation hook: the user leaves every room they are in or invited to."""
        memberships = await self.hs.user_rooms.get(user_id)
        for room_id, (membership, _, _) in list(memberships.items()):
            if membership in ("join", "invite", "knock"):
                try:
                    await self.leave(user_id, room_id)
                except MatrixError as e:
                    logger.warning("deactivating %s: could not leave %s: %s",
                                   user_id, room_id, e.message)
