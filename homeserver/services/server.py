"""The HomeServer: one object holding the configuration, clock, database and services.

Transports receive it and call its services; nothing below the services
layer sees it.
"""

from typing import Any
from urllib.parse import urlsplit

import homeserver
from crypto.keys import ServerSigningKey
from homeserver.config import HomeserverConfig
from homeserver.config.loader import parse_duration_ms
from homeserver.services.clock import Clock
from homeserver.services.server_keys import ServerKeys
from storage import Database


class HomeServer:
    def __init__(
        self,
        config: HomeserverConfig,
        reactor: Any,
        database: Database,
        signing_keys: list[ServerSigningKey],
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = Clock(reactor)
        self.database = database
        self.server_name = config.server_name
        self.server_keys = ServerKeys(
            config.server_name,
            signing_keys,
            config.get("old_signing_keys") or {},
            parse_duration_ms(config["key_refresh_interval"]),
            self.clock,
        )

    version = homeserver.__version__

    @property
    def federation_server_address(self) -> str:
        """host:port other servers should reach us at, for /.well-known/matrix/server."""
        url = urlsplit(self.config.public_baseurl)
        return f"{url.hostname}:{url.port or 443}"
