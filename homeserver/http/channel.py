"""HTTP/1.1 on plain TCP with fewer Python steps per request than Twisted's own.

Twisted's ``HTTPChannel`` reads a request head one line at a time (a method
call per line, another per header, each header name canonicalised twice);
for a Matrix client's typical request that is most of the time Twisted spends
on it. ``HomeserverChannel`` keeps Twisted's parser for everything unusual and
takes a fast path for the usual case: when a whole head (request line to the
blank line) is in the buffer at the start of a request, it is split once and
its headers are checked and stored in one loop, with the same limits and the
same 400 responses as Twisted's (header count and size, bad names, NUL/CR/LF
in values, duplicate framing headers). The request line, the body (Content-Length
or chunked), ``Expect: 100-continue``, persistence and pipelining are still
Twisted's.

It also remembers the connection's two addresses (Twisted's ``Request`` asks
for them on every request: a system call and an address object each time),
and lets a response be handed to the socket directly when nothing is queued
before it (``send_now``), which saves the two epoll registrations a buffered
write costs.
"""

from typing import Any

from twisted.internet import tcp
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import InvalidHeaderName

_CONTENT_LENGTH = b"Content-Length"
_TRANSFER_ENCODING = b"Transfer-Encoding"
_FRAMING = {b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING}
_END_OF_HEAD = b"\r\n\r\n"


class HomeserverChannel(HTTPChannel):
    """An ``HTTPChannel`` for plain-TCP listeners (see the module docstring)."""

    _local_address: Any = None
    _peer_address: Any = None

    def getHost(self) -> Any:  # noqa: N802 - Twisted's name
        if self._local_address is None:
            self._local_address = self.transport.getHost()
        return self._local_address

    def getPeer(self) -> Any:  # noqa: N802 - Twisted's name
        if self._peer_address is None:
            self._peer_address = self.transport.getPeer()
        return self._peer_address

    def dataReceived(self, data: bytes) -> Any:  # noqa: N802
        """Twisted's ``HTTPChannel.dataReceived`` (``LineReceiver``'s loop), with
        whole request heads taken at once (``_head_received``)."""
        self.resetTimeout()
        if self._busyReceiving:
            self._buffer += data
            return None
        try:
            self._busyReceiving = True
            self._buffer += data
            while self._buffer and not self.paused:
                if self.line_mode:
                    if not self.requests and self.persistent and self._buffer[:2] != b"\r\n":
                        end = self._buffer.find(_END_OF_HEAD, 0, self.totalHeadersSize + 4)
                        if end > 0:
                            head = self._buffer[:end]
                            self._buffer = self._buffer[end + 4:]
                            self._head_received(head)
                            if self.transport and self.transport.disconnecting:
                                return None
                            continue
                    try:
                        line, self._buffer = self._buffer.split(self.delimiter, 1)
                    except ValueError:
                        if len(self._buffer) >= (self.MAX_LENGTH + len(self.delimiter)):
                            line, self._buffer = self._buffer, b""
                            return self.lineLengthExceeded(line)
                        return None
                    if len(line) > self.MAX_LENGTH:
                        exceeded = line + self.delimiter + self._buffer
                        self._buffer = b""
                        return self.lineLengthExceeded(exceeded)
                    why = self.lineReceived(line)
                    if why or self.transport and self.transport.disconnecting:
                        return why
                else:
                    data, self._buffer = self._buffer, b""
                    why = self.rawDataReceived(data)
                    if why:
                        return why
        finally:
            self._busyReceiving = False
        return None

    def _head_received(self, head: bytes) -> None:
        """A complete request head: what Twisted's ``lineReceived`` does for each
        of its lines and for the blank line after them."""
        lines = head.split(b"\r\n")
        if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
            # Obsolete line folding: Twisted's line-by-line parser joins them.
            for line in lines:
                self.lineReceived(line)
                if not self.requests or self.transport.disconnecting:
                    return
            self.lineReceived(b"")
            return
        self.lineReceived(lines[0])  # creates the Request; a bad line is answered 400
        if not self.requests or self.transport.disconnecting:
            return
        headers = self.requests[-1].requestHeaders
        size = self._receivedHeaderSize
        count = 0
        for line in lines[1:]:
            size += len(line)
            name, colon, value = line.partition(b":")
            if not colon:
                self._respondToBadRequestAndDisconnect()
                return
            value = value.strip(b" \t")
            if b"\x00" in value or b"\r" in value or b"\n" in value:
                self._respondToBadRequestAndDisconnect()
                return
            framing = _FRAMING.get(name.lower())
            if framing is not None and not self._maybeChooseTransferDecoder(framing, value):
                return  # answered 400
            try:
                headers.addRawHeader(name, value)
            except InvalidHeaderName:
                self._respondToBadRequestAndDisconnect()
                return
            count += 1
        # (A head over totalHeadersSize is never taken here: the search for its
        # end stops there, and Twisted's line parser refuses it. Checked anyway.)
        if size > self.totalHeadersSize or count > self.maxHeaders:
            self._respondToBadRequestAndDisconnect()
            return
        self._receivedHeaderSize = size
        self._receivedHeaderCount = count
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a plain TCP connection's socket at once when nothing is
    queued before it; otherwise (or for what the socket did not take) the
    transport's buffered write, flushed now. Errors are left for the reactor
    to find on its next turn, as with any write."""
    if (
        type(transport) is tcp.Server
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
    flush(transport)


def flush(transport: Any) -> None:
    """Send what the transport holds now rather than on the reactor's next
    turn, so the client has the response while the server goes on with the
    turn's remaining work (after-persist hooks, other requests). Plain TCP
    transports only; if the send fails, the reactor finds out on its next turn."""
    do_write = getattr(transport, "doWrite", None)
    if do_write is not None and transport.connected and not transport.disconnecting:
        do_write()
