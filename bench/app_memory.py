"""The public app's memory under hostile load: heavy visitors and heavy links against `python app.py`.

    python -m bench.app_memory [--visitors 4] [--links 2] [--seconds 180]

- `--visitors` gradio_client sessions each apply, one after another, new recipes with the heaviest
  work the public app allows (bias fit on its 8 distilled images, calib-mse on the examples, every
  view, the Methods tab, the Advisor, an int8 export), and try the recipes it refuses (256 bias-fit
  images, a 100,000-point liu-ptq search) as uploads;
- `--links` Chromium pages open, again and again, links to heavy and to refused recipes;
- one more visitor asks for a prediction every second, timed: they must keep coming.
The server's resident memory (and its children's) is sampled every 0.25 s. The bound it must stay
under is BOUND_GB. Writes bench/results/app_memory.json.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

from bench.app_load import BROWSER_ARGS, free_port, start_app
from bench.common import ROOT, machine, save

# The Space has 16 GB: the server, its caches and every visitor's work together must stay under this.
BOUND_GB = 8.0
TABLE = {"headers": [], "data": []}
RECIPES = [(m, w, a) for w, a in ((8, 8), (6, 6), (8, 5), (5, 8), (7, 7), (8, 4), (4, 8), (6, 5))
           for m in ("spiq", "calib-mse", "static-tensor", "dynamic-channel")]
REFUSED = [{"method": "spiq", "bias_images": 256}, {"method": "liu-ptq", "search_points": 100_000},
           {"method": "spiq", "bias_images": 32}]
LINKS = [{"bias_images": 256}, {"method": "calib-mse", "weight_bits": 6, "input_bits": 6},
         {"method": "spiq", "weight_bits": 5, "input_bits": 5}, {"bias_images": 255},
         {"method": "<img src=x>"}, {"method": "static-tensor", "weight_bits": 7, "input_bits": 5}]


def _rss(pid: int) -> int:
    """Resident bytes of `pid` and its children."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) << 10
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def _visitor(url: str, offset: int, stop: threading.Event, log: dict, scratch: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False)
    image = handle_file(str(ROOT / "assets" / "cat.jpg"))
    calls = [lambda: client.predict(image, None, None, None, "grad-cam", 11, api_name="/refresh"),
             lambda: client.predict(image, api_name="/methods"),
             lambda: client.predict(4.5, api_name="/advisor"),
             lambda: client.predict(image, api_name="/deploy")]
    for i, (method, w, a) in enumerate(itertools.islice(itertools.cycle(RECIPES), offset, None)):
        if stop.is_set():
            return
        bad = scratch / f"refused-{offset}.json"
        bad.write_text(json.dumps(REFUSED[i % len(REFUSED)]))
        for call in [lambda: client.predict(method, w, a, "channel", "method default", True, TABLE, image,
                                            api_name="/apply"),
                     lambda: client.predict(handle_file(str(bad)), api_name="/load_recipe"), *calls]:
            if stop.is_set():
                return
            try:
                call()
                log["done"] += 1
            except AppError as exc:
                kind = "busy" if "busy" in str(exc) else "refused"
                log[kind] += 1


def _predictor(url: str, stop: threading.Event, times: list, errors: list) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    image = handle_file(str(ROOT / "assets" / "coffee.jpg"))
    while not stop.is_set():
        start = time.perf_counter()
        try:
            client.predict(image, api_name="/predict")
            times.append(time.perf_counter() - start)
        except Exception as exc:   # a prediction that did not come: what this bench is about
            errors.append(str(exc)[:200])
        stop.wait(max(0.0, 1.0 - (time.perf_counter() - start)))


async def _links(chromium: str, url: str, pages: int, stop: threading.Event, opened: list) -> None:
    from playwright.async_api import async_playwright

    async def one(browser, offset):
        for recipe in itertools.islice(itertools.cycle(LINKS), offset, None):
            if stop.is_set():
                return
            context = await browser.new_context()
            page = await context.new_page()
            try:
                await page.goto(f"{url}?recipe={quote(json.dumps(recipe))}", wait_until="domcontentloaded")
                await page.wait_for_function("(document.querySelector('#pred-text') || {innerText: ''}).innerText"
                                             ".includes('logit SQNR')", timeout=120_000)
                opened.append(time.perf_counter())
            except Exception:
                pass
            finally:
                await context.close()

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        await asyncio.gather(*(one(browser, 2 * i) for i in range(pages)))
        await browser.close()


# long: one run: the server, its hostile visitors and links, the memory sampled throughout, saved at the end
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--visitors", type=int, default=4)
    p.add_argument("--links", type=int, default=2)
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--settle", type=float, default=20.0)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--notes", default="")
    args = p.parse_args(argv)

    port = free_port()
    proc, _ = start_app(port)
    url = f"http://127.0.0.1:{port}/"
    samples, stop, sampling = [], threading.Event(), threading.Event()

    def sample():
        while not sampling.is_set():
            samples.append((time.perf_counter(), _rss(proc.pid)))
            sampling.wait(0.25)

    threading.Thread(target=sample, daemon=True).start()
    log = {"done": 0, "refused": 0, "busy": 0}
    times, errors, opened = [], [], []
    try:
        time.sleep(args.settle)
        baseline = _rss(proc.pid)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            threads = [threading.Thread(target=_visitor, args=(url, 5 * i, stop, log, Path(scratch)))
                       for i in range(args.visitors)]
            threads.append(threading.Thread(target=_predictor, args=(url, stop, times, errors)))
            threads.append(threading.Thread(target=lambda: asyncio.run(_links(args.chromium, url, args.links, stop,
                                                                                opened))))
            for t in threads:
                t.start()
            time.sleep(args.seconds)
            stop.set()
            for t in threads:
                t.join(timeout=300)
        elapsed = time.perf_counter() - started
    finally:
        sampling.set()
        proc.terminate()
        proc.wait(timeout=30)
    peak = max(r for t, r in samples if t >= started)
    r = {"baseline_gb": baseline / 2**30, "peak_gb": peak / 2**30, "bound_gb": BOUND_GB,
         "within_bound": peak / 2**30 <= BOUND_GB, "seconds": elapsed, "visitors": args.visitors,
         "link_pages": args.links, "requests": log, "links_opened": len(opened),
         "predictions": len(times), "prediction_errors": errors,
         "prediction_median_s": statistics.median(times) if times else None,
         "prediction_worst_s": max(times) if times else None,
         "rss_gb": [[round(t - started, 2), round(b / 2**30, 3)] for t, b in samples if t >= started][::4],
         "machine": machine(), "notes": args.notes}
    save("app_memory", r)
    print(f"server memory: {r['baseline_gb']:.2f} GB at rest, peak {r['peak_gb']:.2f} GB under load "
          f"(bound {BOUND_GB:g} GB: {'within' if r['within_bound'] else 'EXCEEDED'})")
    print(f"heavy requests: {log['done']} done, {log['refused']} refused by name, {log['busy']} refused as busy; "
          f"{len(opened)} links opened")
    print(f"predictions meanwhile: {len(times)} (median {r['prediction_median_s'] or 0:.2f} s, worst "
          f"{r['prediction_worst_s'] or 0:.2f} s), {len(errors)} failed")
    return 0 if r["within_bound"] and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
