"""The OHIF Viewer (npm @ohif/app's dist/, served as static files) on the node's DICOMweb, in
Debian's chromium. Needs the unpacked package: PACS_NODE_OHIF_DIST=/path/to/package/dist
(`npm pack @ohif/app && tar xzf ohif-app-*.tgz`); skipped without it, since the suite never
downloads."""

from __future__ import annotations

import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_web import stow, study, web_node
from tests.test_web_browser import ARGS, CHROMIUM

DIST = os.environ.get("PACS_NODE_OHIF_DIST", "")
CONFIG = Path(__file__).resolve().parent.parent / "docs" / "ohif-app-config.js"


class _SpaHandler(SimpleHTTPRequestHandler):
    """Static files; any other path is the single-page app's index.html."""

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if not path.exists():
            self.path = "/index.html"
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.skipif(not DIST, reason="PACS_NODE_OHIF_DIST is not set (OHIF dist/ unpacked)")
def test_ohif_viewer_loads_a_study(start_node, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    site = tmp_path / "ohif"
    os.symlink(DIST, site)
    viewer_port = free_port()
    origin = f"http://127.0.0.1:{viewer_port}"
    _, base = web_node(start_node, cors_origins=[origin])
    config = CONFIG.read_text().replace("NODE", base)
    served = tmp_path / "site"
    served.mkdir()
    for entry in Path(DIST).iterdir():
        if entry.name != "app-config.js":
            (served / entry.name).symlink_to(entry)
    (served / "app-config.js").write_text(config)
    handler = partial(_SpaHandler, directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", viewer_port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    made = study(tmp_path / "in", count=5)
    assert stow(base, [m.path for m in made]).status_code == 200
    shots = Path(os.environ.get("PACS_NODE_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[*ARGS, "--use-gl=swiftshader", "--enable-unsafe-swiftshader"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on(
                "response",
                lambda r: (
                    failed.append(f"{r.status} {r.url}")
                    if r.url.startswith(base) and r.status >= 400
                    else None
                ),
            )
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.goto(f"{origin}/")
            try:
                page.wait_for_selector("text=Yamada, Tarou", timeout=30_000)
            except Exception:
                page.screenshot(path=str(shots / "ohif-failed.png"))
                raise AssertionError("\n".join(console[-30:] + failed)) from None
            page.screenshot(path=str(shots / "ohif-list.png"))
            page.goto(f"{origin}/viewer?StudyInstanceUIDs={made[0].study_uid}")
            try:
                page.wait_for_selector("canvas", timeout=30_000)
                page.wait_for_timeout(5000)
            finally:
                page.screenshot(path=str(shots / "ohif-viewer.png"))
            browser.close()
    finally:
        httpd.shutdown()
    assert failed == []
