"""Stored filters: POST /user/{userId}/filter returns an id that /sync accepts."""

import json
from collections import OrderedDict
from typing import Any

from homeserver.errors import MatrixError
from homeserver.services.filtering import SyncFilter

_encoder = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


class FilterService:
    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self._cache: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    async def add(self, user_id: str, definition: dict[str, Any]) -> str:
        text = _encoder.encode(definition)

        def insert(txn: Any) -> int:
            # Reuse the id of an identical filter: clients upload the same one often.
            row = txn.execute(
                "SELECT filter_id FROM user_filters WHERE user_id = ? AND filter_json = ?",
                (user_id, text),
            ).fetchone()
            if row is not None:
                return row[0]
            (latest,) = txn.execute(
                "SELECT COALESCE(MAX(filter_id), -1) FROM user_filters WHERE user_id = ?",
                (user_id,),
            ).fetchone()
            txn.execute(
                "INSERT INTO user_filters (user_id, filter_id, filter_json) VALUES (?, ?, ?)",
                (user_id, latest + 1, text),
            )
            return latest + 1

        filter_id = str(await self.hs.database.run_interaction("add_filter", insert))
        self._cache[(user_id, filter_id)] = definition
        return filter_id

    async def get(self, user_id: str, filter_id: str) -> dict[str, Any]:
        cached = self._cache.get((user_id, filter_id))
        if cached is not None:
            return cached
        if not filter_id.isdigit():
            raise MatrixError("M_NOT_FOUND", "No such filter")
        rows = await self.hs.database.select(
            "get_filter",
            "SELECT filter_json FROM user_filters WHERE user_id = ? AND filter_id = ?",
            (user_id, int(filter_id)),
        )
        if not rows:
            raise MatrixError("M_NOT_FOUND", "No such filter")
        definition = json.loads(rows[0][0])
        self._cache[(user_id, filter_id)] = definition
        if len(self._cache) > 10_000:
            self._cache.popitem(last=False)
        return definition

    async def sync_filter(self, user_id: str, value: str | None) -> SyncFilter:
        """The filter for a /sync ``filter`` parameter: inline JSON or a stored id."""
        if value is None:
            return SyncFilter()
        if value.startswith("{"):
            try:
                definition = json.loads(value)
            except ValueError:
                raise MatrixError("M_INVALID_PARAM", "filter is not valid JSON") from None
            if not isinstance(definition, dict):
                raise MatrixError("M_INVALID_PARAM", "filter must be a JSON object")
        else:
            definition = await self.get(user_id, value)
        try:
            return SyncFilter.from_json(definition)
        except (TypeError, ValueError, AttributeError):
            raise MatrixError("M_INVALID_PARAM", "filter has the wrong shape") from None
