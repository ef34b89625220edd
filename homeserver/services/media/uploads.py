"""Upload bodies, written to disk and hashed as they arrive.

The listener's request class (``homeserver/app/listeners.py``) makes an
``UploadSink`` the request's ``content`` for upload paths, so a body never sits
in memory: each chunk goes to a temporary file under ``media_store_path/tmp``
and into a running SHA-256. Once the body is complete the upload handler
``claim``s the file; if nobody does (the request failed, the client went away),
``close`` deletes it.
"""

import hashlib
import os
import tempfile

import attrs


@attrs.frozen
class ClaimedUpload:
    path: str  # the caller now owns this file
    sha256: str
    length: int


class UploadTooLarge(Exception):
    pass


class UploadSink:
    """A file-like Twisted can use as ``request.content`` for an upload body."""

    def __init__(self, tmp_dir: str, max_size: int) -> None:
        self.max_size = max_size
        fd, self.path = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.length = 0
        self.too_large = False
        self._claimed = False
        self._closed = False

    # --- what Twisted calls -------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.too_large or self._closed:
            return
        self.length += len(data)
        if self.length > self.max_size:
            self.too_large = True
            self._discard()
            return
        self._file.write(data)
        self._hash.update(data)

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
    def claim(self) -> ClaimedUpload:
        """Take the finished body: its file, SHA-256 and length."""
        if self.too_large:
            raise UploadTooLarge()
        if self._closed:
            raise OSError("the upload was abandoned")
        self._file.close()
        self._claimed = True
        self._closed = True
        return ClaimedUpload(self.path, self._hash.hexdigest(), self.length)

    def _discard(self) -> None:
        try:
            self._file.close()
        finally:
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
