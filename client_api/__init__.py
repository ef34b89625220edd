"""The client-server API transport: parse, authenticate, call a service, render."""

from client_api.account import register_account_resources
from client_api.account_data import register_account_data_resources
from client_api.admin import register_admin_resources
from client_api.capabilities import register_capabilities_resources
from client_api.devices import register_device_resources
from client_api.directory import register_directory_resources
from client_api.keys import register_keys_resources
from client_api.login import register_login_resources
from client_api.presence import register_presence_resources
from client_api.profile import register_profile_resources
from client_api.push_rules import register_push_rule_resources
from client_api.receipts import register_receipt_resources
from client_api.register import register_registration_resources
from client_api.relations import register_relations_resources
from client_api.room_events import register_room_event_resources
from client_api.rooms import register_room_resources
from client_api.sync import register_sync_resources
from client_api.to_device import register_to_device_resources
from client_api.typing import register_typing_resources
from client_api.user_directory import register_user_directory_resources
from client_api.versions import register_versions_resources
from client_api.voip import register_voip_resources

__all__ = ["register_client_resources"]


def register_client_resources(router, hs) -> None:  # type: ignore[no-untyped-def]
    register_versions_resources(router, hs)
    register_registration_resources(router, hs)
    register_login_resources(router, hs)
    register_account_resources(router, hs)
    register_device_resources(router, hs)
    register_capabilities_resources(router, hs)
    register_admin_resources(router, hs)
    register_room_resources(router, hs)
    register_room_event_resources(router, hs)
    register_sync_resources(router, hs)
    register_voip_resources(router, hs)
    register_relations_resources(router, hs)
    register_directory_resources(router, hs)
    register_profile_resources(router, hs)
    register_user_directory_resources(router, hs)
    register_typing_resources(router, hs)
    register_presence_resources(router, hs)
    register_account_data_resources(router, hs)
    register_to_device_resources(router, hs)
    register_keys_resources(router, hs)
    register_receipt_resources(router, hs)
    register_push_rule_resources(router, hs)
