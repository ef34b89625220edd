"""Request-body validation against the project's own JSON schemas.

Each endpoint has one schema (in ``client_api/schemas``); a body that is not
JSON is ``M_NOT_JSON``, a body of the wrong shape is ``M_BAD_JSON`` naming the
offending field.
"""

from typing import Any

import jsonschema
from twisted.web.server import Request

from homeserver.errors import MatrixError
from homeserver.http.server import parse_json_body

_validators: dict[int, jsonschema.Draft202012Validator] = {}


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    v = _validators.get(id(schema))
    if v is None:
        v = jsonschema.Draft202012Validator(schema)
        _validators[id(schema)] = v
    return v


def validate(body: Any, schema: dict[str, Any]) -> Any:
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(body))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        message = f"{where}: {error.message}" if where else error.message
        raise MatrixError("M_BAD_JSON", message[:500])
    return body


def parse_body(request: Request, schema: dict[str, Any]) -> Any:
    """The request's JSON body, validated against ``schema``."""
    return validate(parse_json_body(request), schema)


def query_arg(request: Request, name: str, default: str | None = None) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else default


def query_args(request: Request, name: str) -> list[str]:
    return [v.decode("utf-8", "replace") for v in request.args.get(name.encode(), [])]


def query_int(request: Request, name: str, default: int | None = None) -> int | None:
    value = query_arg(request, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise MatrixError("M_INVALID_PARAM", f"{name} must be an integer") from None


def query_bool(request: Request, name: str, default: bool = False) -> bool:
    value = query_arg(request, name)
    if value is None:
        return default
    if value not in ("true", "false"):
        raise MatrixError("M_INVALID_PARAM", f"{name} must be true or false")
    return value == "true"
