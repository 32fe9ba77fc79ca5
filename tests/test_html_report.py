"""The HTML report, read as its users read it: in a real browser.

Headless Chromium (Debian's ``chromium``, installed by scripts/setup) opens
the report of the committed fixtures with plain command-line flags, no
driver: ``--screenshot`` (the PNG must show the map in the verdict colours)
and ``--dump-dom`` (the DOM the browser built: one map per VM, one band per
slot version with its hover text, hex addresses, no Python reprs), with the
browser's console log on stderr (``--enable-logging=stderr``): the page has
no script, so any console message (a blocked resource, a CSP violation) is a
failure. Without chromium these tests skip, except in CI (CI=true) or with
KVMTRACE_REQUIRE_LIVE=1, where they fail.

The same checks on the HTML as written (without a browser) run everywhere.
"""

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import pytest

import kvmtrace
from kvmtrace import html as khtml, htmlmap, render
from kvmtrace.analysis import compare

from conftest import FIXTURES, REQUIRE_LIVE, kvmtrace as run

X86 = FIXTURES / "x86-pvm-demo.kvt"
BAR = FIXTURES / "arm64" / "bar-7.x.kvt"  # Device / Normal-NC PCI BAR slots
CASES = {"x86": X86, "bar": BAR}
WINDOW = (1320, 1600)


# -- a small DOM (html.parser) -----------------------------------------------

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "wbr", "source"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    @property
    def cls(self) -> set:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        """The text a reader sees (style sheets left out)."""
        return "".join(c if isinstance(c, str) else c.text() for c in self.children
                       if isinstance(c, str) or c.tag not in ("style", "script"))

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find(self, tag=None, cls=None) -> list:
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.cls)]


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        n = Node(tag, attrs, self.cur)
        self.cur.children.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def dom(text: str) -> Node:
    b = _Builder()
    b.feed(text)
    b.close()
    return b.root


# -- what every page must satisfy, as written and as the browser built it ----

def vm_slots(model) -> dict:
    """{(pid, proc, vm_fd, as_id): {(slot, version)}} of the recording."""
    out: dict = {}
    for r in model.slots.itertuples():
        out.setdefault((r.pid, r.proc, r.vm_fd, r.as_id), set()).add((r.slot, r.version))
    return out


def check_page(root: Node, model):
    body = root.find("body")[0]
    text = re.sub(r"\s+", " ", body.text())
    # no Python reprs: no dicts or lists, no floats in exponent form, no NaN / None
    assert "{" not in text and "}" not in text, text[:2000]
    assert not re.search(r"\[\s*'|'\s*\]|\bnan\b|\bNone\b|\bNaN\b|<NA>", text)
    assert not re.search(r"\d\.\d+e[+-]\d\d", text)
    # the header: a definition list, not a dict
    hdr = root.find("dl", "hdr")[0]
    keys = [n.text() for n in hdr.find("dt")]
    assert {"host", "kernel", "arch", "KVM", "events"} <= set(keys), keys
    # one map per VM (and address space), one band per slot version, with its hover
    maps = root.find("svg", "gpamap")
    want = vm_slots(model)
    assert len(maps) == len(want) >= 1
    slots = model.slots.assign(end=model.slots["gpa"] + model.slots["size_bytes"])
    summary = render.tables(model)["slots"]
    for svg, (vm, versions) in zip(maps, sorted(want.items())):
        bands = svg.find("g", "slot")
        got = {(int(b.attrs["data-slot"]), int(b.attrs["data-version"])) for b in bands}
        assert len(bands) == len(versions) and got == versions
        for b in bands:
            s, v = int(b.attrs["data-slot"]), int(b.attrs["data-version"])
            row = slots[(slots["slot"] == s) & (slots["version"] == v)].iloc[0]
            srow = summary[(summary["slot"] == s) & (summary["version"] == v)].iloc[0]
            title = b.find("title")
            assert len(title) == 1
            hover = title[0].text()
            assert f"GPA {row.gpa:#x}-{row.end:#x} ({htmlmap.size(row['size_bytes'])})" in hover
            assert f"HVA {row.hva:#x}" in hover
            assert f"VMA {row.vma}" in hover and "VM flags " in hover
            assert "VMA memory type: " in hover and "installed (" in hover
            assert f"verdict: {srow.verdict}" in hover and srow.reason[:60] in hover
            assert len(b.find("rect")) >= 3  # one per lane
        # the map's axis: GPAs in hex
        addrs = [t.text() for t in svg.find("text", "addr")]
        assert addrs and all(re.fullmatch(r"0x[0-9a-f]+", a) for a in addrs), addrs
    # tables: readable columns, addresses in hex, sizes with units
    for t in root.find("table"):
        heads = [h.text() for h in t.find("th")]
        assert len(heads) <= 14, heads
        for i, h in enumerate(heads):
            cells = [tr.find("td")[i].text() for tr in t.find("tr") if tr.find("td")]
            if h in ("GPA", "HVA", "spte", "stage-2 prot", "pfn"):
                assert all(re.fullmatch(r"(0x[0-9a-f]+)?", c) for c in cells), (h, cells)
                assert any(cells), h
            if h == "GPA range":
                assert all(re.fullmatch(r"0x[0-9a-f]+-0x[0-9a-f]+", c) for c in cells), cells
            if h == "size":
                assert all(re.fullmatch(r"\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)", c) for c in cells)
    for gpa in model.slots["gpa"]:
        if gpa >= 10:
            assert not re.search(rf"\b{int(gpa)}\b", text), f"decimal GPA {gpa}"
    # self-contained: no script, no external reference
    assert not root.find("script") and not root.find("img") and not root.find("link")
    for n in root.iter():
        for k, v in n.attrs.items():
            assert not k.startswith("on"), (n.tag, k)
            if k in ("href", "src", "xlink:href"):
                assert (v or "").startswith("#"), (n.tag, k, v)
    return text


@pytest.fixture(scope="module")
def models():
    return {k: kvmtrace.load(str(p)) for k, p in CASES.items()}


@pytest.fixture(scope="module")
def pages(tmp_path_factory, models):
    """The reports, made by the CLI as a user makes them."""
    d = tmp_path_factory.mktemp("html")
    out = {k: d / f"{k}.html" for k in CASES}
    with ThreadPoolExecutor(len(CASES)) as ex:
        for r in ex.map(lambda k: run("report", CASES[k], "--format", "html", "-o", out[k]),
                        CASES):
            assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("case", CASES)
def test_report_html_as_written(case, pages, models):
    text = check_page(dom(pages[case].read_text()), models[case])
    if case == "bar":  # the PCI BAR slots: both VMA types and the verdicts, with the rule
        for s in ("Device-nGnRE", "Normal-NC", "downgraded", "rejected",
                  "s2_force_noncacheable", "S2FWB yes"):
            assert s in text, s
    else:
        for s in ("0x1000000-0x1040000", "256 KiB", "[vvar]", "VM_PFNMAP|VM_IO",
                  "LOG_DIRTY_PAGES", "EEXIST", "host PAT WB WC UC- UC"):
            assert s in text, s


def test_truncated_recording_has_a_banner(tmp_path):
    cut = tmp_path / "cut.kvt"
    cut.write_bytes(X86.read_bytes()[:60000])
    m = kvmtrace.load(str(cut))
    assert not m.recording.complete
    root = dom(khtml.report_html(m, render.tables(m)))
    banner = [n for n in root.find("div", "banner") if "bad" in n.cls]
    assert banner and "Incomplete recording" in banner[0].text()
    assert m.recording.problems[0] in banner[0].text()


def test_lost_events_banner_and_table(models):
    m = kvmtrace.load(str(X86))
    m.lost.loc[m.lost["kind"] == "set_spte", "lost"] = 17
    page = khtml.report_html(m, render.tables(m))
    root = dom(page)
    warn = [n for n in root.find("div", "banner") if "warn" in n.cls]
    assert warn and "17 events lost" in warn[0].text() and "set_spte 17 of 246" in warn[0].text()
    lost = root.find("h2")
    assert any(h.attrs.get("id") == "lost" for h in lost)
    assert "set_spte" in page and not [n for n in root.find("div", "banner") if "bad" in n.cls]


def test_diff_html_is_formatted():
    base, new = kvmtrace.load(str(FIXTURES / "arm64" / "bar-6.1.kvt")), kvmtrace.load(str(BAR))
    root = dom(khtml.diff_html(base, new, compare.compare(base, new)))
    body = root.find("body")[0]
    text = re.sub(r"\s+", " ", body.text())
    assert "{" not in text and "}" not in text
    assert not re.search(r"\d\.\d+e[+-]\d\d|\bnan\b|\bNone\b", text)
    assert "0x1800000" in text and "128 KiB" in text and "4K 25" in text
    assert "MMIO 3" in text  # exits per reason by name, not {6: 3}
    assert len(root.find("dl", "hdr")) == 2
    assert "25165824" not in text  # the GPA of slot 3, in decimal


def test_map_is_cheap():
    """The map adds little to the report: a fraction of a second for the
    fixture with the most slot versions (about 30 ms here)."""
    m = kvmtrace.load(str(FIXTURES / "arm64" / "demo-7.x.kvt"))
    t = render.tables(m)
    start = time.process_time()  # CPU time: the same on a busy host
    maps = htmlmap.vm_maps(m, t["slots"], t["ops"])
    took = time.process_time() - start
    assert sum(len(svgs) for _, svgs, _ in maps) == 1 and took < 0.5, took


def test_scale_keeps_small_slots_visible():
    sc = htmlmap.Scale([(0x1000000, 0x1004000), (0x100000000, 0x200000000)])
    small = sc.x(0x1004000) - sc.x(0x1000000)
    big = sc.x(0x200000000) - sc.x(0x100000000)
    assert small >= htmlmap.MIN_SEG and big < 10 * small
    assert sc.x(0) == 0 and sc.width >= htmlmap.PLOT_W


# -- in the browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium")
                                        else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-color-profile=srgb", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true" or REQUIRE_LIVE:
            pytest.fail("chromium is not installed (scripts/setup installs it)")
        pytest.skip("chromium is not installed (scripts/setup installs it)")
    return CHROMIUM


def open_page(chromium, page, png) -> tuple[str, list[str], float]:
    """Load ``page`` once: screenshot to ``png``; the DOM, the console lines and
    the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="kvmtrace-chromium-") as profile:
        start = time.monotonic()
        p = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}",
                            f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={png}",
                            "--dump-dom", page.resolve().as_uri()],
                           capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                           env={**os.environ, "XDG_CONFIG_HOME": profile,  # crash reports:
                                "XDG_CACHE_HOME": profile})  # not in the user's home
        took = time.monotonic() - start
    assert p.returncode == 0, p.stderr[-3000:]
    console = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]
    return p.stdout, console, took


@pytest.fixture(scope="module")
def loaded(browser, pages, tmp_path_factory):
    d = tmp_path_factory.mktemp("shots")
    control = d / "control.html"  # a page the CSP must block: proves the console is read
    control.write_text(khtml._page("control", ["<img src='missing.png' alt=''>"]))
    jobs = {**{k: (pages[k], d / f"{k}.png") for k in CASES},
            "control": (control, d / "control.png")}
    with ThreadPoolExecutor(len(jobs)) as ex:
        futs = {k: ex.submit(open_page, browser, pg, png) for k, (pg, png) in jobs.items()}
        res = {k: f.result() for k, f in futs.items()}
    for k, (_, _, took) in res.items():
        print(f"chromium {k}: {took:.2f} s")
    return {k: (res[k][0], res[k][1], jobs[k][1]) for k in jobs}


def test_browser_reads_the_console(loaded):
    _, console, _ = loaded["control"]
    assert any("Content Security Policy" in ln for ln in console), console


@pytest.mark.parametrize("case", CASES)
def test_browser_dom(case, loaded, models):
    dom_text, console, _ = loaded[case]
    assert not console, console
    check_page(dom(dom_text), models[case])


@pytest.mark.parametrize("case", CASES)
def test_browser_screenshot(case, loaded, models):
    _, _, png = loaded[case]
    px = read_png(png.read_bytes())
    assert px.shape[:2] == (WINDOW[1], WINDOW[0])
    rgb = px.reshape(-1, 3).astype(np.uint32)
    colors, counts = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2], return_counts=True)
    white = counts[colors == 0xFFFFFF].sum() / len(rgb)
    assert white < 0.95 and len(colors) > 30, "blank page"
    chan = np.stack([colors >> 16, colors >> 8 & 255, colors & 255], axis=1).astype(int)
    t = render.tables(models[case])
    verdicts = set(t["slots"]["verdict"]) | ({"rejected"} if (t["ops"]["ret"] < 0).any() else set())
    want = {v: htmlmap.VERDICT_COLORS[v] for v in verdicts}
    for name, t_ in (("VMA type", "Device-nGnRE"), ("installed", "Normal-NC")) if case == "bar" \
            else (("VMA type", "WB"),):
        want[f"{name} {t_}"] = htmlmap.memtype_color(t_)
    for what, color in want.items():
        c = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        n = int(counts[(np.abs(chan - c) <= 2).all(axis=1)].sum())
        assert n >= 300, f"{what} ({color}): {n} pixels"


# -- PNG, without Pillow (numpy only; Pillow when present) ---------------------

def read_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB / RGBA PNG as an (h, w, 3) uint8 array."""
    try:
        import io

        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except ImportError:
        pass
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and not interlace
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:
            cur = line.reshape(w, bpp).cumsum(axis=0).reshape(-1)
        elif f == 2:
            cur = line + prev
        else:
            cur = line.copy()
            up = prev.astype(np.int32)
            for i in range(w * bpp):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(up[i])
                if f == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    c = int(up[i - bpp]) if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = (np.asarray(cur) & 255).astype(np.uint8)
        out[y] = prev
    return out.reshape(h, w, bpp)[:, :, :3]


def test_png_reader_without_pillow(tmp_path):
    """The fallback decoder agrees with a PNG written here with every filter."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rows = b""
    prev = np.zeros(15, dtype=np.int32)
    for y in range(6):
        line = img[y].reshape(-1).astype(np.int32)
        f = y % 5
        left = np.r_[np.zeros(3, np.int32), line[:-3]]
        upleft = np.r_[np.zeros(3, np.int32), prev[:-3]]
        if f == 0:
            enc = line
        elif f == 1:
            enc = line - left
        elif f == 2:
            enc = line - prev
        elif f == 3:
            enc = line - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
            enc = line - pred
        rows += bytes([f]) + (enc & 255).astype(np.uint8).tobytes()
        prev = line

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    import builtins
    real_import = builtins.__import__

    def no_pil(name, *a, **kw):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    builtins.__import__ = no_pil
    try:
        got = read_png(png)
    finally:
        builtins.__import__ = real_import
    assert (got == img).all()
