"""Image references of a row: checking them when the row is read, decoding them when it is used.

A reference is a file path (already resolved against the data file's folder), the encoded bytes of
an image file, or a PIL image. ``probe_image`` reads only the header (cheap, done for every row at
setup); ``load_image`` decodes to RGB and resizes into a pixel budget (done when a batch is built).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlrl.data.errors import DataError, RowLocation

ImageRef = str | bytes | Image.Image


def probe_image(ref: ImageRef, where: RowLocation | None = None, field: str = "images") -> tuple[int, int]:
    """The ``(width, height)`` of an image, read from its header; raises ``DataError`` if unreadable."""
    if isinstance(ref, Image.Image):
        return ref.size
    if isinstance(ref, str) and not Path(ref).is_file():
        raise DataError(
            f"image file {ref} does not exist",
            "correct the path (relative paths are resolved against the data file's folder) or add the file",
            where=where,
            field=field,
            reason="missing_image",
        )
    try:
        with _open(ref) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise _unreadable(ref, error, where, field) from error


def load_image(
    ref: ImageRef,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    where: RowLocation | None = None,
    field: str = "images",
) -> Image.Image:
    """Decode an image to RGB and fit its area into ``[min_pixels, max_pixels]`` (see ``fit_pixels``)."""
    try:
        if isinstance(ref, Image.Image):
            image = to_rgb(ref)
        else:
            with _open(ref) as opened:
                image = to_rgb(opened)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise _unreadable(ref, error, where, field) from error
    return fit_pixels(image, min_pixels, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent areas become white (not the black that ``convert`` gives)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fit_pixels(image: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Resize ``image``, keeping its aspect ratio, so that width*height lies in ``[min_pixels, max_pixels]``.

    An image already inside the range (or with no bound given) is returned unchanged.

    >>> fit_pixels(Image.new("RGB", (200, 100)), max_pixels=5000).size
    (100, 50)
    """
    width, height = image.size
    area = width * height
    if max_pixels is not None and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    elif min_pixels is not None and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        size = (math.ceil(width * scale), math.ceil(height * scale))
    else:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def _open(ref: str | bytes) -> Image.Image:
    if isinstance(ref, bytes):
        return Image.open(io.BytesIO(ref))
    return Image.open(ref)


def _unreadable(ref: ImageRef, error: Exception, where: RowLocation | None, field: str) -> DataError:
    what = f"image file {ref}" if isinstance(ref, str) else "embedded image bytes"
    return DataError(
        f"{what} cannot be read as an image ({type(error).__name__}: {error})",
        "replace the image with a valid PNG/JPEG file or remove the row",
        where=where,
        field=field,
        reason="unreadable_image",
    )
