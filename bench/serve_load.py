"""The demo server (`--config.mode=serve`) under load: time to the first image after start-up and per-request latency
with concurrent clients, on loopback only (BENCHMARKS.md, "Demo page").

    python bench/serve_load.py --workdir /tmp/d2g_mnist                      # the MNIST job's export
    python bench/serve_load.py --workdir /tmp/w --unet <teacher>/unet        # any diffusers U-Net folder
    python bench/serve_load.py --workdir /tmp/d2g_mnist --screenshot docs/demo.png

Starts the real command (`python -m d2g_jax.main --config=<config> --workdir=<workdir> --config.mode=serve
--config.serve.port=0`) and measures, from the process launch: when it listens (load + the student's compile), when
the first one-step image comes back (one POST as soon as it listens), and when the teacher's first image comes back.
Then `--clients` threads (each its own keep-alive connection to 127.0.0.1) POST one-image student requests with
random world captions and seeds back to back for `--seconds`: p50 / p99 / max latency, requests/s, errors (any
non-200 or failed connection) and the mean batch the worker formed. A 1-client run of `--seconds` / 3 gives the
unloaded latency first. `--screenshot`: the page in Debian's Chromium with the teacher toggle on (docs/demo.png).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    conn.request("POST", "/api/generate", data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def get(url: str, path: str) -> dict:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("GET", path)
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def load(url: str, clients: int, seconds: float, captions: list[str], num_images: int) -> dict:
    u = urllib.parse.urlsplit(url)
    lat, errors, lock = [], [], threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        while time.perf_counter() < stop:
            body = {"prompt": rng.choice(captions), "seed": rng.randrange(2**31), "num_images": num_images}
            t0 = time.perf_counter()
            try:
                status, out = post(conn, body)
                ok = status == 200 and len(out["student"]["images"]) == num_images
                err = None if ok else f"{status}: {out.get('error')}"
            except Exception as e:  # noqa: BLE001 - counted as an error
                err = f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                (errors.append(err) if err else lat.append(dt))
        conn.close()

    b0 = get(url, "/api/info")["batches"]["student"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    batches = get(url, "/api/info")["batches"]["student"] - b0
    n = len(lat)
    return {"clients": clients, "seconds": round(wall, 1), "requests": n, "errors": len(errors),
            "error_examples": errors[:3], "requests_per_s": n / wall, "images_per_s": n * num_images / wall,
            "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99), "max_ms": 1000 * max(lat) if lat else None,
            "mean_batch": (n + len(errors)) * num_images / max(batches, 1)}  # fmt: skip


def screenshot(url: str, path: str, prompt: str, count: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=os.environ.get("D2G_CHROMIUM", "/usr/bin/chromium"),
                              args=CHROMIUM_ARGS, headless=True)  # fmt: skip
        page = b.new_page(viewport={"width": 1100, "height": 560}, device_scale_factor=1)
        page.set_default_timeout(300_000)
        page.goto(url)
        page.wait_for_selector("#model:has-text('student')")
        page.check("#teacher")
        page.fill("#prompt", prompt)
        page.fill("#seed", "0")
        page.fill("#count", str(count))
        for _ in range(2):  # the second answer is the one shown (warm: both times are steady-state)
            with page.expect_response("**/api/generate"):
                page.click("#go")
            page.wait_for_selector("body[data-busy='0']", state="attached")
        page.screenshot(path=path, full_page=True)
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="configs/mnist.py")
    ap.add_argument("--unet", default="", help="sample.unet (default: the workdir's latest export)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--num_images", type=int, default=1)
    ap.add_argument("--max_images", type=int, default=8)
    ap.add_argument("--screenshot", default="")
    ap.add_argument("--screenshot_prompt", default="a red seven on a black background")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "d2g_jax.main", f"--config={args.config}", f"--workdir={args.workdir}",
           "--config.mode=serve", "--config.serve.port=0", f"--config.serve.max_images={args.max_images}"]  # fmt: skip
    if args.unet:
        cmd.append(f"--config.sample.unet={args.unet}")
    t_launch = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, url = [], None
    for line in proc.stdout:
        lines.append(line)
        sys.stdout.write("  server| " + line)
        m = re.search(r"listening on (http://\S+/)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [sys.stdout.write("  server| " + x) for x in proc.stdout], daemon=True).start()
    res: dict = {"command": " ".join(cmd[1:]), "listening_s": time.perf_counter() - t_launch}
    try:
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        status, out = post(conn, {"prompt": "a red seven on a black background", "seed": 0})
        assert status == 200, out
        res["first_image_s"] = time.perf_counter() - t_launch
        res["first_request_ms"] = out["total_ms"]
        status, out = post(conn, {"prompt": "a red seven on a black background", "seed": 0, "teacher": True})
        assert status == 200, out
        res["first_teacher_image_s"] = time.perf_counter() - t_launch
        conn.close()
        while not (info := get(url, "/api/info"))["ready"] or not (info["teacher"] or {"ready": True})["ready"]:
            time.sleep(0.5)
        res["all_compiled_s"] = time.perf_counter() - t_launch
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        for n in (1, args.max_images):  # steady state, one client
            out = [post(conn, {"prompt": "a red seven on a black background", "seed": s, "num_images": n,
                               "teacher": True})[1] for s in range(3)]  # fmt: skip
            res[f"steady_ms_per_image_n{n}"] = {w: min(o[w]["ms_per_image"] for o in out)
                                                for w in ("student", "teacher")}  # fmt: skip
            res[f"steady_request_ms_n{n}_with_teacher"] = min(o["total_ms"] for o in out)
        conn.close()
        from d2g_jax.world.data import all_captions

        caps = all_captions()
        res["load_1_client"] = load(url, 1, max(5.0, args.seconds / 3), caps, args.num_images)
        res[f"load_{args.clients}_clients"] = load(url, args.clients, args.seconds, caps, args.num_images)
        res["info"] = get(url, "/api/info")
        if args.screenshot:
            screenshot(url, args.screenshot, args.screenshot_prompt, min(4, args.max_images))
            res["screenshot"] = args.screenshot
    finally:
        proc.terminate()  # SIGTERM: a background job's SIGINT may be ignored
        proc.wait(30)
    try:
        res["loadavg"] = os.getloadavg()
    except OSError:
        pass
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
