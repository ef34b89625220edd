"""End-to-end encryption keys of local devices and users, and the device-list stream.

Every write that changes what other users see of a user's devices (device
keys, cross-signing keys, signatures, a deleted device) adds its
``device_lists_stream`` row in the same transaction, under the stream id the
caller allocated, so the change and its announcement commit together.

A one-time key is claimed by deleting its row: a claim selects the oldest key
and deletes exactly that row, trying the next one if another transaction
deleted it first. On SQLite the single writer serialises claims; on
PostgreSQL the second DELETE of a row waits for the first and then finds it
gone. Either way no key is ever handed out twice.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from storage.database import Database, Txn

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_BATCH = 500  # ids per IN (...) list
_MAX_CLAIM_ATTEMPTS = 1000

# Kinds of device-list stream entries (see 0013_e2e_keys.sql).
KEYS = "keys"
OWN = "own"

CROSS_SIGNING_TYPES = ("master", "self_signing", "user_signing")


def encode(value: Any) -> str:
    return _json_encoder.encode(value)


@attrs.frozen
class StreamEntry:
    stream_id: int
    user_id: str
    kind: str
    room_id: str = ""


class OneTimeKeyConflict(Exception):
    """A one-time key id was uploaded before with different contents."""

    def __init__(self, key_id: str) -> None:
        super().__init__(key_id)
        self.key_id = key_id


@attrs.frozen
class CrossSigningKey:
    key_type: str
    public_key: str
    key: dict[str, Any]


@attrs.frozen
class Signature:
    target_user_id: str
    target_key_id: str
    signer_user_id: str
    signer_key_id: str
    signature: str


@attrs.frozen
class StoredKeys:
    """What /keys/query needs about some users, before signature filtering."""

    # user -> device -> (device keys, device display name)
    devices: dict[str, dict[str, tuple[dict[str, Any], str | None]]]
    # user -> key type -> key
    cross_signing: dict[str, dict[str, CrossSigningKey]]
    signatures: list[Signature]


def _chunks(items: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


def add_stream_rows(txn: Txn, stream_id: int, rows: Iterable[tuple[str, str, str]]) -> None:
    """Announce (user_id, kind, room_id) changes at ``stream_id``, in the caller's transaction.

    Called with no rows too, when ``stream_id`` was handed out but nothing
    changed: readers may have seen the position reach it, so it must not go
    back after a restart.
    """
    txn.executemany(
        "INSERT INTO device_lists_stream (stream_id, user_id, kind, room_id)"
        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [(stream_id, user_id, kind, room_id) for user_id, kind, room_id in rows],
    )
    txn.execute(
        "UPDATE device_lists_position SET stream_id = ? WHERE stream_id < ?",
        (stream_id, stream_id),
    )


class DeviceListsStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- start-up (blocking) ---------------------------------------------------------------
    def position_blocking(self) -> int:
        def txn_fn(txn: Txn) -> int:
            recorded = txn.execute("SELECT MAX(stream_id) FROM device_lists_position").fetchone()
            rows = txn.execute("SELECT MAX(stream_id) FROM device_lists_stream").fetchone()
            return max(recorded[0] or 0, rows[0] or 0)

        return self.db.run_blocking(txn_fn)

    def recent_blocking(self, limit: int) -> list[StreamEntry]:
        """The latest ``limit`` entries, oldest first."""
        rows = self.db.run_blocking(
            lambda txn: txn.execute(
                "SELECT stream_id, user_id, kind, room_id FROM device_lists_stream"
                " ORDER BY stream_id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [StreamEntry(*r) for r in reversed(rows)]

    # --- reading and writing ---------------------------------------------------------------
    async def entries_between(self, after: int, upto: int) -> list[StreamEntry]:
        """Entries in (after, upto], oldest first (for tokens older than the memory window)."""
        rows = await self.db.select(
            "device_list_changes",
            "SELECT stream_id, user_id, kind, room_id FROM device_lists_stream"
            " WHERE stream_id > ? AND stream_id <= ? ORDER BY stream_id",
            (after, upto),
        )
        return [StreamEntry(*r) for r in rows]


class E2eKeysStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- /keys/upload ------------------------------------------------------------------------
    async def upload(
        self,
        user_id: str,
        device_id: str,
        device_keys: dict[str, Any] | None,
        one_time_keys: list[tuple[str, str, dict[str, Any] | str]],
        fallback_keys: dict[str, tuple[str, dict[str, Any] | str]],
        now_ms: int,
        stream_id: int | None,
    ) -> tuple[dict[str, int], bool]:
        """Store the keys; returns (one-time key counts, whether the device keys changed).

        ``one_time_keys`` are (algorithm, key id, key); ``fallback_keys`` map an
        algorithm to (key id, key). Raises OneTimeKeyConflict (and stores
        nothing) when a one-time key id exists with different contents.
        ``stream_id`` is used for the device-list row when the device keys changed.
        """

        def txn_fn(txn: Txn) -> tuple[dict[str, int], bool]:
            changed = False
            if device_keys is not None:
                new = encode(device_keys)
                row = txn.execute(
                    "SELECT key_json FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                ).fetchone()
                if row is None or json.loads(row[0]) != device_keys:
                    txn.execute(
                        "INSERT INTO e2e_device_keys (user_id, device_id, key_json)"
                        " VALUES (?, ?, ?) ON CONFLICT (user_id, device_id)"
                        " DO UPDATE SET key_json = excluded.key_json",
                        (user_id, device_id, new),
                    )
                    changed = True
            if stream_id is not None:
                # The position moves even without a change: the id was handed out.
                add_stream_rows(txn, stream_id, [(user_id, KEYS, "")] if changed else [])
            if one_time_keys:
                existing: dict[tuple[str, str], Any] = {}
                for algorithm, key_id, key_json in txn.execute(
                    "SELECT algorithm, key_id, key_json FROM e2e_one_time_keys"
                    " WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                ).fetchall():
                    existing[(algorithm, key_id)] = key_json
                rows = []
                for algorithm, key_id, key in one_time_keys:
                    old = existing.get((algorithm, key_id))
                    if old is not None:
                        if json.loads(old) != key:
                            raise OneTimeKeyConflict(f"{algorithm}:{key_id}")
                        continue
                    rows.append((user_id, device_id, algorithm, key_id, now_ms, encode(key)))
                txn.executemany(
                    "INSERT INTO e2e_one_time_keys"
                    " (user_id, device_id, algorithm, key_id, uploaded_ts, key_json)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    rows,
                )
            for algorithm, (key_id, key) in fallback_keys.items():
                new = encode(key)
                row = txn.execute(
                    "SELECT key_id, key_json FROM e2e_fallback_keys"
                    " WHERE user_id = ? AND device_id = ? AND algorithm = ?",
                    (user_id, device_id, algorithm),
                ).fetchone()
                if row is not None and row[0] == key_id and json.loads(row[1]) == key:
                    continue  # the same key again: it stays used if it was
                txn.execute(
                    "INSERT INTO e2e_fallback_keys"
                    " (user_id, device_id, algorithm, key_id, key_json, used)"
                    " VALUES (?, ?, ?, ?, ?, FALSE)"
                    " ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET"
                    " key_id = excluded.key_id, key_json = excluded.key_json, used = FALSE",
                    (user_id, device_id, algorithm, key_id, new),
                )
            return _one_time_key_counts(txn, user_id, device_id), changed

        return await self.db.run_interaction("upload_e2e_keys", txn_fn)

    async def key_counts(self, user_id: str, device_id: str) -> tuple[dict[str, int], list[str]]:
        """(one-time key counts per algorithm, algorithms with an unused fallback key)."""

        def txn_fn(txn: Txn) -> tuple[dict[str, int], list[str]]:
            unused = txn.execute(
                "SELECT algorithm FROM e2e_fallback_keys"
                " WHERE user_id = ? AND device_id = ? AND used = FALSE ORDER BY algorithm",
                (user_id, device_id),
            ).fetchall()
            return _one_time_key_counts(txn, user_id, device_id), [r[0] for r in unused]

        return await self.db.run_read("e2e_key_counts", txn_fn)

    # --- /keys/claim -------------------------------------------------------------------------
    async def claim(
        self, wanted: list[tuple[str, str, str]]
    ) -> dict[tuple[str, str], tuple[str, Any]]:
        """Claim one key per (user, device, algorithm): (user, device) -> ("alg:id", key).

        A one-time key (oldest first) when there is one, else the fallback key,
        which is marked used. Devices with neither are left out.
        """

        def txn_fn(txn: Txn) -> dict[tuple[str, str], tuple[str, Any]]:
            claimed: dict[tuple[str, str], tuple[str, Any]] = {}
            # A fixed order, so concurrent claims on PostgreSQL lock rows in the
            # same order and never deadlock.
            for user_id, device_id, algorithm in sorted(set(wanted)):
                found = _claim_one_time_key(txn, user_id, device_id, algorithm)
                if found is None:
                    found = _claim_fallback_key(txn, user_id, device_id, algorithm)
                if found is not None:
                    claimed[(user_id, device_id)] = found
            return claimed

        return await self.db.run_interaction("claim_e2e_keys", txn_fn)

    # --- /keys/query -------------------------------------------------------------------------
    async def get_keys(
        self,
        query: Mapping[str, Iterable[str]],
        include_user_signing: Iterable[str] = (),
    ) -> StoredKeys:
        """Device keys (all a user's devices when their list is empty), cross-signing keys
        (user-signing keys only for ``include_user_signing``) and stored signatures."""
        users = list(query)
        with_user_signing = set(include_user_signing)

        def txn_fn(txn: Txn) -> StoredKeys:
            devices: dict[str, dict[str, tuple[dict[str, Any], str | None]]] = {}
            for chunk in _chunks(users):
                marks = ", ".join("?" * len(chunk))
                for user_id, device_id, key_json, name in txn.execute(
                    "SELECT k.user_id, k.device_id, k.key_json, d.display_name"
                    " FROM e2e_device_keys k LEFT JOIN devices d"
                    " ON d.user_id = k.user_id AND d.device_id = k.device_id"
                    f" WHERE k.user_id IN ({marks})",
                    chunk,
                ).fetchall():
                    wanted = query[user_id]
                    if wanted and device_id not in wanted:
                        continue
                    devices.setdefault(user_id, {})[device_id] = (json.loads(key_json), name)
            cross: dict[str, dict[str, CrossSigningKey]] = {}
            signatures: list[Signature] = []
            for chunk in _chunks(users):
                marks = ", ".join("?" * len(chunk))
                for user_id, key_type, public_key, key_json in txn.execute(
                    "SELECT user_id, key_type, public_key, key_json FROM e2e_cross_signing_keys"
                    f" WHERE user_id IN ({marks})",
                    chunk,
                ).fetchall():
                    if key_type == "user_signing" and user_id not in with_user_signing:
                        continue
                    cross.setdefault(user_id, {})[key_type] = CrossSigningKey(
                        key_type, public_key, json.loads(key_json)
                    )
                signatures.extend(
                    Signature(*r)
                    for r in txn.execute(
                        "SELECT target_user_id, target_key_id, signer_user_id, signer_key_id,"
                        " signature FROM e2e_cross_signing_signatures"
                        f" WHERE target_user_id IN ({marks})",
                        chunk,
                    ).fetchall()
                )
            return StoredKeys(devices, cross, signatures)

        return await self.db.run_read("get_e2e_keys", txn_fn)

    async def get_device_keys(self, user_id: str, device_id: str) -> dict[str, Any] | None:
        rows = await self.db.select(
            "get_device_keys",
            "SELECT key_json FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        )
        return json.loads(rows[0][0]) if rows else None

    async def device_ids(self, user_id: str) -> set[str]:
        """The ids of every device of the user (with keys or not)."""
        rows = await self.db.select(
            "device_ids", "SELECT device_id FROM devices WHERE user_id = ?", (user_id,)
        )
        return {r[0] for r in rows}

    # --- cross-signing -----------------------------------------------------------------------
    async def get_cross_signing_keys(self, user_id: str) -> dict[str, CrossSigningKey]:
        rows = await self.db.select(
            "get_cross_signing_keys",
            "SELECT key_type, public_key, key_json FROM e2e_cross_signing_keys WHERE user_id = ?",
            (user_id,),
        )
        return {r[0]: CrossSigningKey(r[0], r[1], json.loads(r[2])) for r in rows}

    async def set_cross_signing_keys(
        self,
        user_id: str,
        keys: list[CrossSigningKey],
        stream_id: int,
        stream_rows: list[tuple[str, str, str]],
    ) -> None:
        """Store (replace) cross-signing keys; signatures made by the replaced keys go."""

        def txn_fn(txn: Txn) -> None:
            for key in keys:
                old = txn.execute(
                    "SELECT public_key FROM e2e_cross_signing_keys"
                    " WHERE user_id = ? AND key_type = ?",
                    (user_id, key.key_type),
                ).fetchone()
                if old is not None and old[0] != key.public_key:
                    txn.execute(
                        "DELETE FROM e2e_cross_signing_signatures"
                        " WHERE signer_user_id = ? AND signer_key_id = ?",
                        (user_id, f"ed25519:{old[0]}"),
                    )
                    if key.key_type == "master":
                        # Signatures of the old master key by the user's devices.
                        txn.execute(
                            "DELETE FROM e2e_cross_signing_signatures"
                            " WHERE target_user_id = ? AND target_key_id = ?",
                            (user_id, old[0]),
                        )
                txn.execute(
                    "INSERT INTO e2e_cross_signing_keys (user_id, key_type, public_key, key_json)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, key_type) DO UPDATE SET"
                    " public_key = excluded.public_key, key_json = excluded.key_json",
                    (user_id, key.key_type, key.public_key, encode(key.key)),
                )
            add_stream_rows(txn, stream_id, stream_rows)

        await self.db.run_interaction("set_cross_signing_keys", txn_fn)

    async def add_signatures(
        self, signatures: list[Signature], stream_id: int, stream_rows: list[tuple[str, str, str]]
    ) -> None:
        def txn_fn(txn: Txn) -> None:
            txn.executemany(
                "INSERT INTO e2e_cross_signing_signatures (target_user_id, target_key_id,"
                " signer_user_id, signer_key_id, signature) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (target_user_id, target_key_id, signer_user_id, signer_key_id)"
                " DO UPDATE SET signature = excluded.signature",
                [
                    (
                        s.target_user_id,
                        s.target_key_id,
                        s.signer_user_id,
                        s.signer_key_id,
                        s.signature,
                    )
                    for s in signatures
                ],
            )
            add_stream_rows(txn, stream_id, stream_rows)

        await self.db.run_interaction("add_cross_signing_signatures", txn_fn)

    # --- deletion ----------------------------------------------------------------------------
    async def delete_devices(self, user_id: str, device_ids: list[str], stream_id: int) -> bool:
        """Delete the devices' keys and the signatures of them; True if one had device keys."""

        def txn_fn(txn: Txn) -> bool:
            had_keys = False
            for device_id in device_ids:
                txn.execute(
                    "DELETE FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )
                had_keys = had_keys or txn.rowcount > 0
                for table in ("e2e_one_time_keys", "e2e_fallback_keys"):
                    txn.execute(
                        f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?",
                        (user_id, device_id),
                    )
                txn.execute(
                    "DELETE FROM e2e_cross_signing_signatures"
                    " WHERE target_user_id = ? AND target_key_id = ?",
                    (user_id, device_id),
                )
                txn.execute(
                    "DELETE FROM e2e_cross_signing_signatures"
                    " WHERE signer_user_id = ? AND signer_key_id = ?",
                    (user_id, f"ed25519:{device_id}"),
                )
            add_stream_rows(txn, stream_id, [(user_id, KEYS, "")] if had_keys else [])
            return had_keys

        return await self.db.run_interaction("delete_device_e2e_keys", txn_fn)

    async def delete_cross_signing(self, user_id: str, stream_id: int) -> bool:
        """Delete the user's cross-signing keys and signatures (deactivation)."""

        def txn_fn(txn: Txn) -> bool:
            txn.execute("DELETE FROM e2e_cross_signing_keys WHERE user_id = ?", (user_id,))
            had_keys = txn.rowcount > 0
            txn.execute(
                "DELETE FROM e2e_cross_signing_signatures"
                " WHERE signer_user_id = ? OR target_user_id = ?",
                (user_id, user_id),
            )
            add_stream_rows(txn, stream_id, [(user_id, KEYS, "")] if had_keys else [])
            return had_keys

        return await self.db.run_interaction("delete_cross_signing_keys", txn_fn)


def _one_time_key_counts(txn: Txn, user_id: str, device_id: str) -> dict[str, int]:
    rows = txn.execute(
        "SELECT algorithm, COUNT(*) FROM e2e_one_time_keys"
        " WHERE user_id = ? AND device_id = ? GROUP BY algorithm",
        (user_id, device_id),
    ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def _claim_one_time_key(
    txn: Txn, user_id: str, device_id: str, algorithm: str
) -> tuple[str, Any] | None:
    for _ in range(_MAX_CLAIM_ATTEMPTS):
        row = txn.execute(
            "SELECT key_id, key_json FROM e2e_one_time_keys"
            " WHERE user_id = ? AND device_id = ? AND algorithm = ?"
            " ORDER BY uploaded_ts, key_id LIMIT 1",
            (user_id, device_id, algorithm),
        ).fetchone()
        if row is None:
            return None
        txn.execute(
            "DELETE FROM e2e_one_time_keys"
            " WHERE user_id = ? AND device_id = ? AND algorithm = ? AND key_id = ?",
            (user_id, device_id, algorithm, row[0]),
        )
        if txn.rowcount == 1:
            return f"{algorithm}:{row[0]}", json.loads(row[1])
        # Another transaction claimed it between our SELECT and DELETE: next key.
    raise RuntimeError("could not claim a one-time key: too much contention")


def _claim_fallback_key(
    txn: Txn, user_id: str, device_id: str, algorithm: str
) -> tuple[str, Any] | None:
    row = txn.execute(
        "SELECT key_id, key_json, used FROM e2e_fallback_keys"
        " WHERE user_id = ? AND device_id = ? AND algorithm = ?",
        (user_id, device_id, algorithm),
    ).fetchone()
    if row is None:
        return None
    if not row[2]:
        txn.execute(
            "UPDATE e2e_fallback_keys SET used = TRUE"
            " WHERE user_id = ? AND device_id = ? AND algorithm = ?",
            (user_id, device_id, algorithm),
        )
    return f"{algorithm}:{row[0]}", json.loads(row[1])


__all__ = [
    "CROSS_SIGNING_TYPES",
    "KEYS",
    "OWN",
    "CrossSigningKey",
    "DeviceListsStore",
    "E2eKeysStore",
    "OneTimeKeyConflict",
    "Signature",
    "StoredKeys",
    "StreamEntry",
]
