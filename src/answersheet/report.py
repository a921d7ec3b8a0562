"""report.html: what a reviewer opens first. Drift flags and the images to review first on top, then counts,
per-camera figures, class and confidence histograms (inline SVG), stratified samples (every camera, lowest
confidence, empty, short sets) whose thumbnails open the full-size image with its boxes, rejections, and the
model, settings and timings that made the sheet.

Rejections are counts per kind plus the first rows (preprocess caps them): one row per rejected member made a
38 MB page (11 KB now) for a day with 200k junk members.

Rendered with Jinja2 (autoescaping: road names, class names and rejection reasons are data). Boxes are drawn
with Pillow and a TrueType font scaled to the image (`label_font`): yolov5's `Annotator` needs torch and cv2
(not in the slim preprocess image) and downloads Arial.ttf at run time (stage pods have no internet).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape
from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#ff3838", "#2c99a8", "#ff701f", "#6473ff", "#cfd231", "#48f90a", "#92cc17", "#3ddb86",
           "#1a9334", "#00d4bb", "#ff9d97", "#00c2ff", "#344593", "#ff95c8", "#8438ff", "#cb38ff"]
# TrueType fonts tried in order: CJK/Korean first (class names may be Korean), then DejaVu, then Pillow's own
# scalable default (Pillow >= 10.1, Latin only). $ANSWERSHEET_FONT wins.
FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/nanum/NanumGothicBold.ttf",  # the preprocess image's (fonts-nanum)
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)
THUMB_WIDTH = 640  # thumbnails are shown at 320 CSS px: sharp on 2x screens
THUMB_FONT_PX = 24  # ... so their tags show at 12 CSS px
FONT_SCALE = 0.022  # tag text height / image width: 14 px on a 640 px thumbnail, 42 px on a 1920 px original
CJK_FONT_STACK = ('system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK KR", "Apple SD Gothic Neo", '
                  '"Malgun Gothic", "NanumGothic", sans-serif')


@lru_cache(maxsize=32)
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A scalable font of `size` px for box tags (first of $ANSWERSHEET_FONT, FONT_CANDIDATES, Pillow's)."""
    for path in (os.environ.get("ANSWERSHEET_FONT"), *FONT_CANDIDATES):
        if path and Path(path).is_file():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default(size=size)


def draw_boxes(jpeg: bytes, boxes: Sequence[dict[str, Any]], width: int | None = None,
               font_px: int | None = None) -> bytes:
    """The image (scaled to `width` px, or full size) with its boxes and `class conf` tags; JPEG bytes.

    `boxes` are predictions-file boxes (`class_id`, `class`, `confidence` or None, normalised `box`).
    Line width and tag font scale with the image so tags stay readable on thumbnails and originals alike.
    """
    with Image.open(io.BytesIO(jpeg)) as src:
        im = src.convert("RGB")
        if width and im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(im)
    w, h = im.size
    font = label_font(font_px or max(12, round(w * FONT_SCALE)))
    line = max(2, round(w / 320))
    for b in boxes:
        color = PALETTE[b["class_id"] % len(PALETTE)]
        cx, cy, bw, bh = b["box"]
        x0, y0, x1, y1 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
        tag = b["class"] if b.get("confidence") is None else f"{b['class']} {b['confidence']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the top edge
        tx = max(0, min(x0, w - tw))  # kept inside the image at the right edge
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.text((tx + line - left, ty + line - top), tag, fill="white", font=font)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()


def bar_svg(items: Sequence[tuple[str, float]], width: int = 520, bar: int = 18, fmt: str = "{:g}") -> str:
    """A horizontal bar chart as inline SVG (labels left, values right); '' for no items."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1
    label_w, value_w = 170, 60
    span = width - label_w - value_w
    rows = []
    for i, (label, value) in enumerate(items):
        y = i * (bar + 4)
        bw = max(1.0, span * value / top) if value else 0
        rows.append(
            f'<text x="{label_w - 6}" y="{y + bar - 4}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{bw:.1f}" height="{bar}" fill="#4c78a8"/>'
            f'<text x="{label_w + bw + 4:.1f}" y="{y + bar - 4}">{fmt.format(value)}</text>'
        )
    height = len(items) * (bar + 4)
    return (f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(rows)}</svg>')


def confidence_bins(confs: Sequence[float], low: float, n: int = 10) -> list[tuple[str, int]]:
    """Counts of confidences in n equal bins from `low` (the threshold) to 1."""
    low = min(low, min(confs, default=low))
    step = (1 - low) / n or 1
    counts = [0] * n
    for c in confs:
        counts[min(n - 1, int((c - low) / step))] += 1
    return [(f"{low + i * step:.2f}–{low + (i + 1) * step:.2f}", counts[i]) for i in range(n)]


TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="ko"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: {{ font_stack }}; margin: 2em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flags { background: #fff4e5; border: 1px solid #f0a040; padding: .6em 1em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 320px; }
figure img { width: 320px; height: auto; display: block; border: 1px solid #ccc; }
figcaption { font-size: .85em; word-break: break-all; }
.chart text { font-size: 12px; fill: #222; }
.muted { color: #777; }
code { font-size: .9em; }
</style></head>
<body>
<h1 id="road-name">{{ road_name }}</h1>
<p class="muted">{{ road_id }} · {{ day }} · answer sheet</p>

{% if drift_flags %}<div class="flags" id="drift"><h2>Drift across days</h2>
<p>Compared with the road's last {{ drift.days|length }} published day(s): {{ drift.days|join(", ") }}.
Flags never fail the run; they say where to look.</p>
<table><tr><th>camera</th><th>what</th><th>today</th><th>usual</th><th>why it matters</th></tr>
{% for f in drift_flags %}<tr><td>{{ f.camera }}</td><td>{{ f.metric }}</td><td class="num">{{ f.today }}</td>
<td class="num">{{ f.baseline }}</td><td>{{ f.note }}</td></tr>{% endfor %}</table></div>
{% elif drift.note %}<p class="muted" id="drift">Drift: {{ drift.note }}</p>{% endif %}

<h2 id="review-first">Review first ({{ review|length }})</h2>
<p class="muted">Highest review priority: boxes near the threshold, low mean confidence, tiny boxes, passes
that disagree (datasheet column <code>review_priority</code>; Label Studio tasks are in this order).</p>
{{ grid(review) }}

<h2>Counts</h2>
<table><tr><th>status</th><th>images</th><th>meaning</th></tr>
{% for s in statuses %}
<tr><td>{{ s.name }}</td><td class="num">{{ s.count }}</td><td>{{ s.meaning }}</td></tr>
{% endfor %}
</table>
<p>{{ counts.sets }} sets, {{ counts.short_sets }} short, {{ counts.boxes }} boxes.</p>

<h2>Per camera</h2>
<table><tr><th>camera</th><th>images</th><th>detected</th><th>empty</th><th>not detected</th><th>boxes/image</th>
<th>mean confidence</th></tr>
{% for c in cameras %}
<tr><td>{{ c.camera }}</td><td class="num">{{ c.images }}</td><td class="num">{{ c.detected }}</td>
<td class="num">{{ c.empty }}</td><td class="num">{{ c.not_detected }}</td>
<td class="num">{{ c.boxes_per_image if c.boxes_per_image is not none else "–" }}</td>
<td class="num">{{ c.mean_conf if c.mean_conf is not none else "–" }}</td></tr>{% endfor %}
</table>

<h2>Boxes per class</h2>
{{ class_svg|safe if class_svg else "<p class='muted'>No boxes.</p>"|safe }}
<h2>Confidence</h2>
{{ conf_svg|safe if conf_svg else "<p class='muted'>No boxes, so no confidences.</p>"|safe }}

<h2>Samples</h2>
{% for section in samples %}<h3>{{ section.title }} ({{ section.rows|length }})</h3>
{{ grid(section.rows) if section.rows else "<p class='muted'>None.</p>"|safe }}{% endfor %}

<h2>Short sets ({{ short_sets|length }})</h2>
{% if short_sets %}<table><tr><th>set</th><th>missing cameras</th></tr>
{% for s, m in short_sets.items() %}<tr><td>{{ s }}</td><td>{{ m|join(", ") }}</td></tr>{% endfor %}</table>{% endif %}

<h2>Rejected ({{ rejected_total }})</h2>
{% if rejected_reasons %}<table><tr><th>kind</th><th>count</th></tr>
{% for reason, n in rejected_reasons %}<tr><td>{{ reason }}</td><td class="num">{{ n }}</td></tr>{% endfor %}</table>
<table><tr><th>name</th><th>reason</th></tr>
{% for r in rejected %}<tr><td>{{ r.name }}</td><td>{{ r.note }}</td></tr>{% endfor %}</table>
{% if rejected_total > rejected|length %}<p class="muted">First {{ rejected|length }} shown (counts per kind
above, summary rows in <a href="datasheet.csv">datasheet.csv</a>): every ingest rejection is in
<code>{{ rejected_full_list or "the ingest manifest" }}</code>, every detect failure in the detect manifests.
</p>{% endif %}{% endif %}

{% if unusable_sets %}<h2>Sets without a usable image ({{ unusable_sets|length }})</h2>
<p>Reported, not filled with placeholder labels.</p>
<table><tr><th>set</th></tr>{% for s in unusable_sets %}<tr><td>{{ s }}</td></tr>{% endfor %}</table>{% endif %}

<h2>Model and settings</h2>
<table>{% for k, v in model %}<tr><th>{{ k }}</th><td><code>{{ v }}</code></td></tr>{% endfor %}</table>

<section id="timings"><h2>Timings</h2>
<table>{% for k, v in timings %}<tr><th>{{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}</table></section>

<h2>Files</h2>
<p><a href="datasheet.csv">datasheet.csv</a> · <a href="data.yaml">data.yaml</a> ·
<a href="coco/instances.json">coco/instances.json</a> · <a href="coco/results.json">coco/results.json</a> ·
<a href="cvat/coco-1.0.zip">cvat/coco-1.0.zip</a> · <a href="label-studio/tasks.json">label-studio/tasks.json</a> ·
<a href="predictions.jsonl">predictions.jsonl</a> · <a href="manifest.json">manifest.json</a></p>
</body></html>
""", autoescape=True, trim_blocks=True, lstrip_blocks=True)

GRID = jinja2.Template("""<div class="grid">{% for s in items %}<figure>
<a href="{{ s.full }}"><img src="{{ s.thumb }}" alt="{{ s.name }}" loading="eager"></a>
<figcaption><a href="{{ s.image }}">{{ s.name }}</a><br>{{ s.status }}{% if s.boxes %} · {{ s.boxes }} boxes{% endif %}
{% if s.mean_conf is not none %} · mean {{ "%.2f"|format(s.mean_conf) }}{% endif %}
{% if s.review_priority is not none %} · priority {{ "%.2f"|format(s.review_priority) }}{% endif %}
</figcaption></figure>{% endfor %}</div>""", autoescape=True)

STATUS_MEANINGS = {
    "detected": "the detector looked and found boxes",
    "empty": "the detector looked and found nothing (a true empty label)",
    "not_detected": "camera not sent to the detector: no label",
    "missing": "short set: the camera's image is missing",
    "rejected": "the image was rejected (ingest or detect); see below",
    "failed": "the detector could not read the image",
}


def render_html(ctx: dict[str, Any]) -> str:
    """The report page from a context (datasheet.report_context). No wall-clock time in it: only the
    timings section changes between re-runs (tests compare the rest byte for byte)."""
    return TEMPLATE.render(font_stack=CJK_FONT_STACK, grid=lambda items: Markup(GRID.render(items=items)),
                           **ctx)
