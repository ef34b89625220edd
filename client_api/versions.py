"""/_matrix/client/versions and the /.well-known documents."""

from typing import Any

from twisted.web.server import Request

from homeserver.errors import MatrixError

# Spec versions whose client-server changes this server implements. The
# modules not served yet are listed in the README ("What is not there yet");
# a version is added here only once what it introduced for clients is served.
SUPPORTED_SPEC_VERSIONS: tuple[str, ...] = (
    "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11",
)

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
