"""Unpadded base64, standard and URL-safe, as the Matrix appendices define it."""

import base64
import binascii


class Base64Error(ValueError):
    """The input is not valid unpadded (or padded) base64."""


def encode_base64(data: bytes, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.rstrip(b"=").decode("ascii")


def decode_base64(text: str | bytes) -> bytes:
    """Decode standard or URL-safe base64, padded or not."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError as e:
            raise Base64Error("non-ASCII base64") from e
    if len(text) % 4 == 1:
        raise Base64Error("impossible base64 length")
    text = text.rstrip(b"=") + b"=" * (-len(text.rstrip(b"=")) % 4)
    try:
        if b"-" in text or b"_" in text:
            return base64.urlsafe_b64decode(text)
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise Base64Error(str(e)) from e
