"""EDUs from other servers: what a ``PUT /send`` transaction's ``edus`` do here.

``on_edu`` is called for every EDU of an inbound transaction
(``homeserver/services/federation_inbound.py``). A server speaks only for
its own users: an EDU about anybody else's is dropped, as is anything
malformed, with a log line; ``on_edu`` never raises.

- ``m.typing``: a member joined to the room is typing (for at most 30 s, the
  spec's timeout, unless the server says again) or stopped.
- ``m.receipt``: public read receipts (``m.read``) of joined members, on
  events we have.
- ``m.presence``: the presence of users who share a room with us.
- ``m.direct_to_device``: messages for our users' devices, stored once per
  message id even when a retried transaction brings them again.
- ``m.device_list_update``, ``m.signing_key_update``: the user's device list
  or cross-signing keys changed; local users sharing a room see them in
  /sync's ``device_lists.changed``, and cached keys are dropped (or, for
  cross-signing keys, replaced).

Nothing received is sent out again: the typing, receipts and presence
services hand only our own users' changes to the federation sender.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer

from homeserver.errors import MatrixError
from homeserver.services.federation_reads import acl_allows
from homeserver.services.memberships import joined_rooms
from homeserver.services.presence import STATES as PRESENCE_STATES

logger = logging.getLogger(__name__)

TYPING = "m.typing"
RECEIPT = "m.receipt"
PRESENCE = "m.presence"
TO_DEVICE = "m.direct_to_device"
DEVICE_LIST_UPDATE = "m.device_list_update"
SIGNING_KEY_UPDATE = "m.signing_key_update"
# Typing from other servers lasts this long unless repeated (spec: "Typing Notifications").
REMOTE_TYPING_TIMEOUT_MS = 30_000
READ = "m.read"  # the only receipt type that travels between servers


class BadEdu(Exception):
    """The EDU is malformed or speaks for somebody it may not: dropped."""


def _string(content: dict[str, Any], field: str) -> str:
    value = content.get(field)
    if not isinstance(value, str) or not value:
        raise BadEdu(f"{field} must be a non-empty string")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadEdu(f"{what} must be an object")
    return value


def _user_of(origin: str, user_id: Any) -> str:
    """``user_id``, if it is a user of ``origin``."""
    if not isinstance(user_id, str) or not user_id.startswith("@"):
        raise BadEdu(f"{user_id!r} is not a user id")
    if user_id.partition(":")[2] != origin:
        raise BadEdu(f"{user_id} is not a user of {origin}")
    return user_id


class FederationEduHandler:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._handlers: dict[str, Callable[[str, dict[str, Any]], Awaitable[None]]] = {
            TYPING: self._on_typing,
            RECEIPT: self._on_receipt,
            PRESENCE: self._on_presence,
            TO_DEVICE: self._on_to_device,
            DEVICE_LIST_UPDATE: self._on_device_list_update,
            SIGNING_KEY_UPDATE: self._on_signing_key_update,
        }

    async def on_edu(self, origin: str, edu_type: str, content: Any) -> None:
        """Act on one EDU from ``origin`` (the transaction's authenticated sender)."""
        handler = self._handlers.get(edu_type)
        if handler is None:
            logger.debug("ignoring an EDU of type %r from %s", edu_type, origin)
            return
        try:
            await handler(origin, _object(content, "content"))
        except (BadEdu, MatrixError) as e:
            logger.info("dropping an %s EDU from %s: %s", edu_type, origin, e)
        except Exception:
            logger.exception("handling an %s EDU from %s failed", edu_type, origin)

    # --- typing, receipts, presence ---------------------------------------------------------
    async def _on_typing(self, origin: str, content: dict[str, Any]) -> None:
        user_id = _user_of(origin, content.get("user_id"))
        typing = content.get("typing")
        if not isinstance(typing, bool):
            raise BadEdu("typing must be a boolean")
        room_id = _string(content, "room_id")
        self._check_acl(origin, room_id)
        # Only joined members (M_FORBIDDEN otherwise); the federation sender only
        # passes our own users' typing on, so this is not sent back out.
        await self.hs.typing.set_typing(user_id, room_id, typing, REMOTE_TYPING_TIMEOUT_MS)

    def _check_acl(self, origin: str, room_id: str) -> None:
        """Typing and receipts in a room obey its server ACL, as its events do."""
        room = self.hs.room_states.get_cached(room_id)
        if room is not None and not acl_allows(room.get("m.room.server_acl"), origin):
            raise BadEdu(f"{origin} is denied by the server ACL of {room_id}")

    async def _on_receipt(self, origin: str, content: dict[str, Any]) -> None:
        writes = []
        for room_id, by_type in content.items():
            # Private receipts never leave their server; other types are not spec'd.
            reads = by_type.get(READ) if isinstance(by_type, dict) else None
            if not isinstance(reads, dict):
                logger.info("dropping the receipts of %s from %s: no m.read object", room_id, origin)
                continue
            for user_id, receipt in reads.items():
                try:
                    self._check_acl(origin, room_id)
                    writes.append(self._receipt(origin, room_id, user_id, receipt))
                except BadEdu as e:
                    logger.info("dropping a receipt from %s: %s", origin, e)
        # At once, so they share the receipts service's write batches.
        results = await defer.DeferredList(
            [defer.ensureDeferred(w) for w in writes], consumeErrors=True
        )
        for ok, failure in results:
            if not ok:
                logger.info("dropping a receipt from %s: %s", origin, failure.getErrorMessage())

    def _receipt(self, origin: str, room_id: str, user_id: str, receipt: Any) -> Awaitable[None]:
        _user_of(origin, user_id)
        receipt = _object(receipt, "a receipt")
        event_ids = receipt.get("event_ids")
        if not isinstance(event_ids, list) or not event_ids:
            raise BadEdu("event_ids must be a non-empty list")
        event_id = event_ids[-1]  # the spec allows exactly one
        if not isinstance(event_id, str):
            raise BadEdu("event ids must be strings")
        data = _object(receipt.get("data", {}), "data")
        ts = data.get("ts")
        if not isinstance(ts, int) or isinstance(ts, bool):
            ts = self.hs.clock.time_msec()
        thread_id = data.get("thread_id")
        if thread_id is not None and (not isinstance(thread_id, str) or not thread_id):
            raise BadEdu("thread_id must be a non-empty string")
        return self.hs.receipts.on_remote_receipt(user_id, room_id, event_id, ts, thread_id)

    async def _on_presence(self, origin: str, content: dict[str, Any]) -> None:
        push = content.get("push")
        if not isinstance(push, list):
            raise BadEdu("push must be a list")
        for entry in push:
            try:
                entry = _object(entry, "a presence update")
                user_id = _user_of(origin, entry.get("user_id"))
                state = _string(entry, "presence")
                if state not in PRESENCE_STATES:
                    raise BadEdu(f"unknown presence {state!r}")
                ago = entry.get("last_active_ago")
                status_msg = entry.get("status_msg")
            except BadEdu as e:
                logger.info("dropping a presence update from %s: %s", origin, e)
                continue
            if not await joined_rooms(self.hs, user_id, remote=True):
                continue  # nobody here may see it
            self.hs.presence.on_remote_presence(
                user_id,
                state,
                ago if isinstance(ago, int) and not isinstance(ago, bool) else None,
                status_msg if isinstance(status_msg, str) else None,
                entry.get("currently_active") is True,
            )

    # --- send-to-device -------------------------------------------------------------------------
    async def _on_to_device(self, origin: str, content: dict[str, Any]) -> None:
        sender = _user_of(origin, content.get("sender"))
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        for user_id, by_device in _object(content.get("messages"), "messages").items():
            if isinstance(by_device, dict):
                messages[user_id] = {
                    d: body for d, body in by_device.items() if isinstance(body, dict)
                }
        await self.hs.to_device.receive(
            origin, sender, _string(content, "message_id"), _string(content, "type"), messages
        )

    # --- device lists ---------------------------------------------------------------------------
    async def _on_device_list_update(self, origin: str, content: dict[str, Any]) -> None:
        user_id = _user_of(origin, content.get("user_id"))
        _string(content, "device_id")
        self.hs.e2e_keys.remote.on_device_list_update(user_id)
        await self.hs.device_lists.on_remote_change(user_id)

    async def _on_signing_key_update(self, origin: str, content: dict[str, Any]) -> None:
        user_id = _user_of(origin, content.get("user_id"))
        self.hs.e2e_keys.remote.on_signing_key_update(
            user_id, content.get("master_key"), content.get("self_signing_key")
        )
        await self.hs.device_lists.on_remote_change(user_id)
