"""Other servers' signing keys: fetched, checked, cached, and used to verify.

Spec: server-server API "Retrieving server keys" and "Querying Keys Through
Another Server".

- Directly: ``GET /_matrix/key/v2/server`` on the server. The document must
  name that server and carry a valid self-signature by *every* key in its
  ``verify_keys``.
- Through notaries (``trusted_key_servers``): ``POST /_matrix/key/v2/query``.
  Each returned document must be self-signed as above *and* signed by the
  notary, checked with the ``verify_keys`` configured for it or, when none
  are configured, with the notary's own keys fetched directly.

Keys are cached in memory and in ``remote_server_keys`` and never deleted, so
old events stay verifiable. A key from ``verify_keys`` is valid until the
lesser of the document's ``valid_until_ts`` and 7 days after we got it; an
``old_verify_keys`` entry until its ``expired_ts``. A key that is unknown,
or not valid until the time asked for, is fetched again (at most once a
minute per server).
"""

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from nacl.signing import VerifyKey

from crypto.b64 import Base64Error, encode_base64
from crypto.canonical_json import encode_canonical_json
from crypto.keys import ALGORITHM, decode_verify_key
from crypto.signing import SignatureError, verify_signature
from crypto.xmatrix import check_signed_json
from homeserver.core.events import Pdu
from homeserver.core.room_versions import RoomVersion
from homeserver.core.signatures import (
    key_validity_ts,
    required_signers,
    verify_pdu_signatures,
    verify_received_pdu,
)
from homeserver.services.federation_client import FederationError
from homeserver.services.inflight import InFlight
from storage.server_keys import ServerKeyStore, StoredServerKey

logger = logging.getLogger(__name__)

MAX_KEY_VALIDITY_MS = 7 * 24 * 3600 * 1000
MIN_REFETCH_INTERVAL_MS = 60 * 1000
_PREFIX = ALGORITHM + ":"
_SERVER_CACHE_SIZE = 20_000


class KeyFetchError(Exception):
    """A key document could not be fetched or is not acceptable."""


@attrs.frozen
class KeyEntry:
    verify_key: VerifyKey
    valid_until_ts: int  # effective: see the module docstring; expired_ts for old keys
    expired_ts: int | None
    key_json: str | None  # the signed document it came in (None for our own keys)
    fetched_from: str = ""

    def valid_at(self, ts: int) -> bool:
        return self.valid_until_ts >= ts


def parse_key_document(
    doc: Any, server_name: str, now_ms: int, fetched_from: str
) -> dict[str, KeyEntry]:
    """Check a ``/_matrix/key/v2/server`` document of ``server_name`` and return
    its keys; raise KeyFetchError if it is malformed or not validly self-signed."""
    if not isinstance(doc, dict):
        raise KeyFetchError("key document is not a JSON object")
    if doc.get("server_name") != server_name:
        raise KeyFetchError(f"key document names {str(doc.get('server_name'))[:255]!r}")
    valid_until = doc.get("valid_until_ts")
    if type(valid_until) is not int:
        raise KeyFetchError("valid_until_ts is not an integer")
    verify_keys = doc.get("verify_keys")
    old_keys = doc.get("old_verify_keys", {})
    if not isinstance(verify_keys, dict) or not isinstance(old_keys, dict):
        raise KeyFetchError("verify_keys / old_verify_keys are not objects")

    # Only the origin's signatures are kept: a notary's are checked by the caller.
    own_sigs = (
        doc.get("signatures", {}).get(server_name)
        if isinstance(doc.get("signatures"), dict)
        else None
    )
    stored = {**doc, "signatures": {server_name: own_sigs if isinstance(own_sigs, dict) else {}}}
    try:
        key_json = encode_canonical_json(stored).decode("utf-8")
    except ValueError as e:
        raise KeyFetchError(f"key document is not canonical JSON: {e}") from e

    entries: dict[str, KeyEntry] = {}
    for key_id, value in old_keys.items():
        if not (isinstance(key_id, str) and key_id.startswith(_PREFIX) and isinstance(value, dict)):
            continue
        expired = value.get("expired_ts")
        if type(expired) is not int or not isinstance(value.get("key"), str):
            raise KeyFetchError(f"old key {key_id} is malformed")
        try:
            entries[key_id] = KeyEntry(
                decode_verify_key(value["key"]), expired, expired, key_json, fetched_from
            )
        except (Base64Error, ValueError) as e:
            raise KeyFetchError(f"old key {key_id} is not an ed25519 key") from e

    effective = min(valid_until, now_ms + MAX_KEY_VALIDITY_MS)
    current = 0
    for key_id, value in verify_keys.items():
        if not (isinstance(key_id, str) and key_id.startswith(_PREFIX)):
            continue
        if not isinstance(value, dict) or not isinstance(value.get("key"), str):
            raise KeyFetchError(f"key {key_id} is malformed")
        try:
            verify_key = decode_verify_key(value["key"])
        except (Base64Error, ValueError) as e:
            raise KeyFetchError(f"key {key_id} is not an ed25519 key") from e
        try:
            verify_signature(doc, server_name, key_id, verify_key)
        except SignatureError as e:
            raise KeyFetchError(f"key document is not self-signed by {key_id}: {e}") from e
        entries[key_id] = KeyEntry(verify_key, effective, None, key_json, fetched_from)
        current += 1
    if current == 0:
        raise KeyFetchError("key document lists no ed25519 verify key")
    return entries


def _merge_rule(new: KeyEntry, old: KeyEntry | None) -> bool:
    """Whether ``new`` replaces ``old`` (the same rule as the store's)."""
    return (
        old is None
        or new.valid_until_ts >= old.valid_until_ts
        or (new.expired_ts is not None and old.expired_ts is None)
    )


class Keyring:
    def __init__(
        self,
        server_name: str,
        now_ms: Callable[[], int],
        own_keys: Any,
        client: Any,
        store: ServerKeyStore | None,
        trusted_key_servers: Iterable[dict[str, Any]] = (),
        min_refetch_interval_ms: int = MIN_REFETCH_INTERVAL_MS,
    ) -> None:
        """``own_keys`` is the ``ServerKeys`` of this server, ``client`` the
        ``FederationClient``; ``store`` None keeps keys in memory only."""
        self.server_name = server_name
        self._now_ms = now_ms
        self._own_keys = own_keys
        self._client = client
        self._store = store
        self._notaries: list[tuple[str, dict[str, VerifyKey]]] = []
        for entry in trusted_key_servers or ():
            name = entry.get("server_name")
            if not isinstance(name, str) or name == server_name:
                continue
            keys = {}
            for key_id, key in (entry.get("verify_keys") or {}).items():
                try:
                    keys[key_id] = decode_verify_key(key)
                except (Base64Error, ValueError, TypeError):
                    logger.warning("trusted_key_servers: bad verify key %s of %s", key_id, name)
            self._notaries.append((name, keys))
        self._min_refetch_ms = min_refetch_interval_ms
        self._keys: OrderedDict[str, dict[str, KeyEntry]] = OrderedDict()
        self._last_fetch: dict[str, int] = {}
        self._loading: InFlight[dict[str, KeyEntry]] = InFlight()
        self._fetching: InFlight[None] = InFlight()

    # --- looking keys up -----------------------------------------------------------
    async def get_verify_key(
        self, server_name: str, key_id: str, minimum_valid_until_ts: int = 0
    ) -> VerifyKey | None:
        """The key, if it is valid until at least ``minimum_valid_until_ts``
        (0: any key ever seen, old ones included), fetching it if needed."""
        keys = await self.get_verify_keys(server_name, [key_id], minimum_valid_until_ts)
        return keys.get(key_id)

    async def get_verify_keys(
        self, server_name: str, key_ids: Iterable[str], minimum_valid_until_ts: int = 0
    ) -> dict[str, VerifyKey]:
        key_ids = [k for k in key_ids if isinstance(k, str) and k.startswith(_PREFIX)]
        if not key_ids:
            return {}
        if server_name == self.server_name:
            own = self._own_entries()
            return {
                k: own[k].verify_key
                for k in key_ids
                if k in own and own[k].valid_at(minimum_valid_until_ts)
            }
        known = await self._known(server_name)
        missing = [
            k for k in key_ids if k not in known or not known[k].valid_at(minimum_valid_until_ts)
        ]
        if missing:
            await self._refresh(server_name, missing, minimum_valid_until_ts)
            known = self._keys.get(server_name, {})
        return {
            k: known[k].verify_key
            for k in key_ids
            if k in known and known[k].valid_at(minimum_valid_until_ts)
        }

    async def get_key_entries(self, server_name: str) -> dict[str, KeyEntry]:
        """Everything known (cached or stored) about ``server_name``'s keys, no fetching."""
        if server_name == self.server_name:
            return self._own_entries()
        return dict(await self._known(server_name))

    def _own_entries(self) -> dict[str, KeyEntry]:
        doc = self._own_keys.key_response()
        entries = {
            key_id: KeyEntry(decode_verify_key(v["key"]), 2**62, None, None, self.server_name)
            for key_id, v in doc["verify_keys"].items()
        }
        for key_id, v in doc.get("old_verify_keys", {}).items():
            entries.setdefault(
                key_id,
                KeyEntry(
                    decode_verify_key(v["key"]),
                    v["expired_ts"],
                    v["expired_ts"],
                    None,
                    self.server_name,
                ),
            )
        return entries

    async def _known(self, server_name: str) -> dict[str, KeyEntry]:
        known = self._keys.get(server_name)
        if known is not None:
            self._keys.move_to_end(server_name)
            return known
        if self._store is None:
            return self._remember(server_name, {})
        return await self._loading.run(server_name, lambda: self._load(server_name))

    async def _load(self, server_name: str) -> dict[str, KeyEntry]:
        entries = {}
        for row in await self._store.get_server_keys(server_name):
            try:
                entries[row.key_id] = KeyEntry(
                    decode_verify_key(row.verify_key),
                    row.valid_until_ts,
                    row.expired_ts,
                    row.key_json,
                    row.fetched_from,
                )
            except (Base64Error, ValueError):
                logger.warning("stored key %s of %s is unreadable", row.key_id, server_name)
        # Keys fetched while we were reading win.
        entries.update(self._keys.get(server_name, {}))
        return self._remember(server_name, entries)

    def _remember(self, server_name: str, entries: dict[str, KeyEntry]) -> dict[str, KeyEntry]:
        self._keys[server_name] = entries
        self._keys.move_to_end(server_name)
        while len(self._keys) > _SERVER_CACHE_SIZE:
            self._keys.popitem(last=False)
        return entries

    async def _add(self, server_name: str, entries: dict[str, KeyEntry]) -> None:
        known = await self._known(server_name)
        changed = {k: e for k, e in entries.items() if _merge_rule(e, known.get(k))}
        known.update(changed)
        if self._store is not None and changed:
            await self._store.store_server_keys(
                [
                    StoredServerKey(
                        server_name,
                        key_id,
                        encode_base64(bytes(e.verify_key)),
                        e.valid_until_ts,
                        e.expired_ts,
                        e.fetched_from,
                        e.key_json or "{}",
                    )
                    for key_id, e in changed.items()
                ]
            )

    # --- fetching -------------------------------------------------------------------
    async def _refresh(self, server_name: str, key_ids: list[str], minimum: int) -> None:
        last = self._last_fetch.get(server_name)
        recent = last is not None and self._now_ms() - last < self._min_refetch_ms
        if recent and not self._fetching.busy(server_name):
            return
        # While a fetch runs, this joins it (and gets its outcome).
        await self._fetching.run(
            server_name, lambda: self._fetch_everywhere(server_name, key_ids, minimum)
        )

    def _satisfied(self, server_name: str, key_ids: list[str], minimum: int) -> bool:
        known = self._keys.get(server_name, {})
        return all(k in known and known[k].valid_at(minimum) for k in key_ids)

    def _mark_fetch(self, server_name: str) -> None:
        self._last_fetch.pop(server_name, None)
        self._last_fetch[server_name] = self._now_ms()
        while len(self._last_fetch) > _SERVER_CACHE_SIZE:
            self._last_fetch.pop(next(iter(self._last_fetch)))

    async def _fetch_everywhere(self, server_name: str, key_ids: list[str], minimum: int) -> None:
        self._mark_fetch(server_name)
        try:
            await self.fetch_direct(server_name)
        except KeyFetchError as e:
            logger.info("fetching keys of %s directly failed: %s", server_name, e)
        except Exception:
            logger.exception("fetching keys of %s directly failed", server_name)
        if self._satisfied(server_name, key_ids, minimum):
            return
        for notary, _ in self._notaries:
            if notary == server_name:
                continue
            try:
                await self.fetch_from_notary(notary, server_name, key_ids, minimum)
            except KeyFetchError as e:
                logger.info("fetching keys of %s through %s failed: %s", server_name, notary, e)
                continue
            except Exception:
                logger.exception("fetching keys of %s through %s failed", server_name, notary)
                continue
            if self._satisfied(server_name, key_ids, minimum):
                return

    async def fetch_direct(self, server_name: str) -> dict[str, Any]:
        """GET the server's own key document, check it, store its keys; return it."""
        try:
            doc = await self._client.get_json(
                server_name, "/_matrix/key/v2/server", ignore_backoff=True
            )
        except FederationError as e:
            raise KeyFetchError(str(e)) from e
        entries = parse_key_document(doc, server_name, self._now_ms(), server_name)
        await self._add(server_name, entries)
        return doc

    async def fetch_from_notary(
        self, notary: str, server_name: str, key_ids: list[str], minimum: int
    ) -> None:
        """POST /_matrix/key/v2/query to ``notary``; check and store what it returns."""
        # Synapse (1.163) refuses criteria without minimum_valid_until_ts.
        criteria = {k: {"minimum_valid_until_ts": minimum} for k in key_ids}
        try:
            response = await self._client.post_json(
                notary,
                "/_matrix/key/v2/query",
                {"server_keys": {server_name: criteria}},
                ignore_backoff=True,
            )
        except FederationError as e:
            raise KeyFetchError(str(e)) from e
        docs = response.get("server_keys") if isinstance(response, dict) else None
        if not isinstance(docs, list):
            raise KeyFetchError(f"{notary}: server_keys is not a list")
        notary_keys = await self._notary_keys(notary)
        now = self._now_ms()
        accepted = 0
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("server_name") != server_name:
                continue
            try:
                check_signed_json(doc, notary, lambda s, k: notary_keys.get(k))
                entries = parse_key_document(doc, server_name, now, notary)
            except (SignatureError, KeyFetchError) as e:
                logger.warning("%s returned a bad key document for %s: %s", notary, server_name, e)
                continue
            await self._add(server_name, entries)
            accepted += 1
        if not accepted and docs:
            raise KeyFetchError(f"{notary}: no acceptable key document for {server_name}")

    async def _notary_keys(self, notary: str) -> dict[str, VerifyKey]:
        configured = next((keys for name, keys in self._notaries if name == notary), {})
        if configured:
            return configured
        # No keys configured for the notary: trust what it serves itself (current keys only).
        now = self._now_ms()
        known = await self._known(notary)
        if not any(e.expired_ts is None and e.valid_at(now) for e in known.values()):
            try:
                await self.fetch_direct(notary)
            except KeyFetchError as e:
                raise KeyFetchError(f"cannot get the keys of notary {notary}: {e}") from e
            known = self._keys.get(notary, {})
        return {
            k: e.verify_key for k, e in known.items() if e.expired_ts is None and e.valid_at(now)
        }

    # --- serving as a notary --------------------------------------------------------------
    async def key_documents_for_notary(
        self, server_name: str, criteria: dict[str, int] | None, minimum_valid_until_ts: int
    ) -> list[dict[str, Any]]:
        """The signed key documents of ``server_name`` a notary answers with
        (without our signature), fetched directly when what we have is not
        valid long enough; cached documents are served if the server is down.

        ``criteria`` maps key ids to their minimum_valid_until_ts (empty or
        None: all keys, valid until ``minimum_valid_until_ts``)."""
        if server_name == self.server_name:
            return [self._own_keys.key_response()]
        known = await self._known(server_name)
        wanted = criteria or {}
        if wanted:
            fresh = all(k in known and known[k].valid_at(m) for k, m in wanted.items())
        else:
            fresh = any(
                e.expired_ts is None and e.valid_at(minimum_valid_until_ts) for e in known.values()
            )
        last = self._last_fetch.get(server_name)
        recent = last is not None and self._now_ms() - last < self._min_refetch_ms
        if not fresh and (not recent or self._fetching.busy(server_name)):

            async def fetch() -> None:
                self._mark_fetch(server_name)
                try:
                    await self.fetch_direct(server_name)
                except KeyFetchError as e:
                    logger.info("notary: fetching keys of %s failed: %s", server_name, e)
                except Exception:
                    logger.exception("notary: fetching keys of %s failed", server_name)

            await self._fetching.run(server_name, fetch)
            known = self._keys.get(server_name, {})
        entries = [known[k] for k in wanted if k in known] if wanted else list(known.values())
        docs: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if entry.key_json and entry.key_json not in docs:
                try:
                    doc = json.loads(entry.key_json)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("server_name") == server_name:
                    docs[entry.key_json] = doc
        if not wanted and docs:
            # Without criteria the newest document is the answer.
            newest = max(docs.values(), key=lambda d: d.get("valid_until_ts", 0))
            return [newest]
        return sorted(docs.values(), key=lambda d: -d.get("valid_until_ts", 0))

    # --- verifying ----------------------------------------------------------------------
    async def verify_json_signed_by(
        self, obj: dict[str, Any], server_name: str, minimum_valid_until_ts: int = 0
    ) -> None:
        """Raise SignatureError unless ``obj`` is validly signed by ``server_name``
        with a key valid until ``minimum_valid_until_ts`` (fetched as needed)."""
        sigs = obj.get("signatures") if isinstance(obj, dict) else None
        key_ids = (
            list(sigs.get(server_name, {}))
            if isinstance(sigs, dict) and isinstance(sigs.get(server_name), dict)
            else []
        )
        keys = await self.get_verify_keys(server_name, key_ids, minimum_valid_until_ts)
        check_signed_json(obj, server_name, lambda s, k: keys.get(k) if s == server_name else None)

    async def _keys_for_pdu(
        self, data: dict[str, Any], room_version: RoomVersion, minimum: int
    ) -> Callable[[str, str], VerifyKey | None]:
        servers = required_signers(data, room_version)
        sigs = data.get("signatures")
        found: dict[tuple[str, str], VerifyKey] = {}
        for server in sorted(servers):
            ours = sigs.get(server) if isinstance(sigs, dict) else None
            key_ids = list(ours) if isinstance(ours, dict) else []
            for key_id, key in (await self.get_verify_keys(server, key_ids, minimum)).items():
                found[(server, key_id)] = key
        return lambda s, k: found.get((s, k))

    async def verify_pdu(self, pdu: Pdu) -> None:
        """Raise SignatureError unless every server that must sign the PDU did,
        with a key valid at its origin_server_ts in rooms 5+ (any key before)."""
        lookup = await self._keys_for_pdu(pdu.data, pdu.room_version, key_validity_ts(pdu))
        verify_pdu_signatures(pdu, lookup)

    async def verify_received_pdu(self, data: Any, room_version: RoomVersion) -> tuple[Pdu, bool]:
        """``homeserver.core.signatures.verify_received_pdu`` (format, signatures,
        hash: receipt checks 1-3) with the keys fetched first."""
        minimum = 0
        if room_version.enforce_key_validity and isinstance(data, dict):
            ts = data.get("origin_server_ts")
            minimum = ts if type(ts) is int else 0
        lookup: Callable[[str, str], VerifyKey | None] = lambda s, k: None  # noqa: E731
        if isinstance(data, dict):
            try:
                lookup = await self._keys_for_pdu(data, room_version, minimum)
            except SignatureError:
                pass  # the core check reports the problem precisely
        return verify_received_pdu(data, room_version, lookup)
