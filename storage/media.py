"""The media repository's tables: media ids, content hashes, thumbnails.

``media`` maps each ``mxc://origin/media_id`` to the SHA-256 of its content
(``media_content``), so identical uploads share one stored file; thumbnails
belong to the content hash. Deleting the last media id of a hash reports the
hash as orphaned so the caller can remove the stored bytes.
"""

import re
from collections.abc import Iterable
from typing import Any

import attrs

from storage.database import Database, Txn

_MEDIA_COLUMNS = (
    "origin, media_id, user_id, media_type, upload_name, media_length, sha256, created_ts,"
    " unused_expires_ts, last_access_ts, quarantined_by, safe_from_quarantine, authenticated"
)
_THUMB_COLUMNS = (
    "sha256, width, height, method, animated, content_type, actual_width, actual_height, length"
)
# mxc://<server name>/<media id>, as found anywhere in an event's JSON.
MXC_IN_TEXT = re.compile(r"mxc://([A-Za-z0-9.:\[\]-]+)/([A-Za-z0-9_-]+)")
_ROOM_SCAN_BATCH = 500


@attrs.frozen
class MediaRecord:
    origin: str
    media_id: str
    user_id: str | None
    media_type: str | None
    upload_name: str | None
    media_length: int | None
    sha256: str | None  # None: created by /create, not uploaded yet
    created_ts: int
    unused_expires_ts: int | None
    last_access_ts: int | None
    quarantined_by: str | None
    safe_from_quarantine: bool
    authenticated: bool

    @property
    def uploaded(self) -> bool:
        return self.sha256 is not None

    def admin_json(self) -> dict[str, Any]:
        """The shape of Synapse's admin API for one media item."""
        return {
            "media_id": self.media_id,
            "media_type": self.media_type,
            "media_length": self.media_length,
            "upload_name": self.upload_name,
            "created_ts": self.created_ts,
            "last_access_ts": self.last_access_ts,
            "quarantined_by": self.quarantined_by,
            "safe_from_quarantine": self.safe_from_quarantine,
            "sha256": self.sha256,
        }


@attrs.frozen
class ThumbnailRecord:
    sha256: str
    width: int
    height: int
    method: str
    animated: bool
    content_type: str
    actual_width: int
    actual_height: int
    length: int


@attrs.frozen
class DeletedMedia:
    """What a deletion removed: the media ids, and the hashes nothing refers to now."""

    media: list[tuple[str, str]]
    orphaned: list[str]  # content hashes whose bytes (and thumbnails) can go
    orphaned_thumbnails: list[ThumbnailRecord]


def _media(row: tuple[Any, ...]) -> MediaRecord:
    return MediaRecord(*row[:11], bool(row[11]), bool(row[12]))


def _thumb(row: tuple[Any, ...]) -> ThumbnailRecord:
    return ThumbnailRecord(row[0], row[1], row[2], row[3], bool(row[4]), *row[5:])


class MediaStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- reading ----------------------------------------------------------------
    async def get_media(self, origin: str, media_id: str) -> MediaRecord | None:
        return await self.db.run_read("get_media", self._get_media_txn, origin, media_id)

    @staticmethod
    def _get_media_txn(txn: Txn, origin: str, media_id: str) -> MediaRecord | None:
        row = txn.execute(
            f"SELECT {_MEDIA_COLUMNS} FROM media WHERE origin = ? AND media_id = ?",
            (origin, media_id),
        ).fetchone()
        return _media(row) if row else None

    async def get_thumbnails(self, sha256: str) -> list[ThumbnailRecord]:
        rows = await self.db.select(
            "get_thumbnails",
            f"SELECT {_THUMB_COLUMNS} FROM media_thumbnails WHERE sha256 = ?",
            (sha256,),
        )
        return [_thumb(r) for r in rows]

    async def count_pending(self, user_id: str, now: int) -> int:
        rows = await self.db.select(
            "count_pending_media",
            "SELECT COUNT(*) FROM media WHERE user_id = ? AND sha256 IS NULL"
            " AND unused_expires_ts > ?",
            (user_id, now),
        )
        return int(rows[0][0])

    async def uploaded_since(self, user_id: str, since_ts: int) -> int:
        """Bytes the user uploaded at or after ``since_ts`` (for quotas)."""
        rows = await self.db.select(
            "uploaded_since",
            "SELECT COALESCE(SUM(media_length), 0) FROM media"
            " WHERE user_id = ? AND created_ts >= ? AND sha256 IS NOT NULL",
            (user_id, since_ts),
        )
        return int(rows[0][0])

    async def list_user_media(
        self, user_id: str, start: int, limit: int, order_by: str, descending: bool
    ) -> tuple[list[MediaRecord], int]:
        """A page of the user's uploads (Synapse's admin API) and their total count."""
        column = {
            "media_id": "media_id",
            "upload_name": "upload_name",
            "created_ts": "created_ts",
            "last_access_ts": "last_access_ts",
            "media_length": "media_length",
            "media_type": "media_type",
            "quarantined_by": "quarantined_by",
            "safe_from_quarantine": "safe_from_quarantine",
        }[order_by]
        direction = "DESC" if descending else "ASC"

        def txn_fn(txn: Txn) -> tuple[list[MediaRecord], int]:
            total = txn.execute(
                "SELECT COUNT(*) FROM media WHERE user_id = ? AND sha256 IS NOT NULL",
                (user_id,),
            ).fetchone()[0]
            rows = txn.execute(
                f"SELECT {_MEDIA_COLUMNS} FROM media WHERE user_id = ? AND sha256 IS NOT NULL"
                f" ORDER BY {column} {direction}, media_id {direction} LIMIT ? OFFSET ?",
                (user_id, limit, start),
            ).fetchall()
            return [_media(r) for r in rows], int(total)

        return await self.db.run_read("list_user_media", txn_fn)

    async def user_media_ids(self, user_id: str) -> list[tuple[str, str]]:
        rows = await self.db.select(
            "user_media_ids", "SELECT origin, media_id FROM media WHERE user_id = ?", (user_id,)
        )
        return [(r[0], r[1]) for r in rows]

    async def media_in_room(self, room_id: str) -> set[tuple[str, str]]:
        """Every (origin, media_id) an mxc:// URL in the room's events points at."""
        found: set[tuple[str, str]] = set()
        after = -(2**62)
        while True:
            rows = await self.db.select(
                "media_in_room",
                "SELECT stream_ordering, json FROM events WHERE room_id = ? AND stream_ordering > ?"
                " ORDER BY stream_ordering LIMIT ?",
                (room_id, after, _ROOM_SCAN_BATCH),
            )
            for _, text in rows:
                if "mxc://" in text:
                    # json.dumps-decoded text: URLs may be written with escaped slashes.
                    found.update(MXC_IN_TEXT.findall(text.replace("\\/", "/")))
            if len(rows) < _ROOM_SCAN_BATCH:
                return found
            after = rows[-1][0]

    # --- writing ----------------------------------------------------------------
    async def create_pending(
        self,
        origin: str,
        media_id: str,
        user_id: str,
        now: int,
        expires_ts: int,
        authenticated: bool,
    ) -> None:
        await self.db.run_interaction(
            "create_pending_media",
            lambda txn: txn.execute(
                "INSERT INTO media (origin, media_id, user_id, created_ts, unused_expires_ts,"
                " authenticated) VALUES (?, ?, ?, ?, ?, ?)",
                (origin, media_id, user_id, now, expires_ts, authenticated),
            ),
        )

    async def store_media(
        self, record: MediaRecord, replace_pending: bool = False
    ) -> MediaRecord | None:
        """Record uploaded content under a media id (and its hash, once).

        With ``replace_pending`` the id must exist, belong to ``record.user_id``
        and not be uploaded yet; returns the row as it was before when that is
        not so (the caller explains), None on success.
        """
        return await self.db.run_interaction(
            "store_media", self._store_media_txn, record, replace_pending
        )

    @staticmethod
    def _store_media_txn(txn: Txn, r: MediaRecord, replace_pending: bool) -> MediaRecord | None:
        assert r.sha256 is not None and r.media_length is not None
        if (
            txn.execute("SELECT 1 FROM media_content WHERE sha256 = ?", (r.sha256,)).fetchone()
            is None
        ):
            txn.execute(
                "INSERT INTO media_content (sha256, length, created_ts) VALUES (?, ?, ?)",
                (r.sha256, r.media_length, r.created_ts),
            )
        if not replace_pending:
            txn.execute(
                f"INSERT INTO media ({_MEDIA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(r),
            )
            return None
        txn.execute(
            "UPDATE media SET media_type = ?, upload_name = ?, media_length = ?, sha256 = ?,"
            " unused_expires_ts = NULL WHERE origin = ? AND media_id = ? AND user_id = ?"
            " AND sha256 IS NULL AND unused_expires_ts > ?",
            (
                r.media_type,
                r.upload_name,
                r.media_length,
                r.sha256,
                r.origin,
                r.media_id,
                r.user_id,
                r.created_ts,
            ),
        )
        if txn.rowcount == 1:
            return None
        before = MediaStore._get_media_txn(txn, r.origin, r.media_id)
        # Nothing refers to the content if it was new: do not keep an orphan row.
        MediaStore._drop_if_orphan_txn(txn, r.sha256)
        return before or attrs.evolve(r, sha256=None, unused_expires_ts=0)

    async def add_thumbnail(self, thumb: ThumbnailRecord) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.execute(
                "DELETE FROM media_thumbnails WHERE sha256 = ? AND width = ? AND height = ?"
                " AND method = ? AND animated = ?",
                (thumb.sha256, thumb.width, thumb.height, thumb.method, thumb.animated),
            )
            txn.execute(
                f"INSERT INTO media_thumbnails ({_THUMB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(thumb),
            )

        await self.db.run_interaction("add_thumbnail", txn_fn)

    async def content_known(self, sha256: str) -> bool:
        rows = await self.db.select(
            "content_known", "SELECT 1 FROM media_content WHERE sha256 = ?", (sha256,)
        )
        return bool(rows)

    async def update_last_access(self, accesses: Iterable[tuple[str, str, int]]) -> None:
        rows = [(ts, origin, media_id, ts) for origin, media_id, ts in accesses]
        if not rows:
            return
        await self.db.run_interaction(
            "update_media_last_access",
            lambda txn: txn.executemany(
                "UPDATE media SET last_access_ts = ? WHERE origin = ? AND media_id = ?"
                " AND (last_access_ts IS NULL OR last_access_ts < ?)",
                rows,
            ),
        )

    async def set_quarantined(self, media: Iterable[tuple[str, str]], by: str | None) -> int:
        """Quarantine (``by`` an admin) or release (``by`` None) media; returns how many changed.

        Media marked safe_from_quarantine is never quarantined.
        """
        items = list(media)

        def txn_fn(txn: Txn) -> int:
            changed = 0
            for origin, media_id in items:
                if by is None:
                    txn.execute(
                        "UPDATE media SET quarantined_by = NULL WHERE origin = ? AND media_id = ?"
                        " AND quarantined_by IS NOT NULL",
                        (origin, media_id),
                    )
                else:
                    txn.execute(
                        "UPDATE media SET quarantined_by = ? WHERE origin = ? AND media_id = ?"
                        " AND quarantined_by IS NULL AND safe_from_quarantine = ?",
                        (by, origin, media_id, False),
                    )
                changed += max(txn.rowcount, 0)
            return changed

        return await self.db.run_interaction("set_media_quarantined", txn_fn)

    async def set_safe_from_quarantine(self, origin: str, media_id: str, safe: bool) -> bool:
        def txn_fn(txn: Txn) -> bool:
            txn.execute(
                "UPDATE media SET safe_from_quarantine = ? WHERE origin = ? AND media_id = ?",
                (safe, origin, media_id),
            )
            return txn.rowcount > 0

        return await self.db.run_interaction("set_safe_from_quarantine", txn_fn)

    async def delete_media(self, media: Iterable[tuple[str, str]]) -> DeletedMedia:
        items = list(media)

        def txn_fn(txn: Txn) -> DeletedMedia:
            deleted: list[tuple[str, str]] = []
            hashes: set[str] = set()
            for origin, media_id in items:
                row = txn.execute(
                    "SELECT sha256 FROM media WHERE origin = ? AND media_id = ?", (origin, media_id)
                ).fetchone()
                if row is None:
                    continue
                txn.execute(
                    "DELETE FROM media WHERE origin = ? AND media_id = ?", (origin, media_id)
                )
                deleted.append((origin, media_id))
                if row[0] is not None:
                    hashes.add(row[0])
            orphaned: list[str] = []
            thumbs: list[ThumbnailRecord] = []
            for sha256 in sorted(hashes):
                gone = MediaStore._drop_if_orphan_txn(txn, sha256)
                if gone is not None:
                    orphaned.append(sha256)
                    thumbs.extend(gone)
            return DeletedMedia(deleted, orphaned, thumbs)

        return await self.db.run_interaction("delete_media", txn_fn)

    @staticmethod
    def _drop_if_orphan_txn(txn: Txn, sha256: str) -> list[ThumbnailRecord] | None:
        """Forget content no media id refers to; returns its thumbnails, or None if in use."""
        if txn.execute("SELECT 1 FROM media WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone():
            return None
        thumbs = [
            _thumb(r)
            for r in txn.execute(
                f"SELECT {_THUMB_COLUMNS} FROM media_thumbnails WHERE sha256 = ?", (sha256,)
            ).fetchall()
        ]
        txn.execute("DELETE FROM media_thumbnails WHERE sha256 = ?", (sha256,))
        txn.execute("DELETE FROM media_content WHERE sha256 = ?", (sha256,))
        return thumbs

    async def expired_pending(self, now: int, limit: int = 1000) -> list[tuple[str, str]]:
        rows = await self.db.select(
            "expired_pending_media",
            "SELECT origin, media_id FROM media WHERE sha256 IS NULL AND unused_expires_ts <= ?"
            " LIMIT ?",
            (now, limit),
        )
        return [(r[0], r[1]) for r in rows]

    async def not_accessed_since(
        self, local_origin: str, local: bool, cutoff: int, limit: int = 1000
    ) -> list[tuple[str, str]]:
        """Uploaded media of this server (or cached remote media) unused since ``cutoff``.

        Media marked safe_from_quarantine is kept (as Synapse does).
        """
        rows = await self.db.select(
            "media_not_accessed_since",
            "SELECT origin, media_id FROM media WHERE "
            + ("origin = ?" if local else "origin <> ?")
            + " AND sha256 IS NOT NULL AND safe_from_quarantine = ?"
            " AND COALESCE(last_access_ts, created_ts) < ? LIMIT ?",
            (local_origin, False, cutoff, limit),
        )
        return [(r[0], r[1]) for r in rows]
