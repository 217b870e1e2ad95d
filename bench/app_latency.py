"""How fast the app answers, measured end to end through its HTTP API (2 threads, EfficientNet-Lite0).

    python -m bench.app_latency [--repeats R]

- cold start: `python app.py` launched until the first page is served;
- re-quantize: bits or method changed, new predictions back (the /apply endpoint);
- refresh: every analysis view for a new image (the /refresh endpoint), with Grad-CAM and with IG;
- memory: RSS growth of the app's cache after 50 different re-quantizations.
Targets (issue 3): re-quantize <= 1 s, refresh <= 3 s, cold start <= 20 s, memory < 200 MB.
Writes bench/results/app_latency.json.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from bench.common import ROOT, machine, save

TARGETS = {"cold_start_s": 20.0, "requantize_s": 1.0, "refresh_s": 3.0, "memory_growth_mb": 200.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], port: int) -> tuple[subprocess.Popen, float]:
    """Start a server process and wait for its first page: (process, seconds it took)."""
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - start
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited before serving") from None
            if time.perf_counter() - start > 180:
                proc.terminate()
                raise RuntimeError(f"{args} did not serve within 180 s") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


# The app as it runs after its first seconds: ranges searched (app.py does it in a background
# thread; here before serving, so no request races the search), then the same queue settings.
WARM_SERVER = ("import torch, app; from spiq.ui import state; torch.set_num_threads(2); state.warm_up(); "
               "app.demo.queue(default_concurrency_limit=4).launch(server_name='127.0.0.1')")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    proc, t_cold = _serve(["app.py"], _free_port())
    _stop(proc)
    print(f"cold start to first page: {t_cold:.1f} s")

    from gradio_client import Client, handle_file

    # The server runs in its own process, as for a user: a client in the same process would fight
    # it for the GIL and charge the app for its own polling.
    port = _free_port()
    proc, _ = _serve(["-c", WARM_SERVER], port)
    try:
        return _measure(Client(f"http://127.0.0.1:{port}/", verbose=False), handle_file, proc.pid, t_cold, args)
    finally:
        _stop(proc)


# long: every measured path in the order a visitor takes them, each timed where it happens
def _measure(client, handle_file, pid: int, t_cold: float, args) -> int:
    table = {"headers": [], "data": []}
    cat = handle_file(str(ROOT / "assets" / "cat.jpg"))
    images = [handle_file(str(ROOT / "assets" / f)) for f in ("coffee.jpg", "rocket.jpg", "astronaut.jpg", "camera.jpg")]

    def apply(method, w, a):
        start = time.perf_counter()
        client.predict(method, w, a, "channel", "method default", True, table, cat, api_name="/apply")
        return time.perf_counter() - start

    apply("spiq", 8, 8)
    changes = [("spiq", 8, 4), ("spiq", 8, 5), ("static-tensor", 8, 5), ("dynamic-channel", 8, 5), ("spiq", 6, 6),
               ("spiq", 4, 8), ("calib-mse", 8, 4), ("spiq", 8, 3)][: max(args.repeats, 5)]
    requant = {f"{m} W{w}A{a}": apply(m, w, a) for m, w, a in changes}
    again = {f"{m} W{w}A{a} (cached)": apply(m, w, a) for m, w, a in changes[:3]}

    def refresh(img, attr):
        client.predict(img, api_name="/predict")
        start = time.perf_counter()
        client.predict(img, None, None, None, attr, api_name="/refresh")
        return time.perf_counter() - start

    apply("spiq", 8, 4)
    refresh(cat, "grad-cam")  # first use of each method's model at these bits
    refresh_cam = [refresh(img, "grad-cam") for img in images]
    refresh_ig = [refresh(img, "integrated-gradients") for img in images]
    # bits never seen: the Story view quantizes two methods anew, and the Methods tab (drawn when
    # shown, or after the views while it is) every method
    after_apply, methods_tab = [], []
    for w, a in ((7, 6), (6, 7), (7, 5)):
        apply("spiq", w, a)
        after_apply.append(refresh(images[0], "grad-cam"))
        start = time.perf_counter()
        client.predict(images[0], api_name="/methods")
        methods_tab.append(time.perf_counter() - start)

    rss0 = _rss_mb(pid)
    configs = [(m, w, a) for w in (8, 6, 5, 4) for a in (8, 7, 6, 5, 4, 3) for m in ("spiq", "static-tensor")]
    configs += [("dynamic-channel", w, a) for w, a in ((8, 8), (8, 4))]
    for m, w, a in configs[:50]:
        apply(m, w, a)
    growth = _rss_mb(pid) - rss0

    worst_requant = max(requant.values())
    results = {
        "machine": machine(), "targets": TARGETS,
        "cold_start_s": t_cold,
        "requantize_s": {"per_change": requant, "cached": again, "median": statistics.median(requant.values()),
                         "worst": worst_requant},
        "refresh_s": {"grad_cam_per_image": refresh_cam, "median_grad_cam": statistics.median(refresh_cam),
                      "integrated_gradients_per_image": refresh_ig,
                      "median_integrated_gradients": statistics.median(refresh_ig),
                      "after_new_bits_per_change": after_apply, "median_after_new_bits": statistics.median(after_apply),
                      "methods_tab_after_new_bits": methods_tab,
                      "median_methods_tab_after_new_bits": statistics.median(methods_tab)},
        "memory_growth_mb": {"after_50_requantizations": growth},
    }
    save("app_latency", results)
    print(f"{'measure':44} {'seconds / MB':>12} {'target':>8}")
    print(f"{'cold start to first page':44} {t_cold:12.2f} {'<= 20':>8}")
    for k, v in {**requant, **again}.items():
        print(f"{'re-quantize + predictions: ' + k:44} {v:12.2f} {'<= 1':>8}")
    print(f"{'all views, new image (Grad-CAM), median':44} {statistics.median(refresh_cam):12.2f} {'<= 3':>8}")
    print(f"{'all views, new image (Integrated Gradients), median':44} {statistics.median(refresh_ig):12.2f} {'<= 3':>8}")
    print(f"{'all views after new bits, median':44} {statistics.median(after_apply):12.2f} {'<= 3':>8}")
    print(f"{'Methods tab after new bits (all anew), median':44} {statistics.median(methods_tab):12.2f} {'<= 3':>8}")
    print(f"{'RSS growth after 50 re-quantizations (MB)':44} {growth:12.0f} {'< 200':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
