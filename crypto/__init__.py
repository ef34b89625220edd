"""Lowest layer: canonical JSON, unpadded base64, ed25519 keys, JSON signatures,
content/reference hashes and the federation X-Matrix authorisation header.

Nothing here knows about rooms or storage; everything is a pure function.
"""
