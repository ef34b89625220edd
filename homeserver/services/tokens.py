"""Sync and pagination tokens.

A sync token is the position in every stream a client follows:
``s{events}_{typing}_{receipts}_{account_data}_{to_device}_{presence}_{device_lists}``.
A pagination token (``prev_batch``, ``/messages`` ``from``/``to``) is an event
stream position on its own: ``s{events}``. Both parse as the other expects,
so a sync token can start a /messages request, as the spec allows.
"""

import attrs

from homeserver.errors import MatrixError

STREAMS = ("events", "typing", "receipts", "account_data", "to_device", "presence",
           "device_lists")


@attrs.frozen
class StreamToken:
    events: int = 0
    typing: int = 0
    receipts: int = 0
    account_data: int = 0
    to_device: int = 0
    presence: int = 0
    device_lists: int = 0

    @classmethod
    def parse(cls, token: str) -> "StreamToken":
        if not token.startswith("s"):
            raise MatrixError("M_INVALID_PARAM", f"Bad token {token!r}")
        parts = token[1:].split("_")
        if len(parts) > len(STREAMS):
            raise MatrixError("M_INVALID_PARAM", f"Bad token {token!r}")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise MatrixError("M_INVALID_PARAM", f"Bad token {token!r}") from None
        if any(v < 0 for v in values):
            raise MatrixError("M_INVALID_PARAM", f"Bad token {token!r}")
        return cls(*values)

    def __str__(self) -> str:
        return "s" + "_".join(str(getattr(self, name)) for name in STREAMS)

    def copy_with(self, **changes: int) -> "StreamToken":
        return attrs.evolve(self, **changes)


def pagination_token(stream_ordering: int) -> str:
    return f"s{stream_ordering}"


def parse_pagination_token(token: str) -> int:
    """The events position of a /messages token; negative positions are history
    fetched from other servers (homeserver/services/backfill.py)."""
    if token.startswith("s-") and token[2:].isdigit():
        return -int(token[2:])
    return StreamToken.parse(token).events
