"""The redaction algorithm, per room version (spec: rooms/fragments/v*-redactions)."""

from typing import Any

from homeserver.core.room_versions import RedactionRules, RoomVersion

_TOP_LEVEL_V1 = frozenset(
    {
        "event_id", "type", "room_id", "sender", "state_key", "content", "hashes",
        "signatures", "depth", "prev_events", "prev_state", "auth_events", "origin",
        "origin_server_ts", "membership",
    }
)
_TOP_LEVEL_V11 = _TOP_LEVEL_V1 - {"origin", "membership", "prev_state"}

_POWER_LEVEL_KEYS = (
    "ban", "events", "events_default", "kick", "redact", "state_default", "users",
    "users_default",
)


def _kept_content(event_type: str, content: dict[str, Any], rules: RedactionRules) -> dict[str, Any]:
    v = rules.value

    def keep(*keys: str) -> dict[str, Any]:
        return {k: content[k] for k in keys if k in content}

    if event_type == "m.room.member":
        kept = keep("membership", "join_authorised_via_users_server") if v >= 9 else keep("membership")
        if v >= 11:
            # The object stays (possibly empty), with only its "signed" key:
            # Synapse does this, and it changes the reference hash.
            invite = content.get("third_party_invite")
            if isinstance(invite, dict):
                kept["third_party_invite"] = (
                    {"signed": invite["signed"]} if "signed" in invite else {}
                )
        return kept
    if event_type == "m.room.create":
        return dict(content) if v >= 11 else keep("creator")
    if event_type == "m.room.join_rules":
        return keep("join_rule", "allow") if v >= 8 else keep("join_rule")
    if event_type == "m.room.power_levels":
        return keep(*_POWER_LEVEL_KEYS, "invite") if v >= 11 else keep(*_POWER_LEVEL_KEYS)
    if event_type == "m.room.aliases" and v < 6:
        return keep("aliases")
    if event_type == "m.room.history_visibility":
        return keep("history_visibility")
    if event_type == "m.room.redaction" and v >= 11:
        return keep("redacts")
    return {}


def redact_pdu(pdu: dict[str, Any], room_version: RoomVersion) -> dict[str, Any]:
    """Return the redacted copy of a PDU dict; the input is not modified."""
    rules = room_version.redaction_rules
    allowed = _TOP_LEVEL_V11 if rules is RedactionRules.V11 else _TOP_LEVEL_V1
    redacted = {k: v for k, v in pdu.items() if k in allowed}
    content = pdu.get("content")
    redacted["content"] = (
        _kept_content(pdu.get("type"), content, rules) if isinstance(content, dict) else {}
    )
    return redacted
