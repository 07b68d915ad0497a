"""The status page and the study browser in a real browser: Debian's chromium driven by
Playwright (no browser download: `executable_path=/usr/bin/chromium`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_web import stow, study, web_node

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_status_page_and_study_browser_in_chromium(start_node, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing (scripts/test.sh installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    _, base = web_node(
        start_node, viewer_url="http://viewer.example/viewer?StudyInstanceUIDs={study}"
    )
    made = study(tmp_path / "a", count=3)
    assert stow(base, [m.path for m in made]).status_code == 200
    shots = Path(os.environ.get("PACS_NODE_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 768})
            page.goto(f"{base}/")
            assert page.title().startswith("Status")
            status = page.locator("#status").inner_text()
            assert "Instances\t3" in status
            assert page.get_by_role("alert").first.inner_text().startswith("Replication is off")
            page.screenshot(path=str(shots / "status.png"))

            page.click("text=Studies")
            page.fill("input[name=patient]", "yamada")  # case-insensitive, part of the name
            page.fill("input[name=modality]", "CT")
            page.click("button[type=submit]")
            rows = page.locator("tr.study")
            assert rows.count() == 1
            assert "Yamada^Tarou" in rows.first.inner_text()
            page.fill("input[name=modality]", "MR")
            page.click("button[type=submit]")
            assert page.locator("tr.study").count() == 0
            page.go_back()
            page.locator("tr.study a").first.click()
            page.wait_for_load_state("networkidle")
            assert page.locator("h1").inner_text().startswith("Yamada^Tarou 20240115")
            viewer = page.get_attribute("#viewer", "href")
            assert viewer == f"http://viewer.example/viewer?StudyInstanceUIDs={made[0].study_uid}"
            images = page.locator("#series img")
            assert images.count() == 1
            widths = page.eval_on_selector_all(
                "#series img", "imgs => imgs.map(i => i.complete && i.naturalWidth)"
            )
            assert widths == [32], widths  # decoded from the node's pixel data
            page.screenshot(path=str(shots / "study.png"), full_page=True)

            phone = browser.new_page(viewport={"width": 375, "height": 667})
            phone.goto(page.url)
            phone.wait_for_load_state("networkidle")
            assert phone.evaluate("document.documentElement.scrollWidth") <= 375
            phone.screenshot(path=str(shots / "study-phone.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "study.png").stat().st_size > 1000
