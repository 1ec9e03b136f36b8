"""Decoding uploaded images in the gateway (PIL only), so bad files never reach the queue.

Uploads are untrusted. Only common still-image formats are opened (never EPS, which runs
Ghostscript, nor the many exotic formats PIL can parse); the pixel count is checked from the
header BEFORE any pixel is decoded (decompression bombs); the first frame is decoded in full
(truncation shows here, not in the worker); EXIF orientation is applied once, here, and the
result is stored as PNG, which has no orientation tag, so nothing downstream rotates it again.

Colour: the stored PNG keeps what the worker's ``cgidm_core.images.load_image`` needs to give
exactly the pixels it gives for the original file (the service and ``cgidm check`` agree):
palette, alpha, grey and 16-bit grey are stored as they are; CMYK, YCbCr, LAB and HSV are
converted to RGB here with PIL's conversion (the one ``load_image`` and diffusion training
scripts use); 32-bit integer images are stored as 16-bit when their values fit, and float
images are refused.

Animated images (GIF, APNG, WebP) and multi-page TIFFs: the first frame is used, and the
response says so (``warnings``). Multi-picture JPEGs from cameras (MPO) hold the photo as their
first picture, so they are used without a warning.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import cast

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ApiError
from cgidm.errors import CgidmServiceError

log = logging.getLogger("cgidm.gateway")

#: The formats a person uploads photos or scans in. PIL tries only these.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO
#: Modes PNG stores losslessly and ``load_image`` converts itself.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
_TO_RGBA = {"PA", "RGBa", "La", "RGBX"}
_INT_MODES = {"I", "I;16B", "I;16L", "I;16N"}


@dataclass
class DecodedImage:
    png: bytes
    width: int
    height: int
    frames: int = 1
    warnings: list[str] = field(default_factory=list)


def decode_image(field: str, filename: str, data: bytes, max_pixels: int) -> DecodedImage:
    """Validate one upload and re-encode it as PNG with its EXIF orientation applied."""

    def bad(kind: str, msg: str) -> ApiError:
        return ApiError(422, ["body", field], kind, f"{filename}: {msg}", file=filename)

    if not data:
        raise bad("empty_file", "the file is empty; upload a PNG or JPEG image")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width < 1 or height < 1:
                raise bad("corrupt_image", f"the image is {width}x{height} pixels")
            if width * height > max_pixels:
                raise bad("image_too_large", f"{width}x{height} pixels is more than the "
                          f"{max_pixels} allowed (CGIDM_MAX_IMAGE_PIXELS)")
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1 and image.format != "MPO":
                notes.append(f"{filename}: {image.format} image with {frames} frames; only the "
                             "first frame is used")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _storable(image)
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise bad("not_an_image", "not an image file (or not one of "
                  f"{', '.join(FORMATS)}); upload a PNG or JPEG image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise bad("image_too_large", str(exc)) from None
    except UnsupportedMode as exc:
        raise bad("unsupported_image", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad("corrupt_image", f"truncated or corrupt image ({exc})") from None
    except Exception as exc:  # PIL's parsers raise many types on hostile files; none is a 500
        log.warning("upload %r: %s while decoding", filename, type(exc).__name__)
        raise bad("corrupt_image", f"cannot decode this image ({type(exc).__name__})") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return DecodedImage(buffer.getvalue(), image.width, image.height, frames, notes)


class UnsupportedMode(CgidmServiceError, ValueError):
    """A pixel format with no faithful 8-bit rendering (float images)."""

    code, http_status = "unsupported_image", 422


def _storable(image: Image.Image) -> Image.Image:
    """An image PNG can hold with the pixels ``load_image`` would make of the original."""
    mode = image.mode
    if mode in _PNG_MODES:
        return image
    if mode in _TO_RGBA:
        return image.convert("RGBA")
    if mode in _INT_MODES:
        # an "I" image has one band, so its extrema are one (min, max) pair
        low, high = cast("tuple[int, int]", image.getextrema()) if mode == "I" else (0, 65535)
        if low < 0 or high > 65535:
            raise UnsupportedMode(f"{mode} image with values {low}..{high}; only 8- and 16-bit "
                                  "images are supported")
        return image if mode == "I;16" else image.convert("I").convert("I;16")
    if mode == "F":
        raise UnsupportedMode("floating-point image; export it as an 8- or 16-bit PNG or TIFF")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
