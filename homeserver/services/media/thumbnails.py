"""Thumbnails with Pillow: which size to serve, and making them.

Everything here that touches pixels is blocking and meant for a worker
thread. An image is only decoded once its header says it has no more than
``max_image_pixels`` pixels (decompression bombs never get decoded), and only
JPEG, PNG, GIF and WebP decoders are ever used, whatever the upload claimed.

Methods (spec "Thumbnails"): ``scale`` fits the image inside the box keeping
its aspect ratio; ``crop`` fills the box exactly, cutting off the overflow
around the centre. Neither ever upscales: an image smaller than the box comes
back at its own size (cropped to the box's aspect ratio for ``crop``).
"""

import io
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # Pillow is imported on first use: an idle server never loads it
    from PIL import Image

# Content types we make thumbnails of.
THUMBNAILABLE = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/apng", "image/gif", "image/webp"}
)
_DECODERS = ["JPEG", "PNG", "GIF", "WEBP"]
# Animated thumbnails: at most this many frames.
MAX_ANIMATED_FRAMES = 150
# The largest box a thumbnail is made for; sizes made on demand (larger than
# every configured one) are rounded up to a multiple of SNAP.
MAX_DYNAMIC_SIZE = 2048
SNAP = 32
JPEG_QUALITY = 80


class CannotThumbnail(Exception):
    """Not an image we can decode."""


class ImageTooLarge(Exception):
    """More pixels than max_image_pixels: not decoded."""


@attrs.frozen
class ThumbnailSpec:
    width: int
    height: int
    method: str  # "crop" or "scale"
    animated: bool = False


@attrs.frozen
class Thumbnail:
    spec: ThumbnailSpec  # as asked for
    content_type: str
    width: int
    height: int
    data: bytes
    animated: bool = False  # whether the output is animated


@attrs.frozen
class ImageInfo:
    width: int
    height: int
    content_type: str


def specs_from_config(entries: list[dict[str, Any]]) -> list[ThumbnailSpec]:
    specs = []
    for e in entries:
        spec = ThumbnailSpec(int(e["width"]), int(e["height"]), e.get("method", "scale"))
        if spec not in specs:
            specs.append(spec)
    return specs


def _snap(value: int) -> int:
    return min(MAX_DYNAMIC_SIZE, -(-max(value, 1) // SNAP) * SNAP)


def choose_spec(
    width: int, height: int, method: str, configured: list[ThumbnailSpec], dynamic: bool
) -> ThumbnailSpec:
    """The box to make or serve for a request.

    With ``dynamic`` the request's own box. Otherwise, of the configured
    sizes with the requested method (any method if none has it), the smallest
    at least as large as asked in both dimensions (for crop, the closest in
    aspect ratio first). When none is that large, a box rounded up to a
    multiple of ``SNAP`` (at most ``MAX_DYNAMIC_SIZE``) is made on demand: a
    thumbnail is never smaller than asked unless the image itself is, and
    arbitrary sizes cannot fill the store.
    """
    if dynamic:
        return ThumbnailSpec(
            min(max(width, 1), MAX_DYNAMIC_SIZE), min(max(height, 1), MAX_DYNAMIC_SIZE), method
        )
    same = [s for s in configured if s.method == method] or configured
    big_enough = [s for s in same if s.width >= width and s.height >= height]
    if not big_enough:
        return ThumbnailSpec(_snap(width), _snap(height), method)
    if method == "crop":
        want = width / max(height, 1)
        return min(
            big_enough, key=lambda s: (round(abs(s.width / s.height - want), 2), s.width * s.height)
        )
    return min(big_enough, key=lambda s: s.width * s.height)


def _open(path: str, max_pixels: int) -> "Image.Image":
    from PIL import Image

    try:
        img = Image.open(path, formats=_DECODERS)
    except Image.DecompressionBombError as e:  # Pillow's own limit, from the header
        raise ImageTooLarge(str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise CannotThumbnail(str(e)) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise CannotThumbnail("image has no pixels")
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(f"{width}x{height} pixels")
    return img


def image_info(path: str, max_pixels: int) -> ImageInfo:
    """Size and type from the header only (nothing is decoded)."""
    from PIL import Image

    img = _open(path, max_pixels)
    try:
        return ImageInfo(img.size[0], img.size[1], Image.MIME.get(img.format or "", "image/png"))
    finally:
        img.close()


def scaled_size(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    ratio = min(box_w / width, box_h / height, 1.0)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def crop_region(
    width: int, height: int, box_w: int, box_h: int
) -> tuple[float, float, float, float]:
    """The centred region of the source with the box's aspect ratio."""
    if width * box_h > height * box_w:  # source is wider than the box
        region_w, region_h = height * box_w / box_h, float(height)
    else:
        region_w, region_h = float(width), width * box_h / box_w
    left = (width - region_w) / 2
    top = (height - region_h) / 2
    return left, top, left + region_w, top + region_h


def _transform(frame: "Image.Image", spec: ThumbnailSpec) -> "Image.Image":
    from PIL import Image

    width, height = frame.size
    if spec.method == "crop":
        box = crop_region(width, height, spec.width, spec.height)
        region_w, region_h = box[2] - box[0], box[3] - box[1]
        if region_w >= spec.width and region_h >= spec.height:
            size = (spec.width, spec.height)
        else:  # never upscale: the region at its own size
            size = (max(1, round(region_w)), max(1, round(region_h)))
        return frame.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    size = scaled_size(width, height, spec.width, spec.height)
    if size == frame.size:
        return frame.copy()
    return frame.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _static_frame(img: "Image.Image") -> "tuple[Image.Image, str]":
    """The first frame, upright, in a mode we can encode; and the output type."""
    from PIL import ImageOps

    img.seek(0)
    if img.format == "JPEG":
        frame = ImageOps.exif_transpose(img) or img
        return frame.convert("RGB"), "image/jpeg"
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB"), "image/png"


def _encode(frame: "Image.Image", content_type: str) -> bytes:
    out = io.BytesIO()
    if content_type == "image/jpeg":
        frame.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        frame.save(out, "PNG", optimize=False, compress_level=6)
    return out.getvalue()


def _animated(img: "Image.Image", spec: ThumbnailSpec, max_pixels: int) -> Thumbnail | None:
    from PIL import ImageSequence

    frames_total = getattr(img, "n_frames", 1)
    width, height = img.size
    if frames_total > MAX_ANIMATED_FRAMES or frames_total * width * height > max_pixels:
        return None
    frames: list[Image.Image] = []
    durations: list[int] = []
    for frame in ImageSequence.Iterator(img):
        durations.append(int(frame.info.get("duration", 100)) or 100)
        frames.append(_transform(frame.convert("RGBA"), spec))
    if len(frames) < 2:
        return None
    out = io.BytesIO()
    frames[0].save(
        out,
        "WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=durations,
        loop=int(img.info.get("loop", 0)),
        quality=JPEG_QUALITY,
    )
    return Thumbnail(
        spec, "image/webp", frames[0].size[0], frames[0].size[1], out.getvalue(), animated=True
    )


def make_thumbnails(path: str, specs: list[ThumbnailSpec], max_pixels: int) -> list[Thumbnail]:
    """Decode the image at ``path`` once and make every thumbnail, in the order of ``specs``.

    An ``animated`` spec gives an animated WebP when the source is animated
    (and small enough), otherwise a static thumbnail of the first frame.
    Raises ImageTooLarge or CannotThumbnail.
    """
    img = _open(path, max_pixels)
    try:
        results: list[Thumbnail | None] = [None] * len(specs)
        is_animated = bool(getattr(img, "is_animated", False))
        static: list[int] = []
        for i, spec in enumerate(specs):
            if spec.animated and is_animated:
                results[i] = _animated(img, spec, max_pixels)
            if results[i] is None:
                static.append(i)
        if static:
            if img.format == "JPEG" and not is_animated:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers
                # every box, either way round (EXIF rotation may swap the sides).
                side = max(max(specs[i].width, specs[i].height) for i in static)
                img.draft("RGB", (side, side))
            frame, content_type = _static_frame(img)
            for i in static:
                out = _transform(frame, specs[i])
                results[i] = Thumbnail(
                    specs[i], content_type, out.size[0], out.size[1], _encode(out, content_type)
                )
        return [r for r in results if r is not None]
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise CannotThumbnail(str(e)) from None
    finally:
        img.close()
