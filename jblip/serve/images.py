"""Image URLs of a request -> a decoded PIL image, within the server's limits.

Accepted: `data:image/<type>;base64,<data>` URLs, and (only when the server was started
with --allow-local-files DIR) local paths or `file://` URLs that resolve inside DIR.
Remote URLs (http, https, ...) are refused: the server never fetches on a client's behalf.
Sizes are checked on the compressed bytes and, before decoding, on the pixel count the
image header declares, so a decompression bomb is refused without being expanded.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
from dataclasses import dataclass

from PIL import Image, ImageOps

from jblip.serve.errors import APIError, invalid, too_large

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20        # compressed size
    max_pixels: int = 40_000_000     # width * height as declared by the header
    allow_local_files: str | None = None


def _decode_base64(data: str) -> bytes:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the image's data URL does not hold valid base64", "messages", "invalid_image") from None


def _read_data_url(url: str, limits: ImageLimits) -> bytes:
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise invalid("image data URLs must look like data:image/png;base64,<data>", "messages", "invalid_image")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise invalid(f"the data URL's media type is {mime or 'missing'}, not image/*", "messages", "invalid_image")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise too_large(f"the image is larger than the server's {limits.max_bytes} byte limit",
                        "messages", "image_too_large")
    return _decode_base64(payload)


def _read_local(url: str, limits: ImageLimits) -> bytes:
    if limits.allow_local_files is None:
        raise invalid("local image paths are not accepted by this server (start it with --allow-local-files DIR); "
                      "send the image inline as a data:image/...;base64 URL", "messages", "local_files_disabled")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = os.path.realpath(limits.allow_local_files)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise APIError(f"image path {path!r} is outside the folder this server may read", 403,
                       "permission_error", "messages", "path_not_allowed")
    if not os.path.isfile(real):
        raise invalid(f"no image file at {path!r}", "messages", "image_not_found")
    if os.path.getsize(real) > limits.max_bytes:
        raise too_large(f"the image is larger than the server's {limits.max_bytes} byte limit",
                        "messages", "image_too_large")
    with open(real, "rb") as f:
        return f.read()


def read_image_url(url: str, limits: ImageLimits) -> Image.Image:
    """The image a request names, decoded (RGB conversion is left to the image processor)."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "data":
        data = _read_data_url(url, limits)
    elif scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        data = _read_local(url, limits)
    else:
        raise invalid(f"remote image URLs ({scheme}://) are not fetched by this server; "
                      "send the image inline as a data:image/...;base64 URL", "messages", "remote_url_refused")
    if len(data) > limits.max_bytes:
        raise too_large(f"the image is larger than the server's {limits.max_bytes} byte limit",
                        "messages", "image_too_large")
    return decode_image(data, limits)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling, far above ours
        raise too_large(f"the image has too many pixels ({e})", "messages", "image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise invalid(f"the image data is not a readable image ({e})", "messages", "invalid_image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise too_large(f"the image is {width}x{height} = {width * height} pixels, more than the server's "
                        f"limit of {limits.max_pixels}", "messages", "image_too_large")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise invalid(f"the image data cannot be decoded ({e})", "messages", "invalid_image") from None
