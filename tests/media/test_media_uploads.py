"""Upload spooling with worker threads (the lanes, back-pressure, abandoning an upload),
receiving straight from a socket (splice), and the local reader's page-cache reads."""

import hashlib
import os
import socket
import tempfile
import threading
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from homeserver.services.media import uploads
from homeserver.services.media.storage import LocalFileReader
from homeserver.services.media.uploads import HIGH_WATER, UploadSink, can_receive_directly

MIB = 1024 * 1024


class FakeProducer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False


class SlowLanes:
    """Makes the worker lanes slow, so the sink falls behind and pauses its producer."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._original = uploads._write_chunks

    def __enter__(self) -> "SlowLanes":
        def slow(fd: int, chunks: list[bytes]) -> None:
            time.sleep(self.delay)
            self._original(fd, chunks)

        uploads._write_chunks = slow
        return self

    def __exit__(self, *exc: object) -> None:
        uploads._write_chunks = self._original


class UploadSinkLaneTests(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp()

    def tearDown(self) -> None:
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))
        os.rmdir(self.tmp)

    @defer.inlineCallbacks
    def test_big_body_is_written_and_hashed_by_the_lanes(self):
        data = os.urandom(9 * MIB + 3)
        sink = UploadSink(self.tmp, 100 * MIB, reactor, len(data))
        producer = sink.producer = FakeProducer()
        with SlowLanes(0.01):
            for i in range(0, len(data), 64 * 1024):
                sink.write(data[i : i + 64 * 1024])
                if producer.paused:  # what the transport does: no reads while paused
                    while producer.paused:
                        yield deferLater(0.005)
            yield sink.flushed()
        claimed = sink.claim()
        self.assertGreater(producer.pauses, 0)  # it fell behind, and said so
        self.assertFalse(producer.paused)
        self.assertEqual(claimed.length, len(data))
        self.assertEqual(claimed.sha256, hashlib.sha256(data).hexdigest())
        with open(claimed.path, "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_queued_bytes_stay_bounded(self):
        """The producer is paused before much more than HIGH_WATER waits in memory."""
        sink = UploadSink(self.tmp, 100 * MIB, reactor, None)
        producer = sink.producer = FakeProducer()
        chunk = os.urandom(64 * 1024)
        most = 0
        with SlowLanes(0.02):
            for _ in range(200):
                while producer.paused:
                    yield deferLater(0.005)
                sink.write(chunk)
                most = max(most, max(lane.waiting for lane in sink._lanes))
            yield sink.flushed()
        self.assertLessEqual(most, HIGH_WATER + len(chunk))
        self.assertEqual(sink.claim().sha256, hashlib.sha256(chunk * 200).hexdigest())

    @defer.inlineCallbacks
    def test_abandoned_while_the_lanes_work(self):
        sink = UploadSink(self.tmp, 100 * MIB, reactor, None)
        sink.producer = FakeProducer()
        with SlowLanes(0.05):
            for _ in range(40):
                sink.write(os.urandom(64 * 1024))
            sink.close()  # the client went away
            self.assertFalse(sink.producer.paused)
            for _ in range(100):
                if not os.path.exists(sink.path):
                    break
                yield deferLater(0.02)
        self.assertFalse(os.path.exists(sink.path))
        with self.assertRaises(OSError):
            sink.claim()

    @defer.inlineCallbacks
    def test_small_body_is_written_at_once(self):
        sink = UploadSink(self.tmp, 100 * MIB, reactor, 1000)
        sink.write(b"x" * 1000)
        self.assertIsNone(sink._lanes)
        yield sink.flushed()
        self.assertEqual(sink.claim().sha256, hashlib.sha256(b"x" * 1000).hexdigest())

    def test_too_large_while_the_lanes_work(self):
        sink = UploadSink(self.tmp, 3 * MIB, reactor, None)
        for _ in range(60):
            sink.write(os.urandom(64 * 1024))
        self.assertTrue(sink.too_large)
        return _eventually(lambda: not os.path.exists(sink.path))


def deferLater(seconds: float) -> defer.Deferred:  # noqa: N802
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _eventually(check, timeout: float = 5.0) -> defer.Deferred:
    @defer.inlineCallbacks
    def go():
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            yield deferLater(0.02)

    return go()


class ReceiveTests(unittest.TestCase):
    """UploadSink.receive: straight from a socket into the spool file (on this thread)."""

    def setUp(self) -> None:
        if not can_receive_directly():
            raise unittest.SkipTest("no splice(2) here")
        self.tmp = tempfile.mkdtemp()
        self.client, self.server = socket.socketpair()
        self.server.setblocking(False)

    def tearDown(self) -> None:
        self.client.close()
        self.server.close()
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))
        os.rmdir(self.tmp)

    def _send_later(self, data: bytes, close: bool = False) -> threading.Thread:
        def send() -> None:
            for i in range(0, len(data), 100_000):
                self.client.sendall(data[i : i + 100_000])
                time.sleep(0.001)
            if close:
                self.client.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=send)
        thread.start()
        return thread

    def test_body_lands_in_the_file_with_its_hash(self):
        head = os.urandom(70_000)  # what came with the headers, through Twisted
        rest = os.urandom(4 * MIB + 17)
        sink = UploadSink(self.tmp, 100 * MIB, reactor, len(head) + len(rest), direct=True)
        sink.write(head)
        sender = self._send_later(rest + b"next request")
        sink.receiving()
        self.assertEqual(sink.receive(self.server.fileno(), len(rest), 10, lambda: False), len(rest))
        sink.received(len(rest))
        sender.join()
        # Only the body was taken from the socket.
        self.assertEqual(self.server.recv(100), b"next request")
        claimed = sink.claim()
        self.assertEqual(claimed.sha256, hashlib.sha256(head + rest).hexdigest())
        with open(claimed.path, "rb") as f:
            self.assertEqual(f.read(), head + rest)

    def test_client_closing_early(self):
        sink = UploadSink(self.tmp, 100 * MIB, reactor, 2 * MIB, direct=True)
        sender = self._send_later(os.urandom(MIB), close=True)
        sink.receiving()
        with self.assertRaises(EOFError):
            sink.receive(self.server.fileno(), 2 * MIB, 10, lambda: False)
        sender.join()
        sink.close()  # what the connection's loss does, while receive() still counts
        self.assertTrue(os.path.exists(sink.path))
        sink.received(0)
        self.assertFalse(os.path.exists(sink.path))

    def test_idle_client_times_out_and_stopping_stops(self):
        sink = UploadSink(self.tmp, 100 * MIB, reactor, 2 * MIB, direct=True)
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            sink.receive(self.server.fileno(), MIB, 0.5, lambda: False)
        self.assertLess(time.monotonic() - started, 5)
        with self.assertRaises(uploads.UploadAbandoned):
            sink.receive(self.server.fileno(), MIB, None, lambda: True)


class LocalFileReaderTests(unittest.TestCase):
    def test_reads_from_the_page_cache_and_after_the_head(self):
        data = os.urandom(3 * MIB + 5)
        fd, path = tempfile.mkstemp()
        try:
            os.write(fd, data)
            reader = LocalFileReader(fd, 1000, 1000 + 2 * MIB)
            reader.set_head(os.pread(fd, 4096, 1000))
            self.assertIsNone(reader.position)  # the head goes first
            self.assertEqual(reader.read_nowait(4096), data[1000:5096])
            self.assertEqual(reader.position, 5096)
            self.assertEqual(reader.cached(MIB), MIB)  # just written: in the page cache
            reader.skip(MIB)
            rest = b""
            while chunk := (reader.read_nowait(300_000) or reader.read(300_000)):
                rest += chunk
            self.assertEqual(rest, data[5096 + MIB : 1000 + 2 * MIB])
            self.assertEqual(reader.read_nowait(10), b"")
        finally:
            os.close(fd)
            os.unlink(path)


class OpenFilesTests(unittest.TestCase):
    """LocalMediaStorage keeps files open for readers; writing or deleting forgets them."""

    def setUp(self) -> None:
        from homeserver.services.media.storage import LocalMediaStorage

        self.root = tempfile.mkdtemp()
        self.storage = LocalMediaStorage(reactor, self.root)

    def tearDown(self) -> None:
        import shutil

        self.storage.close_files()
        shutil.rmtree(self.root)

    @defer.inlineCallbacks
    def test_shared_descriptor_and_forgetting(self):
        yield self.storage.put_bytes("content/aa/bb/x", b"first version")
        first = yield self.storage.open("content/aa/bb/x")
        second = yield self.storage.open("content/aa/bb/x", 6, 3)
        self.assertEqual(first._fd, second._fd)  # one descriptor for both
        self.assertEqual(second.read(100), b"ver")
        fd = first._fd
        # A new version of the key: the next reader sees it; the old readers keep theirs.
        yield self.storage.put_bytes("content/aa/bb/x", b"second")
        third = yield self.storage.open("content/aa/bb/x")
        self.assertNotEqual(third._fd, fd)
        self.assertEqual(third.read(100), b"second")
        self.assertEqual(first.read(100), b"first version")
        first.close()
        os.fstat(fd)  # still open: the second reader uses it
        second.close()
        with self.assertRaises(OSError):
            os.fstat(fd)  # closed with its last reader
        third.close()
        yield self.storage.delete("content/aa/bb/x")
        from homeserver.services.media.storage import MediaNotStored

        with self.assertRaises(MediaNotStored):
            yield self.storage.open("content/aa/bb/x")
