"""Every room version's properties in one registry.

Each field names one behaviour that differs between versions, so code asks
``room_version.knock_join_rule`` rather than comparing version strings.
"""

import enum

import attrs


class EventIdFormat(enum.Enum):
    V1 = 1  # "$localpart:server", carried in the event (rooms 1, 2)
    V2 = 2  # "$" + standard unpadded base64 reference hash (room 3)
    V3 = 3  # "$" + URL-safe unpadded base64 reference hash (rooms 4+)


class StateResAlgorithm(enum.Enum):
    V1 = 1  # room version 1
    V2 = 2  # rooms 2-11
    V2_1 = 3  # room 12: v2 with the empty-set start and conflicted-subgraph changes


class RedactionRules(enum.Enum):
    V1 = 1  # rooms 1-5
    V6 = 6  # rooms 6-7: aliases content no longer kept
    V8 = 8  # room 8: join_rules keeps "allow"
    V9 = 9  # rooms 9-10: member keeps join_authorised_via_users_server
    V11 = 11  # rooms 11-12


@attrs.frozen
class RoomVersion:
    identifier: str
    event_id_format: EventIdFormat
    state_res: StateResAlgorithm
    redaction_rules: RedactionRules
    # Auth rules
    special_case_aliases_auth: bool  # rooms 1-5: m.room.aliases skips most rules
    enforce_key_validity: bool  # room 5+: signing key valid_until_ts is checked
    strict_canonical_json: bool  # room 6+: floats/big ints make an event invalid
    limit_notifications_power_levels: bool  # room 6+: "notifications" is checked
    knock_join_rule: bool  # room 7+
    restricted_join_rule: bool  # room 8+
    knock_restricted_join_rule: bool  # room 10+
    enforce_int_power_levels: bool  # room 10+: no string power levels
    implicit_room_creator: bool  # room 11+: creator is the create event's sender
    # Room 12 ("hydra")
    room_id_is_create_event_hash: bool  # room id = "!" + create event reference hash
    creators_have_infinite_power: bool  # creators outrank every power level
    additional_creators: bool  # m.room.create content.additional_creators
    create_event_in_auth_events: bool  # false in room 12: implied by the room id

    @property
    def event_id_in_pdu(self) -> bool:
        return self.event_id_format is EventIdFormat.V1


def _version(identifier: str, number: int) -> RoomVersion:
    if number <= 5:
        redaction = RedactionRules.V1
    elif number <= 7:
        redaction = RedactionRules.V6
    elif number == 8:
        redaction = RedactionRules.V8
    elif number <= 10:
        redaction = RedactionRules.V9
    else:
        redaction = RedactionRules.V11
    return RoomVersion(
        identifier=identifier,
        event_id_format=(
            EventIdFormat.V1 if number <= 2 else EventIdFormat.V2 if number == 3 else EventIdFormat.V3
        ),
        state_res=(
            StateResAlgorithm.V1
            if number == 1
            else StateResAlgorithm.V2_1
            if number >= 12
            else StateResAlgorithm.V2
        ),
        redaction_rules=redaction,
        special_case_aliases_auth=number <= 5,
        enforce_key_validity=number >= 5,
        strict_canonical_json=number >= 6,
        limit_notifications_power_levels=number >= 6,
        knock_join_rule=number >= 7,
        restricted_join_rule=number >= 8,
        knock_restricted_join_rule=number >= 10,
        enforce_int_power_levels=number >= 10,
        implicit_room_creator=number >= 11,
        room_id_is_create_event_hash=number >= 12,
        creators_have_infinite_power=number >= 12,
        additional_creators=number >= 12,
        create_event_in_auth_events=number < 12,
    )


KNOWN_ROOM_VERSIONS: dict[str, RoomVersion] = {
    str(n): _version(str(n), n) for n in range(1, 13)
}
DEFAULT_ROOM_VERSION = "12"


class UnsupportedRoomVersion(ValueError):
    pass


def get_room_version(identifier: str) -> RoomVersion:
    try:
        return KNOWN_ROOM_VERSIONS[identifier]
    except (KeyError, TypeError):
        raise UnsupportedRoomVersion(f"unsupported room version {identifier!r}") from None
