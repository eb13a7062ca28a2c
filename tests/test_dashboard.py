"""The /ui dashboard in headless Chromium: its API key, the job list, a label job's chart."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from gemma_batch.cli.demo import TEMPLATE, fewshot, sample_rows
from gemma_batch.cli.stack import LocalStack
from tests.conftest import TINY

# As the machine's own probe runs it: no network chatter from a browser on a closed network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: scripts/bootstrap.sh test installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_dashboard_lists_jobs_and_charts_labels(
    stack: LocalStack, browser: Browser, tmp_path: Path
) -> None:
    client = stack.client()
    rows = sample_rows()[:10]
    labelled = client.label(rows, TEMPLATE, ["positive", "negative"], TINY, prefix=fewshot())
    plain = client.submit(TINY, [{"prompt": "hello"}] * 4, {"max_new_tokens": 2})
    labelled.wait(poll=0.3)
    plain.wait(poll=0.3)
    counts = client.request("GET", f"/v1/jobs/{labelled.id}/labels")["data"]
    assert sum(counts.values()) == 10 and list(counts) == ["positive", "negative"]

    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(f"{stack.url}/ui")
    page.wait_for_selector("text=this API needs a key")
    page.fill("#api-key", stack.api_key)
    page.click("#key-form button")
    page.wait_for_selector("tr.job")
    listed = page.locator("tr.job")
    assert listed.count() == 2
    assert page.locator(f"tr.job >> text={labelled.id}").count() == 1
    assert page.locator(".bar[aria-valuenow='100']").count() == 2
    page.wait_for_selector("tr.worker")  # the fleet: the stack's one worker
    cells = page.locator("tr.worker td")
    assert [cells.nth(i).inner_text() for i in (2, 3)] == [TINY, "cpu · none"]

    page.click(f"text={labelled.id}")
    page.wait_for_selector("#label-chart")
    assert page.inner_text("#completed") == "10" and page.inner_text("#total") == "10"
    bars = page.locator("rect.label-bar")
    assert bars.count() == 2
    assert [bars.nth(i).get_attribute("data-label") for i in range(2)] == ["positive", "negative"]
    widths = [float(bars.nth(i).get_attribute("width")) for i in range(2)]
    top = max(counts.values())
    assert widths == [max(2, round(300 * counts[label] / top)) for label in counts]
    hrefs = [page.locator(".downloads a").nth(i).get_attribute("href") for i in range(3)]
    assert hrefs == [
        f"/v1/jobs/{labelled.id}/results?format={f}" for f in ("jsonl", "csv", "parquet")
    ]
    with page.expect_download() as download:  # fetched with the key, not by a bare link
        page.click(".downloads >> text=CSV")
    assert download.value.suggested_filename == f"{labelled.id}.csv"
    assert Path(download.value.path()).read_text().count("\n") == 11  # header and 10 rows
    page.screenshot(path=str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
