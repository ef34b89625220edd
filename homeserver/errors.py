"""The one table of Matrix error codes and the exception that carries them.

Every layer raises ``MatrixError``; the HTTP layer renders it as
``{"errcode": ..., "error": ...}`` with the table's status unless overridden.
"""

from typing import Any

# errcode -> default HTTP status
ERRCODES: dict[str, int] = {
    "M_FORBIDDEN": 403,
    "M_UNKNOWN_TOKEN": 401,
    "M_MISSING_TOKEN": 401,
    "M_USER_LOCKED": 401,
    "M_USER_SUSPENDED": 403,
    "M_BAD_JSON": 400,
    "M_NOT_JSON": 400,
    "M_NOT_FOUND": 404,
    "M_LIMIT_EXCEEDED": 429,
    "M_UNRECOGNIZED": 404,
    "M_UNKNOWN": 400,
    "M_UNAUTHORIZED": 401,
    "M_USER_DEACTIVATED": 403,
    "M_USER_IN_USE": 400,
    "M_INVALID_USERNAME": 400,
    "M_ROOM_IN_USE": 400,
    "M_INVALID_ROOM_STATE": 400,
    "M_THREEPID_IN_USE": 400,
    "M_THREEPID_NOT_FOUND": 400,
    "M_THREEPID_AUTH_FAILED": 401,
    "M_THREEPID_DENIED": 403,
    "M_SERVER_NOT_TRUSTED": 403,
    "M_UNSUPPORTED_ROOM_VERSION": 400,
    "M_INCOMPATIBLE_ROOM_VERSION": 400,
    "M_BAD_STATE": 400,
    "M_GUEST_ACCESS_FORBIDDEN": 403,
    "M_CAPTCHA_NEEDED": 400,
    "M_CAPTCHA_INVALID": 400,
    "M_MISSING_PARAM": 400,
    "M_INVALID_PARAM": 400,
    "M_TOO_LARGE": 413,
    "M_EXCLUSIVE": 400,
    "M_RESOURCE_LIMIT_EXCEEDED": 403,
    "M_CANNOT_LEAVE_SERVER_NOTICE_ROOM": 403,
    "M_WEAK_PASSWORD": 400,
    "M_UNABLE_TO_AUTHORISE_JOIN": 400,
    "M_UNABLE_TO_GRANT_JOIN": 400,
    "M_NOT_YET_UPLOADED": 504,
    "M_CANNOT_OVERWRITE_MEDIA": 409,
    "M_UNKNOWN_POS": 400,
    "M_URL_NOT_SET": 404,
    "M_DUPLICATE_ANNOTATION": 400,
    "M_BAD_ALIAS": 400,
    "M_INVALID_SIGNATURE": 400,
}


class MatrixError(Exception):
    """An error a Matrix client or server sees as ``{errcode, error}``."""

    def __init__(
        self,
        errcode: str,
        message: str,
        status: int | None = None,
        **extra: Any,
    ) -> None:
        if errcode not in ERRCODES:
            raise ValueError(f"unknown errcode {errcode}")
        super().__init__(message)
        self.errcode = errcode
        self.message = message
        self.status = status if status is not None else ERRCODES[errcode]
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.message, **self.extra}


def unrecognized(status: int = 404) -> MatrixError:
    return MatrixError("M_UNRECOGNIZED", "Unrecognized request", status)
