"""The HTML report in a real browser (headless Chromium): it loads without console messages, draws
something (the screenshot is not blank), and holds the sections and plot elements it promises, for
the bundled mixed capture with its labels; it needs no network and runs no script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from tests.conftest import PROJECT_PCAPS, ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (`make test` installs it)")
SECTIONS = ("summary", "traffic", "timeline", "attacks", "talkers", "alerts")


def otwatch(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)


def chromium(page, tmp_path, *flags) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--hide-scrollbars", *flags, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return re.findall(r":CONSOLE[^\]]*\] (.*)", stderr)


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def classed(self, tag, cls):
        return [a for t, a in self.tags if t == tag and cls in (a.get("class") or "").split()]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    done = otwatch("report", PROJECT_PCAPS / "mixed.pcap", "--labels", PROJECT_PCAPS / "mixed.labels.csv", "-o", out)
    assert done.returncode == 0, done.stderr
    return out


def test_console_check_sees_script_errors(tmp_path):
    """The console check used below can fail: a page with a script error shows up in it."""
    if CHROMIUM is None:
        pytest.skip("needs chromium")
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>nosuch();</script></body></html>")
    done = chromium(bad, tmp_path, "--dump-dom")
    assert any("nosuch" in m for m in console_messages(done.stderr)), done.stderr[-2000:]


def test_report_is_self_contained(report):
    text = report.read_text()
    el = Elements()
    el.feed(text)
    assert not el.find("script") and not [a for t, a in el.tags if t == "link" and a.get("rel") == "stylesheet"]
    loaded = [a.get("src") or a.get("href") for t, a in el.tags if t in ("img", "link", "iframe", "source", "use")]
    assert all(u is None or u.startswith(("data:", "#")) for u in loaded), loaded  # nothing fetched


@needs_chromium
def test_report_renders_in_chromium(report, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "shot.png"
    done = chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert console_messages(done.stderr) == []
    img = Image.open(shot).convert("L")
    stat = ImageStat.Stat(img)
    assert stat.stddev[0] > 20  # not a blank page
    hist = img.histogram()
    assert sum(hist[:200]) / sum(hist) > 0.03  # a fair share of drawn (non-white) pixels

    dom = chromium(report, tmp_path, "--dump-dom")
    assert dom.returncode == 0 and console_messages(dom.stderr) == []
    el = Elements()
    el.feed(dom.stdout)
    for sid in SECTIONS:
        assert el.find("section", id=sid), sid
    labels = (PROJECT_PCAPS / "mixed.labels.csv").read_text().strip().splitlines()[1:]
    alerts = len(el.classed("tr", "alert-row"))
    assert alerts > 5
    assert len(el.find("polyline")) >= 4  # frames and the PDUs of each of the three protocols
    assert len(el.classed("rect", "alert-bar")) == alerts  # one bar per alert on the timeline
    assert len(el.classed("line", "alert-mark")) == alerts
    assert len(el.classed("rect", "attack-band")) == len(labels)
    assert len(el.classed("rect", "bar")) >= 2 * 5  # top talkers: sent and received
    assert el.find("svg", id="comm-map")
    assert re.search(rf"<b>\d/{len(labels)}</b>attacks detected", dom.stdout)  # the score card


def test_eval_html_writes_the_same_report(tmp_path):
    out = tmp_path / "eval.html"
    done = otwatch("eval", PROJECT_PCAPS / "iec104.pcap", "--labels", PROJECT_PCAPS / "iec104.labels.csv",
                   "--html", out, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    el = Elements()
    el.feed(out.read_text())
    for sid in SECTIONS:
        assert el.find("section", id=sid), sid
    assert len(el.classed("tr", "alert-row")) == result["alerts"]
    assert f"{result['detected']}/{len(result['scenarios'])}" in out.read_text()
