"""report.html in a real browser: headless Chromium loads every figure, logs no console error, and leaves a
screenshot (build/test-artefacts/report.png) for a person to look at.

Runs where Chromium is installed (CI installs Debian's `chromium`: .ci/run); elsewhere it is skipped with the reason.
No browser-automation library is needed: a small script placed at the top of a copy of the page records console
errors and failed loads, and one at the bottom writes its findings into the DOM, which `--dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alexrepro.evaluate import report
from test_report import make_inputs

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "build" / "test-artefacts"
BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium here (CI installs it: apt-get install -y chromium)"
)

# Record console errors and resource load failures from the very start of the page.
WATCH = """<script>
window.__problems = [];
const __error = console.error.bind(console);
console.error = (...args) => { window.__problems.push("console.error: " + args.join(" ")); __error(...args); };
window.addEventListener("error", e => {
  window.__problems.push(e.target && e.target.tagName ? "failed to load <" + e.target.tagName.toLowerCase() + ">"
                                                      : "error: " + e.message);
}, true);
</script>"""
# After load: every image decoded with a size; the findings as JSON in a <pre id="__findings">.
REPORT = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                                 width: i.naturalWidth, height: i.naturalHeight}));
  const pre = document.createElement("pre");
  pre.id = "__findings";
  pre.textContent = JSON.stringify({images, problems: window.__problems});
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    _, html = report.write_report(out, make_inputs())
    return html


def test_report_renders_every_image_without_console_errors(page, tmp_path):
    html = page.read_text()
    watched = tmp_path / "watched.html"
    head = re.search(r"<head[^>]*>", html)
    assert head, "report.html has no <head>"
    watched.write_text(html[: head.end()] + WATCH + html[head.end() :].replace("</body>", REPORT + "</body>"))
    result = chromium("--dump-dom", watched.as_uri(), profile=tmp_path / "profile-dom")
    found = re.search(r'<pre id="__findings">(.*?)</pre>', result.stdout, flags=re.S)
    assert found, f"no findings in the DOM; chromium said:\n{result.stderr[-3000:]}"
    findings = json.loads(
        found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )
    assert len(findings["images"]) == len(report.FIGURE_INCHES), findings["images"]
    assert all(image["ok"] and image["width"] > 0 for image in findings["images"]), findings["images"]
    assert findings["problems"] == []


def test_report_screenshot_is_kept_as_an_artefact(page, tmp_path):
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "report.png"
    shot.unlink(missing_ok=True)
    result = chromium(
        f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri(), profile=tmp_path / "profile-shot"
    )
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-3000:]
