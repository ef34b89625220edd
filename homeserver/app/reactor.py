"""Installing Twisted's reactor without the TLS stack while no TLS is in use.

Twisted's ``posixbase`` and ``tcp`` modules import ``twisted.protocols.tls`` and
``twisted.internet.ssl`` when the reactor is installed, and with them pyOpenSSL,
cryptography's native bindings and service_identity: about 11 MiB of resident
memory in a server that may never speak TLS (plain-HTTP listeners behind a
reverse proxy, no federation yet). ``twisted.web.http`` likewise imports the
HTTP/2 stack (h2, hpack, hyperframe), which Twisted only speaks when TLS
negotiates it (ALPN), never on a plain-HTTP listener.

When no listener is configured with TLS, ``install_reactor`` installs the
reactor and imports ``twisted.web.http`` while those modules refuse to import
(as if pyOpenSSL and h2 were missing, which Twisted handles), then gives
``posixbase`` stand-ins that import the real modules on first use, so
``listenSSL`` / ``connectSSL`` still work: the TLS stack loads with the first
outbound federation request, remote media fetch or URL preview.

Lost in that case: ``startTLS`` on plain TCP connections (Twisted adds it to
``tcp.Connection`` only when TLS imports at reactor start; nothing here uses it)
and HTTP/2 on a TLS listener opened later in the process (there is none: the
listeners are the configured ones, all plain HTTP).
"""

import importlib
import sys
from typing import Any

# The modules the reactor would import for TLS (``_newtls`` brings ``tls``).
_TLS_MODULES = frozenset(
    {"twisted.internet._newtls", "twisted.protocols.tls", "twisted.internet.ssl"}
)
# What twisted.web.http imports for HTTP/2 (it brings h2, hpack, hyperframe).
_HTTP2_MODULES = frozenset({"twisted.web._http2"})


class _Refuse:
    """A meta path finder under which the given modules fail to import."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name in self._names:
            raise ImportError(f"{name} is not imported before TLS is used")
        return None


class _OnFirstUse:
    """Stands in for a module; imports it at the first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use>"


def install_reactor(tls_listener: bool) -> None:
    """Install the default reactor; without ``tls_listener``, with TLS imported
    on first use and without HTTP/2 (see the module docstring).

    Call it before anything imports the reactor or ``twisted.web.http``. It
    does nothing when a TLS listener is configured (the TLS stack is needed at
    start-up then) or when the reactor is already imported (tests, or an
    embedding program): that reactor is left as it is.
    """
    if tls_listener or "twisted.internet.posixbase" in sys.modules:
        return
    refuse = set(_TLS_MODULES)
    if "twisted.web.http" not in sys.modules:
        refuse |= _HTTP2_MODULES
    guard = _Refuse(frozenset(refuse))
    sys.meta_path.insert(0, guard)
    try:
        from twisted.internet import reactor  # noqa: F401 - installs the default reactor
        from twisted.web import http  # noqa: F401 - without HTTP/2
    finally:
        sys.meta_path.remove(guard)
    from twisted.internet import posixbase

    if posixbase.tls is None and posixbase.ssl is None:
        from twisted.internet.interfaces import IReactorSSL
        from zope.interface import classImplements

        posixbase.tls = _OnFirstUse("twisted.protocols.tls")  # type: ignore[assignment]
        posixbase.ssl = _OnFirstUse("twisted.internet.ssl")  # type: ignore[assignment]
        classImplements(posixbase.PosixReactorBase, IReactorSSL)

