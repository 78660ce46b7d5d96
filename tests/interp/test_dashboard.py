"""dlmscope.interp.dashboard: the static site's structure, escaping and validation, and the pages in headless Chromium
(the DOM after the sorting JS ran, no console errors, screenshots kept under tmp_path).

Chromium (150, Debian) prints every console message of a page, whatever its level, and every uncaught exception
to stderr under ``--enable-logging=stderr`` as one line::

    [pid:tid:date/time:INFO:CONSOLE:5] "Uncaught ReferenceError: f is not defined", source: file:///…/x.html (5)

(``CONSOLE(5)`` in older builds; 5 is the line). The level is not shown, so the check rejects every console
message whose source is one of our files: the dashboard's JS logs nothing, and a load that the pages'
Content-Security-Policy blocks is reported the same way. A page with a deliberate ``console.error`` and a
deliberate uncaught error is the negative control.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dlmscope.interp.dashboard import REQUIRE_ENTRY, write_dashboard
from dlmscope.interp.report import validate_report

EVIL = '<script>alert("x")</script>'


def _window(tokens, values, centre, hidden=None):
    w = {"tokens": list(tokens), "values": list(values), "centre": centre}
    if hidden is not None:
        w["hidden"] = hidden
    return w


def _entry(f: int, *, dlm: bool, windows: int = 3, width: int = 21, accuracy=0.5, bins: int = 36) -> dict:
    """A latent entry with ``windows`` top / importance (/ masked) windows of ``width`` tokens."""
    c = width // 2
    words = [f"w{i}" for i in range(width)]
    values = [0.0] * width
    values[c], values[c - 1] = 2.0 + f % 3, 0.5
    entry = {
        "latent": f, "frequency": 0.001 * (f + 1), "n_fired": 10 * (f + 1), "max_act": 3.0 + f % 3,
        "histogram": {"edges": [10 ** (-3 + i / 6) for i in range(bins + 1)],
                      "counts": [0] * 10 + [5, 40, 7] + [0] * (bins - 13)},
        "top": [_window(words, values, c) for _ in range(windows)],
        "importance": [_window(words, [v / 2 for v in values], c) for _ in range(windows)],
        "logits": {"promoted": [["paris", 1.2], ["rome", 0.8]], "suppressed": [["dog", -0.9]]},
        "interp": {"explanation": f"explanation {f}", "accuracy": accuracy, "judge": "planted"},
        "concept": {"name": "place", "f1": 0.74},
    }
    if dlm:
        masked = words[:c] + ["[MASK]"] + words[c + 1:]
        entry["masked"] = {"frequency": 0.02, "n_fired": 800, "max_act": 4.0,
                           "top": [_window(masked, values, c, hidden="paris") for _ in range(windows)],
                           "hidden_tokens": [["paris", 12], ["rome", 3]]}
    return entry


def _report(ids=(3, 17, 5), *, dlm: bool = True, **kw) -> dict:
    return {"model": "world-dlm", "layer": 4, "policy": "unmask", "n_latents": 512, "k": 8, "tokens_seen": 200000,
            "is_diffusion": dlm, "latents": {str(f): _entry(f, dlm=dlm, **kw) for f in ids}}


class _Tags(HTMLParser):
    """Start tags of a document as ``(tag, attrs dict)`` and its text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


# ---- structure ----------------------------------------------------------------------------------------------


def test_writes_index_and_one_page_per_latent_and_every_link_resolves(tmp_path):
    index = write_dashboard(_report(), tmp_path / "site")
    assert index == tmp_path / "site" / "index.html"
    assert sorted(p.name for p in (tmp_path / "site" / "latents").iterdir()) == ["17.html", "3.html", "5.html"]
    for page in [index, *sorted((tmp_path / "site" / "latents").iterdir())]:
        tags = _Tags(page.read_text())
        hrefs = [a["href"] for a in tags.all("a")]
        assert hrefs, page
        for href in hrefs:
            assert (page.parent / href).resolve().is_file(), (page, href)
        # self-contained: nothing is loaded from anywhere
        assert not tags.all("link") and not tags.all("img")
        assert all("src" not in a for a in tags.all("script"))
        assert "http://" not in page.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
    rows = [a["href"] for a in _Tags(index.read_text()).all("a")]
    assert rows == ["latents/3.html", "latents/5.html", "latents/17.html"]     # by latent id


def test_index_has_the_header_and_sortable_columns(tmp_path):
    text = write_dashboard(_report(), tmp_path).read_text()
    for field in ("world-dlm", "layer <b>4</b>", "unmask", "n <b>512</b>", "k <b>8</b>", "200,000"):
        assert field in text
    heads = {a["data-key"]: a["data-type"] for a in _Tags(text).all("th")}
    assert heads == {"latent": "num", "frequency": "num", "max_act": "num", "accuracy": "num",
                     "explanation": "text", "concept": "text", "f1": "num", "masked_frequency": "num"}
    assert "masked frequency" in text


def test_every_token_and_text_is_escaped(tmp_path):
    report = _report(ids=(1,))
    entry = report["latents"]["1"]
    entry["top"][0]["tokens"][10] = EVIL
    entry["top"][0]["tokens"][0] = 'a"b&c'
    entry["interp"]["explanation"] = 'quotes " and <b>tags</b> & co'
    entry["logits"]["promoted"][0][0] = "<img src=x>"
    entry["masked"]["top"][0]["hidden"] = "</span><i>"
    index = write_dashboard(report, tmp_path)
    page = (tmp_path / "latents" / "1.html").read_text()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page and "<img" not in page and "<i>" not in page   # the latent page has no JS
    assert "a&quot;b&amp;c" in page and "[MASK→&lt;/span&gt;&lt;i&gt;]" in page
    text = index.read_text()
    tags = _Tags(text)
    assert len(tags.all("script")) == 1 and "<b>tags</b>" not in text           # our sorter is the only script
    assert {"data-v": 'quotes " and <b>tags</b> & co'} in tags.all("td")       # the sort value round-trips


def test_windows_are_shaded_by_activation_with_the_centre_marked(tmp_path):
    report = _report(ids=(0,))
    entry = report["latents"]["0"]
    entry.update(max_act=4.0, top=[_window(["a", "b", "c"], [0.0, 1.0, 4.0], 2)], importance=[])
    entry["masked"]["max_act"] = 2.0
    entry["masked"]["top"] = [_window(["x", "[MASK]"], [0.5, 2.0], 1, hidden="paris")]
    write_dashboard(report, tmp_path)
    spans = _Tags((tmp_path / "latents" / "0.html").read_text()).all("span")
    win = [s for s in spans if "title" in s]
    assert [s["title"] for s in win] == ["0", "1", "4", "0.5", "2"]
    assert [s.get("style") for s in win] == [None, "--a:0.25", "--a:1.00", "--a:0.12", "--a:0.50"]
    assert [s.get("class") for s in win] == [None, None, "c", None, "c"]
    assert ">[MASK→paris]<" in (tmp_path / "latents" / "0.html").read_text()


def test_histogram_is_an_inline_svg_of_the_non_empty_bins(tmp_path):
    write_dashboard(_report(ids=(0,)), tmp_path)
    tags = _Tags((tmp_path / "latents" / "0.html").read_text())
    assert len(tags.all("svg")) == 1
    heights = [float(r["height"]) for r in tags.all("rect")]
    assert len(heights) == 3 and heights[1] == max(heights)                     # counts 5, 40, 7
    assert heights[0] / heights[1] == pytest.approx(5 / 40, abs=1e-2)


def test_masked_section_only_for_diffusion_reports(tmp_path):
    write_dashboard(_report(ids=(2,), dlm=True), tmp_path / "dlm")
    write_dashboard(_report(ids=(2,), dlm=False), tmp_path / "ar")
    dlm = (tmp_path / "dlm" / "latents" / "2.html").read_text()
    ar = (tmp_path / "ar" / "latents" / "2.html").read_text()
    assert 'id="masked"' in dlm and "Hidden-token distribution" in dlm and "[MASK→paris]" in dlm
    assert 'id="masked"' not in ar and "MASK" not in ar and "autoregressive LM" in ar
    assert "masked_frequency" not in (tmp_path / "ar" / "index.html").read_text()


def test_rewriting_removes_pages_of_latents_no_longer_in_the_report(tmp_path):
    write_dashboard(_report(ids=(1, 2)), tmp_path)
    (tmp_path / "latents" / "notes.html").write_text("mine")
    write_dashboard(_report(ids=(2, 9)), tmp_path)
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == ["2.html", "9.html", "notes.html"]


def test_pages_stay_small(tmp_path):
    """50 latents as interp's defaults make them: 12 top, 7 importance and 12 masked windows of 21 tokens."""
    report = _report(ids=range(50), windows=12)
    for e in report["latents"].values():
        e["importance"] = e["importance"][:7]
    write_dashboard(report, tmp_path)
    sizes = [p.stat().st_size for p in (tmp_path / "latents").iterdir()]
    assert len(sizes) == 50 and max(sizes) < 40_000
    assert (tmp_path / "index.html").stat().st_size < 40_000


def _bad(change):
    report = _report(ids=(7,))
    change(report)
    return report


@pytest.mark.parametrize("report, message", [
    ({"model": "m"}, r"feature report has no 'latents' \(keys: \['model'\]\)"),
    ([], "a feature report is a dict, got list"),
    (_bad(lambda r: r["latents"]["7"].pop("top")), "latent 7: entry has no 'top' windows"),
    (_bad(lambda r: r["latents"]["7"]["top"][1]["values"].pop()),
     r"latent 7: top\[1\]: 21 tokens but 20 values"),
    (_bad(lambda r: r["latents"]["7"]["masked"]["top"][0]["tokens"].append("x")),
     r"latent 7: masked.top\[0\]: 22 tokens but 21 values"),
    (_bad(lambda r: r["latents"]["7"]["importance"][0].update(centre=21)),
     r"latent 7: importance\[0\]: centre 21 is not a position of its 21 tokens"),
    (_bad(lambda r: r.update(is_diffusion=False)), "latent 7: has a 'masked' section, but the report is not for"),
    (_bad(lambda r: r["latents"].update({"../x": r["latents"]["7"]})), r"must be str\(latent id\), got '../x'"),
    (_bad(lambda r: r["latents"]["7"].update(latent=8)), "latent 7: entry says latent 8"),
    (_bad(lambda r: r["latents"]["7"]["histogram"]["counts"].pop()), "latent 7: histogram needs"),
    (_bad(lambda r: r["latents"]["7"].update(max_act="big")), "latent 7: max_act must be a number"),
])
def test_bad_reports_raise_with_the_problem(tmp_path, report, message):
    with pytest.raises(ValueError, match=message):
        validate_report(report, require_entry=REQUIRE_ENTRY)
    with pytest.raises(ValueError, match=message):
        write_dashboard(report, tmp_path)
    assert not (tmp_path / "index.html").exists()


# ---- in a browser -------------------------------------------------------------------------------------------

#: one console message in Chromium's stderr log: the message and its source URL (see the module docstring)
_CONSOLE = re.compile(r':CONSOLE[:(]\d+\)?\] "(.*?)", source: (\S*) \(\d+\)', re.S)
_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("headless Chromium not found: install it (Debian/Ubuntu: `apt-get install -y chromium`) "
                    "to run the dashboard's browser tests")
    return binary


def _browse(binary: str, url: str, tmp_path: Path, name: str) -> tuple[str, list[tuple[str, str]], Path]:
    """Load ``url`` in headless Chromium once: the DOM after its scripts ran, the console messages
    ``(message, source)`` whose source is under ``tmp_path``, and a 1200×900 screenshot."""
    shot = tmp_path / f"{name}.png"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / f'profile-{name}'}", "--enable-logging=stderr", "--v=1",
           "--window-size=1200,900", f"--screenshot={shot}", "--dump-dom", url]
    # its own process group, so a hung browser is killed with all its children
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        dom, log = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish {url} within {_TIMEOUT_S} s")
    assert proc.returncode == 0, log[-3000:]
    ours = tmp_path.as_uri()
    return dom, [(m, src) for m, src in _CONSOLE.findall(log) if src.startswith(ours)], shot


def _assert_screenshot(path: Path) -> None:
    """A 1200×900 PNG with more than a blank page's colours."""
    Image = pytest.importorskip("PIL.Image")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))
    assert struct.unpack(">II", data[16:24]) == (1200, 900)
    with Image.open(path) as img:
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_chromium_console_check_catches_errors(chromium, tmp_path):
    """The negative control: a deliberate console.error and an uncaught exception are both seen."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><p id="p">x</p><script>\n'
                    'console.error("deliberate console error");\n'
                    'document.getElementById("p").dataset.ran = "1";\n'
                    'notAFunction();\n</script></body></html>\n')
    dom, console, _ = _browse(chromium, page.as_uri(), tmp_path, "broken")
    assert 'data-ran="1"' in dom
    messages = [m for m, _ in console]
    assert "deliberate console error" in messages
    assert any(m.startswith("Uncaught ReferenceError: notAFunction") for m in messages), messages


def test_chromium_renders_and_sorts_the_index(chromium, tmp_path):
    report = _report(ids=(1, 2, 3, 4))
    for f, acc in zip("1234", (0.5, None, 0.9, 0.1)):
        report["latents"][f]["interp"]["accuracy"] = acc
    index = write_dashboard(report, tmp_path / "site")
    dom, console, shot = _browse(chromium, index.as_uri() + "#sort=accuracy-desc", tmp_path, "index")
    assert console == []
    assert 'data-sorted="accuracy-desc"' in dom                                 # the JS ran and sorted
    order = re.findall(r'<a href="latents/(\d+)\.html">', dom)
    assert order == ["3", "1", "4", "2"]                                         # the missing accuracy last
    assert 'aria-sort="descending"' in dom
    _assert_screenshot(shot)


def test_chromium_renders_a_latent_page(chromium, tmp_path):
    report = _report(ids=(17, 18))
    report["latents"]["17"]["top"][0]["tokens"][10] = EVIL
    write_dashboard(report, tmp_path / "site")
    page = tmp_path / "site" / "latents" / "17.html"
    dom, console, shot = _browse(chromium, page.as_uri(), tmp_path, "latent")
    assert console == []
    assert "<h1>Latent 17</h1>" in dom and 'id="masked"' in dom and "<svg" in dom
    assert "&lt;script&gt;" in dom and "<script" not in dom
    _assert_screenshot(shot)


@pytest.mark.parametrize("change, field", [
    (lambda r: r["latents"]["7"].update(frequency=10 ** 400), "frequency"),
    (lambda r: r["latents"]["7"]["top"][0]["values"].__setitem__(0, -10 ** 400), r"top\[0\].values\[0\]"),
    (lambda r: r["latents"]["7"]["histogram"]["counts"].__setitem__(0, 10 ** 400), r"histogram.counts\[0\]"),
    (lambda r: r.update(n_latents="many"), "'n_latents'"),
    (lambda r: r.update(k=[8]), "'k'"),
    (lambda r: r.update(tokens_seen=-1), "'tokens_seen'"),
    (lambda r: r.update(model={"name": "m"}), "'model'"),
    (lambda r: r.update(is_diffusion="yes"), "'is_diffusion'"),
    (lambda r: r["latents"]["7"]["interp"].update(judge=["planted"]), "interp.judge"),
    (lambda r: r["latents"]["7"]["concept"].update(name=3), "concept.name"),
    (lambda r: r["latents"]["7"]["concept"].update(f1="high"), "concept.f1"),
    (lambda r: r["latents"]["7"]["masked"]["top"][0].update(hidden={"t": 1}), r"masked.top\[0\].hidden"),
])
def test_21_13_write_dashboard_with_wrong_field_types_names_the_field(tmp_path, change, field):
    with pytest.raises(ValueError, match=f"bad report: .*{field}"):
        write_dashboard(_bad(change), tmp_path)
    assert not (tmp_path / "index.html").exists()
