"""A report a person can look at: summary tables and sample images with their boxes drawn."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

PALETTE = ["#ff3838", "#2c99a8", "#ff701f", "#6473ff", "#cfd231", "#48f90a", "#92cc17", "#3ddb86",
           "#1a9334", "#00d4bb", "#ff9d97", "#00c2ff", "#344593", "#ff95c8", "#8438ff", "#cb38ff"]


def parse_yolo_label(text: str) -> list[tuple[int, float, float, float, float]]:
    """YOLO label lines `cls cx cy w h [conf]` -> tuples (normalised coordinates)."""
    boxes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5:
            boxes.append((int(float(parts[0])), *(float(p) for p in parts[1:5])))
    return boxes


def draw_boxes(jpeg: bytes, label_text: str, classes: Sequence[str], width: int = 960) -> bytes:
    """The image scaled to `width` px with its boxes and class names drawn; JPEG bytes (deterministic)."""
    with Image.open(io.BytesIO(jpeg)) as im:
        im = im.convert("RGB")
        scale = min(1.0, width / im.width)
        im = im.resize((round(im.width * scale), round(im.height * scale)))
    draw = ImageDraw.Draw(im)
    w, h = im.size
    for cls, cx, cy, bw, bh in parse_yolo_label(label_text):
        color = PALETTE[cls % len(PALETTE)]
        x0, y0, x1, y1 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
        draw.rectangle((x0, y0, x1, y1), outline=color, width=3)
        name = classes[cls] if 0 <= cls < len(classes) else str(cls)
        tw = draw.textlength(name) + 6
        draw.rectangle((x0, max(0, y0 - 14), x0 + tw, max(14, y0)), fill=color)
        draw.text((x0 + 3, max(0, y0 - 13)), name, fill="white")
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def pick_samples(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The n images with the most boxes (ties by name), for the report."""
    with_boxes = [r for r in rows if r["status"] == "detected"]
    return sorted(with_boxes, key=lambda r: (-r["boxes"], r["name"]))[:n]


REJECTED_ROWS = 50  # rejected rows shown one by one; the rest are counted per kind


def render_html(title: str, counts: dict[str, Any], per_class: dict[str, int], short_sets: dict[str, list[str]],
                rejected: Sequence[dict[str, Any]], samples: Sequence[tuple[str, dict[str, Any]]],
                rejections: dict[str, Any] | None = None, unusable_sets: Sequence[str] = ()) -> str:
    """The report page (no timestamps: re-runs give the same bytes).

    Rejections are a table of counts per kind plus the first REJECTED_ROWS rows: one row per rejected
    member made a 38 MB page (11 KB now) for a day with 200k junk members.
    """
    e = html.escape

    def table(head: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
        ths = "".join(f"<th>{e(str(h))}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><tr>{ths}</tr>{trs}</table>"

    parts = [
        "<!doctype html><html lang='ko'><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;"
        "margin:1em 0}}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "figure{display:inline-block;margin:8px}img{max-width:480px;display:block}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<h2>Counts</h2>", table(["what", "count"], [[k, v] for k, v in counts.items() if not isinstance(v, dict)]),
        "<h2>Boxes per class</h2>", table(["class", "boxes"], sorted(per_class.items(), key=lambda kv: -kv[1])),
        f"<h2>Short sets ({len(short_sets)})</h2>",
        table(["set", "missing cameras"], [[s, ", ".join(m)] for s, m in short_sets.items()]),
        *([f"<h2>Sets without a usable image ({len(unusable_sets)})</h2>",
           "<p>Reported, not filled with placeholder labels.</p>", table(["set"], [[s] for s in unusable_sets])]
          if unusable_sets else []),
        *_rejected_section(table, rejected, rejections or {}),
        f"<h2>Samples ({len(samples)} images with the most boxes)</h2>",
    ]
    for src, row in samples:
        parts.append(f"<figure><img src='{e(src)}' alt='{e(row['name'])}'>"
                     f"<figcaption>{e(row['name'])} — {row['boxes']} boxes</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _rejected_section(table, rejected: Sequence[dict[str, Any]], rejections: dict[str, Any]) -> list[str]:
    """Counts per kind, the first REJECTED_ROWS rejected rows, and where the rest are listed."""
    e = html.escape
    total = rejections.get("total", len(rejected))
    parts = [f"<h2>Rejected ({total})</h2>"]
    if rejections.get("by_kind"):
        parts.append(table(["kind", "count"], list(rejections["by_kind"].items())))
    shown = list(rejected[:REJECTED_ROWS])
    parts.append(table(["name", "reason"], [[r["name"], r["note"]] for r in shown]))
    if total > len(shown):
        where = rejections.get("full_list", "the ingest manifest")
        parts.append(f"<p>{total - len(shown)} more not listed here: every ingest rejection is in {e(where)}, "
                     "every detect failure in the detect manifests.</p>")
    return parts
