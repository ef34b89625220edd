"""Upload bodies, written to disk and hashed as they arrive.

The listener's request class (``homeserver/app/listeners.py``) makes an
``UploadSink`` the request's ``content`` for upload paths, so a body never sits
in memory: each chunk goes to a temporary file under ``media_store_path/tmp``
and into a running SHA-256. Once the body is complete the upload handler
waits for ``flushed()`` and ``claim``s the file; if nobody does (the request
failed, the client went away), ``close`` deletes it.

Three ways in, by size and connection:

- Small bodies (announced at most ``INLINE_MAX`` bytes) are written and hashed
  on the reactor thread as they arrive: for them a hand-off to another thread
  costs more than it saves.
- Bigger ones on a plain TCP connection skip the reactor: ``receive`` moves
  them from the socket into the file with splice(2) on a worker thread (no
  copy through Python), while a second thread hashes what has landed, read
  back from the page cache (``_FileHasher``). The listener decides
  (``MediaRequest._receive_directly``) and hands the connection back after.
- Otherwise (TLS, a body of unknown length, all receivers busy) the chunks
  Twisted reads go to two worker lanes (``_Lane``), one writing and one
  hashing, while the reactor goes on reading: the three overlap (writes and
  SHA-256 release the GIL). The reactor only queues chunks; each lane drains
  its queue in order, a batch at a time, on the reactor's thread pool. When a
  lane has more than ``HIGH_WATER`` bytes waiting, the sink pauses its
  ``producer`` (the connection's transport: no more reads) until both lanes
  are below ``LOW_WATER``, so an upload holds a few MiB in memory whatever its
  size.

Without a reactor (tests, the remote-media fetcher) every chunk is written and
hashed at once, on the caller's thread.
"""

import fcntl
import hashlib
import os
import queue
import select
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer

from homeserver.services.media.storage import thread_buffer

# Bytes waiting in a lane above which the connection stops reading, and below
# which (in both lanes) it reads again.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024
# A lane starts once this much waits (or the body is complete): every hand-off
# between threads costs, so the workers take the chunks a batch at a time.
BATCH = 1024 * 1024
# Bodies announced at most this long are written and hashed on the reactor thread.
INLINE_MAX = 2 * 1024 * 1024
# receive(): the pipe between socket and file, and how often it checks whether to stop.
SPLICE_PIPE_SIZE = 1024 * 1024
POLL_MS = 200
# What the hashing thread reads back at a time.
HASH_READ_SIZE = 256 * 1024

def _hash_buffer() -> bytearray:
    """A buffer of the current thread to read back what receive() spliced, to hash it."""
    return thread_buffer("hash", HASH_READ_SIZE)


def can_receive_directly() -> bool:
    """Whether ``UploadSink.receive`` works here (Linux splice(2))."""
    return hasattr(os, "splice") and hasattr(select, "poll")


@attrs.frozen
class ClaimedUpload:
    path: str  # the caller now owns this file
    sha256: str
    length: int


class UploadTooLarge(Exception):
    pass


class UploadAbandoned(Exception):
    pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_chunks(fd: int, chunks: list[bytes]) -> None:
    """Write ``chunks`` in order, with as few system calls as the kernel allows."""
    written = os.writev(fd, chunks) if len(chunks) > 1 else 0
    for chunk in chunks:
        if written >= len(chunk):
            written -= len(chunk)
            continue
        _write_all(fd, memoryview(chunk)[written:])
        written = 0


class _Lane:
    """Chunks handed to ``work`` on the reactor's worker threads: in order, a batch at a
    time, by at most one job at a time (so ``work`` needs no lock of its own)."""

    def __init__(
        self, reactor: Any, work: Callable[[list[bytes]], None], progress: Callable[[], None]
    ) -> None:
        self._reactor = reactor
        self._work = work
        self._progress = progress  # called on the reactor once below LOW_WATER, if watched
        self._lock = threading.Lock()
        self._queue: list[bytes] = []
        self.waiting = 0  # bytes queued or being worked on
        self.busy = False
        self.watched = False
        self.error: BaseException | None = None
        self._stopped = False
        self._after_stop: Callable[[], None] | None = None
        self._waiters: list[defer.Deferred[None]] = []

    def put(self, chunk: bytes) -> bool:
        """Queue a chunk; True when the lane is behind (then ``progress`` will be called)."""
        with self._lock:
            self._queue.append(chunk)
            self.waiting += len(chunk)
            behind = self.waiting > HIGH_WATER
            if behind:
                self.watched = True
            start = not self.busy and self.waiting >= BATCH
            if start:
                self.busy = True
        if start:
            self._reactor.getThreadPool().callInThread(self._drain)
        return behind

    def lagging(self) -> bool:
        """Over LOW_WATER? Then ``progress`` will be called once it is not."""
        with self._lock:
            self.watched = self.waiting > LOW_WATER
            return self.watched

    def idle(self) -> "defer.Deferred[None]":
        """Fires once everything queued so far has been worked on."""
        d: defer.Deferred[None] | None = None
        with self._lock:
            start = bool(self._queue) and not self.busy and not self._stopped
            if start:
                self.busy = True
            if self.busy:
                d = defer.Deferred()
                self._waiters.append(d)
        if start:
            self._reactor.getThreadPool().callInThread(self._drain)
        return d if d is not None else defer.succeed(None)

    def stop(self, after: Callable[[], None]) -> None:
        """Drop what waits; call ``after`` once no job runs (now, or when the job ends)."""
        with self._lock:
            self._stopped = True
            self._queue.clear()
            if self.busy:
                self._after_stop = after
                return
        after()

    def _drain(self) -> None:
        """On a worker thread: work through the queue until it is empty."""
        notify = False
        while True:
            with self._lock:
                if not self._queue or self._stopped:
                    self.busy = False
                    self.waiting = 0 if self._stopped else self.waiting
                    after, self._after_stop = self._after_stop, None
                    waiters, self._waiters = self._waiters, []
                    break
                batch, self._queue = self._queue, []
                failed = self.error is not None
            if not failed:
                try:
                    self._work(batch)
                except BaseException as e:  # kept for claim(); later chunks are dropped
                    self.error = e
            with self._lock:
                self.waiting -= sum(map(len, batch))
                if self.watched and self.waiting <= LOW_WATER:
                    self.watched = False
                    notify = True
        if after is not None:
            after()
        if waiters or notify:
            self._reactor.callFromThread(self._done, waiters, notify)

    def _done(self, waiters: list["defer.Deferred[None]"], notify: bool) -> None:
        if notify:
            self._progress()
        for d in waiters:
            d.callback(None)


class _FileHasher:
    """Hashes byte ranges of a file, in order, on a thread of its own, from the page
    cache, while ``UploadSink.receive`` goes on writing the next ones."""

    def __init__(self, fd: int, hash_: Any) -> None:
        self._fd = fd
        self._hash = hash_
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def add(self, position: int, count: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="media-hash", daemon=True)
            self._thread.start()
        self._ranges.put((position, count))

    def finish(self) -> None:
        """Wait until everything added is hashed."""
        if self._thread is not None:
            self._ranges.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        buffer = memoryview(_hash_buffer())
        while (item := self._ranges.get()) is not None:
            if self._error is not None:
                continue
            position, count = item
            try:
                while count > 0:
                    view = buffer[: min(len(buffer), count)]
                    got = os.preadv(self._fd, [view], position)
                    if got <= 0:
                        raise OSError("the spool file is shorter than what was written")
                    self._hash.update(view[:got])
                    position += got
                    count -= got
            except BaseException as e:  # reported by finish()
                self._error = e


class UploadSink:
    """A file-like Twisted can use as ``request.content`` for an upload body."""

    def __init__(
        self,
        tmp_dir: str,
        max_size: int,
        reactor: Any = None,
        expected: int | None = None,
        direct: bool = False,
    ) -> None:
        """``reactor``: write and hash on its worker threads (see the module doc) bodies
        of unknown length (``expected`` None) or longer than INLINE_MAX. ``direct``:
        the caller means to ``receive`` the body from the socket (the first bytes,
        that came with the headers, are written at once)."""
        self.max_size = max_size
        self._reactor = reactor
        self._fd, self.path = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self._hash = hashlib.sha256()
        self.length = 0
        self.too_large = False
        self._claimed = False
        self._closed = False
        self._discarded = False
        # The connection to pause while a worker is behind (see the module doc).
        self.producer: Any = None
        self._paused = False
        self._lanes: tuple[_Lane, _Lane] | None = None
        self._receiving = False  # a worker thread is in receive()
        self._cancel = False  # tells it to stop
        if reactor is not None and not direct and (expected is None or expected > INLINE_MAX):
            self.use_lanes()

    def use_lanes(self) -> None:
        """From now on, write and hash on worker threads (nothing may be pending)."""
        if self._lanes is None and self._reactor is not None:
            self._lanes = (
                _Lane(self._reactor, self._write_batch, self._progress),
                _Lane(self._reactor, self._hash_batch, self._progress),
            )

    # --- what Twisted calls -------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.too_large or self._closed:
            return
        self.length += len(data)
        if self.length > self.max_size:
            self.too_large = True
            self._discard()
            return
        if self._lanes is None:
            _write_all(self._fd, data)
            self._hash.update(data)
            return
        behind = False
        for lane in self._lanes:
            behind = lane.put(data) or behind
        if behind and not self._paused and self.producer is not None:
            self._paused = True
            self.producer.pauseProducing()

    def tell(self) -> int:
        return self.length

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0  # Twisted rewinds the body before rendering: nothing to do

    def read(self, size: int = -1) -> bytes:
        return b""  # the body is only available through claim()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._claimed:
            self._discard()

    # --- for the upload handler ---------------------------------------------------
    def flushed(self) -> "defer.Deferred[Any]":
        """Fires once every chunk received so far is written and hashed."""
        if self._lanes is None:
            return defer.succeed(None)
        return defer.gatherResults([lane.idle() for lane in self._lanes])

    def claim(self) -> ClaimedUpload:
        """Take the finished body: its file, SHA-256 and length (after ``flushed``)."""
        if self.too_large:
            raise UploadTooLarge()
        if self._closed:
            raise OSError("the upload was abandoned")
        self._closed = True
        if self._lanes is not None:
            if any(lane.busy for lane in self._lanes):
                self._closed = False
                raise RuntimeError("claim() before the upload was flushed")
            error = self._lanes[0].error or self._lanes[1].error
            if error is not None:
                self._discard()
                raise OSError(f"writing the upload failed: {error}")
        self._claimed = True
        self._resume()
        os.close(self._fd)
        return ClaimedUpload(self.path, self._hash.hexdigest(), self.length)

    # --- receiving straight from the socket -------------------------------------------
    def receiving(self) -> None:
        """On the reactor, before ``receive`` starts on a worker thread."""
        self._receiving = True

    def received(self, count: int) -> None:
        """On the reactor, once ``receive`` has returned (``count``: the bytes it took)."""
        self._receiving = False
        self.length += count
        if self._discarded:  # abandoned meanwhile: the file was left for now
            self._remove_file()

    def receive(
        self, sock: int, count: int, idle_timeout: float | None, stopping: Callable[[], bool]
    ) -> int:
        """On a worker thread: move the next ``count`` bytes of the body from the socket
        ``sock`` into the spool file with splice(2), so they never pass through Python,
        and hash them as they land (from the page cache). Returns ``count``.

        Raises (the connection must then be dropped) when the client goes away,
        sends nothing for ``idle_timeout`` seconds, or the upload is abandoned.
        """
        position = self.length  # every byte before it is in the file already
        left = count
        hasher = _FileHasher(self._fd, self._hash)
        pipe_r, pipe_w = os.pipe()
        try:
            try:
                fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, SPLICE_PIPE_SIZE)
            except (OSError, AttributeError):
                pass  # the default size (64 KiB) works too
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            idle = 0.0
            while left > 0:
                if self._cancel or stopping():
                    raise UploadAbandoned("the upload was abandoned")
                try:
                    moved = os.splice(
                        sock,
                        pipe_w,
                        min(left, SPLICE_PIPE_SIZE),
                        flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                    )
                except BlockingIOError:
                    if not poller.poll(POLL_MS):
                        idle += POLL_MS / 1000
                        if idle_timeout is not None and idle >= idle_timeout:
                            raise TimeoutError("the client stopped sending") from None
                    continue
                if moved == 0:
                    raise EOFError("the client closed the connection")
                idle = 0.0
                written = 0
                while written < moved:
                    written += os.splice(pipe_r, self._fd, moved - written)
                hasher.add(position, moved)
                position += moved
                left -= moved
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
            hasher.finish()  # raises what went wrong in the hasher, if anything
        return count

    # --- the lanes (worker threads) -------------------------------------------------
    def _write_batch(self, chunks: list[bytes]) -> None:
        _write_chunks(self._fd, chunks)

    def _hash_batch(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)

    def _progress(self) -> None:
        """A lane went below LOW_WATER: read again unless the other is still behind."""
        assert self._lanes is not None
        if not [lane for lane in self._lanes if lane.lagging()]:
            self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    def _discard(self) -> None:
        if self._discarded:
            return
        self._discarded = True
        self._resume()
        if self._receiving:  # receive() is using the file: received() removes it
            self._cancel = True
            return
        if self._lanes is None:
            self._remove_file()
            return
        # The file goes once the writing lane has stopped using it.
        self._lanes[1].stop(lambda: None)
        self._lanes[0].stop(self._remove_file)

    def _remove_file(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def spool_bytes(tmp_dir: str, data: bytes) -> ClaimedUpload:
    """A ClaimedUpload for bytes already in memory (URL preview images)."""
    fd, path = tempfile.mkstemp(dir=tmp_dir, prefix="fetched-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return ClaimedUpload(path, hashlib.sha256(data).hexdigest(), len(data))
