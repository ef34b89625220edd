"""The client-server API transport: parse, authenticate, call a service, render."""

from client_api.rooms import register_room_resources
from client_api.versions import register_versions_resources

__all__ = ["register_client_resources"]


def register_client_resources(router, hs) -> None:  # type: ignore[no-untyped-def]
    register_versions_resources(router, hs)
    register_room_resources(router, hs)
