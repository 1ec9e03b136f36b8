"""Decoding uploaded images in the gateway (PIL only), so bad files never reach the queue."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import ApiError

#: Modes PNG stores as they are; anything else (CMYK, YCbCr, float) becomes RGB here. Alpha and
#: palettes are kept so the worker converts them exactly as the library does for local files.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


@dataclass
class DecodedImage:
    png: bytes
    width: int
    height: int


def decode_image(field: str, filename: str, data: bytes, max_pixels: int) -> DecodedImage:
    """Validate one upload and re-encode it as PNG with its EXIF orientation applied."""

    def bad(kind: str, msg: str) -> ApiError:
        return ApiError(422, ["body", field], kind, f"{filename}: {msg}", file=filename)

    if not data:
        raise bad("empty_file", "the file is empty; upload a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise bad("image_too_large", f"{width}x{height} pixels is more than the "
                          f"{max_pixels} allowed (CGIDM_MAX_IMAGE_PIXELS)")
            image.load()
            image = ImageOps.exif_transpose(image)
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise bad("not_an_image", "not an image file; upload a PNG or JPEG image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise bad("image_too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise bad("corrupt_image", f"truncated or corrupt image ({exc})") from None
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return DecodedImage(buffer.getvalue(), image.width, image.height)
