"""The federation transport: server keys, signed requests, queries, transactions.

Every endpoint other servers call (except ``/version`` and the key
endpoints) is wrapped with ``federation.auth.authenticated``.
"""

from typing import Any

from federation.auth import authenticated
from federation.keys import register_key_resources
from federation.media import register_federation_media_resources
from federation.membership import register_membership_resources
from federation.queries import register_query_resources
from federation.reads import register_read_resources
from federation.transactions import register_transaction_resources
from federation.user_keys import register_user_key_resources
from federation.version import register_federation_resources as register_version_resource


def register_federation_resources(router: Any, hs: Any) -> None:
    register_version_resource(router, hs)
    register_query_resources(router, hs)
    register_read_resources(router, hs)
    register_federation_media_resources(router, hs)
    register_transaction_resources(router, hs)
    register_membership_resources(router, hs)
    register_user_key_resources(router, hs)


__all__ = ["authenticated", "register_federation_resources", "register_key_resources"]
