"""The report as one self-contained HTML file (figures embedded as base64 PNG, no external
resources), plus the terminal summary table."""
from __future__ import annotations

import base64
import html
import os
from typing import Dict, List

__all__ = ["write_html", "summary_table"]

_CSS = """
:root { --ink:#1d2733; --muted:#5b6877; --line:#dde3ea; --accent:#1f5fa8; --bg:#f6f8fb; --warn:#b5651d; --bad:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:linear-gradient(120deg,#17324d,#1f5fa8); color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 6px; font-size:26px; font-weight:650; letter-spacing:.2px; }
header p { margin:2px 0; color:#d9e6f5; font-size:14px; }
main { max-width:1120px; margin:0 auto; padding:18px 28px 40px; }
nav { margin:14px 0 6px; font-size:14px; }
nav a { color:var(--accent); margin-right:16px; text-decoration:none; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(250px,1fr)); gap:14px; margin:16px 0 8px; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card h3 { margin:0 0 8px; font-size:15px; }
.card table { width:100%; font-size:13.5px; border:none; margin:0; }
.card td { border:none; padding:2px 0; }
.card td.v { text-align:right; font-variant-numeric:tabular-nums; font-weight:600; }
section { background:#fff; border:1px solid var(--line); border-radius:12px; padding:18px 24px 10px; margin:20px 0; }
section h2 { margin:0 0 8px; font-size:20px; }
.howto { background:#eef4fb; border-left:4px solid var(--accent); padding:8px 12px; margin:8px 0 14px;
         font-size:14px; color:#24384f; border-radius:0 6px 6px 0; }
.howto b { color:var(--accent); }
.status { padding:10px 14px; border-radius:8px; margin:10px 0; font-size:14px; }
.status.missing { background:#fff6e5; border:1px solid #f0d29a; color:#6b4a09; }
.status.failed { background:#fdecea; border:1px solid #f2b8b5; color:var(--bad); }
.note { color:var(--warn); font-size:13.5px; margin:6px 0; }
.text { font-size:14px; margin:6px 0; }
.finding { font-size:14px; margin:6px 0; padding:6px 12px; background:#f4f9f1; border-left:4px solid #2e933c;
           border-radius:0 6px 6px 0; }
table { border-collapse:collapse; margin:8px 0 4px; font-size:13.5px; width:100%; }
th, td { border-bottom:1px solid var(--line); padding:5px 8px; text-align:left; vertical-align:top; }
th { background:#f1f4f8; font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.caption { color:var(--muted); font-size:12.5px; margin:2px 0 14px; }
figure { margin:12px 0 18px; text-align:center; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
figcaption { color:var(--muted); font-size:12.5px; margin-top:4px; }
footer { color:var(--muted); font-size:12.5px; max-width:1120px; margin:0 auto; padding:0 28px 30px; }
code { background:#eef1f5; padding:0 4px; border-radius:4px; font-size:12.5px; }
#render-check { display:none; }
"""

# Marks every image that failed to load (for the headless-browser check and for a person reading
# the page: a broken figure gets a red outline and a note).
_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), bad = 0;
  imgs.forEach(function (im) {
    if (!(im.complete && im.naturalWidth > 0)) {
      bad++; im.setAttribute('data-broken', '1'); im.style.outline = '3px solid #b3261e';
    }
  });
  var el = document.getElementById('render-check');
  el.setAttribute('data-images', imgs.length); el.setAttribute('data-broken', bad);
  el.setAttribute('data-sections', document.querySelectorAll('section[data-section]').length);
  el.textContent = 'images ' + imgs.length + ' broken ' + bad;
  document.body.setAttribute('data-render', bad ? 'broken' : 'ok');
});
"""


def _esc(v) -> str:
    return html.escape(str(v))


def _is_num(s: str) -> bool:
    s = str(s).strip()
    if not s:
        return False
    return s[0].isdigit() or (s[0] in "-+" and s[1:2].isdigit()) or s in ("n/a",)


def _table(headers, rows, caption) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for j, c in enumerate(row):
            cls = ' class="num"' if j > 0 and _is_num(c) else ""
            cells.append(f"<td{cls}>{_esc(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if caption:
        out.append(f'<div class="caption">{_esc(caption)}</div>')
    return "\n".join(out)


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        b64 = base64.b64encode(f.read()).decode("ascii")
    name = os.path.basename(path)
    return f'<img src="data:image/png;base64,{b64}" alt="{_esc(alt)}" data-file="{_esc(name)}">'


def _section(sec) -> str:
    parts = [f'<section id="{sec.key}" data-section="{sec.key}" data-status="{sec.status}">',
             f"<h2>{_esc(sec.title)}</h2>"]
    if sec.howto:
        parts.append(f'<div class="howto"><b>How to read this.</b> {_esc(sec.howto)}</div>')
    if sec.status in ("missing", "failed"):
        label = "Not available" if sec.status == "missing" else "Failed"
        parts.append(f'<div class="status {sec.status}"><b>{label}:</b> {_esc(sec.message)}</div>')
    elif sec.status == "skipped":
        parts.append(f'<div class="status missing"><b>Skipped:</b> {_esc(sec.message or "not run")}</div>')
    for b in sec.blocks:
        kind = b[0]
        if kind == "table":
            parts.append(_table(b[1], b[2], b[3]))
        elif kind == "figure":
            parts.append(f"<figure>{_img(b[1], b[3])}<figcaption>{_esc(b[2])}</figcaption></figure>")
        elif kind == "text":
            parts.append(f'<p class="text">{_esc(b[1])}</p>')
        elif kind == "finding":
            parts.append(f'<p class="finding">{_esc(b[1])}</p>')
        elif kind == "note":
            parts.append(f'<p class="note">&#9888; {_esc(b[1])}</p>')
    if sec.seconds:
        parts.append(f'<div class="caption">Section computed in {sec.seconds:.1f} s.</div>')
    parts.append("</section>")
    return "\n".join(parts)


def _cards(sections, model_labels: List[str], models_info: Dict[str, dict]) -> str:
    out = ['<div class="cards">']
    for label in model_labels:
        rows = []
        info = models_info.get(label, {})
        if info.get("parameters") is not None:
            rows.append(("parameters", f"{info['parameters']:,}"))
        for sec in sections:
            for metric, val in sec.summary.get(label, {}).items():
                rows.append((metric, val))
        body = "".join(f'<tr><td>{_esc(k)}</td><td class="v">{_esc(v)}</td></tr>' for k, v in rows)
        out.append(f'<div class="card"><h3>{_esc(label)}</h3><div class="caption">{_esc(info.get("source", ""))}</div>'
                   f"<table>{body}</table></div>")
    out.append("</div>")
    return "\n".join(out)


def write_html(path: str, *, title: str, subtitle: List[str], sections, model_labels: List[str],
               models_info: Dict[str, dict], footer: List[str]) -> str:
    nav = " ".join(f'<a href="#{s.key}">{_esc(s.title)}</a>' for s in sections)
    doc = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
           f"<header><h1>{_esc(title)}</h1>" + "".join(f"<p>{_esc(s)}</p>" for s in subtitle) + "</header>",
           "<main>", f"<nav>{nav}</nav>", _cards(sections, model_labels, models_info)]
    doc += [_section(s) for s in sections]
    doc.append("</main>")
    doc.append("<footer>" + "<br>".join(_esc(f) for f in footer) + "</footer>")
    doc.append('<div id="render-check"></div>')
    doc.append(f"<script>{_JS}</script></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(doc))
    return path


def summary_table(sections, model_labels: List[str]) -> str:
    """Plain-text table: one row per metric, one column per model."""
    rows = []
    for sec in sections:
        if sec.status in ("missing", "failed"):
            rows.append((f"[{sec.title}]", [sec.status] * len(model_labels)))
            continue
        metrics = []
        for label in list(model_labels) + ["all models"]:
            for m in sec.summary.get(label, {}):
                if m not in metrics:
                    metrics.append(m)
        for m in metrics:
            vals = []
            for label in model_labels:
                v = sec.summary.get(label, {}).get(m)
                if v is None:
                    v = sec.summary.get("all models", {}).get(m, "")
                vals.append(v)
            rows.append((m, vals))
    w0 = max([len(r[0]) for r in rows] + [6])
    ws = [max([len(l)] + [len(str(r[1][j])) for r in rows]) for j, l in enumerate(model_labels)]
    line = "  ".join(["metric".ljust(w0)] + [l.rjust(w) for l, w in zip(model_labels, ws)])
    out = [line, "-" * len(line)]
    for m, vals in rows:
        out.append("  ".join([m.ljust(w0)] + [str(v).rjust(w) for v, w in zip(vals, ws)]))
    return "\n".join(out)
