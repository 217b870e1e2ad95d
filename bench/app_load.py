"""How long a new visitor waits for the first prediction, in a real Chromium against `python app.py`.

    python -m bench.app_load [--pages N] [--busy-sessions S] [--chromium PATH]

- cold start: a fresh server process, from its first answer to the first prediction text of a
  page opened at that moment (and from `python app.py` to that answer: the server computes the
  default page's predictions before it serves);
- idle: N fresh pages one after another, from navigation start to the first prediction text in
  `#pred-text` and to the prediction plot drawn in `#pred-plot` (a plotly trace in its svg);
- busy: the same N pages while S other sessions keep applying new recipes: by default
  gradio_client sessions that, after each Apply, ask for every analysis view (`/refresh`: more
  work than one open tab), as visitors whose browsers run elsewhere, as on a Space; with
  `--load browser`, Chromium pages with the Layer error tab open, whose redraws then share this
  machine's cores with the server and the measured page (a pessimistic figure).
Targets: busy median first prediction text <= 2 s and plot <= 4 s; cold start <= 5 s.
Writes bench/results/app_load.json (app_load_browser.json with `--load browser`).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.common import ROOT, machine, save

TARGETS = {"busy_median_text_s": 2.0, "busy_median_plot_s": 4.0, "cold_start_text_s": 5.0}
# Records, at the first animation frame they hold, when the prediction text and the plot (a still
# image, decoded) appeared (performance.now() counts from navigation start).
SEEN = """() => {
    const text = (document.querySelector('#pred-text') || {innerText: ''}).innerText;
    if (text.includes('logit SQNR') && !window.__text) window.__text = performance.now();
    const img = document.querySelector('#pred-plot img');
    if (img && img.naturalWidth > 0 && !window.__plot) window.__plot = performance.now();
    return window.__text && window.__plot;
}"""
# The busy sessions' recipes: (weight bits, input bits), each session from its own offset.
BITS = list(itertools.product((8, 7, 6, 5, 4), (8, 7, 6, 5, 4, 3)))
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int) -> tuple[subprocess.Popen, float]:
    """`python app.py` on `port`; returns when it first answers: (process, perf_counter at that moment)."""
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    while time.perf_counter() - start < 180:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc, time.perf_counter()
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("app.py exited before serving") from None
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("app.py did not serve within 180 s")


async def _visit(browser, url: str) -> tuple[float, float]:
    """A fresh page (its own context: a new visitor): seconds to the prediction text and to the plot."""
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    try:
        await page.goto(url, wait_until="commit")
        await page.wait_for_function(SEEN, polling="raf", timeout=180_000)
        text, plot = await page.evaluate("[window.__text, window.__plot]")
        return text / 1000, plot / 1000
    finally:
        await context.close()


async def _busy(browser, url: str, offset: int, stop: asyncio.Event, applied: list) -> None:
    """A session with the Layer error tab open that applies a new recipe as soon as its views are back."""
    context = await browser.new_context(viewport={"width": 1280, "height": 720})
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_selector("#apply", timeout=120_000)
    await page.get_by_role("tab", name="Layer error").click()
    for w, a in itertools.islice(itertools.cycle(BITS), offset, None):
        if stop.is_set():
            break
        for elem, value in (("#wbits", w), ("#abits", a)):
            box = page.locator(f"{elem} input[type=number]")
            await box.fill(str(value))
            await box.press("Enter")
        await page.click("#apply")
        note = f'"weight_bits": {w}, "input_bits": {a}'
        try:
            await page.wait_for_function(f"(document.querySelector('#views-note') || {{innerText: ''}})"
                                         f".innerText.includes({note!r})", timeout=60_000)
            applied.append(time.perf_counter())
        except Exception:   # a slow round: apply the next recipe anyway
            pass
    await context.close()


def _busy_client(url: str, offset: int, stop: asyncio.Event, applied: list) -> None:
    """A gradio_client session: Apply a new recipe, then every view of it, again until stopped."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    image = handle_file(str(ROOT / "assets" / (ROOT / "assets" / "examples.txt").read_text().split()[0]))
    for w, a in itertools.islice(itertools.cycle(BITS), offset, None):
        if stop.is_set():
            break
        client.predict("spiq", w, a, "channel", "method default", True, {"headers": [], "data": []}, image,
                       api_name="/apply")
        client.predict(image, None, None, None, "grad-cam", 11, api_name="/refresh")
        applied.append(time.perf_counter())


def _summary(samples: list[tuple[float, float]]) -> dict:
    text, plot = [s[0] for s in samples], [s[1] for s in samples]
    return {"text_s": text, "plot_s": plot, "median_text_s": statistics.median(text), "worst_text_s": max(text),
            "median_plot_s": statistics.median(plot), "worst_plot_s": max(plot)}


async def _measure(args, port: int) -> dict:
    from playwright.async_api import async_playwright

    url = f"http://127.0.0.1:{port}/"
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=args.chromium, args=BROWSER_ARGS)
        # (c) cold start: the page opens the moment the fresh server first answers
        launched = time.perf_counter()
        proc, answered = start_app(port)
        try:
            page_text, _ = await _visit(browser, url)
            cold = time.perf_counter() - answered
            print(f"cold start: first prediction text {cold:.2f} s after the server answered "
                  f"({page_text:.2f} s after navigation)")
            await asyncio.sleep(args.settle)   # the background warm-up of the data-free ranges
            idle = [await _visit(browser, url) for _ in range(args.pages)]
            stop, applied = asyncio.Event(), []
            if args.load == "browser":
                busy_tasks = [asyncio.create_task(_busy(browser, url, 7 * i, stop, applied))
                              for i in range(args.busy_sessions)]
            else:
                busy_tasks = [asyncio.create_task(asyncio.to_thread(_busy_client, url, 7 * i, stop, applied))
                              for i in range(args.busy_sessions)]
            await asyncio.sleep(args.settle)   # the busy sessions are applying
            started = time.perf_counter()
            busy = []
            for _ in range(args.pages):
                busy.append(await _visit(browser, url))
                await asyncio.sleep(1.0)
            elapsed = time.perf_counter() - started
            stop.set()
            await asyncio.gather(*busy_tasks, return_exceptions=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        await browser.close()
    applies = sum(t >= started for t in applied)
    return {"cold_start_text_s": cold, "start_to_answer_s": answered - launched, "idle": _summary(idle), "busy": _summary(busy),
            "busy_applies_per_s": applies / elapsed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=5)
    p.add_argument("--busy-sessions", type=int, default=3)
    p.add_argument("--load", choices=("client", "browser"), default="client",
                   help="the busy sessions: gradio_client sessions, or Chromium pages on this machine")
    p.add_argument("--settle", type=float, default=20.0, help="seconds before measuring idle and busy pages")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--notes", default="", help="what else the machine was doing")
    args = p.parse_args(argv)

    r = asyncio.run(_measure(args, free_port()))
    met = {"busy_median_text_s": r["busy"]["median_text_s"] <= TARGETS["busy_median_text_s"],
           "busy_median_plot_s": r["busy"]["median_plot_s"] <= TARGETS["busy_median_plot_s"],
           "cold_start_text_s": r["cold_start_text_s"] <= TARGETS["cold_start_text_s"]}
    save("app_load" if args.load == "client" else "app_load_browser",
         {"load": args.load, "machine": machine(), "targets": TARGETS, "met": met, **r, "pages": args.pages,
          "busy_sessions": args.busy_sessions, "notes": args.notes})
    print(f"{'new page, seconds from navigation':40} {'median':>8} {'worst':>8}")
    for phase in ("idle", "busy"):
        for what in ("text", "plot"):
            print(f"{phase + ': prediction ' + what:40} {r[phase]['median_' + what + '_s']:8.2f} "
                  f"{r[phase]['worst_' + what + '_s']:8.2f}")
    print(f"{'cold start: server answer to text':40} {r['cold_start_text_s']:8.2f}")
    print(f"{'cold start: python app.py to its answer':40} {r['start_to_answer_s']:8.2f}")
    print(f"busy sessions applied {r['busy_applies_per_s']:.2f} recipes/s while measured")
    for k, ok in met.items():
        print(f"target {k} <= {TARGETS[k]}: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
