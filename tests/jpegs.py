"""Odd JPEGs made from a real photo, shared by the decode tests (test_detect_inference.py) and the detect
stage's failure handling (test_detect.py): a plain module, nothing happens on import."""

from __future__ import annotations

import io


def _jpeg(im, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _patch_sof(data: bytes, marker: int | None = None, bits: int | None = None,
               size: tuple[int, int] | None = None) -> bytes:
    """The same JPEG with its baseline frame header (FFC0) changed: another SOF type, precision or size."""
    i = data.index(b"\xff\xc0")
    out = bytearray(data)
    if marker is not None:
        out[i + 1] = marker
    if bits is not None:
        out[i + 4] = bits
    if size is not None:
        out[i + 5 : i + 9] = size[1].to_bytes(2, "big") + size[0].to_bytes(2, "big")
    return bytes(out)


def odd_jpegs(photo) -> dict[str, bytes]:
    """JPEG oddities made from a real photo: extreme shapes, colour models, encodings, orientation, headers.

    Neither Pillow nor OpenCV writes 12- or 16-bit JPEGs, so those are the photo's bytes with the frame
    header claiming 12-bit extended (SOF1) and 16-bit lossless (SOF3) precision; `claims_65000x65000`
    claims a 4.2-gigapixel frame in a few kB (12.7 GB once decoded).
    """
    from PIL import Image

    with Image.open(photo) as src:
        rgb = src.convert("RGB")
    small = rgb.resize((320, 180))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return {
        "1x1": _jpeg(rgb.resize((1, 1))),
        "8x60000": _jpeg(rgb.resize((8, 60000))),
        "60000x8": _jpeg(rgb.resize((60000, 8))),
        "cmyk": _jpeg(small.convert("CMYK")),
        "grayscale": _jpeg(small.convert("L")),
        "progressive": _jpeg(small, progressive=True),
        "exif_rotated": _jpeg(small, exif=exif),
        "claims_12bit": _patch_sof(_jpeg(small), marker=0xC1, bits=12),
        "claims_16bit_lossless": _patch_sof(_jpeg(small), marker=0xC3, bits=16),
        "claims_65000x65000": _patch_sof(_jpeg(small), size=(65000, 65000)),
    }


# what `yolov5 detect` (and so detect) must make of each: decoded like cv2.imread, or refused with this reason
ODD_REFUSED = {
    "8x60000": "too thin to letterbox",
    "60000x8": "too thin to letterbox",
    "claims_12bit": "corrupt JPEG",
    "claims_16bit_lossless": "corrupt JPEG",
    "claims_65000x65000": "above the decode limit",
}
