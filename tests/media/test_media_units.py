"""The media repository's pure parts: thumbnails, choosing sizes, headers, ranges,
URL rules, address checks, OpenGraph parsing, upload spooling."""

import io
import os

import pytest
from PIL import Image

from homeserver.config.loader import DEFAULT_IP_RANGE_BLOCKLIST
from homeserver.config.schema import CONFIG_SCHEMA
from homeserver.services.media.previews import AddressPolicy, parse_open_graph, url_blacklisted
from homeserver.services.media.responses import (
    RangeNotSatisfiable,
    content_disposition,
    parse_range,
    response_content_type,
    sanitise_filename,
)
from homeserver.services.media.storage import LocalMediaStorage
from homeserver.services.media.thumbnails import (
    CannotThumbnail,
    ImageTooLarge,
    ThumbnailSpec,
    choose_spec,
    image_info,
    make_thumbnails,
    specs_from_config,
)
from homeserver.services.media.uploads import UploadSink
from tests.media.helpers import image_bytes

MILLION = 1_000_000
DEFAULT_SPECS = specs_from_config(CONFIG_SCHEMA["properties"]["thumbnail_sizes"]["default"])


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def sizes(thumbs) -> list[tuple[int, int]]:
    return [(t.width, t.height) for t in thumbs]


# --- thumbnails ---------------------------------------------------------------------------
def test_crop_is_exact_and_scale_fits_inside(tmp_path):
    path = write(tmp_path, "a.png", image_bytes(400, 300))
    thumbs = make_thumbnails(
        path,
        [
            ThumbnailSpec(96, 96, "crop"),
            ThumbnailSpec(100, 30, "crop"),
            ThumbnailSpec(320, 240, "scale"),
            ThumbnailSpec(100, 100, "scale"),
        ],
        32 * MILLION,
    )
    assert sizes(thumbs) == [(96, 96), (100, 30), (320, 240), (100, 75)]
    for t in thumbs:
        assert t.content_type == "image/png"
        assert Image.open(io.BytesIO(t.data)).size == (t.width, t.height)


def test_never_upscales(tmp_path):
    path = write(tmp_path, "small.png", image_bytes(20, 10))
    thumbs = make_thumbnails(
        path,
        [
            ThumbnailSpec(96, 96, "crop"),
            ThumbnailSpec(320, 240, "scale"),
            ThumbnailSpec(40, 10, "crop"),
        ],
        32 * MILLION,
    )
    # crop keeps the box's aspect ratio at the image's own resolution
    assert sizes(thumbs) == [(10, 10), (20, 10), (20, 5)]


def test_jpeg_stays_jpeg_and_decodes_scaled(tmp_path):
    path = write(tmp_path, "a.jpg", image_bytes(1600, 1200, "JPEG"))
    [thumb] = make_thumbnails(path, [ThumbnailSpec(200, 200, "crop")], 32 * MILLION)
    assert thumb.content_type == "image/jpeg" and (thumb.width, thumb.height) == (200, 200)
    assert Image.open(io.BytesIO(thumb.data)).format == "JPEG"


def test_animated_gif_is_static_unless_asked(tmp_path):
    frames = [Image.new("RGB", (60, 40), (i * 40, 0, 0)) for i in range(4)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    path = write(tmp_path, "a.gif", out.getvalue())
    static, animated = make_thumbnails(
        path,
        [ThumbnailSpec(32, 32, "crop"), ThumbnailSpec(32, 32, "crop", animated=True)],
        32 * MILLION,
    )
    assert static.content_type == "image/png" and not static.animated
    assert not getattr(Image.open(io.BytesIO(static.data)), "is_animated", False)
    assert animated.content_type == "image/webp" and animated.animated
    decoded = Image.open(io.BytesIO(animated.data))
    assert decoded.is_animated and decoded.n_frames == 4 and decoded.size == (32, 32)


def test_pixel_bombs_are_never_decoded(tmp_path):
    # 8000 x 8000 one-bit pixels compress to a few kilobytes.
    out = io.BytesIO()
    Image.new("1", (8000, 8000)).save(out, "PNG")
    assert len(out.getvalue()) < 100_000
    path = write(tmp_path, "bomb.png", out.getvalue())
    with pytest.raises(ImageTooLarge):
        make_thumbnails(path, [ThumbnailSpec(32, 32, "crop")], 32 * MILLION)
    with pytest.raises(ImageTooLarge):
        image_info(path, 32 * MILLION)


def test_not_images_are_refused(tmp_path):
    for name, data in [
        ("a.png", b"not a png at all"),
        ("a.html", b"<html></html>"),
        ("a.bmp", _bmp()),
    ]:
        with pytest.raises(CannotThumbnail):
            make_thumbnails(
                write(tmp_path, name, data), [ThumbnailSpec(32, 32, "crop")], 32 * MILLION
            )


def _bmp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (10, 10)).save(out, "BMP")  # a decoder we never use
    return out.getvalue()


def test_choose_spec():
    # The smallest configured size at least as large as asked, same method.
    assert choose_spec(96, 96, "crop", DEFAULT_SPECS, False) == ThumbnailSpec(96, 96, "crop")
    assert choose_spec(50, 50, "crop", DEFAULT_SPECS, False) == ThumbnailSpec(96, 96, "crop")
    assert choose_spec(300, 100, "scale", DEFAULT_SPECS, False) == ThumbnailSpec(320, 240, "scale")
    assert choose_spec(700, 500, "scale", DEFAULT_SPECS, False) == ThumbnailSpec(800, 600, "scale")
    # Larger than all: made on demand, rounded up to a multiple of 32.
    assert choose_spec(100, 50, "crop", DEFAULT_SPECS, False) == ThumbnailSpec(128, 64, "crop")
    assert choose_spec(5000, 900, "scale", DEFAULT_SPECS, False) == ThumbnailSpec(
        2048, 928, "scale"
    )
    # dynamic_thumbnails: exactly what was asked.
    assert choose_spec(50, 50, "crop", DEFAULT_SPECS, True) == ThumbnailSpec(50, 50, "crop")


# --- headers, names, ranges ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "name", "expected"),
    [
        ("image/png", "a.png", b'inline; filename="a.png"'),
        ("IMAGE/PNG; foo=bar", None, b"inline"),
        ("text/html", "x.html", b'attachment; filename="x.html"'),
        ("image/svg+xml", "x.svg", b'attachment; filename="x.svg"'),
        ("application/pdf", "a b.pdf", b'attachment; filename="a b.pdf"'),
        (None, "x", b'attachment; filename="x"'),
        ("text/plain", 'say "hi".txt', b"inline; filename*=utf-8''say%20%22hi%22.txt"),
        ("text/plain", "ünï.txt", b"inline; filename*=utf-8''%C3%BCn%C3%AF.txt"),
        ("text/plain", "a\r\nSet-Cookie: x.txt", b'inline; filename="aSet-Cookie: x.txt"'),
        ("text/plain", "C:\\Users\\me\\secret.txt", b'inline; filename="secret.txt"'),
        ("text/plain", "..", b"inline"),
    ],
)
def test_content_disposition(content_type, name, expected):
    assert content_disposition(content_type, name) == expected


def test_sanitise_and_content_type():
    assert sanitise_filename("/etc/passwd") == "passwd"
    assert sanitise_filename("\x00\x1f") is None
    assert response_content_type(None) == "application/octet-stream"
    assert response_content_type("garbage") == "application/octet-stream"
    assert response_content_type("text/plain") == "text/plain; charset=utf-8"
    assert response_content_type("text/plain; charset=latin-1") == "text/plain; charset=latin-1"
    assert response_content_type("image/png") == "image/png"


def test_parse_range():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-", 10) == (0, 10)
    assert parse_range("bytes=2-5", 10) == (2, 4)
    assert parse_range("bytes=8-100", 10) == (8, 2)
    assert parse_range("bytes=-4", 10) == (6, 4)
    assert parse_range("bytes=-40", 10) == (0, 10)
    assert parse_range("bytes=1-2,4-5", 10) is None  # several ranges: everything
    assert parse_range("items=1-2", 10) is None
    for bad in ("bytes=10-", "bytes=5-3", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 10)


# --- URL previews -----------------------------------------------------------------------------
def test_address_policy():
    default = AddressPolicy(DEFAULT_IP_RANGE_BLOCKLIST, [])
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "fe80::1",
        "fc00::5",
        "0.0.0.0",
    ):
        assert default.blocked(address), address
    assert not default.blocked("93.184.216.34")
    assert not default.blocked("2606:2800:220:1::1")
    allowed = AddressPolicy(DEFAULT_IP_RANGE_BLOCKLIST, ["127.0.0.1/32"])
    assert not allowed.blocked("127.0.0.1")
    assert allowed.blocked("127.0.0.2")


def test_url_blacklist():
    rules = [
        {"netloc": "*.evil.example"},
        {"scheme": "http", "netloc": "plain.example"},
        {"path": "^/private/"},
        {"username": "*"},
    ]
    assert url_blacklisted("https://a.evil.example/x", rules)
    assert url_blacklisted("http://plain.example/", rules)
    assert not url_blacklisted("https://plain.example/", rules)
    assert url_blacklisted("https://ok.example/private/doc", rules)
    assert not url_blacklisted("https://ok.example/public/private/", rules)
    assert url_blacklisted("https://user@ok.example/", rules)
    assert not url_blacklisted("https://ok.example/", rules)


def test_open_graph_parsing():
    page = b"""<html><head><meta charset="utf-8"><title> Fallback
      title </title><meta property="og:title" content="The &amp; Title">
      <meta property="og:image" content="/img/pic.png"><meta name="description" content="desc">
      <meta property="og:site_name" content="Site"></head><body><img src="other.png"></body></html>"""
    og = parse_open_graph(page, "text/html", "https://example.org/a/page")
    assert og == {
        "og:title": "The & Title",
        "og:image": "https://example.org/img/pic.png",
        "og:site_name": "Site",
        "og:description": "desc",
    }
    og = parse_open_graph(
        "<title>Naïve</title><img src='x.png'>".encode("latin-1"),
        "text/html; charset=iso-8859-1",
        "https://example.org/",
    )
    assert og == {"og:title": "Naïve", "og:image": "https://example.org/x.png"}


# --- uploads --------------------------------------------------------------------------------
def test_upload_sink_spools_hashes_and_cleans_up(tmp_path):
    sink = UploadSink(str(tmp_path), 10)
    sink.write(b"hello")
    sink.write(b"world")
    assert sink.tell() == 10
    claimed = sink.claim()
    assert open(claimed.path, "rb").read() == b"helloworld"
    assert claimed.sha256 == "936a185caaa266bb9cbe981e9e05cb78cd732b0b3280eb944412bb6f8f8f07af"
    sink.close()  # claimed: the file is the caller's now
    assert os.path.exists(claimed.path)

    abandoned = UploadSink(str(tmp_path), 10)
    abandoned.write(b"x")
    abandoned.close()
    assert not os.path.exists(abandoned.path)

    big = UploadSink(str(tmp_path), 4)
    big.write(b"12345")
    assert big.too_large and not os.path.exists(big.path)


def test_local_storage_keys_cannot_escape(tmp_path):
    storage = LocalMediaStorage(None, str(tmp_path))
    for key in ("../x", "content/../../x", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            storage.path_of(key)
