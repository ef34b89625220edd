"""URL previews: fetch a page safely, read its OpenGraph data, keep its image.

Safety, in order, for the page and for every redirect and image:

- only http and https, and nothing ``url_preview_url_blacklist`` matches;
- the host name is resolved here and *every* address it resolves to is
  checked against ``url_preview_ip_range_blacklist`` (less the whitelist);
  one blocked address refuses the URL;
- the connection goes to an address that was checked (no second lookup a
  DNS rebinding could answer differently);
- at most ``max_spider_size`` bytes are read and the whole fetch, redirects
  included, must finish within ``FETCH_TIMEOUT_SECONDS``.
"""

import fnmatch
import ipaddress
import logging
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import attrs
from twisted.internet import defer, protocol, threads
from twisted.python.failure import Failure
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from homeserver.errors import MatrixError

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 15.0
CONNECT_TIMEOUT_SECONDS = 10
MAX_REDIRECTS = 5
CACHE_SECONDS = 3600
CACHE_ENTRIES = 1000
USER_AGENT = b"Mozilla/5.0 (compatible; homeserver URL preview)"
_MAX_TEXT = {"og:title": 300, "og:description": 1000}
_URL_PARTS = (
    "scheme",
    "netloc",
    "username",
    "password",
    "hostname",
    "port",
    "path",
    "query",
    "fragment",
    "params",
)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)

# (image bytes, content type, file name) -> (mxc URI, width, height)
StoreImage = Callable[[bytes, str, str | None], Awaitable[tuple[str, int, int]]]


class _TooLarge(Exception):
    pass


@attrs.frozen
class Fetched:
    url: str  # after redirects
    content_type: str
    body: bytes


def _networks(ranges: list[str]) -> list[Any]:
    return [ipaddress.ip_network(r, strict=False) for r in ranges]


class AddressPolicy:
    """Which addresses may be contacted: the blacklist less the whitelist."""

    def __init__(self, blacklist: list[str], whitelist: list[str]) -> None:
        self._blacklist = _networks(blacklist)
        self._whitelist = _networks(whitelist)

    def blocked(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        for candidate in candidates:
            if any(candidate in net for net in self._whitelist):
                continue
            if any(candidate in net for net in self._blacklist):
                return True
        return False


def url_blacklisted(url: str, rules: list[dict[str, str]]) -> bool:
    """Synapse's url_preview_url_blacklist: a rule matches when all of its parts match."""
    parts = urlsplit(url)
    values = {
        "scheme": parts.scheme,
        "netloc": parts.netloc,
        "username": parts.username,
        "password": parts.password,
        "hostname": parts.hostname,
        "port": str(parts.port) if parts.port else None,
        "path": parts.path,
        "query": parts.query,
        "fragment": parts.fragment,
        "params": "",
    }
    for rule in rules:
        matched = True
        for part, pattern in rule.items():
            value = values.get(part) if part in _URL_PARTS else None
            if value is None:
                matched = False
            elif pattern.startswith("^"):
                matched = re.match(pattern, value) is not None
            else:
                matched = fnmatch.fnmatch(value, pattern)
            if not matched:
                break
        if matched and rule:
            return True
    return False


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Connect to an address that was checked, whatever the URL's host name."""

    def __init__(self, reactor: Any, address: str) -> None:
        self._reactor = reactor
        self._address = address

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted's interface
        # The HTTP client and TLS are imported on first use: an idle server does
        # not carry them.
        from twisted.internet.endpoints import (
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            wrapClientTLS,
        )
        from twisted.internet.ssl import optionsForClientTLS

        cls = TCP6ClientEndpoint if ":" in self._address else TCP4ClientEndpoint
        endpoint = cls(self._reactor, self._address, uri.port, timeout=CONNECT_TIMEOUT_SECONDS)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(uri.host.decode("idna")), endpoint)
        return endpoint


class _Collect(protocol.Protocol):
    """A response body, up to a limit."""

    def __init__(self, finished: "defer.Deferred[bytes]", limit: int) -> None:
        self._finished = finished
        self._limit = limit
        self._parts: list[bytes] = []
        self._length = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._finished.called:
            return
        self._length += len(data)
        if self._length > self._limit:
            self._finished.errback(_TooLarge())
            self.transport.stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        from twisted.web.client import ResponseDone

        if self._finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(reason)


class _Drop(protocol.Protocol):
    """Refuse a response body: stop the transfer (the connection is closed)."""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.stopProducing()


class _OpenGraph(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.meta: dict[str, str] = {}
        self.title = ""
        self._in_title = False
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs_: list[tuple[str, str | None]]) -> None:
        a = {k.lower(): v for k, v in attrs_ if v is not None}
        if tag == "meta":
            key = (a.get("property") or a.get("name") or "").strip().lower()
            content = a.get("content")
            if key and content is not None and key not in self.meta:
                self.meta[key] = content.strip()
        elif tag == "title":
            self._in_title = True
        elif tag == "img" and a.get("src") and len(self.images) < 5:
            self.images.append(a["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title and len(self.title) < 1000:
            self.title += data


def _decode_html(body: bytes, content_type: str) -> str:
    charset = None
    m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9_.:-]+)", content_type, re.I)
    if m:
        charset = m.group(1)
    else:
        m2 = _META_CHARSET.search(body[:4096])
        if m2:
            charset = m2.group(1).decode("ascii")
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def parse_open_graph(body: bytes, content_type: str, page_url: str) -> dict[str, Any]:
    """og:* values of an HTML page, with <title>, description and an <img> as fall-backs."""
    parser = _OpenGraph()
    try:
        parser.feed(_decode_html(body, content_type))
        parser.close()
    except Exception:  # a broken page: keep what was read
        logger.debug("HTML parsing of %s stopped early", page_url)
    og: dict[str, Any] = {k: v for k, v in parser.meta.items() if k.startswith("og:")}
    meta = parser.meta
    if "og:title" not in og:
        title = meta.get("twitter:title") or " ".join(parser.title.split())
        if title:
            og["og:title"] = title
    if "og:description" not in og:
        description = meta.get("twitter:description") or meta.get("description")
        if description:
            og["og:description"] = description
    if "og:image" not in og:
        image = meta.get("twitter:image") or (parser.images[0] if parser.images else None)
        if image:
            og["og:image"] = image
    for key, limit in _MAX_TEXT.items():
        if isinstance(og.get(key), str):
            og[key] = og[key][:limit]
    if isinstance(og.get("og:image"), str):
        og["og:image"] = urljoin(page_url, og["og:image"])
    return og


class UrlPreviewer:
    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        url_rules: list[dict[str, str]],
        max_size: int,
        store_image: StoreImage,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._reactor = reactor
        self.policy = policy
        self._url_rules = url_rules
        self.max_size = max_size
        self._store_image = store_image
        self._now_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._cache: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        self._in_flight: dict[str, list[defer.Deferred[dict[str, Any]]]] = {}

    async def preview(self, url: str) -> dict[str, Any]:
        """The OpenGraph data of ``url`` (cached for an hour; concurrent asks share a fetch)."""
        self._check_url(url)
        cached = self._cache.get(url)
        if cached is not None and cached[0] > self._now_ms():
            return cached[1]
        waiters = self._in_flight.get(url)
        if waiters is not None:
            waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
            waiters.append(waiter)
            return await waiter
        waiters = self._in_flight[url] = []
        try:
            result = await self._preview(url)
        except BaseException as e:
            for w in waiters:
                w.errback(Failure(e))
            raise
        finally:
            del self._in_flight[url]
        for w in waiters:
            w.callback(result)
        return result

    async def _preview(self, url: str) -> dict[str, Any]:
        page = await self.fetch(url)
        base = page.content_type.split(";", 1)[0].strip().lower()
        og: dict[str, Any]
        if base.startswith("image/"):
            og = {}
            await self._attach_image(og, page)
        elif base in ("text/html", "application/xhtml+xml"):
            og = await threads.deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                parse_open_graph,
                page.body,
                page.content_type,
                page.url,
            )
            image_url = og.pop("og:image", None)
            for key in (
                "og:image:width",
                "og:image:height",
                "og:image:type",
                "og:image:secure_url",
                "og:image:url",
            ):
                og.pop(key, None)
            if isinstance(image_url, str) and urlsplit(image_url).scheme in ("http", "https"):
                try:
                    image = await self.fetch(image_url)
                    await self._attach_image(og, image)
                except MatrixError as e:
                    logger.info("preview of %s: no image (%s)", url, e.message)
        else:
            og = {}
        self._cache[url] = (self._now_ms() + CACHE_SECONDS * 1000, og)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return og

    async def _attach_image(self, og: dict[str, Any], fetched: Fetched) -> None:
        content_type = fetched.content_type.split(";", 1)[0].strip().lower()
        if not content_type.startswith("image/"):
            return
        name = urlsplit(fetched.url).path.rsplit("/", 1)[-1] or None
        try:
            mxc, width, height = await self._store_image(fetched.body, content_type, name)
        except MatrixError as e:
            logger.info("preview image of %s not kept: %s", fetched.url, e.message)
            return
        og["og:image"] = mxc
        og["og:image:type"] = content_type
        og["matrix:image:size"] = len(fetched.body)
        if width and height:
            og["og:image:width"] = width
            og["og:image:height"] = height

    # --- fetching -------------------------------------------------------------------
    def _check_url(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise MatrixError("M_INVALID_PARAM", "Not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MatrixError("M_INVALID_PARAM", "Only http and https URLs can be previewed")
        if port == 0:
            raise MatrixError("M_INVALID_PARAM", "Not a valid URL")
        if url_blacklisted(url, self._url_rules):
            raise MatrixError("M_FORBIDDEN", "URL blocked by url_preview_url_blacklist")

    async def _addresses(self, host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            pass
        try:
            infos = await threads.deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                socket.getaddrinfo,
                host,
                port,
                0,
                socket.SOCK_STREAM,
            )
        except OSError:
            raise MatrixError("M_UNKNOWN", f"Could not resolve {host}", 502) from None
        seen: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in seen:
                seen.append(address)
        return seen

    async def fetch(self, url: str) -> Fetched:
        """GET ``url`` under every rule above; 403 when refused, 502 when it fails."""
        d = defer.ensureDeferred(self._fetch(url))
        d.addTimeout(FETCH_TIMEOUT_SECONDS, self._reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise MatrixError("M_UNKNOWN", "Timed out fetching the URL", 504) from None

    async def _fetch(self, url: str) -> Fetched:
        for _ in range(MAX_REDIRECTS + 1):
            self._check_url(url)
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port or (443 if parts.scheme == "https" else 80)
            addresses = await self._addresses(host, port)
            if not addresses:
                raise MatrixError("M_UNKNOWN", f"Could not resolve {host}", 502)
            if any(self.policy.blocked(a) for a in addresses):
                raise MatrixError(
                    "M_FORBIDDEN",
                    "URL refers to a blocked address (url_preview_ip_range_blacklist)",
                )
            from twisted.web.client import Agent, HTTPConnectionPool

            pool = HTTPConnectionPool(self._reactor, persistent=False)
            agent = Agent.usingEndpointFactory(
                self._reactor, _PinnedEndpoints(self._reactor, addresses[0]), pool=pool
            )
            headers = Headers(
                {b"User-Agent": [USER_AGENT], b"Accept": [b"text/html, image/*;q=0.9, */*;q=0.1"]}
            )
            try:
                response = await agent.request(b"GET", url.encode("ascii", "strict"), headers)
            except UnicodeEncodeError:
                raise MatrixError("M_INVALID_PARAM", "Not a valid URL") from None
            except defer.CancelledError:
                raise
            except Exception as e:
                raise MatrixError("M_UNKNOWN", f"Failed to fetch the URL: {e}", 502) from None
            location = response.headers.getRawHeaders(b"Location")
            if response.code in (301, 302, 303, 307, 308) and location:
                await self._body(response, 64 * 1024, discard=True)
                url = urljoin(url, location[0].decode("latin-1"))
                continue
            if response.code != 200:
                await self._body(response, 64 * 1024, discard=True)
                raise MatrixError("M_UNKNOWN", f"The URL answered HTTP {response.code}", 502)
            content_type = (response.headers.getRawHeaders(b"Content-Type") or [b""])[0]
            body = await self._body(response, self.max_size)
            return Fetched(url, content_type.decode("latin-1"), body)
        raise MatrixError("M_UNKNOWN", "Too many redirects", 502)

    async def _body(self, response: Any, limit: int, discard: bool = False) -> bytes:
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            response.deliverBody(_Drop())
            if discard:
                return b""
            raise MatrixError("M_TOO_LARGE", "The page is larger than max_spider_size", 502)
        finished: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_Collect(finished, limit))
        try:
            return await finished
        except _TooLarge:
            if discard:
                return b""
            raise MatrixError(
                "M_TOO_LARGE", "The page is larger than max_spider_size", 502
            ) from None
        except defer.CancelledError:
            raise
        except Exception as e:
            if discard:
                return b""
            raise MatrixError("M_UNKNOWN", f"Failed to read the URL: {e}", 502) from None
