"""JPEG content checks: magic bytes, end-of-image marker, and a strict decode with libjpeg-turbo (simplejpeg).

Strict means every libjpeg warning is an error. Pillow cannot do this: it silences libjpeg's warnings, so a
JPEG spliced from the first 40 % of a photo plus an end-of-image marker decodes "fine" with a grey bottom
(libjpeg's "Corrupt JPEG data: premature end of data segment" is only a warning). simplejpeg's `strict=True`
raises on it.
"""

from __future__ import annotations

JPEG_MAGIC = b"\xff\xd8\xff"
EOI = b"\xff\xd9"
# Some cameras append a trailer after the end-of-image marker; look for it in this many tail bytes.
EOI_WINDOW = 64 * 1024
# Pixel cap checked from the header before decoding: a progressive JPEG keeps all its DCT coefficients in
# memory (2 bytes per sample), so 64 MP (8192x8192) can cost ~400 MB whatever the file size. 48 MP sensors
# and 8K frames fit.
MAX_PIXELS = 8192 * 8192

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
    """Raise BadJpeg unless data is a whole JPEG that decodes without a single libjpeg warning;
    returns (width, height).

    The decode runs at libjpeg's smallest DCT scale (1/8) into one grey channel (CMYK files: their own
    colour space, which libjpeg cannot convert): every entropy-coded byte of every component is still
    Huffman-decoded, so truncation and corrupt data are caught, but the IDCT, upsampling and colour
    conversion work is ~1/64. Measured per 1920x1080 image on this machine (2 shared cores, medians of 40,
    before = Pillow's lenient 1/8-scale decode this replaces): 940 KB 4:4:4 road photo 15.9 -> 12.0 ms,
    346 KB 4:2:0 q90 3.3 -> 2.9 ms, 333 KB progressive 18.7 -> 16.6 ms.
    """
    import simplejpeg

    if not data.startswith(JPEG_MAGIC):
        raise BadJpeg(f"not a JPEG ({sniff(data)})")
    if data.rfind(EOI, max(0, len(data) - EOI_WINDOW)) < 2:
        raise BadJpeg("truncated JPEG: no end-of-image marker (FFD9)")
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=True)
    except ValueError as exc:
        raise BadJpeg(f"corrupt JPEG header: {exc}") from None
    if width * height > MAX_PIXELS:
        raise BadJpeg(f"JPEG too large to decode safely: {width}x{height} > {MAX_PIXELS} pixels")
    out = "CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY"
    try:
        simplejpeg.decode_jpeg(data, out, min_height=1, min_width=1, strict=True)
    except ValueError as exc:  # libjpeg errors and, with strict, its warnings (premature end, corrupt data)
        raise BadJpeg(f"corrupt JPEG: {exc}") from None
    return width, height
