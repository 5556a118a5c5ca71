"""The demo server (`--config.mode=serve`, d2g_jax/serve.py) in a real headless browser: Debian's Chromium driven by
Playwright (`/usr/bin/chromium`; `.ci/run` installs it when missing; `D2G_CHROMIUM` names another executable).

The server is the real command (`python -m d2g_jax.main --config=configs/mnist.py --config.mode=serve`) on the MNIST
world, started once for the module. Its "student" is the teacher's own U-Net (`sample.unet=<teacher>/unet`: the
teacher's one-step x0, a real diffusers folder, so no training is needed); the teacher toggle runs the world
teacher's 50-step DDIM ODE with CFG 3, and the world's classifier checks that those images show the prompted digit
in the prompted colour. Every bad input must come back as a message on the page (or a 4xx), never a traceback."""

import base64
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(ROOT, "d2g_jax", "world", "assets", "mnist")
CHROMIUM = os.environ.get("D2G_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless, offline: nothing phones home (the machine has no internet; Playwright's own browser download is not used).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
MAX_IMAGES = 2
SIZE = 32  # the MNIST world's resolution
STACK = re.compile(r"Traceback|File \"[^\"]+\", line \d+")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of `--config.mode=serve` on the MNIST world (a free port on 127.0.0.1), stopped with SIGTERM."""
    workdir = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    # one CPU device (configs/mnist.py asks for 2; the buckets asserted below are those of one device)
    cmd = [sys.executable, "-m", "d2g_jax.main", "--config=configs/mnist.py", f"--workdir={workdir}",
           "--config.mode=serve", "--config.cpu.host_devices=1",
           f"--config.sample.unet={os.path.join(WORLD, 'pipeline', 'unet')}",
           "--config.serve.port=0", f"--config.serve.max_images={MAX_IMAGES}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 300
    while not found.is_set() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    url = next((m.group(1) for line in lines for m in [re.search(r"listening on (http://\S+/)", line)] if m), None)
    if url is None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(lines[-40:]))
    yield {"url": url, "log": lines}
    proc.terminate()  # SIGTERM: a background job's SIGINT may be ignored
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "hung"
    time.sleep(0.5)  # the reader's last lines
    assert rc == 0 and any("serve: stopped" in line for line in lines), f"exit {rc}:\n" + "".join(lines[-20:])
    assert not any(STACK.search(line) for line in lines), "the server logged a traceback:\n" + "".join(lines)


@pytest.fixture(scope="module")
def browser():
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"{CHROMIUM}: no Chromium; install Debian's (`apt-get install -y chromium`, as .ci/run does) or "
                    "set D2G_CHROMIUM to a Chromium executable.")  # fmt: skip
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1100, "height": 800})
    pg.set_default_timeout(120_000)  # a request may wait for the teacher's start-up compile
    pg.goto(server["url"])
    pg.wait_for_selector("#model:has-text('student')")  # selectors, not wait_for_function: the page's CSP has no eval
    assert pg.input_value("#count") == str(MAX_IMAGES)  # the page's default (4) capped at the server's limit
    yield pg
    assert not STACK.search(pg.content()), "the page shows a traceback"
    pg.close()


def _fill(pg, prompt=None, seed=None, count=None):
    for sel, v in (("#prompt", prompt), ("#seed", seed), ("#count", count)):
        if v is not None:
            pg.fill(sel, v)


def _generate(pg):
    """Clicks Generate and waits for the answer to be on the page; returns the HTTP status."""
    with pg.expect_response("**/api/generate") as r:
        pg.click("#go")
    status = r.value.status
    pg.wait_for_selector("body[data-busy='0']", state="attached")
    return status


def _images(pg, who):
    """The page's `who` images, decoded from their PNG data: uint8 [N, H, W, 3] (and the browser's natural sizes)."""
    from PIL import Image

    rows = pg.eval_on_selector_all(f"img.{who}", "els => els.map(e => [e.src, e.naturalWidth, e.naturalHeight])")
    out = []
    for src, w, h in rows:
        assert src.startswith("data:image/png;base64,"), src[:40]
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
        assert (w, h) == (img.shape[1], img.shape[0])
        out.append(img)
    return np.stack(out) if out else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def test_generate_shows_student_images_of_the_right_size(page):
    _fill(page, "a red seven on a black background", "7", "2")
    assert _generate(page) == 200
    imgs = _images(page, "student")
    assert imgs.shape == (2, SIZE, SIZE, 3)
    assert imgs.std() > 5, "blank images"
    assert not np.array_equal(imgs[0], imgs[1]), "seeds 7 and 8 drew the same image"
    assert page.locator("img.teacher").count() == 0 and page.is_hidden("#teacher-panel")
    assert re.fullmatch(r"[\d.]+ (ms|s) / image", page.text_content("#student-time"))
    assert page.text_content("#message") == ""
    assert [page.get_attribute(f"img.student >> nth={i}", "data-seed") for i in range(2)] == ["7", "8"]


def test_teacher_on_the_same_noise_draws_the_prompted_digit_and_colour(page):
    from d2g_jax.eval.attributes import load_classifier

    prompt = "a green three on a black background"
    page.check("#teacher")
    _fill(page, prompt, "0", "2")
    assert _generate(page) == 200
    student, teacher = _images(page, "student"), _images(page, "teacher")
    assert student.shape == teacher.shape == (2, SIZE, SIZE, 3)
    assert page.is_visible("#teacher-panel") and re.search(r"/ image", page.text_content("#teacher-time"))
    assert "50 DDIM steps" in page.text_content("#teacher-steps")
    clf = load_classifier(os.path.join(WORLD, "classifier"))
    want = clf.parse(prompt)
    assert None not in want.values()
    got = clf.predict(teacher)
    for attr, cls in want.items():
        assert list(got[attr]) == [cls, cls], f"teacher {attr}: predicted {list(got[attr])}, prompted {cls}"
    # student and teacher start from the same noise: the 1-step x0 of the same seed is closer to the teacher's image
    # of that seed than to the other seed's
    d = np.abs(student[:, None].astype(float) - teacher[None].astype(float)).mean(axis=(2, 3, 4))
    assert d[0, 0] < d[0, 1] and d[1, 1] < d[1, 0], d


def test_live_mode_regenerates_as_you_type_debounced(page):
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/api/generate") else None)
    _fill(page, "a blue one on a black background", "3", "1")
    page.check("#live")  # turning it on generates once
    page.wait_for_selector("body[data-prompt]", state="attached")
    n0 = len(sent)
    text = "a blue five on a black background"
    page.fill("#prompt", "")
    page.locator("#prompt").press_sequentially(text, delay=15)
    page.wait_for_selector(f"body[data-prompt={json.dumps(text)}][data-busy='0']", state="attached")
    assert 1 <= len(sent) - n0 <= 4, f"{len(sent) - n0} requests for {len(text)} keystrokes: not debounced"
    assert _images(page, "student").shape[1:] == (SIZE, SIZE, 3)


BAD = [
    ("", "0", "1", "The prompt is empty"),
    ("   ", "0", "1", "The prompt is empty"),
    ("a red one", "abc", "1", "Seed must be a whole number"),
    ("a red one", "-3", "1", "Seed must be a whole number"),
    ("a red one", "1.5", "1", "Seed must be a whole number"),
    ("a red one", "99999999999", "1", "Seed 99999999999 is out of range"),
    ("a red one", "0", "0", "Number of images 0 is out of range"),
    ("a red one", "0", str(MAX_IMAGES + 1), f"Number of images {MAX_IMAGES + 1} is out of range"),
    ("a red one", "0", "two", "Number of images must be a whole number"),
    ("x" * 2500, "0", "1", "at most 2000 are accepted"),
]


def test_bad_inputs_show_a_message_not_a_traceback(page):
    _fill(page, "a red one on a black background", "0", "1")
    assert _generate(page) == 200
    for prompt, seed, count, message in BAD:
        _fill(page, prompt, seed, count)
        assert _generate(page) == 400, (prompt[:20], seed, count)
        assert message in page.text_content("#message"), (message, page.text_content("#message"))
        assert page.is_visible("#message")
        assert _images(page, "student").shape[0] == 1, "the last good images stay on the page"
    # over the tokenizer's 77 tokens: generated from the truncated prompt, with a visible notice
    long_prompt = "a red seven on a black background " + " ".join(["with a small cat"] * 25)
    _fill(page, long_prompt, "0", "1")
    assert _generate(page) == 200
    assert page.text_content("#message") == ""
    notice = page.text_content("#notice")
    assert page.is_visible("#notice") and "Prompt truncated" in notice and "reads the first 75" in notice
    assert _images(page, "student").shape == (1, SIZE, SIZE, 3)


def _request(url, method="GET", path="/", body=None, headers=None):
    """(status, parsed JSON body) of a raw HTTP request (the path is sent as is: no client-side normalisation)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.putrequest(method, path, skip_host=headers is not None and "Host" in headers, skip_accept_encoding=True)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    if body is not None and "Content-Length" not in (headers or {}):
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    raw = r.read().decode("utf-8")
    conn.close()
    assert not STACK.search(raw), raw
    return r.status, (json.loads(raw) if r.getheader("Content-Type", "").startswith("application/json") else raw)


def test_http_errors_are_4xx_with_a_message_and_requests_never_compile(server):
    url = server["url"]
    js = {"Content-Type": "application/json"}
    cases = [
        ("GET", "/etc/passwd", None, None, 404),
        ("GET", "/../../etc/passwd", None, None, 404),
        ("GET", "/%2e%2e/%2e%2e/d2g_jax/serve.py", None, None, 404),
        ("GET", "/serve_static/index.html", None, None, 404),
        ("GET", "/api/generate", None, None, 405),
        ("PUT", "/", b"", None, 405),
        ("DELETE", "/api/generate", None, None, 405),
        ("POST", "/api/nothing", b"{}", js, 404),
        ("POST", "/api/generate", b"x" * 20000, js, 413),
        ("POST", "/api/generate", b"{not json", js, 400),
        ("POST", "/api/generate", b"\xff\xfe", js, 400),
        ("POST", "/api/generate", b"prompt=a+red+one", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("POST", "/api/generate", b'{"prompt": "a red one", "path": "/etc/passwd"}', js, 400),
        ("POST", "/api/generate", b'{"prompt": ["a", "b"]}', js, 400),
        ("POST", "/api/generate", b'{"prompt": "a red one", "teacher": "yes"}', js, 400),
        ("POST", "/api/generate", b'{"prompt": "a red one", "num_images": true}', js, 400),
        ("GET", "/", None, {"Host": "attacker.example"}, 403),
    ]
    for method, path, body, headers, want in cases:
        status, out = _request(url, method, path, body, headers)
        assert status == want, (method, path, status, out)
        assert isinstance(out, dict) and out.get("error"), (method, path, out)
    status, page = _request(url, "GET", "/")
    assert status == 200 and "<script>" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|@import|url\(", page), "the page loads something"

    # the jit caches after start-up stay as they are: every served shape was compiled once, up front
    deadline = time.time() + 180
    while time.time() < deadline:
        info = _request(url, path="/api/info")[1]
        if info["ready"] and info["teacher"]["ready"]:
            break
        time.sleep(0.5)
    info = _request(url, path="/api/info")[1]
    assert info["buckets"] == [1, 2] and info["max_tokens"] == 77
    before = info["compiled"]
    assert before == {"student": 2, "noise": 2, "teacher": 2}, before
    for n, seed in ((1, 11), (2, 4294967294), (1, 0)):
        body = json.dumps({"prompt": "a white four on a black background", "seed": seed, "num_images": n,
                           "teacher": n == 2}).encode()  # fmt: skip
        status, out = _request(url, "POST", "/api/generate", body, js)
        assert status == 200 and len(out["student"]["images"]) == n and out["height"] == out["width"] == SIZE
    assert _request(url, path="/api/info")[1]["compiled"] == before


def test_concurrent_requests_are_all_answered(server):
    url = server["url"]
    results = []

    def one(i):
        body = json.dumps({"prompt": f"a yellow {['one', 'two'][i % 2]} on a black background", "seed": i}).encode()
        req = urllib.request.Request(url + "api/generate", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            results.append((r.status, json.loads(r.read())))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200] * 8
    assert all(len(o["student"]["images"]) == 1 for _, o in results)


def test_buckets_and_the_worker_batches_waiting_requests():
    """Unit level, no model: the compiled batch sizes; jobs that wait while the worker is busy run as one batch (in
    the smallest bucket that holds them); a full queue answers 503."""
    from d2g_jax import serve

    assert serve.buckets_for(8, 1) == (1, 2, 4, 8)
    assert serve.buckets_for(6, 1) == (1, 2, 4, 6)
    assert serve.buckets_for(3, 2) == (2, 4)
    assert serve.buckets_for(8, 8) == (8,)
    gate, calls = threading.Event(), []

    def run(bucket, seeds, prompts):
        calls.append((bucket, list(seeds)))
        gate.wait(30)
        return np.zeros((len(prompts), 2, 2, 3), np.uint8) + np.asarray(seeds, np.uint8)[:, None, None, None]

    w = serve._Worker("student", (1, 2, 4), run, lambda b: None, max_queue=3)
    w.start(first_now=True)
    assert w.ready.wait(30) and w.compiled == [1, 2, 4]
    first = w.submit(["a"], [0])
    while not calls:
        time.sleep(0.01)
    waiting = [w.submit(["b"], [1]), w.submit(["c", "c"], [2, 3]), w.submit(["d"], [4])]
    with pytest.raises(serve.RequestError, match="busy") as e:
        w.submit(["e"], [5])
    assert e.value.status == 503
    gate.set()
    for j in [first, *waiting]:
        assert j.done.wait(30) and not j.error
    assert calls == [(1, [0]), (4, [1, 2, 3, 4])]
    assert [j.images[:, 0, 0, 0].tolist() for j in waiting] == [[1], [2, 3], [4]]
    assert [j.batch_images for j in waiting] == [4, 4, 4]


def test_before_the_large_buckets_compile_a_batch_runs_in_chunks_of_a_compiled_one():
    from d2g_jax import serve

    gate, calls = threading.Event(), []

    def warm(b):
        if b > 1:
            gate.wait(30)  # the larger buckets are still compiling

    def run(bucket, seeds, prompts):
        calls.append((bucket, list(seeds)))
        return np.zeros((len(prompts), 2, 2, 3), np.uint8)

    w = serve._Worker("student", (1, 2, 4), run, warm, max_queue=8)
    w.start(first_now=True)
    job = w.submit(["a"] * 3, [0, 1, 2])
    assert job.done.wait(30) and not job.error and job.images.shape[0] == 3
    assert calls == [(1, [0]), (1, [1]), (1, [2])] and not w.ready.is_set()
    gate.set()
    assert w.ready.wait(30) and w.compiled == [1, 2, 4]
    job = w.submit(["a"] * 3, [0, 1, 2])
    assert job.done.wait(30) and calls[-1] == (4, [0, 1, 2])


@pytest.mark.parametrize(
    "field,value,message",
    [("serve.host", "", "an address to bind"), ("serve.host", "http://x", "an address to bind"),
     ("serve.port", 70000, "serve.port=70000 must be in \\[0, 65535\\]"), ("serve.max_images", 0, "serve.max_images"),
     ("serve.max_images", 65, "serve.max_images"), ("serve.queue", 0, "serve.queue"),
     ("serve.port", -1, "serve.port=-1"), ("sample.unet", "/nonexistent", "no config.json")],
)  # fmt: skip
def test_serve_config_rules(tmp_path, field, value, message):
    import importlib.util

    from d2g_jax.validate import ConfigError, validate

    spec = importlib.util.spec_from_file_location("mnist_cfg", os.path.join(ROOT, "configs", "mnist.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.mode = "serve"
    assert "serve" in validate(c, str(tmp_path))
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(c, str(tmp_path))
