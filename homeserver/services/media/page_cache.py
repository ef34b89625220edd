"""Whether a byte range of a file is in the page cache, found without reading it.

A download on the reactor thread may only ``sendfile`` bytes the page cache
holds: anything else would block the whole server on the disk. Linux 6.5+
answers with ``cachestat(2)`` (pages cached in a range, no data copied);
elsewhere a one-byte ``preadv2(RWF_NOWAIT)`` every ``STRIDE`` bytes and at
the end of the range stands in (the kernel reads ahead and evicts in runs of
pages, so a range whose sampled pages are all there is, in practice, there).
Reading the whole range into a scratch buffer, as this did before, cost a
copy of every byte sent and a buffer of the largest range per thread.
"""

import ctypes
import errno
import os
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
STRIDE = 128 * 1024
_SYS_CACHESTAT = 451  # the same number on every Linux architecture


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


_syscall: Any = None
_cachestat_works = os.uname().sysname == "Linux" and os.uname().machine in ("x86_64", "aarch64")
_nowait_works = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
_probe = bytearray(1)


def _cachestat(fd: int, offset: int, length: int) -> int | None:
    """Pages of ``[offset, offset+length)`` in the page cache, or None if the kernel
    cannot tell."""
    global _syscall, _cachestat_works
    if not _cachestat_works:
        return None
    if _syscall is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _syscall = libc.syscall
        _syscall.restype = ctypes.c_long
    stat = _Stat()
    span = _Range(offset, length)
    result = _syscall(
        ctypes.c_long(_SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(span),
        ctypes.byref(stat), ctypes.c_uint(0),
    )
    if result != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            _cachestat_works = False  # an older kernel, a seccomp filter, a file system
        return None
    return int(stat.nr_cache)


def _sampled(fd: int, offset: int, length: int) -> bool | None:
    """Whether one byte every STRIDE and the last byte are cached; None if unknowable."""
    global _nowait_works
    if not _nowait_works:
        return None
    view = memoryview(_probe)
    last = offset + length - 1
    positions = list(range(offset, last, STRIDE))
    positions.append(last)
    try:
        for position in positions:
            if os.preadv(fd, [view], position, os.RWF_NOWAIT) <= 0:
                return False
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _nowait_works = False
            return None
        raise
    return True


def cached_length(fd: int, offset: int, length: int) -> int:
    """``length`` if ``[offset, offset+length)`` of ``fd`` is in the page cache, else 0
    (also when it cannot be told: the caller then reads on a worker thread)."""
    if length <= 0:
        return 0
    pages = _cachestat(fd, offset, length)
    if pages is not None:
        wanted = (offset + length - 1) // PAGE - offset // PAGE + 1
        return length if pages >= wanted else 0
    return length if _sampled(fd, offset, length) else 0
