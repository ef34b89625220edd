"""Where media bytes live: one small interface, a local-disk and an S3 back-end.

Keys are chosen by the media service (``content/ab/cd/<sha256>``,
``thumbnails/...``), never by clients. Every blocking call runs on a worker
thread; readers returned by ``open`` are blocking file-likes meant to be read
from worker threads too (see ``responses.MediaProducer``).
"""

import collections
import errno
import logging
import os
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from twisted.internet import threads

from homeserver.services.media.page_cache import cached_length

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_./-]*$")
COPY_CHUNK = 1024 * 1024
# What ``open`` of a local file reads at once, on the worker thread that opens it
# (a thumbnail, usually all of it), and how far ahead it asks the kernel to read.
FIRST_CHUNK = 128 * 1024
READAHEAD = 8 * 1024 * 1024
# Stored files kept open for downloads (see LocalMediaStorage).
OPEN_FILES = 64
# The most LocalFileReader.read_nowait reads into its scratch buffer at once.
PROBE_MAX = 1024 * 1024
# Files at least this big are removed from the reactor thread on a worker thread,
# without waiting (freeing their pages takes a while); smaller ones at once.
FREE_LATER_MIN = 1024 * 1024


class MediaReader(Protocol):
    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


class MediaNotStored(Exception):
    """The key has no bytes in the back-end."""


def _check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"bad media storage key {key!r}")
    return key


class MediaStorage(ABC):
    """Put, get (whole or a byte range), delete and test for stored objects."""

    name = "abstract"

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), func, *args)

    # --- the interface --------------------------------------------------------------
    async def put_file(self, key: str, path: str) -> None:
        """Store the local file at ``path`` under ``key``; the file is consumed."""
        await self._in_thread(self._put_file, _check_key(key), path)
        self._changed(key)

    async def put_content(self, key: str, path: str, length: int) -> None:
        """Store the local file at ``path`` (``length`` bytes) under a content-addressed key.

        Unless an object of that length is already stored there: the key names
        its bytes, so the file is then just dropped. Either way the file is
        consumed. One hand-off to a worker thread.
        """
        await self._in_thread(self._put_content, _check_key(key), path, length)
        self._changed(key)

    async def put_stream(self, key: str, stream: BinaryIO) -> None:
        """Store everything ``stream`` yields under ``key`` (read on a worker thread)."""
        await self._in_thread(self._put_stream, _check_key(key), stream)
        self._changed(key)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._in_thread(self._put_bytes, _check_key(key), data)
        self._changed(key)

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> MediaReader:
        """A reader of the object's bytes from ``offset`` (``length`` of them, or to the end).

        Raises MediaNotStored when nothing is stored under the key.
        """
        return await self._in_thread(self._open, _check_key(key), offset, length)

    async def delete(self, key: str) -> None:
        try:
            await self._in_thread(self._delete, _check_key(key))
        finally:
            self._changed(key)

    async def exists(self, key: str) -> bool:
        return await self._in_thread(self._exists, _check_key(key))

    async def local_copy(self, key: str) -> tuple[str, Callable[[], None]]:
        """A path on local disk holding the object, and what to call when done with it."""
        return await self._in_thread(self._local_copy, _check_key(key))

    def _changed(self, key: str) -> None:  # noqa: B027 - most back-ends keep nothing
        """On the reactor, after the object under ``key`` was written or deleted."""

    # --- what back-ends implement (blocking, on worker threads) ---------------------------
    @abstractmethod
    def _put_file(self, key: str, path: str) -> None: ...

    @abstractmethod
    def _put_stream(self, key: str, stream: BinaryIO) -> None: ...

    def _put_content(self, key: str, path: str, length: int) -> None:
        if self._exists(key):
            os.unlink(path)
        else:
            self._put_file(key, path)

    def _put_bytes(self, key: str, data: bytes) -> None:
        import io

        self._put_stream(key, io.BytesIO(data))

    @abstractmethod
    def _open(self, key: str, offset: int, length: int | None) -> MediaReader: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _local_copy(self, key: str) -> tuple[str, Callable[[], None]]: ...


# preadv2(RWF_NOWAIT): read what the page cache holds without waiting for the disk
# (Linux 4.14+). Switched off for good the first time the kernel refuses it.
_nowait_reads = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
# Scratch buffers, each thread its own (see thread_buffer).
_scratch = threading.local()


def thread_buffer(name: str, size: int) -> bytearray:
    """The current thread's reusable buffer called ``name``, of ``size`` bytes."""
    buf: bytearray | None = getattr(_scratch, name, None)
    if buf is None:
        buf = bytearray(size)
        setattr(_scratch, name, buf)
    return buf


def _probe_buffer() -> bytearray:
    """Where read_nowait reads (in fact only on the reactor thread)."""
    return thread_buffer("probe", PROBE_MAX)


class LocalFileReader:
    """Bytes ``[offset, end)`` of a local file.

    ``read`` may wait for the disk (call it on a worker thread); ``read_nowait``
    and ``cached`` never do: they only look at the page cache, so the reactor
    thread can use them, and hand the read to a worker thread when they say
    the bytes are not there. ``open`` reads the first bytes on the worker
    thread that opens the file, so a small file needs no second hand-off.
    ``fileno``/``position``/``skip`` let the response send the rest with
    ``sendfile`` (see ``responses.MediaProducer``).
    """

    def __init__(
        self, fd: int, offset: int, end: int, release: Callable[[], None] | None = None
    ) -> None:
        self._fd = fd
        self._pos = offset  # of the first byte after the head
        self._end = end
        self._head = b""
        self._release = release  # instead of closing the descriptor (shared: see _OpenFile)

    def set_head(self, head: bytes) -> None:
        """The first bytes, read already (by ``open``): the next reads return them."""
        self._head = head
        self._pos += len(head)

    def fileno(self) -> int:
        return self._fd

    @property
    def position(self) -> int | None:
        """The file offset of the next byte, or None while prefetched bytes are pending."""
        return None if self._head else self._pos

    def skip(self, count: int) -> None:
        """``count`` bytes from ``position`` were sent some other way (sendfile)."""
        self._pos += count

    def _take_head(self, size: int) -> bytes:
        data, self._head = self._head[:size], self._head[size:]
        return data

    def _pread(self, size: int) -> bytes:
        size = min(size, self._end - self._pos)
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def read(self, size: int) -> bytes:
        if self._head:
            return self._take_head(size)
        return self._pread(size)

    def _read_cached(self, buf: bytearray | memoryview) -> int:
        """preadv2(RWF_NOWAIT) at the position: how many bytes came from the page cache."""
        global _nowait_reads
        if not _nowait_reads:
            return 0
        try:
            return max(0, os.preadv(self._fd, [buf], self._pos, os.RWF_NOWAIT))
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                _nowait_reads = False
                return 0
            raise

    def read_nowait(self, size: int) -> bytes | None:
        """The next bytes (at most ``size``) if the page cache holds them, else None."""
        if self._head:
            return self._take_head(size)
        size = min(size, self._end - self._pos, PROBE_MAX)
        if size <= 0:
            return b""
        buf = _probe_buffer()
        got = self._read_cached(memoryview(buf)[:size])
        if got == 0:
            return None  # not cached, or the file ends too early: read() tells the caller
        self._pos += got
        return bytes(memoryview(buf)[:got])

    def cached(self, size: int) -> int:
        """``size`` (at most to the end) if the next ``size`` bytes are all in the page
        cache, else 0; found without waiting for the disk or copying them."""
        size = min(size, self._end - self._pos)
        if size <= 0 or self._head:
            return 0
        return cached_length(self._fd, self._pos, size)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._release is not None:
                self._release()
            else:
                os.close(fd)


class _OpenFile:
    """A stored file kept open for readers (they only use pread and sendfile, with
    offsets, so one descriptor serves them all)."""

    __slots__ = ("fd", "size", "users", "dropped")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.users = 0
        self.dropped = False  # out of the table: closed once the last reader is done

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.dropped:
            os.close(self.fd)


class LocalMediaStorage(MediaStorage):
    """Files under ``media_store_path`` (the default).

    The files read lately stay open (``OPEN_FILES``, least recently used out), so
    a download of one of them opens nothing: with its bytes in the page cache it
    needs no worker thread at all. Writing or deleting a key forgets its file.
    The table is only used on the reactor thread.
    """

    name = "local"

    def __init__(self, reactor: Any, root: str) -> None:
        super().__init__(reactor)
        self.root = os.path.abspath(root)
        self._open_files: collections.OrderedDict[str, _OpenFile] = collections.OrderedDict()

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> MediaReader:
        open_file = self._open_files.get(_check_key(key))
        head = b""
        if open_file is None:
            fd, size, head = await self._in_thread(self._open_file, key, offset, length)
            open_file = self._open_files.get(key)
            if open_file is None:
                open_file = self._open_files[key] = _OpenFile(fd, size)
                self._forget_unused()
            else:  # opened twice at once: keep the first
                os.close(fd)
        self._open_files.move_to_end(key)
        end = open_file.size if length is None else min(open_file.size, offset + length)
        open_file.users += 1
        reader = LocalFileReader(open_file.fd, offset, end, open_file.release)
        reader.set_head(head)
        return reader

    def _forget_unused(self) -> None:
        while len(self._open_files) > OPEN_FILES:
            _, oldest = self._open_files.popitem(last=False)
            self._drop(oldest)

    @staticmethod
    def _drop(open_file: _OpenFile) -> None:
        open_file.dropped = True
        if open_file.users == 0:
            os.close(open_file.fd)

    def _changed(self, key: str) -> None:
        open_file = self._open_files.pop(key, None)
        if open_file is not None:
            self._drop(open_file)

    def close_files(self) -> None:
        """Close the files kept open (readers still using one keep it until they are done)."""
        while self._open_files:
            self._drop(self._open_files.popitem()[1])

    def _open_file(self, key: str, offset: int, length: int | None) -> tuple[int, int, bytes]:
        """On a worker thread: the file's descriptor, size, and its first bytes from ``offset``."""
        try:
            fd = os.open(self.path_of(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise MediaNotStored(key) from None
        try:
            size = os.fstat(fd).st_size
            end = size if length is None else min(size, offset + length)
            head = os.pread(fd, max(0, min(FIRST_CHUNK, end - offset)), offset)
            if end - offset > FIRST_CHUNK and hasattr(os, "posix_fadvise"):
                # Start reading the next bytes into the page cache, where the
                # response can take them without a thread (see LocalFileReader).
                os.posix_fadvise(
                    fd,
                    offset + len(head),
                    min(READAHEAD, end - offset - len(head)),
                    os.POSIX_FADV_WILLNEED,
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, size, head

    def path_of(self, key: str) -> str:
        return os.path.join(self.root, *_check_key(key).split("/"))

    async def put_content(self, key: str, path: str, length: int) -> None:
        # As MediaStorage's, and the stored file is kept open for the downloads
        # that usually follow an upload (see the class doc).
        duplicate, fd = await self._in_thread(self._place_content, _check_key(key), path, length)
        if not duplicate:
            self._changed(key)  # replaced: an old descriptor has the old bytes
        if fd is not None:
            if key in self._open_files:
                os.close(fd)
            else:
                self._open_files[key] = _OpenFile(fd, length)
                self._forget_unused()

    def _place_content(self, key: str, path: str, length: int) -> tuple[bool, int | None]:
        """(whether the bytes were there already, the stored file opened for reading)."""
        final = self.path_of(key)
        try:
            stored = os.stat(final).st_size
        except FileNotFoundError:
            stored = -1
        duplicate = stored == length  # content-addressed: the same bytes are there already
        if duplicate:
            os.unlink(path)
        else:
            self._replace(key, path)  # missing, or cut short (e.g. by a power loss)
        try:
            fd = os.open(final, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = None
        return duplicate, fd

    def _put_file(self, key: str, path: str) -> None:
        final = self.path_of(key)
        if os.path.exists(final):  # content-addressed: the same bytes are already there
            os.unlink(path)
            return
        self._replace(key, path)

    def _replace(self, key: str, path: str) -> None:
        final = self.path_of(key)
        try:
            try:
                os.replace(path, final)
            except FileNotFoundError:  # the first file under this prefix
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(path, final)
        except FileNotFoundError:
            raise
        except OSError:  # another file system: copy, then drop the original
            with open(path, "rb") as src:
                self._put_stream(key, src)
            os.unlink(path)

    def _put_stream(self, key: str, stream: BinaryIO) -> None:
        final = self.path_of(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(stream, out, COPY_CHUNK)
            os.replace(tmp, final)
        except BaseException:
            os.unlink(tmp)
            raise

    def _open(self, key: str, offset: int, length: int | None) -> MediaReader:
        fd, size, head = self._open_file(key, offset, length)
        end = size if length is None else min(size, offset + length)
        reader = LocalFileReader(fd, offset, end)  # its own descriptor, closed with it
        reader.set_head(head)
        return reader

    def _delete(self, key: str) -> None:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            pass

    def _exists(self, key: str) -> bool:
        return os.path.isfile(self.path_of(key))

    def _local_copy(self, key: str) -> tuple[str, Callable[[], None]]:
        path = self.path_of(key)
        if not os.path.isfile(path):
            raise MediaNotStored(key)
        return path, lambda: None


class S3MediaStorage(MediaStorage):
    """Objects in an S3-compatible bucket (``media_storage_s3``), through boto3."""

    name = "s3"

    def __init__(self, reactor: Any, settings: dict[str, Any], tmp_dir: str) -> None:
        super().__init__(reactor)
        import boto3
        from botocore.config import Config

        self.bucket = settings["bucket"]
        self.prefix = settings.get("prefix") or ""
        self._tmp_dir = tmp_dir
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": settings.get("addressing_style") or "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=20,
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.get("endpoint_url") or None,
            region_name=settings.get("region_name") or None,
            aws_access_key_id=settings.get("access_key_id") or None,
            aws_secret_access_key=settings.get("secret_access_key") or None,
            verify=settings.get("verify_tls", True),
            config=config,
        )
        from botocore.exceptions import ClientError

        self._client_error = ClientError

    def _object(self, key: str) -> str:
        return self.prefix + key

    def _missing(self, e: Exception) -> bool:
        if not isinstance(e, self._client_error):
            return False
        code = str(e.response.get("Error", {}).get("Code", ""))  # type: ignore[attr-defined]
        return code in ("404", "NoSuchKey", "NotFound")

    def _put_file(self, key: str, path: str) -> None:
        try:
            # Multipart for big files: the file is read in parts, never whole.
            self._client.upload_file(path, self.bucket, self._object(key))
        finally:
            os.unlink(path)

    def _put_stream(self, key: str, stream: BinaryIO) -> None:
        self._client.upload_fileobj(stream, self.bucket, self._object(key))

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data)

    def _open(self, key: str, offset: int, length: int | None) -> MediaReader:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._object(key)}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kwargs["Range"] = f"bytes={offset}-{end}"
        try:
            return self._client.get_object(**kwargs)["Body"]
        except Exception as e:
            if self._missing(e):
                raise MediaNotStored(key) from None
            raise

    def _delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._object(key))
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def _local_copy(self, key: str) -> tuple[str, Callable[[], None]]:
        fd, path = tempfile.mkstemp(dir=self._tmp_dir, prefix="s3-")
        os.close(fd)
        try:
            self._client.download_file(self.bucket, self._object(key), path)
        except Exception as e:
            os.unlink(path)
            if self._missing(e):
                raise MediaNotStored(key) from None
            raise

        def cleanup() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

        return path, cleanup


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove %s: %s", path, e)


def remove_later(reactor: Any, path: str) -> None:
    """Remove a file on a worker thread, without waiting for it."""
    reactor.getThreadPool().callInThread(remove_quietly, path)


def content_key(sha256: str) -> str:
    return f"content/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def thumbnail_key(
    sha256: str, width: int, height: int, method: str, animated: bool, content_type: str
) -> str:
    ext = content_type.rsplit("/", 1)[-1]
    suffix = "-animated" if animated else ""
    return f"thumbnails/{sha256[:2]}/{sha256[2:4]}/{sha256}/{width}x{height}-{method}{suffix}.{ext}"
