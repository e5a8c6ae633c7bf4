"""Image references of a row: checking them when the row is read, decoding them when it is used.

A reference is a file path (already resolved against the data file's folder), the encoded bytes of
an image file, or a PIL image. ``probe_image`` checks that all of an image's data is there (done
for every row at setup, so that a truncated file is a bad row then, not a crash mid-run);
``load_image`` decodes to RGB and resizes into a pixel budget (done when a batch is built). An
image larger than PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) is a
bad row (reason ``image_too_large``) at both places.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image

from vlrl.data.errors import DataError, RowLocation

ImageRef = str | bytes | Image.Image


def probe_image(ref: ImageRef, where: RowLocation | None = None, field: str = "images") -> tuple[int, int]:
    """The ``(width, height)`` of an image whose data is complete; raises ``DataError`` if it is not.

    A PNG is verified (every chunk read and its checksum compared, without decompressing: about a tenth
    of the cost of decoding); any other format is decoded (about 10 ms per megapixel of JPEG).
    """
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
            size = image.size
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
            return size
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many types; any of them means a bad image
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
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many types; any of them means a bad image
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
    size = fitted_size(image.size, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def fitted_size(size: tuple[int, int], min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """The ``(width, height)`` that ``fit_pixels`` gives an image of ``size``.

    >>> fitted_size((200, 100), max_pixels=5000)
    (100, 50)
    """
    width, height = size
    area = width * height
    if max_pixels is not None and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if min_pixels is not None and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
        return math.ceil(width * scale), math.ceil(height * scale)
    return size


def _open(ref: str | bytes) -> Image.Image:
    if isinstance(ref, bytes):
        return Image.open(io.BytesIO(ref))
    return Image.open(ref)


def _unreadable(ref: ImageRef, error: Exception, where: RowLocation | None, field: str) -> DataError:
    what = f"image file {ref}" if isinstance(ref, str) else "embedded image bytes"
    if isinstance(error, Image.DecompressionBombError):
        return DataError(
            f"{what} is too large to decode safely ({error})",
            "downscale the image (vlrl resizes to max_pixels anyway), or raise PIL.Image.MAX_IMAGE_PIXELS "
            "in your launcher if you trust the file",
            where=where,
            field=field,
            reason="image_too_large",
        )
    return DataError(
        f"{what} cannot be read as an image ({type(error).__name__}: {error})",
        "replace the image with a valid PNG/JPEG file or remove the row",
        where=where,
        field=field,
        reason="unreadable_image",
    )
