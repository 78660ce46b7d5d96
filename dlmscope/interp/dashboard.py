"""A static, self-contained HTML feature dashboard, written from a feature report (:mod:`dlmscope.interp.features`).

``write_dashboard(report, out_dir)`` writes::

    out_dir/index.html          the run's header and a table of the report's latents, sortable by clicking a
                                column header (a few lines of vanilla JS; ``index.html#sort=<column>-<asc|desc>``
                                opens it sorted; missing values sort last either way)
    out_dir/latents/<id>.html   one latent: its numbers, the activation histogram (inline SVG), top and
                                importance-weighted windows shaded by activation, logit effects and, for a
                                diffusion LM, the latent at [MASK] positions (masked vs clean frequency, masked
                                windows with the hidden token shown at the mask, the hidden-token distribution)

No server, no network: CSS and JS are inline, and every page carries a Content-Security-Policy that blocks any
external load (a browser reports a blocked load as a console error). Every token and text of the report is
escaped (tokens can be ``<``, ``&`` or quotes). A page of 12 top, 7 importance and 12 masked windows of 21 tokens
is about 24 KB, an index of 50 latents about 21 KB.

The report (:mod:`dlmscope.interp.report` gives its shape) is validated first, each latent's ``top`` windows
required (:data:`REQUIRE_ENTRY`); a bad one raises ``ValueError`` naming the latent and field before anything is
written.
"""
from __future__ import annotations

import html
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dlmscope.util import atomic
from .report import LATENT_KEY, validate_report

__all__ = ["REQUIRE_ENTRY", "write_dashboard"]

#: what a latent's page cannot be drawn without (every other part of the report is optional)
REQUIRE_ENTRY = ("top",)
#: blocks every load but the page's own inline style and script: the site must not reach out
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_MISSING = "—"

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;padding:0 1.5em;max-width:80em;color:#222}
h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.15em;margin:1.6em 0 .4em}
table{border-collapse:collapse}th,td{padding:.2em .7em;border-bottom:1px solid #e3e3e3;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th button{font:inherit;font-weight:600;border:0;background:none;padding:0;cursor:pointer;color:inherit}
th[aria-sort=ascending] button::after{content:" \\25B2"}th[aria-sort=descending] button::after{content:" \\25BC"}
.run,.muted{color:#666}.run b{color:#222}
code,.win{font-family:ui-monospace,Menlo,Consolas,monospace}
.win{font-size:13px;line-height:2;white-space:nowrap;overflow-x:auto}
.win b{display:inline-block;width:4.5em;color:#666;font-weight:400}
.win span{white-space:pre;padding:.1em .12em;margin-right:1px;border-radius:2px;background:rgba(235,100,0,var(--a,0))}
.win span.c{outline:2px solid #1f5fbf}
.cols{display:flex;flex-wrap:wrap;gap:1em 4em}
.bar{display:inline-block;height:.8em;background:#1f5fbf}
svg rect{fill:#eb6400}svg text{font-size:11px;fill:#555}
"""

# The index's sorter: a click on a header sorts by that column (numbers first descending, text ascending; a second
# click reverses); missing values (data-v="") sort last either way. The page opens sorted by the URL's
# #sort=<key>-<dir>, else by latent id; data-sorted on the table records the order (tests read it).
_SORT_JS = """
(function () {
  "use strict";
  var table = document.getElementById("latents"), body = table.tBodies[0], heads = table.tHead.rows[0].cells;
  function sortBy(col, dir) {
    var numeric = heads[col].dataset.type === "num", sign = dir === "asc" ? 1 : -1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      if (x === "" || y === "") return (x === "") - (y === "");
      return sign * (numeric ? x - y : x.localeCompare(y));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute("aria-sort");
    heads[col].setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.dataset.sorted = heads[col].dataset.key + "-" + dir;
  }
  function column(key) {
    for (var i = 0; i < heads.length; i++) if (heads[i].dataset.key === key) return i;
    return -1;
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var now = th.getAttribute("aria-sort");
      var dir = now ? (now === "ascending" ? "desc" : "asc") : (th.dataset.type === "num" ? "desc" : "asc");
      sortBy(col, dir);
    });
  });
  var m = /^#sort=([a-z_]+)-(asc|desc)$/.exec(location.hash), col = m ? column(m[1]) : -1;
  if (col >= 0) sortBy(col, m[2]); else sortBy(column("latent"), "asc");
})();
"""


# ---- formatting ---------------------------------------------------------------------------------------------


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _num(x) -> float | None:
    """``x`` as a finite float, or None (missing / not a number / NaN)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        return float(x) if math.isfinite(x) else None
    except OverflowError:  # an int too large for a float
        return None


def _fmt(x, spec: str = ".3g") -> str:
    v = _num(x)
    return _MISSING if v is None else format(v, spec)


def _count(x) -> str:
    v = _num(x)
    return _MISSING if v is None else f"{round(v):,}"


def _token(tok) -> str:
    """A token as shown: escaped, with a newline made visible (it would break the window's line)."""
    return _esc(str(tok).replace("\n", "\u21b5"))


def _text(x) -> str:
    """``x`` escaped, or the missing mark for None / an empty string."""
    return _MISSING if x is None or x == "" else _esc(x)


def _run_line(report: Mapping) -> str:
    """The run's header: model, layer, policy, dictionary size, k, tokens seen, model kind."""
    fields = [("model", _text(report.get("model"))), ("layer", _text(report.get("layer"))),
              ("policy", _text(report.get("policy"))), ("n", _count(report.get("n_latents"))),
              ("k", _count(report.get("k"))), ("tokens seen", _count(report.get("tokens_seen")))]
    if "alive" in report:
        fields.append(("alive", _count(report["alive"])))
    kind = "diffusion LM" if report.get("is_diffusion") else "autoregressive LM"
    return '<p class="run">' + " · ".join(f"{k} <b>{v}</b>" for k, v in fields) + f" · {kind}</p>"


def _page(title: str, body: str, script: str = "") -> str:
    """A complete HTML document: the CSP, the shared inline CSS, ``body`` and an optional inline script."""
    tail = f"<script>{script}</script>\n" if script else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_esc(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n{tail}</body></html>\n")


# ---- the index ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    """One column of the index: its sort key, header, the entry's value (a number, a text, or None when
    missing) and, for numbers, the format spec of the cell (None: a text column)."""

    key: str
    header: str
    value: Callable[[Mapping], float | str | None]
    spec: str | None


def _part(entry: Mapping, section: str, field: str):
    return (entry.get(section) or {}).get(field)


_COLUMNS = (
    _Column("latent", "latent", lambda e: e["latent"], "d"),
    _Column("frequency", "frequency", lambda e: e.get("frequency"), ".3g"),
    _Column("max_act", "max activation", lambda e: e.get("max_act"), ".3g"),
    _Column("accuracy", "interp accuracy", lambda e: _part(e, "interp", "accuracy"), ".2f"),
    _Column("explanation", "explanation", lambda e: _part(e, "interp", "explanation"), None),
    _Column("concept", "planted concept", lambda e: _part(e, "concept", "name"), None),
    _Column("f1", "concept F1", lambda e: _part(e, "concept", "f1"), ".2f"),
)
#: DLM reports only: the latent's frequency at [MASK] positions of corrupted text
_MASKED_COLUMN = _Column("masked_frequency", "masked frequency", lambda e: _part(e, "masked", "frequency"), ".3g")


def _cell(col: _Column, entry: Mapping) -> str:
    """A ``<td>`` whose ``data-v`` is the sort value ("" when missing)."""
    raw = col.value(entry)
    if col.spec is None:
        text = "" if raw is None else str(raw)
        return f'<td data-v="{_esc(text)}">{_esc(text) or _MISSING}</td>'
    v = _num(raw)
    shown = _MISSING if v is None else format(int(v) if col.spec == "d" else v, col.spec)
    if col.key == "latent":
        shown = f'<a href="latents/{int(v)}.html">{shown}</a>'
    return f'<td class="n" data-v="{"" if v is None else repr(v)}">{shown}</td>'


def _index_page(report: Mapping, entries: list[Mapping]) -> str:
    columns = _COLUMNS + ((_MASKED_COLUMN,) if report.get("is_diffusion") else ())
    head = "".join(f'<th data-key="{c.key}" data-type="{"text" if c.spec is None else "num"}">'
                   f'<button type="button">{c.header}</button></th>' for c in columns)
    rows = "\n".join("<tr>" + "".join(_cell(c, e) for c in columns) + "</tr>" for e in entries)
    body = (f"<h1>Feature dashboard</h1>\n{_run_line(report)}\n"
            f'<p class="muted">{len(entries)} latents. Click a column header to sort.</p>\n'
            f'<table id="latents"><thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody></table>')
    return _page(f"{report.get('model') or 'SAE'} layer {report.get('layer', '?')}: features", body, _SORT_JS)


# ---- a latent's page ----------------------------------------------------------------------------------------


def _window(w: Mapping, scale: float) -> str:
    """One window as a line of tokens, each shaded by activation / ``scale`` (clipped to [0, 1]) with its value
    as tooltip; the centre is outlined, and in a masked window it shows the hidden token (``[MASK→paris]``)."""
    centre = w.get("centre")
    spans = []
    for i, (tok, value) in enumerate(zip(w["tokens"], w["values"])):
        v = _num(value) or 0.0
        text = str(tok)
        if i == centre and "hidden" in w:
            hidden = str(w["hidden"])
            bracketed = text.startswith("[") and text.endswith("]")                # [MASK] -> [MASK→paris]
            text = f"{text[:-1]}\u2192{hidden}]" if bracketed else f"{text}\u2192{hidden}"
        a = min(max(v / scale, 0.0), 1.0)
        style = f' style="--a:{a:.2f}"' if a >= 0.005 else ""
        cls = ' class="c"' if i == centre else ""
        spans.append(f'<span{cls}{style} title="{v:.3g}">{_token(text)}</span>')
    peak = _fmt(w["values"][centre]) if isinstance(centre, int) else ""
    return f'<div class="win"><b>{peak}</b>{"".join(spans)}</div>'


def _windows(title: str, windows: list, scale: float, note: str = "") -> str:
    body = "\n".join(_window(w, scale) for w in windows) or '<p class="muted">none in this report</p>'
    return f"<h2>{title}</h2>\n{note}{body}"


def _histogram_svg(hist: Mapping | None, width: int = 640, height: int = 150) -> str:
    """The activation histogram as an inline SVG bar chart, one equal-width bar per bin (the report's bins may be
    log-spaced), trimmed to the bins from the first to the last non-empty one; each bar's tooltip gives its range
    and count."""
    counts = list((hist or {}).get("counts", []))
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return '<p class="muted">no histogram in this report</p>'
    lo, hi = nonzero[0], nonzero[-1] + 1
    counts, edges = counts[lo:hi], list(hist["edges"][lo:hi + 1])
    top, bar_w, plot_h = max(counts), width / len(counts), height - 20
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        bars.append(f'<rect x="{i * bar_w:.1f}" y="{12 + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                    f'height="{h:.1f}"><title>[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {_count(c)}</title></rect>')
    labels = (f'<text x="0" y="10">{_count(top)}</text>'
              f'<text x="0" y="{height + 4}">{_fmt(edges[0])}</text>'
              f'<text x="{width}" y="{height + 4}" text-anchor="end">{_fmt(edges[-1])}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 8}" '
            f'viewBox="0 0 {width} {height + 8}" role="img" aria-label="histogram of non-zero activations">'
            f'{"".join(bars)}{labels}</svg>\n'
            '<p class="muted">non-zero activations: one bar per bin of the report (equal widths), '
            'from the first to the last non-empty bin; hover a bar for its range and count</p>')


def _pair_table(title: str, header: str, pairs: list, spec: str) -> str:
    rows = "".join(f"<tr><td><code>{_token(t)}</code></td><td class=\"n\">{_fmt(v, spec)}</td></tr>"
                   for t, v in pairs)
    return (f"<div><h3>{title}</h3><table><thead><tr><th>token</th><th>{header}</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>") if rows else f'<div><h3>{title}</h3><p class="muted">none</p></div>'


def _facts(entry: Mapping) -> str:
    """The latent's numbers: frequency, firings, max activation, explanation and planted concept."""
    interp, concept = entry.get("interp") or {}, entry.get("concept") or {}
    rows = [("frequency", _fmt(entry.get("frequency"))), ("fired", _count(entry.get("n_fired"))),
            ("max activation", _fmt(entry.get("max_act")))]
    if interp:
        judge = f' <span class="muted">(judge: {_esc(interp["judge"])})</span>' if interp.get("judge") else ""
        rows.append(("explanation", _text(interp.get("explanation"))))
        rows.append(("interp accuracy", _fmt(interp.get("accuracy"), ".2f") + judge))
    if concept:
        rows.append(("planted concept", f"{_text(concept.get('name'))} (F1 {_fmt(concept.get('f1'), '.2f')})"))
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _masked_section(entry: Mapping, scale: float) -> str:
    """DLMs: the latent at [MASK] positions of corrupted text next to the clean text."""
    m = entry["masked"]
    clean_f, masked_f = _num(entry.get("frequency")), _num(m.get("frequency"))
    ratio = f" (masked / clean = {masked_f / clean_f:.3g})" if clean_f and masked_f is not None else ""
    table = ("<table><thead><tr><th></th><th>clean</th><th>masked positions</th></tr></thead><tbody>"
             f"<tr><th>frequency</th><td class=\"n\">{_fmt(clean_f)}</td><td class=\"n\">{_fmt(masked_f)}</td></tr>"
             f"<tr><th>fired</th><td class=\"n\">{_count(entry.get('n_fired'))}</td>"
             f"<td class=\"n\">{_count(m.get('n_fired'))}</td></tr>"
             f"<tr><th>max activation</th><td class=\"n\">{_fmt(entry.get('max_act'))}</td>"
             f"<td class=\"n\">{_fmt(m.get('max_act'))}</td></tr></tbody></table>")
    hidden = m.get("hidden_tokens") or []
    most = max((c for _, c in hidden), default=0) or 1
    dist = "".join(f"<tr><td><code>{_token(t)}</code></td><td class=\"n\">{_count(c)}</td>"
                   f"<td><span class=\"bar\" style=\"width:{100 * c / most:.0f}px\"></span></td></tr>"
                   for t, c in hidden)
    dist = (f"<table><thead><tr><th>hidden token</th><th>windows</th><th></th></tr></thead><tbody>{dist}</tbody>"
            "</table>") if dist else '<p class="muted">none in this report</p>'
    return (f'<section id="masked"><h2>Masked vs unmasked</h2>\n<p>The latent at [MASK] positions of corrupted text'
            f"{ratio}.</p>\n{table}\n"
            + _windows("Top activations at [MASK] positions", m.get("top", []), scale,
                       '<p class="muted">the outlined token is the [MASK]; after the arrow, the token it hid</p>\n')
            + f"\n<h3>Hidden-token distribution (top windows)</h3>\n{dist}</section>")


def _colour_scale(entry: Mapping) -> float:
    """The activation that gets full shade on this latent's page: the largest of the clean and masked maxima
    and every window value, so clean and masked windows share one scale."""
    windows = entry["top"] + entry.get("importance", []) + (entry.get("masked") or {}).get("top", [])
    found = [_num(entry.get("max_act")), _num(_part(entry, "masked", "max_act"))]
    found += [_num(v) for w in windows for v in w["values"]]
    return max((v for v in found if v is not None), default=0.0) or 1.0


def _latent_page(report: Mapping, entry: Mapping, prev_id: int | None, next_id: int | None) -> str:
    f = entry["latent"]
    scale = _colour_scale(entry)
    nav = ['<a href="../index.html">\u2190 all latents</a>']
    if prev_id is not None:
        nav.append(f'<a href="{prev_id}.html" rel="prev">\u2039 {prev_id}</a>')
    if next_id is not None:
        nav.append(f'<a href="{next_id}.html" rel="next">{next_id} \u203a</a>')
    logits = entry.get("logits") or {}
    parts = [f"<nav>{' · '.join(nav)}</nav>", f"<h1>Latent {f}</h1>", _run_line(report), _facts(entry),
             "<h2>Activation histogram</h2>", _histogram_svg(entry.get("histogram")),
             _windows("Top activations", entry["top"], scale,
                      f'<p class="muted">shade: activation / {scale:.3g}; the outlined token is the window\'s '
                      "centre; hover a token for its activation</p>\n"),
             _windows("Importance-weighted samples", entry.get("importance", []), scale),
             "<h2>Logit effects</h2>",
             '<div class="cols">' + _pair_table("Promoted", "logit", logits.get("promoted", []), "+.3g")
             + _pair_table("Suppressed", "logit", logits.get("suppressed", []), "+.3g") + "</div>"]
    if report.get("is_diffusion") and entry.get("masked") is not None:
        parts.append(_masked_section(entry, scale))
    return _page(f"Latent {f} · {report.get('model') or 'SAE'} layer {report.get('layer', '?')}", "\n".join(parts))


# ---- the site -----------------------------------------------------------------------------------------------


def write_dashboard(report: Mapping, out_dir: str | os.PathLike) -> Path:
    """Write ``index.html`` and ``latents/<id>.html`` for every latent of ``report`` under ``out_dir`` (created)
    and return the index's path. Files are written atomically, the latent pages first, so the index never links
    to a missing page; pages of latents no longer in the report (left by an earlier run) are removed."""
    validate_report(report, require_entry=REQUIRE_ENTRY)
    out = Path(out_dir)
    pages = out / "latents"
    pages.mkdir(parents=True, exist_ok=True)
    ids = sorted(int(k) for k in report["latents"])
    entries = [{**report["latents"][str(f)], "latent": f} for f in ids]
    for i, entry in enumerate(entries):
        prev_id = ids[i - 1] if i > 0 else None
        next_id = ids[i + 1] if i + 1 < len(ids) else None
        atomic.write_text(pages / f"{entry['latent']}.html", _latent_page(report, entry, prev_id, next_id))
    index = out / "index.html"
    atomic.write_text(index, _index_page(report, entries))
    keep = {f"{f}.html" for f in ids}
    for page in pages.iterdir():
        if page.name not in keep and page.suffix == ".html" and LATENT_KEY.fullmatch(page.stem):
            page.unlink()
    return index
