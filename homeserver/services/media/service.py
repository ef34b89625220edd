"""The media repository: uploads, downloads, thumbnails, previews, quotas, retention.

Content is addressed by its SHA-256: a media id maps to a hash in the
database and the bytes are stored once per hash (``storage.content_key``),
in the back-end configured (local files or S3). Per hash, a lock in memory
orders "store the bytes, record the id" against "forget the last id, delete
the bytes", so a concurrent upload of identical bytes never loses its file.

Media from other servers: ``fetch_remote_media`` fetches it from its origin
over federation (``remote.py``) the first time it is asked for, stores it
like an upload (origin: the other server) and serves it from this cache
afterwards; concurrent requests for the same media share one fetch.
"""

import collections
import logging
import os
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from homeserver.config.loader import parse_duration_ms, parse_size
from homeserver.errors import MatrixError
from homeserver.services.clock import Clock
from homeserver.services.media.previews import AddressPolicy, UrlPreviewer
from homeserver.services.media.remote import (
    FetchedMedia,
    RemoteMediaFetcher,
    filename_from_disposition,
)
from homeserver.services.media.responses import bare_type
from homeserver.services.media.storage import (
    FREE_LATER_MIN,
    LocalMediaStorage,
    MediaNotStored,
    MediaReader,
    MediaStorage,
    S3MediaStorage,
    content_key,
    remove_later,
    remove_quietly,
    thumbnail_key,
)
from homeserver.services.media.thumbnails import (
    THUMBNAILABLE,
    CannotThumbnail,
    ImageTooLarge,
    ThumbnailSpec,
    choose_spec,
    image_info,
    make_thumbnails,
    specs_from_config,
)
from homeserver.services.media.uploads import (
    INLINE_MAX,
    ClaimedUpload,
    UploadSink,
    UploadTooLarge,
    can_receive_directly,
    spool_bytes,
)
from homeserver.services.ratelimit import ratelimiter_from_config
from storage.media import MediaRecord, MediaStore, ThumbnailRecord

logger = logging.getLogger(__name__)

MEDIA_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
SERVER_NAME = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,255}|\d{1,3}(?:\.\d{1,3}){3})(?::\d{1,5})?$"
)
_ID_ALPHABET = string.ascii_letters
MEDIA_ID_LENGTH = 24
# timeout_ms of downloads of created-but-not-uploaded media: default and cap.
DEFAULT_UPLOAD_WAIT_MS = 20_000
MAX_UPLOAD_WAIT_MS = 60_000
# How often retention and the expiry of unused media ids run.
MAINTENANCE_INTERVAL_SECONDS = 3600.0
# Last-access times are written in batches at most this often.
ACCESS_FLUSH_SECONDS = 60.0
# Image decoding is memory-hungry: at most this many at once.
IMAGE_WORKERS = 2
# Upload bodies received straight from the socket (splice) at once, each on a
# thread of their own pool for as long as the body takes; more wait for none.
UPLOAD_RECEIVERS = 4
# Media records (uploaded ones) kept in memory, so a download needs no database read.
RECORD_CACHE_SIZE = 4096
_MAX_TYPE_LENGTH = 255


def _new_media_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(MEDIA_ID_LENGTH))


def not_found(message: str = "Media not found") -> MatrixError:
    return MatrixError("M_NOT_FOUND", message)


def too_large() -> MatrixError:
    return MatrixError("M_TOO_LARGE", "Upload is larger than max_upload_size")


def _clean_content_type(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if len(value) > _MAX_TYPE_LENGTH or not all(32 <= ord(c) < 127 for c in value):
        return bare_type(value) or None
    return value if bare_type(value) else None


def _clean_upload_name(value: str | None) -> str | None:
    if not value:
        return None
    value = "".join(c for c in value if c.isprintable())[:255].strip()
    return value or None


class _Once:
    """Concurrent calls for the same key share one run."""

    def __init__(self) -> None:
        self._waiters: dict[Any, list[defer.Deferred[Any]]] = {}

    def running(self, key: Any) -> bool:
        return key in self._waiters

    async def wait(self, key: Any) -> None:
        """Until the run for ``key`` (if any) is over, whatever its outcome."""
        waiters = self._waiters.get(key)
        if waiters is None:
            return
        d: defer.Deferred[Any] = defer.Deferred()
        waiters.append(d)
        try:
            await d
        except Exception:
            pass

    async def run(self, key: Any, func: Callable[[], Awaitable[Any]]) -> Any:
        waiters = self._waiters.get(key)
        if waiters is not None:
            d: defer.Deferred[Any] = defer.Deferred()
            waiters.append(d)
            return await d
        waiters = self._waiters[key] = []
        try:
            result = await func()
        except BaseException as e:
            del self._waiters[key]
            for w in waiters:
                w.errback(e)
            raise
        del self._waiters[key]
        for w in waiters:
            w.callback(result)
        return result


class PeriodicJob:
    """Runs ``func`` every ``interval`` seconds of ``clock`` (a fake one in tests)."""

    def __init__(self, clock: Clock, interval: float, func: Callable[[], Awaitable[Any]]) -> None:
        self.clock = clock
        self.interval = interval
        self._func = func
        self._call: Any = None
        self._stopped = False
        self.last_run: defer.Deferred[Any] | None = None
        self.runs = 0

    def start(self) -> None:
        self._stopped = False
        self._call = self.clock.call_later(self.interval, self._run)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self) -> None:
        self._call = None
        d = defer.ensureDeferred(self._func())
        self.last_run = d
        d.addErrback(lambda f: logger.error("media maintenance failed: %s", f.getTraceback()))
        d.addBoth(self._again, d)

    def _again(self, _: Any, run: "defer.Deferred[Any]") -> None:
        self.runs += 1
        if not self._stopped and self._call is None and self.last_run is run:
            self._call = self.clock.call_later(self.interval, self._run)


@attrs.frozen
class MaintenanceReport:
    local_deleted: int
    remote_deleted: int
    expired_ids: int


class MediaService:
    def __init__(self, hs: Any) -> None:
        self._hs = hs
        self._reactor = hs.reactor
        self._clock: Clock = hs.clock
        self.server_name: str = hs.server_name
        config = hs.config
        self.store = MediaStore(hs.database)
        self.max_upload_size = parse_size(config["max_upload_size"])
        self.max_image_pixels = parse_size(config["max_image_pixels"])
        self.thumbnail_specs = specs_from_config(config["thumbnail_sizes"])
        self.dynamic_thumbnails = bool(config["dynamic_thumbnails"])
        self.authenticated_media = bool(config["enable_authenticated_media"])
        self.max_pending_uploads = int(config["max_pending_media_uploads"])
        self.unused_expiration_ms = parse_duration_ms(config["unused_expiration_time"])
        self.upload_limits = [
            (parse_duration_ms(limit["time_period"]), parse_size(limit["max_size"]))
            for limit in config["media_upload_limits"] or []
        ]
        retention = config["media_retention"] or {}
        local, remote = (
            retention.get("local_media_lifetime"),
            retention.get("remote_media_lifetime"),
        )
        self.local_media_lifetime_ms = parse_duration_ms(local) if local else None
        self.remote_media_lifetime_ms = parse_duration_ms(remote) if remote else None
        self.store_path = config["media_store_path"]
        self.tmp_dir = os.path.join(self.store_path, "tmp")
        os.makedirs(self.tmp_dir, exist_ok=True)
        s3 = config.get("media_storage_s3")
        self.storage: MediaStorage = (
            S3MediaStorage(hs.reactor, s3, self.tmp_dir)
            if s3
            else LocalMediaStorage(hs.reactor, self.store_path)
        )
        self._create_limiter = ratelimiter_from_config(hs.clock, config["rc_media_create"])
        self.prevent_downloads_from = frozenset(config["prevent_media_downloads_from"] or [])
        self.federation_whitelist = config.get("federation_domain_whitelist")
        self.remote = RemoteMediaFetcher(hs.federation_client, self.tmp_dir, self.max_upload_size)
        self._remote_fetches = _Once()
        self.previews: UrlPreviewer | None = None
        if config["url_preview_enabled"]:
            blacklist = config.get("url_preview_ip_range_blacklist")
            if blacklist is None:
                blacklist = config.ip_range_blocklist
            self.previews = UrlPreviewer(
                hs.reactor,
                AddressPolicy(blacklist, config["url_preview_ip_range_whitelist"] or []),
                config["url_preview_url_blacklist"] or [],
                parse_size(config["max_spider_size"]),
                self._store_preview_image,
                self._clock.time_msec,
            )
        self._image_slots = defer.DeferredSemaphore(IMAGE_WORKERS)
        self._hash_locks: dict[str, tuple[defer.DeferredLock, int]] = {}
        self._receivers: ThreadPool | None = None  # see receive_upload_body
        self._receivers_busy = 0
        self._receivers_stopping = False
        # (origin, media_id) -> record, least recently used first; only uploaded
        # media. Every change to a media row forgets it (and bumps the generation,
        # so a read that raced with the change is not cached).
        self._records: collections.OrderedDict[tuple[str, str], MediaRecord] = (
            collections.OrderedDict()
        )
        self._records_generation = 0
        self._upload_waiters: dict[tuple[str, str], list[defer.Deferred[None]]] = {}
        self._thumbnailing = _Once()
        self._pending_access: dict[tuple[str, str], int] = {}
        self._last_access_flush = self._clock.time_msec()
        self._flushing = False
        self.maintenance: PeriodicJob | None = None
        hs.reactor.addSystemEventTrigger("before", "shutdown", self._flush_on_shutdown)

    # --- lifecycle ------------------------------------------------------------------
    def start(self, clock: Clock | None = None) -> None:
        """Start the hourly maintenance (retention, expiry of unused ids); clear stale spool files."""
        self._remove_stale_spool_files()
        job_clock = clock or self._clock
        self.maintenance = PeriodicJob(
            job_clock,
            MAINTENANCE_INTERVAL_SECONDS,
            lambda: self.run_maintenance(job_clock.time_msec()),
        )
        self.maintenance.start()

    def stop(self) -> None:
        if self.maintenance is not None:
            self.maintenance.stop()
        if isinstance(self.storage, LocalMediaStorage):
            self.storage.close_files()

    def _remove_stale_spool_files(self) -> None:
        cutoff = time.time() - 3600
        try:
            entries = list(os.scandir(self.tmp_dir))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    def config_json(self) -> dict[str, Any]:
        return {"m.upload.size": self.max_upload_size}

    # --- uploads --------------------------------------------------------------------
    def new_upload_sink(self, expected_length: int | None = None, direct: bool = False) -> UploadSink:
        """Where an upload body is written as it arrives (see uploads.py)."""
        return UploadSink(
            self.tmp_dir, self.max_upload_size, self._reactor, expected_length, direct
        )

    @staticmethod
    def receives_directly(length: int) -> bool:
        """Whether a body of ``length`` bytes is better received with ``receive_upload_body``."""
        return length > INLINE_MAX and can_receive_directly()

    def receive_upload_body(
        self, sink: UploadSink, sock: int, count: int, idle_timeout: float | None
    ) -> "defer.Deferred[int] | None":
        """Receive the next ``count`` bytes of an upload body straight from the socket
        ``sock`` into ``sink`` (``UploadSink.receive``, splice(2)), on a thread of the
        media receivers' pool. None when all of them are busy (the body then goes
        the usual way). The caller must not read the socket until this fires.
        """
        if self._receivers_busy >= UPLOAD_RECEIVERS or self._receivers_stopping:
            return None
        if self._receivers is None:
            self._receivers = ThreadPool(0, UPLOAD_RECEIVERS, name="media-receive")
            self._receivers.start()
            self._reactor.addSystemEventTrigger("before", "shutdown", self._stop_receivers)
            self._reactor.addSystemEventTrigger("during", "shutdown", self._receivers.stop)
        dup = os.dup(sock)  # the reactor may close its own descriptor meanwhile
        self._receivers_busy += 1
        sink.receiving()

        def done(result: Any) -> Any:
            os.close(dup)
            self._receivers_busy -= 1
            sink.received(result if isinstance(result, int) else 0)
            return result

        d = threads.deferToThreadPool(
            self._reactor,
            self._receivers,
            sink.receive,
            dup,
            count,
            idle_timeout,
            lambda: self._receivers_stopping,
        )
        d.addBoth(done)
        return d

    def _stop_receivers(self) -> None:
        self._receivers_stopping = True  # receive() checks it every POLL_MS

    @staticmethod
    async def _claim(sink: Any) -> ClaimedUpload:
        if not isinstance(sink, UploadSink):
            raise MatrixError("M_UNKNOWN", "Upload body not received")
        await sink.flushed()
        try:
            return sink.claim()
        except UploadTooLarge:
            raise too_large() from None
        except OSError:
            raise MatrixError("M_UNKNOWN", "Upload body not received") from None

    async def upload(
        self, user_id: str, sink: Any, content_type: str | None, filename: str | None
    ) -> str:
        """POST /upload: store the body; returns its mxc:// URI."""
        upload = await self._claim(sink)
        try:
            await self._check_quota(user_id, upload.length)
            record = self._new_local_record(
                user_id, _clean_content_type(content_type), filename, upload)
            await self._store(upload, record)
        finally:
            self._discard_file(upload)
        self._uploaded(record)
        return f"mxc://{self.server_name}/{record.media_id}"

    def _new_local_record(
        self, user_id: str | None, media_type: str, filename: str | None, upload: Any
    ) -> MediaRecord:
        """The record of new local media whose bytes ``upload`` holds."""
        return MediaRecord(
            origin=self.server_name,
            media_id=_new_media_id(),
            user_id=user_id,
            media_type=media_type,
            upload_name=_clean_upload_name(filename),
            media_length=upload.length,
            sha256=upload.sha256,
            created_ts=self._clock.time_msec(),
            unused_expires_ts=None,
            last_access_ts=None,
            quarantined_by=None,
            safe_from_quarantine=False,
            authenticated=self.authenticated_media,
        )

    async def create(self, user_id: str) -> dict[str, Any]:
        """POST /create: a media id to upload to later."""
        self._create_limiter.check(user_id)
        now = self._clock.time_msec()
        if await self.store.count_pending(user_id, now) >= self.max_pending_uploads:
            raise MatrixError(
                "M_LIMIT_EXCEEDED",
                "Too many pending media uploads",
                retry_after_ms=60_000,
            )
        media_id = _new_media_id()
        expires = now + self.unused_expiration_ms
        await self.store.create_pending(
            self.server_name, media_id, user_id, now, expires, self.authenticated_media
        )
        return {"content_uri": f"mxc://{self.server_name}/{media_id}", "unused_expires_at": expires}

    async def upload_to(
        self,
        user_id: str,
        server_name: str,
        media_id: str,
        sink: Any,
        content_type: str | None,
        filename: str | None,
    ) -> None:
        """PUT /upload/{serverName}/{mediaId}: the content of an id made by /create."""
        upload = await self._claim(sink)
        try:
            now = self._clock.time_msec()
            existing = None
            if server_name == self.server_name and MEDIA_ID.match(media_id):
                existing = await self.store.get_media(server_name, media_id)
            self._check_pending(existing, user_id, now)
            await self._check_quota(user_id, upload.length)
            assert existing is not None
            record = attrs.evolve(
                existing,
                media_type=_clean_content_type(content_type),
                upload_name=_clean_upload_name(filename),
                media_length=upload.length,
                sha256=upload.sha256,
                created_ts=now,
                unused_expires_ts=None,
            )
            before = await self._store(upload, record, replace_pending=True)
            if before is not None:  # lost a race with another PUT or with expiry
                self._check_pending(before, user_id, now)
                raise MatrixError("M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded")
        finally:
            self._discard_file(upload)
        self._uploaded(record)

    @staticmethod
    def _check_pending(existing: MediaRecord | None, user_id: str, now: int) -> None:
        if existing is None or (not existing.uploaded and (existing.unused_expires_ts or 0) <= now):
            raise not_found("Unknown media ID")
        if existing.user_id != user_id:
            raise MatrixError("M_FORBIDDEN", "This media ID was created by another user")
        if existing.uploaded:
            raise MatrixError("M_CANNOT_OVERWRITE_MEDIA", "Media already uploaded")

    async def _check_quota(self, user_id: str, length: int) -> None:
        now = self._clock.time_msec()
        for period_ms, max_size in self.upload_limits:
            used = await self.store.uploaded_since(user_id, now - period_ms)
            if used + length > max_size:
                raise MatrixError(
                    "M_FORBIDDEN", "Upload quota exceeded: try again later or upload less"
                )

    def _hash_lock(self, sha256: str) -> "_HashLock":
        return _HashLock(self._hash_locks, sha256)

    async def _store(
        self, upload: ClaimedUpload, record: MediaRecord, replace_pending: bool = False
    ) -> MediaRecord | None:
        """Put the bytes (once per hash) and record the media id, under the hash's lock.

        The file is in place (renamed into the store, or dropped when the same
        bytes are there already) before the row that points at it commits.
        """
        async with self._hash_lock(upload.sha256):
            key = content_key(upload.sha256)
            await self.storage.put_content(key, upload.path, upload.length)
            self._forget_record(record.origin, record.media_id)
            generation = self._records_generation
            before = await self.store.store_media(record, replace_pending)
            if before is None and not replace_pending and generation == self._records_generation:
                # Inserted as is: the row is this record (the first download reads no row).
                self._remember_record(record)
            else:
                self._forget_record(record.origin, record.media_id)
            if before is not None and not await self.store.content_known(upload.sha256):
                await self.storage.delete(key)
            return before

    def _discard_file(self, upload: ClaimedUpload) -> None:
        """Remove a spool file the store did not take; a big one on a worker thread
        (freeing its pages takes a while), without waiting."""
        if upload.length < FREE_LATER_MIN:
            remove_quietly(upload.path)
        elif os.path.lexists(upload.path):
            remove_later(self._reactor, upload.path)

    def _uploaded(self, record: MediaRecord) -> None:
        """After an upload commits: wake downloads waiting for it, pre-make thumbnails."""
        for d in self._upload_waiters.pop((record.origin, record.media_id), []):
            d.callback(None)
        if bare_type(record.media_type) in THUMBNAILABLE and self.thumbnail_specs:
            d2 = defer.ensureDeferred(self._pregenerate(record))
            d2.addErrback(lambda f: logger.error("thumbnailing failed: %s", f.getTraceback()))

    # --- downloads ------------------------------------------------------------------
    async def get_media(
        self,
        server_name: str,
        media_id: str,
        *,
        legacy: bool = False,
        allow_remote: bool = True,
        timeout_ms: int | None = None,
    ) -> MediaRecord:
        """The uploaded media behind an mxc:// URI, or 404 (504 if it never arrives).

        ``legacy``: for the unauthenticated endpoints, which only serve media
        from before enable_authenticated_media was turned on (so they never
        fetch remote media while it is on). ``allow_remote=False``: only
        media already here (another server asking, as the spec requires).
        """
        if not MEDIA_ID.match(media_id) or not SERVER_NAME.match(server_name):
            raise not_found()
        if server_name != self.server_name:
            fetch = allow_remote and not (legacy and self.authenticated_media)
            record = await self._remote_media(server_name, media_id, fetch, timeout_ms)
        else:
            record = await self._load_record(server_name, media_id)
        if record is None or record.quarantined_by is not None:
            raise not_found()
        if legacy and record.authenticated:
            raise not_found(
                "Media uploaded since authenticated media was enabled is only served by "
                "/_matrix/client/v1/media"
            )
        if not record.uploaded:
            record = await self._wait_for_upload(record, timeout_ms)
        self._note_access(record)
        return record

    async def _load_record(self, origin: str, media_id: str) -> MediaRecord | None:
        """The media row, from memory when it was read or written lately."""
        key = (origin, media_id)
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
            return record
        generation = self._records_generation
        record = await self.store.get_media(origin, media_id)
        if record is not None and record.uploaded and generation == self._records_generation:
            self._remember_record(record)
        return record

    def _remember_record(self, record: MediaRecord) -> None:
        self._records[(record.origin, record.media_id)] = record
        if len(self._records) > RECORD_CACHE_SIZE:
            self._records.popitem(last=False)

    def _forget_record(self, origin: str, media_id: str) -> None:
        """After (and before) any change to a media row."""
        self._records_generation += 1
        self._records.pop((origin, media_id), None)

    def _forget_all_records(self) -> None:
        self._records_generation += 1
        self._records.clear()

    async def _remote_media(
        self, server_name: str, media_id: str, fetch: bool, timeout_ms: int | None
    ) -> MediaRecord | None:
        """Cached media of another server, fetched first if ``fetch`` and not cached."""
        self._check_remote_allowed(server_name)
        record = await self._load_record(server_name, media_id)
        if record is None and fetch:
            record = await self.fetch_remote_media(server_name, media_id, timeout_ms=timeout_ms)
        return record

    def _check_remote_allowed(self, server_name: str) -> None:
        """prevent_media_downloads_from: 404, cached or not (as Synapse, a moderation
        tool); federation_domain_whitelist: 403 for servers it leaves out."""
        if server_name in self.prevent_downloads_from:
            raise not_found()
        if self.federation_whitelist is not None and server_name not in self.federation_whitelist:
            raise MatrixError("M_FORBIDDEN", f"Federation denied with {server_name}")

    async def fetch_remote_media(
        self, server_name: str, media_id: str, *, timeout_ms: int | None = None
    ) -> MediaRecord:
        """Fetch media from its origin over federation and cache it.

        Concurrent calls for the same media share one fetch. Failures are
        MatrixErrors for the client: 404 when the origin does not have it,
        502 M_TOO_LARGE over max_upload_size, 502 M_UNKNOWN when it cannot be
        reached or answers nonsense.
        """
        return await self._remote_fetches.run(
            (server_name, media_id),
            lambda: self._fetch_and_store(server_name, media_id, timeout_ms),
        )

    async def _fetch_and_store(
        self, server_name: str, media_id: str, timeout_ms: int | None
    ) -> MediaRecord:
        cached = await self.store.get_media(server_name, media_id)
        if cached is not None:  # a fetch that finished while this one was queued
            return cached
        wait_ms = DEFAULT_UPLOAD_WAIT_MS if timeout_ms is None else timeout_ms
        wait_ms = max(0, min(wait_ms, MAX_UPLOAD_WAIT_MS))
        fetched = await self.remote.fetch(server_name, media_id, wait_ms)
        try:
            record = self._new_remote_record(server_name, media_id, fetched)
            await self._store(fetched.upload, record)
        finally:
            self._discard_file(fetched.upload)
        logger.info("cached mxc://%s/%s (%d bytes)", server_name, media_id, fetched.upload.length)
        self._uploaded(record)
        return record

    def _new_remote_record(
        self, server_name: str, media_id: str, fetched: FetchedMedia
    ) -> MediaRecord:
        return MediaRecord(
            origin=server_name,
            media_id=media_id,
            user_id=None,
            media_type=_clean_content_type(fetched.content_type),
            upload_name=_clean_upload_name(filename_from_disposition(fetched.disposition)),
            media_length=fetched.upload.length,
            sha256=fetched.upload.sha256,
            created_ts=self._clock.time_msec(),
            unused_expires_ts=None,
            last_access_ts=None,
            quarantined_by=None,
            safe_from_quarantine=False,
            authenticated=self.authenticated_media,
        )

    async def _wait_for_upload(self, record: MediaRecord, timeout_ms: int | None) -> MediaRecord:
        now = self._clock.time_msec()
        if (record.unused_expires_ts or 0) <= now:
            raise not_found()
        wait_ms = DEFAULT_UPLOAD_WAIT_MS if timeout_ms is None else timeout_ms
        wait_ms = max(0, min(wait_ms, MAX_UPLOAD_WAIT_MS))
        key = (record.origin, record.media_id)
        if wait_ms > 0:
            d: defer.Deferred[None] = defer.Deferred()
            self._upload_waiters.setdefault(key, []).append(d)
            d.addTimeout(wait_ms / 1000, self._reactor)
            try:
                await d
            except defer.TimeoutError:
                pass
            finally:
                waiters = self._upload_waiters.get(key)
                if waiters is not None and d in waiters:
                    waiters.remove(d)
                    if not waiters:
                        del self._upload_waiters[key]
        fresh = await self.store.get_media(record.origin, record.media_id)
        if fresh is None or fresh.quarantined_by is not None:
            raise not_found()
        if not fresh.uploaded:
            raise MatrixError("M_NOT_YET_UPLOADED", "Content has not yet been uploaded")
        return fresh

    async def open_content(
        self, record: MediaRecord, offset: int = 0, length: int | None = None
    ) -> MediaReader:
        assert record.sha256 is not None
        try:
            return await self.storage.open(content_key(record.sha256), offset, length)
        except MediaNotStored:
            logger.error(
                "content of mxc://%s/%s (%s) is missing from the %s store",
                record.origin,
                record.media_id,
                record.sha256,
                self.storage.name,
            )
            raise not_found() from None

    def _note_access(self, record: MediaRecord) -> None:
        now = self._clock.time_msec()
        self._pending_access[(record.origin, record.media_id)] = now
        if not self._flushing and now - self._last_access_flush >= ACCESS_FLUSH_SECONDS * 1000:
            defer.ensureDeferred(self._background_flush())

    async def flush_access_times(self) -> None:
        self._last_access_flush = self._clock.time_msec()
        if not self._pending_access:
            return
        batch, self._pending_access = self._pending_access, {}
        await self.store.update_last_access((o, m, ts) for (o, m), ts in batch.items())

    async def _background_flush(self) -> None:
        self._flushing = True
        try:
            await self.flush_access_times()
        except RuntimeError:  # the database is closing
            pass
        except Exception:
            logger.exception("failed to record media access times")
        finally:
            self._flushing = False

    def _flush_on_shutdown(self) -> Any:
        d = defer.ensureDeferred(self.flush_access_times())
        d.addErrback(lambda f: logger.warning("media access flush at shutdown failed: %s", f.value))
        return d

    # --- thumbnails -----------------------------------------------------------------
    async def get_thumbnail(
        self,
        server_name: str,
        media_id: str,
        width: int,
        height: int,
        method: str,
        animated: bool,
        *,
        legacy: bool = False,
        allow_remote: bool = True,
        timeout_ms: int | None = None,
    ) -> ThumbnailRecord:
        if width < 1 or height < 1:
            raise MatrixError("M_INVALID_PARAM", "width and height must be positive integers")
        if method not in ("crop", "scale"):
            raise MatrixError("M_INVALID_PARAM", "method must be crop or scale")
        record = await self.get_media(
            server_name, media_id, legacy=legacy, allow_remote=allow_remote, timeout_ms=timeout_ms
        )
        media_type = bare_type(record.media_type)
        if media_type not in THUMBNAILABLE:
            raise MatrixError("M_UNKNOWN", "Cannot generate thumbnails for the requested content")
        # Only GIF, WebP and (A)PNG can be animated.
        can_animate = media_type in ("image/gif", "image/webp", "image/png", "image/apng")
        spec = attrs.evolve(
            choose_spec(width, height, method, self.thumbnail_specs, self.dynamic_thumbnails),
            animated=animated and can_animate,
        )
        assert record.sha256 is not None
        await self._thumbnailing.wait(record.sha256)  # pre-generation after upload
        found = self._find_thumbnail(await self.store.get_thumbnails(record.sha256), spec)
        if found is not None:
            return found
        made = await self._thumbnailing.run(
            (record.sha256, spec), lambda: self._generate(record, [spec])
        )
        return made[0]

    @staticmethod
    def _find_thumbnail(
        existing: list[ThumbnailRecord], spec: ThumbnailSpec
    ) -> ThumbnailRecord | None:
        for t in existing:
            if (t.width, t.height, t.method, t.animated) == (
                spec.width,
                spec.height,
                spec.method,
                spec.animated,
            ):
                return t
        return None

    async def open_thumbnail(self, thumb: ThumbnailRecord) -> MediaReader:
        key = thumbnail_key(
            thumb.sha256,
            thumb.width,
            thumb.height,
            thumb.method,
            thumb.animated,
            thumb.content_type,
        )
        try:
            return await self.storage.open(key)
        except MediaNotStored:
            raise not_found("Thumbnail missing from the media store") from None

    async def _pregenerate(self, record: MediaRecord) -> None:
        sha256 = record.sha256
        assert sha256 is not None
        if self._thumbnailing.running(sha256):
            return

        async def go() -> None:
            existing = await self.store.get_thumbnails(sha256)
            wanted = [s for s in self.thumbnail_specs if self._find_thumbnail(existing, s) is None]
            if not wanted:
                return
            try:
                await self._generate(record, wanted)
            except MatrixError as e:
                logger.info(
                    "no thumbnails for mxc://%s/%s: %s", record.origin, record.media_id, e.message
                )

        await self._thumbnailing.run(sha256, go)

    async def _generate(
        self, record: MediaRecord, specs: list[ThumbnailSpec]
    ) -> list[ThumbnailRecord]:
        """Make, store and record thumbnails (image work on a worker thread)."""
        sha256 = record.sha256
        assert sha256 is not None
        async with self._image_slots:
            try:
                path, cleanup = await self.storage.local_copy(content_key(sha256))
            except MediaNotStored:
                raise not_found() from None
            try:
                thumbs = await threads.deferToThreadPool(
                    self._reactor,
                    self._reactor.getThreadPool(),
                    make_thumbnails,
                    path,
                    specs,
                    self.max_image_pixels,
                )
            except ImageTooLarge:
                raise MatrixError("M_TOO_LARGE", "Content is too large to thumbnail") from None
            except CannotThumbnail:
                raise MatrixError(
                    "M_UNKNOWN", "Cannot generate thumbnails for the requested content"
                ) from None
            finally:
                await threads.deferToThreadPool(
                    self._reactor, self._reactor.getThreadPool(), cleanup
                )
        records = []
        for t in thumbs:
            rec = ThumbnailRecord(
                sha256,
                t.spec.width,
                t.spec.height,
                t.spec.method,
                t.spec.animated,
                t.content_type,
                t.width,
                t.height,
                len(t.data),
            )
            await self.storage.put_bytes(
                thumbnail_key(
                    sha256, rec.width, rec.height, rec.method, rec.animated, rec.content_type
                ),
                t.data,
            )
            await self.store.add_thumbnail(rec)
            records.append(rec)
        return records

    # --- URL previews ---------------------------------------------------------------
    async def preview_url(self, url: str) -> dict[str, Any]:
        if self.previews is None:
            raise MatrixError("M_UNRECOGNIZED", "URL previews are disabled on this server", 404)
        return await self.previews.preview(url)

    async def _store_preview_image(
        self, data: bytes, content_type: str, name: str | None
    ) -> tuple[str, int, int]:
        pool = self._reactor.getThreadPool()
        upload = await threads.deferToThreadPool(
            self._reactor, pool, spool_bytes, self.tmp_dir, data
        )
        try:
            try:
                info = await threads.deferToThreadPool(
                    self._reactor, pool, image_info, upload.path, self.max_image_pixels
                )
            except (CannotThumbnail, ImageTooLarge) as e:
                raise MatrixError("M_UNKNOWN", f"Not a usable image: {e}") from None
            record = self._new_local_record(None, info.content_type, name, upload)
            await self._store(upload, record)
        finally:
            self._discard_file(upload)
        self._uploaded(record)
        return f"mxc://{self.server_name}/{record.media_id}", info.width, info.height

    # --- administration -------------------------------------------------------------
    async def get_media_info(self, server_name: str, media_id: str) -> MediaRecord:
        record = await self.store.get_media(server_name, media_id)
        if record is None:
            raise not_found()
        return record

    async def quarantine(self, server_name: str, media_id: str, admin: str | None) -> int:
        """Quarantine (or release, ``admin`` None) one media item; quarantined media is 404."""
        try:
            return await self.store.set_quarantined([(server_name, media_id)], admin)
        finally:
            self._forget_record(server_name, media_id)

    async def quarantine_room(self, room_id: str, admin: str) -> int:
        """Quarantine every media item an mxc:// URL in the room's events refers to."""
        media = await self.store.media_in_room(room_id)
        try:
            return await self.store.set_quarantined(sorted(media), admin)
        finally:
            self._forget_all_records()

    async def quarantine_user(self, user_id: str, admin: str | None) -> int:
        media = await self.store.user_media_ids(user_id)
        try:
            return await self.store.set_quarantined(media, admin)
        finally:
            self._forget_all_records()

    async def protect(self, server_name: str, media_id: str, safe: bool) -> None:
        try:
            changed = await self.store.set_safe_from_quarantine(server_name, media_id, safe)
        finally:
            self._forget_record(server_name, media_id)
        if not changed:
            raise not_found()

    async def delete(self, server_name: str, media_id: str) -> bool:
        """Forget a media id; its bytes and thumbnails go once no other id shares them."""
        record = await self.store.get_media(server_name, media_id)
        if record is None:
            return False
        self._forget_record(server_name, media_id)
        if record.sha256 is None:
            deleted = await self.store.delete_media([(server_name, media_id)])
            self._forget_record(server_name, media_id)
            return bool(deleted.media)
        async with self._hash_lock(record.sha256):
            try:
                deleted = await self.store.delete_media([(server_name, media_id)])
            finally:
                self._forget_record(server_name, media_id)
            for sha256 in deleted.orphaned:
                await self.storage.delete(content_key(sha256))
            for t in deleted.orphaned_thumbnails:
                await self.storage.delete(
                    thumbnail_key(t.sha256, t.width, t.height, t.method, t.animated, t.content_type)
                )
        return bool(deleted.media)

    async def delete_user_media(self, user_id: str) -> list[str]:
        deleted = []
        for origin, media_id in await self.store.user_media_ids(user_id):
            if await self.delete(origin, media_id):
                deleted.append(media_id)
        return deleted

    async def list_user_media(
        self, user_id: str, start: int, limit: int, order_by: str, descending: bool
    ) -> tuple[list[MediaRecord], int]:
        return await self.store.list_user_media(user_id, start, limit, order_by, descending)

    # --- maintenance ----------------------------------------------------------------
    async def run_maintenance(self, now_ms: int) -> MaintenanceReport:
        """Retention (media_retention) and the expiry of unused /create ids, as of ``now_ms``."""
        await self.flush_access_times()
        local = remote = 0
        if self.local_media_lifetime_ms is not None:
            local = await self._delete_unused(True, now_ms - self.local_media_lifetime_ms)
        if self.remote_media_lifetime_ms is not None:
            remote = await self._delete_unused(False, now_ms - self.remote_media_lifetime_ms)
        expired = 0
        while True:
            ids = await self.store.expired_pending(now_ms)
            if not ids:
                break
            expired += len((await self.store.delete_media(ids)).media)
            for origin, media_id in ids:
                self._forget_record(origin, media_id)
        if local or remote or expired:
            logger.info(
                "media retention: deleted %d local, %d remote, %d unused ids",
                local,
                remote,
                expired,
            )
        return MaintenanceReport(local, remote, expired)

    async def _delete_unused(self, local: bool, cutoff: int) -> int:
        count = 0
        while True:
            batch = await self.store.not_accessed_since(self.server_name, local, cutoff)
            if not batch:
                return count
            progressed = False
            for origin, media_id in batch:
                if await self.delete(origin, media_id):
                    count += 1
                    progressed = True
            if not progressed:
                return count


class _HashLock:
    """``async with``: the per-hash lock, dropped from the table when nobody holds it."""

    def __init__(self, table: dict[str, tuple[defer.DeferredLock, int]], key: str) -> None:
        self._table = table
        self._key = key

    async def __aenter__(self) -> None:
        lock, users = self._table.get(self._key, (None, 0))
        if lock is None:
            lock = defer.DeferredLock()
        self._table[self._key] = (lock, users + 1)
        await lock.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        lock, users = self._table[self._key]
        lock.release()
        if users <= 1:
            del self._table[self._key]
        else:
            self._table[self._key] = (lock, users - 1)
