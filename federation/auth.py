"""Authenticating inbound federation requests (spec "Request Authentication").

Every federation endpoint except ``/_matrix/federation/v1/version`` and the
key endpoints is wrapped with ``authenticated``::

    async def handler(request, origin, **path_params): ...
    router.register("GET", r"/_matrix/federation/v1/query/profile",
                    authenticated(hs, handler))

The wrapper parses every ``Authorization: X-Matrix ...`` header, refuses a
``destination`` that is not us, fetches the origin's key through the
keyring (it must be currently valid: old keys sign events, not requests) and
checks the signature over method, the request target exactly as received
(``request.uri``: path and query, still percent-encoded), origin,
destination and the JSON body. Any failure answers 401 M_UNAUTHORIZED; an
origin that ``federation_domain_whitelist`` leaves out gets 403 M_FORBIDDEN.
The handler receives the authenticated server name as ``origin``.
"""

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.web.server import Request

from crypto.signing import SignatureError
from crypto.xmatrix import XMatrixHeaderError, parse_authorization, verify_request
from homeserver.errors import MatrixError

logger = logging.getLogger(__name__)

FederationHandler = Callable[..., Awaitable[Any]]


def _unauthorized(message: str) -> MatrixError:
    return MatrixError("M_UNAUTHORIZED", message, 401)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def request_content(request: Request) -> Any:
    """The JSON body as the signature covers it (None without a body); 400 M_NOT_JSON."""
    request.content.seek(0)
    raw = request.content.read()
    request.content.seek(0)
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise MatrixError("M_NOT_JSON", "Content not JSON.") from e


async def authenticate_request(hs: Any, request: Request) -> str:
    """Check the request's X-Matrix signatures; return the origin server name."""
    headers = [
        h.decode("utf-8", "replace")
        for h in request.requestHeaders.getRawHeaders(b"Authorization") or []
    ]
    xmatrix = [h for h in headers if h.strip().lower().startswith("x-matrix")]
    if not xmatrix:
        raise _unauthorized("Missing X-Matrix Authorization header")
    try:
        auths = [parse_authorization(h) for h in xmatrix]
    except XMatrixHeaderError as e:
        raise _unauthorized(f"Malformed X-Matrix Authorization header: {e}") from e
    origin = auths[0].origin
    if any(a.origin != origin for a in auths):
        raise _unauthorized("Authorization headers name different origins")
    for auth in auths:
        if auth.destination is not None and auth.destination != hs.server_name:
            raise _unauthorized(f"Request is for {auth.destination}, not this server")

    whitelist = hs.config.get("federation_domain_whitelist")
    if isinstance(whitelist, list) and origin not in whitelist:
        raise MatrixError("M_FORBIDDEN", "Federation with this server is not allowed")

    content = request_content(request)
    method = request.method.decode("ascii")
    uri = request.uri.decode("utf-8", "replace")
    now = hs.clock.time_msec()
    for auth in auths:
        try:
            verify_key = await hs.keyring.get_verify_key(origin, auth.key_id, now)
        except Exception as e:
            logger.warning("fetching key %s of %s failed: %s", auth.key_id, origin, e)
            verify_key = None
        if verify_key is None:
            raise _unauthorized(f"No valid key {auth.key_id} of {origin} could be found")
        try:
            verify_request(
                auth,
                verify_key,
                method=method,
                uri=uri,
                our_server_name=hs.server_name,
                content=content,
            )
        except SignatureError as e:
            logger.info("refused %s %s from %s: %s", method, uri[:200], origin, e)
            raise _unauthorized(f"Invalid request signature: {e}") from e
    return origin


def authenticated(hs: Any, handler: FederationHandler | None = None) -> Any:
    """Wrap ``handler(request, origin, **params)`` as a route handler that only
    runs for correctly signed requests. Usable as ``authenticated(hs, handler)``
    or as the decorator ``@authenticated(hs)``."""

    def wrap(inner: FederationHandler) -> FederationHandler:
        async def wrapper(request: Request, **params: Any) -> Any:
            origin = await authenticate_request(hs, request)
            return await inner(request, origin=origin, **params)

        wrapper.__name__ = getattr(inner, "__name__", "federation_handler")
        wrapper.__doc__ = inner.__doc__
        return wrapper

    return wrap(handler) if handler is not None else wrap
