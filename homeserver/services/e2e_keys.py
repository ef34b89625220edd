"""End-to-end encryption keys: device keys, one-time and fallback keys, cross-signing.

- ``/keys/upload`` stores a device's identity keys (they must name the
  requesting user and device), one-time keys and fallback keys;
- ``/keys/query`` serves them (and cross-signing keys) for local users, with
  the signatures the requester may see (spec "Key and signature security":
  signatures by the key's owner, and the requester's own);
- ``/keys/claim`` hands out each one-time key once, the fallback key when
  none is left (storage makes the claim atomic);
- ``/keys/device_signing/upload`` stores cross-signing keys; replacing
  existing ones needs user-interactive auth;
- ``/keys/signatures/upload`` adds signatures of the user's own devices (by
  their self-signing key), of their master key (by their devices) and of
  other users' master keys (by their user-signing key), each verified.

Every change other users must hear about goes through the device-list stream
(``homeserver/services/device_lists.py``) in the same transaction.

Users on other servers are asked over federation
(``homeserver/services/remote_keys.py``); a server that fails is named in
``failures``. ``query_local_devices``, ``user_devices`` and
``claim_local_keys`` are what our federation endpoints answer with
(``federation/user_keys.py``).

Each device's one-time key counts and unused fallback key algorithms (in
every /sync) are cached in memory and dropped on every change.
"""

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from crypto.keys import decode_verify_key
from crypto.signing import SignatureError, verify_signature
from homeserver.errors import MatrixError
from homeserver.services.caches import GenerationLru
from homeserver.services.remote_keys import RemoteKeys
from storage.e2e_keys import (
    KEYS,
    OWN,
    CrossSigningKey,
    E2eKeysStore,
    OneTimeKeyConflict,
    Signature,
    StoredKeys,
)

logger = logging.getLogger(__name__)

# The algorithm some clients expect a count for, even when zero (Synapse reports it).
SIGNED_CURVE25519 = "signed_curve25519"
CACHED_DEVICES = 50_000
KEY_TYPES = {
    "master_key": "master",
    "self_signing_key": "self_signing",
    "user_signing_key": "user_signing",
}

Counts = tuple[dict[str, int], list[str]]


def _failure(errcode: str, error: str) -> dict[str, str]:
    return {"errcode": errcode, "error": error}


def _split_key_id(full: str) -> tuple[str, str]:
    algorithm, sep, key_id = full.partition(":")
    if not sep or not algorithm or not key_id:
        raise MatrixError("M_INVALID_PARAM", f"Key id {full!r} is not <algorithm>:<key id>")
    return algorithm, key_id


def _unsigned_body(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


def _verify(obj: dict[str, Any], signer: str, key_id: str, public_key: str) -> bool:
    try:
        verify_signature(obj, signer, key_id, decode_verify_key(public_key))
    except (SignatureError, ValueError):
        return False
    return True


class E2eKeysService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.server_name: str = hs.server_name
        self.store = E2eKeysStore(hs.database)
        self._counts: GenerationLru[tuple[str, str], Counts] = GenerationLru(CACHED_DEVICES)
        # Users of other servers: asked over federation, device lists cached.
        self.remote = RemoteKeys(hs)
        accounts = getattr(hs, "accounts", None)
        if accounts is not None:
            accounts.device_deletion_hooks.append(self.on_devices_deleted)
            accounts.deactivation_hooks.append(self.on_user_deactivated)

    @property
    def position(self) -> int:
        """The device-list stream's position (``hs.device_lists`` owns the stream)."""
        return self.hs.device_lists.position

    def is_mine(self, user_id: str) -> bool:
        return user_id.startswith("@") and user_id.partition(":")[2] == self.server_name

    # --- /keys/upload ------------------------------------------------------------------------
    async def upload_keys(
        self, user_id: str, device_id: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        if device_id is None:
            raise MatrixError(
                "M_MISSING_PARAM", "To upload keys, the access token must belong to a device"
            )
        device_keys = body.get("device_keys")
        if device_keys is not None:
            if device_keys.get("user_id") != user_id:
                raise MatrixError("M_INVALID_PARAM", "user_id in device_keys is not yours")
            if device_keys.get("device_id") != device_id:
                raise MatrixError(
                    "M_INVALID_PARAM", "device_id in device_keys is not this request's device"
                )
            device_keys = dict(device_keys)
            device_keys.pop("unsigned", None)
        one_time: list[tuple[str, str, Any]] = []
        for full_id, key in (body.get("one_time_keys") or {}).items():
            algorithm, key_id = _split_key_id(full_id)
            one_time.append((algorithm, key_id, key))
        fallback: dict[str, tuple[str, Any]] = {}
        fallback_body = body.get("fallback_keys")
        if fallback_body is None:
            fallback_body = body.get("org.matrix.msc2732.fallback_keys")
        for full_id, key in sorted((fallback_body or {}).items()):
            algorithm, key_id = _split_key_id(full_id)
            if algorithm in fallback:
                raise MatrixError(
                    "M_INVALID_PARAM", f"Only one fallback key per algorithm ({algorithm})"
                )
            fallback[algorithm] = (key_id, key)
        now = self.hs.clock.time_msec()

        async def write(stream_id: int | None) -> tuple[dict[str, int], bool]:
            try:
                return await self.store.upload(
                    user_id, device_id, device_keys, one_time, fallback, now, stream_id
                )
            except OneTimeKeyConflict as e:
                raise MatrixError(
                    "M_INVALID_PARAM", f"One-time key {e.key_id} already exists with other contents"
                ) from None

        try:
            if device_keys is not None:
                counts = await self.hs.device_lists.write(user_id, KEYS, write)
            else:
                counts, _ = await write(None)
        finally:
            self._counts.invalidate((user_id, device_id))
        counts.setdefault(SIGNED_CURVE25519, 0)
        return {"one_time_key_counts": counts}

    async def key_counts(self, user_id: str, device_id: str) -> Counts:
        """(one-time key counts, unused fallback key algorithms) of a device, cached."""
        key = (user_id, device_id)
        cached = self._counts.get(key)
        if cached is not None:
            return cached
        generation = self._counts.generation(key)
        value = await self.store.key_counts(user_id, device_id)
        self._counts.put(key, generation, value)
        return value

    async def sync_fields(self, user_id: str, device_id: str) -> dict[str, Any]:
        """The /sync response's ``device_one_time_keys_count`` and
        ``device_unused_fallback_key_types`` for the syncing device."""
        counts, unused = await self.key_counts(user_id, device_id)
        return {
            "device_one_time_keys_count": {SIGNED_CURVE25519: 0, **counts},
            "device_unused_fallback_key_types": list(unused),
        }

    # --- /keys/query -------------------------------------------------------------------------
    async def query_keys(
        self, requester_id: str, device_keys: Mapping[str, Iterable[str]]
    ) -> dict[str, Any]:
        local: dict[str, list[str]] = {}
        remote: dict[str, list[str]] = {}
        for user_id, devices in device_keys.items():
            (local if self.is_mine(user_id) else remote)[user_id] = list(devices)
        result = await self._query(local, requester_id)
        result["failures"] = await self.remote.query(requester_id, remote, result)
        return result

    async def _query(
        self, query: Mapping[str, list[str]], requester_id: str | None
    ) -> dict[str, Any]:
        """The /keys/query answer for local users, as ``requester_id`` may see it
        (None: another server, which sees only signatures by the keys' owners)."""
        include_user_signing = [requester_id] if requester_id in query else []
        stored = await self.store.get_keys(query, include_user_signing)
        extra = self._visible_signatures(stored, requester_id)
        device_keys: dict[str, Any] = {}
        for user_id in query:
            devices: dict[str, Any] = {}
            for device_id, (keys, display_name) in stored.devices.get(user_id, {}).items():
                devices[device_id] = self._device_json(
                    keys, display_name, extra.get((user_id, device_id))
                )
            device_keys[user_id] = devices
        result: dict[str, Any] = {"device_keys": device_keys}
        for field, key_type in (
            ("master_keys", "master"),
            ("self_signing_keys", "self_signing"),
            ("user_signing_keys", "user_signing"),
        ):
            keys = {}
            for user_id, by_type in stored.cross_signing.items():
                key = by_type.get(key_type)
                if key is not None:
                    keys[user_id] = _with_signatures(key.key, extra.get((user_id, key.public_key)))
            result[field] = keys
        return result

    @staticmethod
    def _visible_signatures(
        stored: StoredKeys, requester_id: str | None
    ) -> dict[tuple[str, str], list[Signature]]:
        visible: dict[tuple[str, str], list[Signature]] = {}
        for s in stored.signatures:
            if s.signer_user_id == s.target_user_id or s.signer_user_id == requester_id:
                visible.setdefault((s.target_user_id, s.target_key_id), []).append(s)
        return visible

    @staticmethod
    def _device_json(
        keys: dict[str, Any], display_name: str | None, extra: list[Signature] | None
    ) -> dict[str, Any]:
        device = _with_signatures(keys, extra)
        unsigned = dict(device.get("unsigned") or {})
        if display_name is not None:
            unsigned["device_display_name"] = display_name
        device["unsigned"] = unsigned
        return device

    # --- /keys/claim -------------------------------------------------------------------------
    async def claim_keys(self, one_time_keys: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
        local = {u: d for u, d in one_time_keys.items() if self.is_mine(u)}
        remote = {u: d for u, d in one_time_keys.items() if u not in local}
        claimed = await self.claim_local_keys(local)
        failures = await self.remote.claim(remote, claimed)
        return {"one_time_keys": claimed, "failures": failures}

    async def claim_local_keys(
        self, query: Mapping[str, Mapping[str, str]]
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Claim keys of local devices: {user: {device: algorithm}} ->
        {user: {device: {"<algorithm>:<key id>": key}}} (devices with no key left out).

        The answer of the federation's /user/keys/claim as well.
        """
        wanted = [
            (user_id, device_id, algorithm)
            for user_id, devices in query.items()
            if self.is_mine(user_id)
            for device_id, algorithm in devices.items()
        ]
        if not wanted:
            return {}
        try:
            claimed = await self.store.claim(wanted)
        finally:
            for user_id, device_id, _ in wanted:
                self._counts.invalidate((user_id, device_id))
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for (user_id, device_id), (key_id, key) in claimed.items():
            result.setdefault(user_id, {})[device_id] = {key_id: key}
        return result

    # --- federation ------------------------------------------------------------------------
    async def query_local_devices(
        self, query: Mapping[str, Iterable[str]] | Iterable[str]
    ) -> dict[str, Any]:
        """The federation's /user/keys/query answer for local users:
        ``{device_keys, master_keys, self_signing_keys}``.

        ``query`` maps user ids to device ids (empty: every device), or is a
        list of user ids. Users of other servers are ignored.
        """
        if isinstance(query, Mapping):
            local = {u: list(d) for u, d in query.items() if self.is_mine(u)}
        else:
            local = {u: [] for u in query if self.is_mine(u)}
        result = await self._query(local, None)
        result.pop("user_signing_keys", None)
        return result

    async def user_devices(self, user_id: str) -> dict[str, Any]:
        """The federation's /user/devices/{userId} answer for a local user."""
        keys = await self.query_local_devices({user_id: []})
        devices = []
        for device_id, device in sorted(keys["device_keys"].get(user_id, {}).items()):
            entry: dict[str, Any] = {"device_id": device_id, "keys": _unsigned_body(device)}
            entry["keys"]["signatures"] = device.get("signatures", {})
            name = device.get("unsigned", {}).get("device_display_name")
            if name is not None:
                entry["device_display_name"] = name
            devices.append(entry)
        result: dict[str, Any] = {
            "user_id": user_id,
            "stream_id": self.hs.device_lists.position,
            "devices": devices,
        }
        for field, name in (
            ("master_keys", "master_key"),
            ("self_signing_keys", "self_signing_key"),
        ):
            key = keys[field].get(user_id)
            if key is not None:
                result[name] = key
        return result

    # --- cross-signing keys ---------------------------------------------------------------------
    async def upload_cross_signing_keys(
        self, user_id: str, body: Mapping[str, Any], app_service: bool = False
    ) -> None:
        """POST /keys/device_signing/upload: UIA unless nothing is replaced."""
        existing = await self.store.get_cross_signing_keys(user_id)
        new: dict[str, CrossSigningKey] = {}
        for field, key_type in KEY_TYPES.items():
            key = body.get(field)
            if key is not None:
                new[key_type] = CrossSigningKey(
                    key_type, self._check_cross_signing_key(user_id, key, key_type), dict(key)
                )
        if not new:
            return
        master = new.get("master") or existing.get("master")
        if master is None:
            raise MatrixError("M_MISSING_PARAM", "No master signing key is available")
        for key_type in ("self_signing", "user_signing"):
            key = new.get(key_type)
            if key is not None and not _verify(
                key.key, user_id, f"ed25519:{master.public_key}", master.public_key
            ):
                raise MatrixError(
                    "M_INVALID_SIGNATURE",
                    f"The {key_type} key is not signed by the master signing key",
                )
        changed = [
            k
            for k in new.values()
            if k.key_type not in existing
            or _unsigned_body(existing[k.key_type].key) != _unsigned_body(k.key)
        ]
        if not changed:
            return  # the same keys again: idempotent, no auth needed
        device_ids = await self.store.device_ids(user_id)
        for key in changed:
            if key.public_key in device_ids:
                raise MatrixError("M_FORBIDDEN", "Key ID in use")
        session_id = None
        if "master" in existing and not app_service:
            hs = self.hs
            result = await hs.uia.authenticate(
                operation="POST /keys/device_signing/upload",
                auth=body.get("auth"),
                flows=await hs.accounts.password_flows(user_id),
                user_id=user_id,
            )
            session_id = result.session_id
        # Only the user sees their user-signing key.
        kind = KEYS if any(k.key_type != "user_signing" for k in changed) else OWN

        async def write(stream_id: int) -> tuple[None, bool]:
            await self.store.set_cross_signing_keys(
                user_id, changed, stream_id, [(user_id, kind, "")]
            )
            return None, True

        await self.hs.device_lists.write(user_id, kind, write)
        if session_id is not None:
            await self.hs.uia.finish(session_id)

    @staticmethod
    def _check_cross_signing_key(user_id: str, key: Mapping[str, Any], key_type: str) -> str:
        """The key's public key, once its shape is right for a ``key_type`` key of ``user_id``."""
        if key.get("user_id") != user_id:
            raise MatrixError("M_INVALID_PARAM", f"The {key_type} key is not for {user_id}")
        usage = key.get("usage")
        if not isinstance(usage, list) or key_type not in usage:
            raise MatrixError("M_INVALID_PARAM", f"The {key_type} key lacks usage {key_type!r}")
        keys = key.get("keys")
        if not isinstance(keys, dict) or len(keys) != 1:
            raise MatrixError("M_INVALID_PARAM", f"The {key_type} key must have exactly one key")
        ((key_id, public_key),) = keys.items()
        if key_id != f"ed25519:{public_key}" or not isinstance(public_key, str):
            raise MatrixError(
                "M_INVALID_PARAM", f"The {key_type} key id must be ed25519:<public key>"
            )
        try:
            decode_verify_key(public_key)
        except ValueError:
            raise MatrixError(
                "M_INVALID_PARAM", f"The {key_type} key is not an ed25519 public key"
            ) from None
        return public_key

    # --- /keys/signatures/upload -----------------------------------------------------------------
    async def upload_signatures(
        self, user_id: str, body: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        failures: dict[str, dict[str, Any]] = {}
        own: list[Signature] = []
        others: list[Signature] = []
        mine = await self.store.get_cross_signing_keys(user_id)
        for target_user, keys in body.items():
            for key_id, signed in keys.items():
                try:
                    if target_user == user_id:
                        own.extend(await self._own_signatures(user_id, mine, key_id, signed))
                    else:
                        others.append(
                            await self._other_signature(user_id, mine, target_user, key_id, signed)
                        )
                except MatrixError as e:
                    failures.setdefault(target_user, {})[key_id] = _failure(e.errcode, e.message)
        for signatures, kind in ((own, KEYS), (others, OWN)):
            if signatures:
                await self._store_signatures(user_id, kind, signatures)
        return {"failures": failures}

    async def _store_signatures(self, user_id: str, kind: str, signatures: list[Signature]) -> None:
        async def write(stream_id: int) -> tuple[None, bool]:
            await self.store.add_signatures(signatures, stream_id, [(user_id, kind, "")])
            return None, True

        await self.hs.device_lists.write(user_id, kind, write)

    async def _own_signatures(
        self,
        user_id: str,
        mine: dict[str, CrossSigningKey],
        key_id: str,
        signed: Mapping[str, Any],
    ) -> list[Signature]:
        """Signatures of the user's own device (by their self-signing key) or of their
        master key (by their devices)."""
        if not isinstance(signed, Mapping):
            raise MatrixError("M_INVALID_PARAM", "A signed key must be an object")
        sigs = (signed.get("signatures") or {}).get(user_id)
        if not isinstance(sigs, Mapping):
            raise MatrixError("M_INVALID_SIGNATURE", "No signature by the user")
        master = mine.get("master")
        if master is not None and key_id == master.public_key:
            if _unsigned_body(signed) != _unsigned_body(master.key):
                raise MatrixError("M_INVALID_SIGNATURE", "The signed key is not the master key")
            found = []
            for signer_key_id, signature in sigs.items():
                algorithm, _, device_id = signer_key_id.partition(":")
                if algorithm != "ed25519" or device_id == master.public_key:
                    continue
                device = await self.store.get_device_keys(user_id, device_id)
                if device is None:
                    continue
                public = (device.get("keys") or {}).get(f"ed25519:{device_id}")
                if not isinstance(public, str) or not _verify(
                    dict(signed), user_id, signer_key_id, public
                ):
                    raise MatrixError("M_INVALID_SIGNATURE", f"Bad signature by {signer_key_id}")
                found.append(Signature(user_id, key_id, user_id, signer_key_id, signature))
            if not found:
                raise MatrixError("M_INVALID_SIGNATURE", "No signature by one of your devices")
            return found
        device = await self.store.get_device_keys(user_id, key_id)
        if device is None:
            raise MatrixError("M_NOT_FOUND", "Unknown device or key")
        self_signing = mine.get("self_signing")
        if self_signing is None:
            raise MatrixError("M_MISSING_PARAM", "No self-signing key is available")
        if _unsigned_body(signed) != _unsigned_body(device):
            raise MatrixError("M_INVALID_SIGNATURE", "The signed key is not the device's key")
        signer_key_id = f"ed25519:{self_signing.public_key}"
        signature = sigs.get(signer_key_id)
        if not isinstance(signature, str) or not _verify(
            dict(signed), user_id, signer_key_id, self_signing.public_key
        ):
            raise MatrixError("M_INVALID_SIGNATURE", "Bad or missing self-signing signature")
        return [Signature(user_id, key_id, user_id, signer_key_id, signature)]

    async def _other_signature(
        self,
        user_id: str,
        mine: dict[str, CrossSigningKey],
        target_user: str,
        key_id: str,
        signed: Mapping[str, Any],
    ) -> Signature:
        """A signature of another user's master key by the user's user-signing key."""
        if not isinstance(signed, Mapping):
            raise MatrixError("M_INVALID_PARAM", "A signed key must be an object")
        user_signing = mine.get("user_signing")
        if user_signing is None:
            raise MatrixError("M_MISSING_PARAM", "No user-signing key is available")
        if not self.is_mine(target_user):
            raise MatrixError(
                "M_UNKNOWN", "Keys of users on other servers are not available (no federation)"
            )
        master = (await self.store.get_cross_signing_keys(target_user)).get("master")
        if master is None or master.public_key != key_id:
            raise MatrixError("M_NOT_FOUND", "Only another user's master key can be signed")
        if _unsigned_body(signed) != _unsigned_body(master.key):
            raise MatrixError("M_INVALID_SIGNATURE", "The signed key is not the user's master key")
        signer_key_id = f"ed25519:{user_signing.public_key}"
        signature = ((signed.get("signatures") or {}).get(user_id) or {}).get(signer_key_id)
        if not isinstance(signature, str) or not _verify(
            dict(signed), user_id, signer_key_id, user_signing.public_key
        ):
            raise MatrixError("M_INVALID_SIGNATURE", "Bad or missing user-signing signature")
        return Signature(target_user, key_id, user_id, signer_key_id, signature)

    # --- hooks ----------------------------------------------------------------------------------
    async def on_devices_deleted(self, user_id: str, device_ids: list[str]) -> None:
        """``hs.accounts.device_deletion_hooks``: the devices' keys go with them."""

        async def write(stream_id: int) -> tuple[None, bool]:
            return None, await self.store.delete_devices(user_id, device_ids, stream_id)

        try:
            await self.hs.device_lists.write(user_id, KEYS, write)
        finally:
            for device_id in device_ids:
                self._counts.invalidate((user_id, device_id))

    async def on_user_deactivated(self, user_id: str, erase: bool) -> None:
        """``hs.accounts.deactivation_hooks``: a deactivated user's cross-signing keys go."""

        async def write(stream_id: int) -> tuple[None, bool]:
            return None, await self.store.delete_cross_signing(user_id, stream_id)

        await self.hs.device_lists.write(user_id, KEYS, write)


def _with_signatures(key: dict[str, Any], extra: list[Signature] | None) -> dict[str, Any]:
    """A copy of ``key`` with the stored signatures merged into its own."""
    result = dict(key)
    signatures = {u: dict(s) for u, s in (key.get("signatures") or {}).items()}
    for s in extra or ():
        signatures.setdefault(s.signer_user_id, {})[s.signer_key_id] = s.signature
    result["signatures"] = signatures
    return result
