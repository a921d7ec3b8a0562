"""JPEG content checks: magic bytes, end-of-image marker, and a real (reduced-scale) decode with Pillow."""

from __future__ import annotations

import io

JPEG_MAGIC = b"\xff\xd8\xff"
EOI = b"\xff\xd9"
# Some cameras append a trailer after the end-of-image marker; look for it in this many tail bytes.
EOI_WINDOW = 64 * 1024
# Decode at the smallest libjpeg DCT scale (1/8): every entropy-coded byte is still decoded.
DRAFT_SIZE = (1, 1)

_KNOWN_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "RIFF/WebP"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "zip"),
)


class BadJpeg(ValueError):
    """The bytes are not a complete, decodable JPEG (the message says what is wrong)."""


def sniff(data: bytes) -> str:
    """A short description of what the bytes look like (for error messages)."""
    for magic, kind in _KNOWN_MAGIC:
        if data.startswith(magic):
            return f"{kind} data"
    if not data:
        return "empty"
    return f"content starting {data[:8]!r}"


def check_jpeg(data: bytes) -> tuple[int, int]:
    """Raise BadJpeg unless data is a whole, decodable JPEG; returns (width, height)."""
    from PIL import Image

    if not data.startswith(JPEG_MAGIC):
        raise BadJpeg(f"not a JPEG ({sniff(data)})")
    if data.rfind(EOI, max(0, len(data) - EOI_WINDOW)) < 2:
        raise BadJpeg("truncated JPEG: no end-of-image marker (FFD9)")
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            size = im.size
            im.draft("RGB", DRAFT_SIZE)
            im.load()  # with ImageFile.LOAD_TRUNCATED_IMAGES off this raises on missing data
    except Image.DecompressionBombError as exc:
        raise BadJpeg(f"JPEG too large to decode safely: {exc}") from None
    except Exception as exc:  # noqa: BLE001 — Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadJpeg(f"corrupt JPEG: {type(exc).__name__}: {exc}") from None
    return size
