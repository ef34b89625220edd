"""The federation transport: server keys, signed requests, transactions."""

from federation.keys import register_key_resources
from federation.version import register_federation_resources

__all__ = ["register_federation_resources", "register_key_resources"]
