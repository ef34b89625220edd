"""Canonical JSON (spec appendix "Canonical JSON").

Keys sorted by code point, no insignificant whitespace, UTF-8 output, and
numbers restricted to integers in [-(2**53)+1, (2**53)-1]. Floats are refused.
"""

import json
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1
MIN_SAFE_INTEGER = -(2**53) + 1


class CanonicalJsonError(ValueError):
    """The value cannot be expressed as canonical JSON."""


_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True
)


def _check(value: Any) -> None:
    # Iterative walk: events can be deeply nested and recursion is slower.
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            for k, item in v.items():
                if type(k) is not str:
                    raise CanonicalJsonError("object keys must be strings")
                stack.append(item)
        elif t is list or t is tuple:
            stack.extend(v)
        elif t is int:
            if not MIN_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
                raise CanonicalJsonError(f"integer {v} out of canonical JSON range")
        elif t is float:
            raise CanonicalJsonError("floats are not allowed in canonical JSON")
        elif v is None or t is str or t is bool:
            continue
        else:
            raise CanonicalJsonError(f"cannot encode {t.__name__} as JSON")


def encode_canonical_json(value: Any, *, checked: bool = False) -> bytes:
    """Encode ``value`` as canonical JSON bytes, refusing floats and big integers.

    ``checked``: the caller has already encoded ``value`` or a value containing
    it with this function, so it cannot hold floats or big integers.
    """
    if not checked:
        _check(value)
    return _encoder.encode(value).encode("utf-8")


def _parse_float(text: str) -> int:
    # The spec's example {"b": 1e10} becomes 10000000000: integral numbers
    # written in exponent form are integers; any other fraction is refused.
    f = float(text)
    if not f.is_integer():
        raise CanonicalJsonError(f"non-integral number {text}")
    return int(f)


def _refuse_constant(name: str) -> None:
    raise CanonicalJsonError(f"{name} is not valid JSON")


def parse_json(text: str | bytes) -> Any:
    """Parse JSON the way the spec's canonical-JSON rules read numbers.

    Integral numbers in exponent or fraction form (``1e10``, ``2.0``) become
    ints; non-integral numbers and NaN/Infinity raise CanonicalJsonError.
    """
    return json.loads(text, parse_float=_parse_float, parse_constant=_refuse_constant)
