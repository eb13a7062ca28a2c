"""Take the README's screenshots: Flower and the dashboard while the demo's labelling job runs.

.venv/bin/python scripts/screenshots.py     (needs Debian's chromium; writes docs/images/)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from gemma_batch.cli.admin import db_upgrade
from gemma_batch.cli.demo import TEMPLATE, fewshot, sample_rows
from gemma_batch.cli.stack import LocalStack, free_port
from gemma_batch.settings import get_settings

OUT = Path(__file__).parents[1] / "docs" / "images"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gemma-batch-shots-"))
    env = {
        "GEMMA_BATCH_DATA_DIR": str(work),
        "GEMMA_BATCH_DATABASE_URL": f"sqlite:///{work}/db.sqlite",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    db_upgrade()
    model = get_settings().model
    with LocalStack(env | {"GEMMA_BATCH_CHUNK_SIZE": "16"}, work / "logs") as stack:
        flower_port = free_port()
        flower = subprocess.Popen(
            [sys.executable, "-m", "gemma_batch", "flower", "--port", str(flower_port)],
            env=stack.env | {"GEMMA_BATCH_FLOWER_AUTH": "demo:demo"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = stack.client()
            client.submit(
                model,
                [{"id": "capital", "prompt": "The capital of France is"}],
                {"max_new_tokens": 8},
            ).wait()
            rows = sample_rows() * 20
            job = client.label(rows, TEMPLATE, ["positive", "negative"], model, prefix=fewshot())
            while job.refresh().counts.completed < len(rows) // 3:
                time.sleep(0.5)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=shutil.which("chromium"), args=ARGS
                )
                page = browser.new_page(viewport={"width": 1200, "height": 560})
                page.goto(f"{stack.url}/ui")
                page.fill("#api-key", stack.api_key)
                page.click("#key-form button")
                page.wait_for_selector("tr.job")
                page.screenshot(path=str(OUT / "dashboard.png"))
                page.click(f"text={job.id}")
                page.wait_for_selector("#label-chart")
                page.screenshot(path=str(OUT / "dashboard-job.png"))
                flower_page = browser.new_page(
                    viewport={"width": 1400, "height": 700},
                    http_credentials={"username": "demo", "password": "demo"},
                )
                flower_page.goto(f"http://127.0.0.1:{flower_port}/tasks")
                flower_page.wait_for_timeout(4000)
                flower_page.screenshot(path=str(OUT / "flower.png"))
                browser.close()
            job.cancel()
        finally:
            flower.terminate()
            flower.wait()
    print(f"screenshots in {OUT}")


if __name__ == "__main__":
    main()
