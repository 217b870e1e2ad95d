"""Take the README's screenshot of the app: docs/app.png.

Starts `python app.py` on a free port, opens it in Debian's Chromium through Playwright, waits for
the first prediction plot, saves a 1440x1000 screenshot and stops the app.

    python docs/screenshot.py [--out docs/app.png]

Playwright cannot download its own browsers here, so it drives /usr/bin/chromium (apt-get install
chromium), or the binary named by SPIQ_CHROMIUM, as tests/test_browser.py does.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SPIQ_CHROMIUM", "/usr/bin/chromium")
WIDTH, HEIGHT = 1440, 1000
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    """Poll the page until it answers; fail with the app's output if it exits first."""
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"app.py exited with code {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"app.py did not serve {url} within {START_TIMEOUT_S} s")


def take(url: str, out: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_function("(document.querySelector('#pred-plot img') || {}).naturalWidth > 0", timeout=90_000)
        # The plot element appears before the first prediction fills it: wait for the summary too.
        page.wait_for_function("(document.querySelector('#pred-text') || {}).innerText?.includes('logit SQNR')",
                               timeout=90_000)
        page.wait_for_timeout(1000)   # the page settles
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set SPIQ_CHROMIUM)")

    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    with tempfile.NamedTemporaryFile("w", prefix="spiq-app-", suffix=".log") as log_file:
        log = Path(log_file.name)
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(proc, url, log)
            take(url, args.out)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
