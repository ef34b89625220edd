"""Where media bytes live: one small interface, a local-disk and an S3 back-end.

Keys are chosen by the media service (``content/ab/cd/<sha256>``,
``thumbnails/...``), never by clients. Every blocking call runs on a worker
thread; readers returned by ``open`` are blocking file-likes meant to be read
from worker threads too (see ``responses.MediaProducer``).
"""

import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from twisted.internet import threads

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_./-]*$")
COPY_CHUNK = 1024 * 1024


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

    async def put_stream(self, key: str, stream: BinaryIO) -> None:
        """Store everything ``stream`` yields under ``key`` (read on a worker thread)."""
        await self._in_thread(self._put_stream, _check_key(key), stream)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._in_thread(self._put_bytes, _check_key(key), data)

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> MediaReader:
        """A reader of the object's bytes from ``offset`` (``length`` of them, or to the end).

        Raises MediaNotStored when nothing is stored under the key.
        """
        return await self._in_thread(self._open, _check_key(key), offset, length)

    async def delete(self, key: str) -> None:
        await self._in_thread(self._delete, _check_key(key))

    async def exists(self, key: str) -> bool:
        return await self._in_thread(self._exists, _check_key(key))

    async def local_copy(self, key: str) -> tuple[str, Callable[[], None]]:
        """A path on local disk holding the object, and what to call when done with it."""
        return await self._in_thread(self._local_copy, _check_key(key))

    # --- what back-ends implement (blocking, on worker threads) ---------------------------
    @abstractmethod
    def _put_file(self, key: str, path: str) -> None: ...

    @abstractmethod
    def _put_stream(self, key: str, stream: BinaryIO) -> None: ...

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


class _LimitedFile:
    """At most ``remaining`` bytes of an open file."""

    def __init__(self, f: BinaryIO, remaining: int | None) -> None:
        self._f = f
        self._remaining = remaining

    def read(self, size: int) -> bytes:
        if self._remaining is not None:
            size = min(size, self._remaining)
            if size <= 0:
                return b""
        data = self._f.read(size)
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


class LocalMediaStorage(MediaStorage):
    """Files under ``media_store_path`` (the default)."""

    name = "local"

    def __init__(self, reactor: Any, root: str) -> None:
        super().__init__(reactor)
        self.root = os.path.abspath(root)

    def path_of(self, key: str) -> str:
        return os.path.join(self.root, *_check_key(key).split("/"))

    def _put_file(self, key: str, path: str) -> None:
        final = self.path_of(key)
        if os.path.exists(final):  # content-addressed: the same bytes are already there
            os.unlink(path)
            return
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.replace(path, final)
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
        try:
            f = open(self.path_of(key), "rb")  # noqa: SIM115 - closed by the reader
        except FileNotFoundError:
            raise MediaNotStored(key) from None
        if offset:
            f.seek(offset)
        return _LimitedFile(f, length)

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


def content_key(sha256: str) -> str:
    return f"content/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def thumbnail_key(
    sha256: str, width: int, height: int, method: str, animated: bool, content_type: str
) -> str:
    ext = content_type.rsplit("/", 1)[-1]
    suffix = "-animated" if animated else ""
    return f"thumbnails/{sha256[:2]}/{sha256[2:4]}/{sha256}/{width}x{height}-{method}{suffix}.{ext}"
