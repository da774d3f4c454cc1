"""Image handling of the OCR pipeline: decode file bytes, size inputs, crop text boxes.

Everything here is pure numpy / OpenCV on BGR uint8 images (the colour order PP-OCR
models were trained on) and raises :class:`~models.base.InvalidInput` or
:class:`~models.base.ResourceLimit` with a message the caller can act on.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np

from models.base import InvalidInput, ResourceLimit

__all__ = [
    "crop_text_box",
    "decode_image",
    "det_input",
    "pad_normalise_line",
    "sort_boxes",
]

_SIGNATURES: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF8", "GIF"),
]
_SUPPORTED = "PNG/JPEG/BMP/WebP/TIFF"


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels, if PIL knows it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as exc:
        # PIL refuses headers over twice its own pixel limit before reading them back to
        # us; such an image must not reach cv2.imdecode, which would allocate all of it.
        raise ResourceLimit(
            f"image header declares more pixels than can be decoded safely ({exc}); "
            "send a smaller image"
        ) from None
    except Exception:  # PIL not knowing the format is fine: cv2 gets the final say
        return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ResourceLimit(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"max_image_pixels={max_pixels}; send a smaller image"
        )


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image file bytes to a BGR uint8 array; checks the pixel limit first.

    Transparent PNG/WebP are composited onto white (dark text on a transparent
    background would otherwise turn into black on black).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"image must be file bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInput(f"empty image: got 0 bytes; send the bytes of a {_SUPPORTED} file")
    kind = _sniff(data)
    size = _header_size(data)
    if size is not None:
        _check_pixels(size[0], size[1], max_pixels)
    buf = np.frombuffer(data, np.uint8)
    with_alpha = kind in ("PNG", "WebP", "TIFF")
    # IMREAD_COLOR applies the JPEG EXIF orientation; UNCHANGED keeps an alpha channel.
    flags = cv2.IMREAD_UNCHANGED if with_alpha else cv2.IMREAD_COLOR
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        if kind is None:
            raise InvalidInput(
                f"image bytes could not be decoded (got {len(data)} bytes, not a {_SUPPORTED} file)"
            )
        raise InvalidInput(
            f"{kind} image could not be decoded (got {len(data)} bytes): the file is "
            "corrupt or truncated"
        )
    _check_pixels(img.shape[1], img.shape[0], max_pixels)
    return _to_bgr8(img)


def _to_bgr8(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:  # 16-bit PNG/TIFF
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        white = np.full_like(img[:, :, :3], 255, dtype=np.float32)
        return (img[:, :, :3] * alpha + white * (1.0 - alpha)).astype(np.uint8)
    if img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


_DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_DET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def det_input(img: np.ndarray, limit_side_len: int) -> np.ndarray:
    """Detection input (1, 3, H, W): longest side capped at ``limit_side_len``, both
    sides rounded to multiples of 32 (the DB backbone downsamples by 32)."""
    h, w = img.shape[:2]
    ratio = min(1.0, limit_side_len / max(h, w))
    new_h = max(int(round(h * ratio / 32) * 32), 32)
    new_w = max(int(round(w * ratio / 32) * 32), 32)
    resized = cv2.resize(img, (new_w, new_h))
    x = (resized.astype(np.float32) / 255.0 - _DET_MEAN) / _DET_STD
    return x.transpose(2, 0, 1)[np.newaxis]


def sort_boxes(boxes: np.ndarray, line_tolerance: int = 10) -> list[np.ndarray]:
    """Reading order: top to bottom, and left to right within a line (top-left corners
    less than ``line_tolerance`` pixels apart vertically count as one line)."""
    ordered = sorted(boxes, key=lambda b: (int(b[0][1]), int(b[0][0])))
    # One bubble pass per box fixes the order inside each line, as PaddleOCR does.
    for i in range(len(ordered) - 1):
        for j in range(i, -1, -1):
            a, b = ordered[j], ordered[j + 1]
            if abs(int(b[0][1]) - int(a[0][1])) < line_tolerance and b[0][0] < a[0][0]:
                ordered[j], ordered[j + 1] = b, a
            else:
                break
    return ordered


def crop_text_box(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Perspective-warp a quadrilateral to an upright rectangle; crops much taller than
    wide are taken as vertical text and turned 90 degrees."""
    pts = box.astype(np.float32)
    width = int(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3])))
    height = int(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2])))
    width, height = max(width, 1), max(height, 1)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    matrix = cv2.getPerspectiveTransform(pts, target)
    crop = cv2.warpPerspective(
        img, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    if crop.shape[0] / crop.shape[1] >= 1.5:
        crop = np.rot90(crop)
    return crop


def pad_normalise_line(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """One text line as a (3, height, width) float array in [-1, 1]: resized to
    ``height`` keeping its aspect ratio (at most ``width`` wide), zero-padded right."""
    h, w = crop.shape[:2]
    new_w = min(width, max(1, int(math.ceil(height * w / h))))
    resized = cv2.resize(crop, (new_w, height)).astype(np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out
