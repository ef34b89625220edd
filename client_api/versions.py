"""/_matrix/client/versions and the /.well-known documents."""

from typing import Any

from twisted.web.server import Request

from homeserver.errors import MatrixError

# Spec versions whose whole client-server surface this server implements.
# A version is added here only when its endpoints have landed, so clients
# never rely on something we do not serve.
SUPPORTED_SPEC_VERSIONS: tuple[str, ...] = ()

# Unstable features we implement, by their MSC feature flag.
UNSTABLE_FEATURES: dict[str, bool] = {}


def register_versions_resources(router: Any, hs: Any) -> None:
    async def versions(request: Request) -> tuple[int, Any]:
        return 200, {
            "versions": list(SUPPORTED_SPEC_VERSIONS),
            "unstable_features": dict(UNSTABLE_FEATURES),
            "server": {"name": "homeserver", "version": hs.version},
        }

    async def well_known_client(request: Request) -> tuple[int, Any]:
        return 200, {"m.homeserver": {"base_url": hs.config.public_baseurl}}

    async def well_known_server(request: Request) -> tuple[int, Any]:
        if not hs.config["serve_server_wellknown"]:
            raise MatrixError("M_NOT_FOUND", "No .well-known/matrix/server here")
        return 200, {"m.server": hs.federation_server_address}

    router.register("GET", "/_matrix/client/versions", versions)
    router.register("GET", "/.well-known/matrix/client", well_known_client)
    router.register("GET", "/.well-known/matrix/server", well_known_server)
