"""page_cache.cached_length: a range is only reported cached when all of it is."""

import os
import tempfile
import unittest
from unittest import mock

from homeserver.services.media import page_cache

MIB = 1024 * 1024


class CachedLengthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.fd, self.path = tempfile.mkstemp()
        os.write(self.fd, os.urandom(4 * MIB))
        os.fsync(self.fd)  # written back: the pages can be dropped

    def tearDown(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)

    def _drop(self) -> None:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _check(self) -> None:
        self.assertEqual(page_cache.cached_length(self.fd, 100, MIB), MIB)  # just written
        self.assertEqual(page_cache.cached_length(self.fd, 0, 0), 0)
        self._drop()
        self.assertEqual(page_cache.cached_length(self.fd, 100, MIB), 0)
        os.pread(self.fd, 4096, 0)  # the first pages (and what the kernel reads ahead) only
        self.assertEqual(page_cache.cached_length(self.fd, 0, 4096), 4096)
        self.assertEqual(page_cache.cached_length(self.fd, 0, 3 * MIB), 0)
        os.pread(self.fd, 4 * MIB, 0)
        self.assertEqual(page_cache.cached_length(self.fd, 5, 3 * MIB), 3 * MIB)

    def test_with_cachestat_when_the_kernel_has_it(self):
        if page_cache._cachestat(self.fd, 0, 4096) is None:
            self.skipTest("no cachestat(2) here")
        self._check()

    def test_sampling_with_nowait_reads(self):
        if not page_cache._nowait_works:
            self.skipTest("no preadv2(RWF_NOWAIT) here")
        with mock.patch.object(page_cache, "_cachestat_works", False):
            self._check()

    def test_unknowable_means_not_cached(self):
        with mock.patch.object(page_cache, "_cachestat_works", False), mock.patch.object(
            page_cache, "_nowait_works", False
        ):
            self.assertEqual(page_cache.cached_length(self.fd, 0, MIB), 0)
