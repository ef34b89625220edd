"""Room aliases and the published room directory (spec: client-server "Room aliases",
"Published room directory", ``m.room.canonical_alias``).

Who may do what (the spec leaves most of it to the server):

- Create an alias: the alias must be on this server, well formed (the
  appendix grammar; we also refuse whitespace and control characters in new
  localparts) and free, and not reserved by an application service's
  exclusive alias namespace for other users (400 M_EXCLUSIVE); the room must
  be known here; the user must be joined to the room (or be a server admin).
  ``PUT /directory/room`` answers 409 M_ROOM_IN_USE for a taken alias, as
  the spec's 409; ``/createRoom`` checks first and gets 400 M_ROOM_IN_USE.
  No power level is needed: any member may add an address, as on Synapse;
  what the room *advertises* is the ``m.room.canonical_alias`` event, which
  power levels guard.
- Delete an alias: its creator, a server admin, or a joined member with the
  power to send ``m.room.canonical_alias``. Deleting also drops the alias from
  the room's ``m.room.canonical_alias`` event when the user may send it (the
  spec's recommendation); if they may not, the alias is deleted all the same.
- Publish or unpublish a room: a server admin, or a joined member with the
  power to send ``m.room.canonical_alias``. Publishing must also pass
  ``room_list_publication_rules`` (Synapse's format: rules with ``user_id``,
  ``alias`` and ``room_id`` globs, default ``*``, and ``action`` allow/deny;
  the first matching rule decides; when no rule matches, publishing is
  refused; the default configuration is one rule allowing everything). At room
  creation (``check_power=False``) a refusal by the rules leaves the room
  unpublished instead of failing the creation.
- The directory lists published rooms with at least one joined member,
  largest first, then by room id; pagination tokens are positions in that
  order, so a page boundary survives rooms being added or removed.

Aliases and directories of other servers need federation, which this server
does not have yet: resolving a remote alias answers 404 saying so.
"""

import base64
import binascii
import logging
import re
from bisect import bisect_left, bisect_right
from typing import Any

from homeserver.errors import MatrixError
from homeserver.services.federation_client import FederationError
from homeserver.services.rooms.state import RoomState
from storage.directory import DirectoryStore

logger = logging.getLogger(__name__)

CANONICAL_ALIAS = "m.room.canonical_alias"
MAX_ALIAS_BYTES = 255

# Appendix "Server name": hostname (IPv4, [IPv6] or DNS name) and an optional port.
_SERVER_NAME = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,255})(?::[0-9]{1,5})?", re.ASCII
)


def split_alias(alias: Any) -> tuple[str, str] | None:
    """(localpart, server name) of a well-formed ``#localpart:server`` alias, else None.

    The appendix grammar: any code points but ``:`` and NUL in the localpart,
    a valid server name, at most 255 bytes in all.
    """
    if type(alias) is not str or not alias.startswith("#"):
        return None
    localpart, sep, server = alias[1:].partition(":")
    if not sep or not localpart or "\x00" in localpart or not _SERVER_NAME.fullmatch(server):
        return None
    try:
        if len(alias.encode("utf-8")) > MAX_ALIAS_BYTES:
            return None
    except UnicodeEncodeError:  # lone surrogates
        return None
    return localpart, server


def _glob(pattern: Any) -> re.Pattern[str]:
    """A Synapse-style glob: ``*`` any run of characters, ``?`` one character."""
    text = pattern if isinstance(pattern, str) else "*"
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text]
    return re.compile("".join(parts), re.DOTALL)


class PublicationRule:
    """One entry of ``room_list_publication_rules``."""

    def __init__(self, rule: dict[str, Any]) -> None:
        action = rule.get("action")
        if action not in ("allow", "deny"):
            logger.error(
                "room_list_publication_rules: action %r is not allow/deny; "
                "treating the rule as deny",
                action,
            )
        self.allow = action == "allow"
        self.user_id = _glob(rule.get("user_id", "*"))
        self.room_id = _glob(rule.get("room_id", "*"))
        alias = rule.get("alias", "*")
        self.any_alias = alias == "*"
        self.alias = _glob(alias)

    def matches(self, user_id: str, room_id: str, aliases: list[str]) -> bool:
        if not self.user_id.fullmatch(user_id) or not self.room_id.fullmatch(room_id):
            return False
        # A rule naming an alias pattern applies only to rooms having a matching alias.
        return self.any_alias or any(self.alias.fullmatch(a) for a in aliases)


def _nonempty_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def plain_text_topic(content: dict[str, Any]) -> str | None:
    """The text/plain topic: from ``m.topic`` (spec 1.15) first, else ``topic``."""
    block = content.get("m.topic")
    texts = block.get("m.text") if isinstance(block, dict) else None
    if isinstance(texts, list):
        for text in texts:
            if (
                isinstance(text, dict)
                and text.get("mimetype", "text/plain") == "text/plain"
                and isinstance(text.get("body"), str)
            ):
                return text["body"] or None
    return _nonempty_str(content.get("topic"))


def room_summary(room: RoomState) -> dict[str, Any]:
    """A ``publicRooms`` chunk entry for the room, from its current state."""
    entry: dict[str, Any] = {
        "room_id": room.room_id,
        "num_joined_members": sum(1 for _ in room.users_with_membership("join")),
        "world_readable": room.content_of("m.room.history_visibility", "history_visibility")
        == "world_readable",
        "guest_can_join": room.content_of("m.room.guest_access", "guest_access") == "can_join",
        "join_rule": room.join_rule,
    }
    optional = {
        "name": _nonempty_str(room.content_of("m.room.name", "name")),
        "canonical_alias": _nonempty_str(room.content_of(CANONICAL_ALIAS, "alias")),
        "avatar_url": _nonempty_str(room.content_of("m.room.avatar", "url")),
        "room_type": _nonempty_str(room.create_event.content.get("type")),
    }
    topic_event = room.get("m.room.topic")
    if topic_event is not None:
        optional["topic"] = plain_text_topic(topic_event.content)
    entry.update({k: v for k, v in optional.items() if v is not None})
    return entry


def _advertised_aliases(room: RoomState) -> list[str]:
    """alias and alt_aliases of the room's m.room.canonical_alias event."""
    found = []
    alias = room.content_of(CANONICAL_ALIAS, "alias")
    if isinstance(alias, str) and alias:
        found.append(alias)
    alt = room.content_of(CANONICAL_ALIAS, "alt_aliases")
    if isinstance(alt, list):
        found.extend(a for a in alt if isinstance(a, str))
    return found


# --- pagination tokens: "n" (rooms after) or "p" (rooms before) + a sort key ---------
SortKey = tuple[int, str]  # (-num_joined_members, room_id)


def _sort_key(entry: dict[str, Any]) -> SortKey:
    return (-entry["num_joined_members"], entry["room_id"])


def _encode_token(direction: str, key: SortKey) -> str:
    raw = f"{-key[0]}|{key[1]}".encode()
    return direction + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[str, SortKey]:
    try:
        direction, data = token[0], token[1:]
        if direction not in ("n", "p"):
            raise ValueError(direction)
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
        members, _, room_id = raw.partition("|")
        return direction, (-int(members), room_id)
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        raise MatrixError("M_INVALID_PARAM", f"Invalid pagination token {token[:80]!r}") from None


class DirectoryService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store = DirectoryStore(hs.database)
        self._rules = [
            PublicationRule(r if isinstance(r, dict) else {})
            for r in hs.config["room_list_publication_rules"] or []
        ]

    # --- helpers -----------------------------------------------------------------
    async def _is_admin(self, user_id: str) -> bool:
        return bool(await self.hs.auth.is_server_admin(user_id))

    def _check_exclusive(self, alias: str, user_id: str) -> None:
        """400 M_EXCLUSIVE when an application service reserves the alias for its users."""
        for service in self.hs.auth.app_services:
            if service.is_exclusive_alias(alias) and not (
                user_id == service.sender or service.is_interested_in_user(user_id)
            ):
                raise MatrixError("M_EXCLUSIVE", "This alias is reserved by an application service")

    async def _room(self, room_id: str, message: str = "Room not found") -> RoomState:
        room = await self.hs.room_states.get(room_id)
        if room is None:
            raise MatrixError("M_NOT_FOUND", message)
        return room

    @staticmethod
    def _may_send_canonical_alias(room: RoomState, user_id: str) -> bool:
        if room.membership(user_id) != "join":
            return False
        power = room.power_levels
        return power.user_level(user_id) >= power.required_level(CANONICAL_ALIAS, True)

    def _local_alias(self, alias: str, creating: bool = False) -> str:
        """The alias, checked to be well formed and on this server (else 400)."""
        parts = split_alias(alias)
        if parts is None:
            raise MatrixError("M_INVALID_PARAM", "Room alias invalid")
        localpart, server = parts
        if server != self.hs.server_name:
            raise MatrixError("M_INVALID_PARAM", "Room alias must be on this server")
        if creating and any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in localpart):
            raise MatrixError(
                "M_INVALID_PARAM", "Room alias may not contain whitespace or control characters"
            )
        return alias

    def publication_allowed(self, user_id: str, room_id: str, aliases: list[str]) -> bool:
        """What ``room_list_publication_rules`` say: the first matching rule decides."""
        for rule in self._rules:
            if rule.matches(user_id, room_id, aliases):
                return rule.allow
        return False

    # --- aliases -------------------------------------------------------------------
    async def check_alias_available(self, alias: str, user_id: str | None = None) -> None:
        """400 M_INVALID_PARAM unless a well-formed alias of ours; 400 M_ROOM_IN_USE if taken.

        With ``user_id``, also 400 M_EXCLUSIVE when an application service
        reserves the alias and the user is not one of its users.
        """
        self._local_alias(alias, creating=True)
        if user_id is not None:
            self._check_exclusive(alias, user_id)
        if await self.store.get_alias(alias) is not None:
            raise MatrixError("M_ROOM_IN_USE", f"Room alias {alias} is already in use")

    async def create_alias(
        self, alias: str, room_id: str, user_id: str, check_power: bool = True
    ) -> None:
        """Point ``alias`` at ``room_id``. 409 M_ROOM_IN_USE if the alias exists already."""
        self._local_alias(alias, creating=True)
        if check_power:
            self._check_exclusive(alias, user_id)
        room = await self._room(room_id)
        if check_power and room.membership(user_id) != "join" and not await self._is_admin(user_id):
            raise MatrixError("M_FORBIDDEN", "You must be in the room to create an alias for it")
        created = await self.store.create_alias(
            alias, room_id, user_id, [self.hs.server_name], self.hs.clock.time_msec()
        )
        if not created:
            raise MatrixError("M_ROOM_IN_USE", f"Room alias {alias} already exists", 409)

    async def _resolve_remote_alias(self, alias: str, server: str) -> tuple[str, list[str]]:
        """Ask the alias's server (GET /_matrix/federation/v1/query/directory)."""
        try:
            body = await self.hs.federation_client.get_json(
                server, "/_matrix/federation/v1/query/directory", {"room_alias": alias})
        except FederationError as e:
            raise e.to_matrix_error() from e
        room_id = body.get("room_id") if isinstance(body, dict) else None
        servers = body.get("servers") if isinstance(body, dict) else None
        if not isinstance(room_id, str) or not isinstance(servers, list):
            raise MatrixError("M_UNKNOWN", f"{server} answered with a malformed alias", 502)
        return room_id, [s for s in servers if isinstance(s, str)]

    async def public_rooms_of(
        self, server: str, limit: int | None, since: str | None, search_filter: Any,
        include_all_networks: bool,
    ) -> dict[str, Any]:
        """Another server's public room list (POST /_matrix/federation/v1/publicRooms)."""
        body: dict[str, Any] = {"include_all_networks": include_all_networks}
        if limit is not None:
            body["limit"] = limit
        if since:
            body["since"] = since
        if search_filter:
            body["filter"] = search_filter
        try:
            return await self.hs.federation_client.post_json(
                server, "/_matrix/federation/v1/publicRooms", content=body)
        except FederationError as e:
            raise e.to_matrix_error() from e

    async def resolve_alias(self, alias: str) -> tuple[str, list[str]]:
        """(room id, servers that can help join it), or 404 M_NOT_FOUND."""
        parts = split_alias(alias)
        if parts is None:
            raise MatrixError("M_INVALID_PARAM", "Room alias invalid")
        if parts[1] != self.hs.server_name:
            return await self._resolve_remote_alias(alias, parts[1])
        record = await self.store.get_alias(alias)
        if record is None:
            raise MatrixError("M_NOT_FOUND", f"Room alias {alias} not found")
        servers = [self.hs.server_name, *record.servers]
        room = await self.hs.room_states.get(record.room_id)
        if room is not None:
            servers.extend(u.partition(":")[2] for u in room.users_with_membership("join"))
        return record.room_id, [s for s in dict.fromkeys(servers) if s]

    async def delete_alias(self, alias: str, user_id: str) -> None:
        """Remove one of our aliases (see the module docstring for who may)."""
        parts = split_alias(alias)
        if parts is None:
            raise MatrixError("M_INVALID_PARAM", "Room alias invalid")
        if parts[1] != self.hs.server_name:
            raise MatrixError("M_INVALID_PARAM", "Only aliases of this server can be deleted here")
        record = await self.store.get_alias(alias)
        if record is None:
            raise MatrixError("M_NOT_FOUND", f"Room alias {alias} not found")
        room = await self.hs.room_states.get(record.room_id)
        allowed = (
            record.creator == user_id
            or (room is not None and self._may_send_canonical_alias(room, user_id))
            or await self._is_admin(user_id)
        )
        if not allowed:
            raise MatrixError("M_FORBIDDEN", "You don't have permission to delete the alias")
        if await self.store.delete_alias(alias) is None:
            raise MatrixError("M_NOT_FOUND", f"Room alias {alias} not found")
        if room is not None:
            await self._drop_from_canonical_alias(room, alias, user_id)

    async def _drop_from_canonical_alias(self, room: RoomState, alias: str, user_id: str) -> None:
        event = room.get(CANONICAL_ALIAS)
        if event is None:
            return
        content = dict(event.content)
        changed = False
        if content.get("alias") == alias:
            del content["alias"]
            changed = True
        alt = content.get("alt_aliases")
        if isinstance(alt, list) and alias in alt:
            content["alt_aliases"] = [a for a in alt if a != alias]
            changed = True
        if not changed:
            return
        try:
            await self.hs.room_sender.send(
                user_id, room.room_id, CANONICAL_ALIAS, content, state_key=""
            )
        except MatrixError as e:
            # The spec recommends deleting the alias all the same.
            logger.info(
                "alias %s deleted; %s could not update %s in %s: %s",
                alias,
                user_id,
                CANONICAL_ALIAS,
                room.room_id,
                e.message,
            )

    async def get_local_aliases(self, room_id: str) -> list[str]:
        return await self.store.get_aliases_for_room(room_id)

    async def check_canonical_alias_content(self, room_id: str, content: dict[str, Any]) -> None:
        """Validate a new ``m.room.canonical_alias`` content before it is sent.

        Aliases not already in the room's current event must be well formed
        (400 M_INVALID_PARAM) and, when on this server, point to this room
        (400 M_BAD_ALIAS). Aliases of other servers cannot be checked without
        federation and are accepted as they are.
        """
        alias = content.get("alias")
        alt = content.get("alt_aliases")
        if alias is not None and not isinstance(alias, str):
            raise MatrixError("M_INVALID_PARAM", "alias must be a string")
        if alt is not None and (
            not isinstance(alt, list) or not all(isinstance(a, str) for a in alt)
        ):
            raise MatrixError("M_INVALID_PARAM", "alt_aliases must be a list of strings")
        room = await self.hs.room_states.get(room_id)
        present = set(_advertised_aliases(room)) if room is not None else set()
        candidates = ([alias] if alias else []) + list(alt or [])
        for candidate in dict.fromkeys(candidates):
            if candidate in present:
                continue  # the spec: aliases already in the event are not re-validated
            parts = split_alias(candidate)
            if parts is None:
                raise MatrixError(
                    "M_INVALID_PARAM", f"{candidate[:300]!r} is not a valid room alias"
                )
            if parts[1] != self.hs.server_name:
                continue
            record = await self.store.get_alias(candidate)
            if record is None or record.room_id != room_id:
                raise MatrixError(
                    "M_BAD_ALIAS", f"The alias '{candidate}' does not point to this room."
                )

    # --- published room directory ---------------------------------------------------
    async def get_room_visibility(self, room_id: str) -> str:
        is_public = await self.store.get_room_is_public(room_id)
        if is_public is None:
            raise MatrixError("M_NOT_FOUND", "Room not found")
        return "public" if is_public else "private"

    async def set_room_visibility(
        self, room_id: str, visibility: str, user_id: str, check_power: bool = True
    ) -> None:
        if visibility not in ("public", "private"):
            raise MatrixError("M_INVALID_PARAM", "visibility must be public or private")
        room = await self._room(room_id)
        if (
            check_power
            and not self._may_send_canonical_alias(room, user_id)
            and not (await self._is_admin(user_id))
        ):
            raise MatrixError(
                "M_FORBIDDEN",
                "You need to be in the room with the power to set its canonical alias "
                "to change its visibility in the directory",
            )
        if visibility == "public":
            aliases = [*await self.store.get_aliases_for_room(room_id), *_advertised_aliases(room)]
            if not self.publication_allowed(user_id, room_id, aliases):
                if not check_power:
                    logger.info(
                        "room %s not published: room_list_publication_rules refuse %s",
                        room_id,
                        user_id,
                    )
                    return
                raise MatrixError("M_FORBIDDEN", "Not allowed to publish this room")
        if not await self.store.set_room_is_public(room_id, visibility == "public"):
            raise MatrixError("M_NOT_FOUND", "Room not found")

    async def public_rooms(
        self,
        limit: int | None,
        since: str | None,
        filter: dict[str, Any] | None,
        include_all_networks: bool = False,
    ) -> dict[str, Any]:
        """A page of the published room directory (``publicRooms`` response body).

        There are no application-service networks, so ``include_all_networks``
        lists the same rooms.
        """
        if limit is not None and limit < 1:
            raise MatrixError("M_INVALID_PARAM", "limit must be a positive integer")
        position = _decode_token(since) if since else None
        term, room_types = None, None
        if filter:
            if isinstance(filter.get("generic_search_term"), str):
                term = filter["generic_search_term"].strip().casefold() or None
            if isinstance(filter.get("room_types"), list) and filter["room_types"]:
                room_types = set(filter["room_types"])

        entries = []
        for room_id in await self.store.get_public_room_ids():
            room = await self.hs.room_states.get(room_id)
            if room is None:
                continue
            entry = room_summary(room)
            if entry["num_joined_members"] == 0:
                continue  # nobody of ours is left to let anyone in
            if room_types is not None and entry.get("room_type") not in room_types:
                continue
            if term is not None and not self._matches(term, entry, room):
                continue
            entries.append(entry)
        entries.sort(key=_sort_key)
        keys = [_sort_key(e) for e in entries]

        total = len(entries)
        if position is None:
            start = 0
            end = total if limit is None else min(limit, total)
        elif position[0] == "n":
            start = bisect_right(keys, position[1])
            end = total if limit is None else min(start + limit, total)
        else:
            end = bisect_left(keys, position[1])
            start = 0 if limit is None else max(0, end - limit)
        result: dict[str, Any] = {"chunk": entries[start:end], "total_room_count_estimate": total}
        if start < end:
            if end < total:
                result["next_batch"] = _encode_token("n", keys[end - 1])
            if start > 0:
                result["prev_batch"] = _encode_token("p", keys[start])
        return result

    @staticmethod
    def _matches(term: str, entry: dict[str, Any], room: RoomState) -> bool:
        texts = [entry.get("name"), entry.get("topic"), *_advertised_aliases(room)]
        return any(term in t.casefold() for t in texts if isinstance(t, str))


__all__ = ["DirectoryService", "room_summary", "split_alias"]
