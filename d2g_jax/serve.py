"""`--config.mode=serve`: a local demo page for a one-step generator, with its teacher on the same noise.

    python -m d2g_jax.main --config=configs/mnist.py --workdir=/tmp/d2g_mnist --config.mode=serve
    # → http://127.0.0.1:8000 (localhost only; --config.serve.host=0.0.0.0 opens it to the network)

The page (`d2g_jax/serve_static/index.html`, self-contained: no CDN, no asset fetched at run time) has a prompt box,
a seed, the number of images (1 … `serve.max_images`), "live" (regenerates as you type, debounced, one request in
flight per page) and "teacher on the same noise" (the teacher's `pairs.num_steps`-step DDIM ODE with CFG
`pairs.guidance_scale` beside the student, as `--config.mode=sample` shows it), each with its time per image.
Image i of a request uses `noise_for_seeds(seed + i)`, as the sample mode: the page's images equal the sample mode's
for the same prompt and seed.

Model side (`Engine`):

* **Compiled once.** The served batch sizes are buckets: the powers of two below `serve.max_images` and
  `serve.max_images` itself, each rounded up to a multiple of the devices (`sharding.round_batch`). Each bucket is an
  `OneStepSampler` of that fixed batch sharing the loaded params; a batch of n images runs in the smallest bucket
  ≥ n, padded (noise included: it is drawn at the bucket's size), so the set of shapes is closed. The student's
  smallest bucket is compiled before the server listens (the time to the first image); the other buckets and the
  teacher's compile in background threads, smallest first, while requests are served with what is compiled (a
  batch larger than the largest compiled bucket runs in chunks of it). Only these warm-ups compile: `/api/info`
  reports the jit cache sizes, which requests never change (tests/serve_test.py checks).
* **Queued and batched.** Requests are handled on threads (stdlib `ThreadingHTTPServer`), but the device work is
  not: one worker thread per model (student, teacher) takes jobs from a bounded queue (`serve.queue`, full → 503) and
  coalesces the waiting ones into one batch up to the largest bucket, so several pages share batches instead of
  contending for the device. A slow teacher request never delays a student one.

HTTP: `GET /` (the page), `GET /api/info`, `POST /api/generate` with a JSON object {"prompt", "seed", "num_images",
"teacher"}. Anything else is a 404 / 405; a body over `MAX_BODY` bytes a 413; a non-JSON body a 415 / 400; a bad field
a 400 naming it and what it accepts; a full queue a 503. Every error is `{"error": "<message>"}` — never a traceback
(the server log keeps it). Prompts over the tokenizer's length (77 tokens for SD) are truncated as the text encoder
truncates them, and the response says so (`notice`). No request value reaches the file system: the page is read once
at start-up. Bound to a loopback address, the server also refuses a Host header that is not a loopback name (a
DNS-rebinding guard).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import io
import ipaddress
import json
import os
import re
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from absl import logging

from d2g_jax import sharding as shd
from d2g_jax.generate import OneStepSampler, _noise_batch, noise_for_seeds

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_static", "index.html")
MAX_BODY = 16 * 1024  # bytes of a request body
MAX_PROMPT_CHARS = 2000  # longer prompts are refused before tokenising (the tokenizer keeps 77 tokens anyway)
SEED_MAX = 2**32 - 1  # noise seeds are uint32 (generate.noise_for_seeds)
WAIT_S = 600.0  # a request waiting longer than this for its images gets a 503
FIELDS = ("prompt", "seed", "num_images", "teacher")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx / 503) and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


def buckets_for(max_images: int, devices: int) -> tuple[int, ...]:
    """The served batch sizes: powers of two below `max_images` and `max_images`, rounded up to multiples of
    `devices`."""
    sizes, b = {int(max_images)}, 1
    while b < max_images:
        sizes.add(b)
        b *= 2
    return tuple(sorted({max(1, -(-s // devices)) * devices for s in sizes}))


def png_data_url(image: np.ndarray) -> str:
    """uint8 [H, W, 3] → "data:image/png;base64,…"."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# Request fields.


def _shown(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "…"


def parse_int(body: dict[str, Any], name: str, label: str, lo: int, hi: int, default: int) -> int:
    """A whole number in [lo, hi] from a JSON number or a string of digits (what a text box sends)."""
    v = body.get(name, default)
    if isinstance(v, str) and re.fullmatch(r"\s*\+?\d{1,30}\s*", v):
        v = int(v)
    elif isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(400, f"{label} must be a whole number from {lo} to {hi}; got {_shown(v)}.")
    if not lo <= v <= hi:
        raise RequestError(400, f"{label} {v} is out of range: use a whole number from {lo} to {hi}.")
    return v


def check_prompt(prompt: Any, tokenizer: Any, max_tokens: int, lock: Any = None) -> tuple[str, str]:
    """(the prompt, a notice) — the notice says what the text encoder reads when the prompt is over `max_tokens`
    (start and end tokens included), which the tokenizer truncates as in training."""
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be text; got {_shown(prompt)}.")
    p = prompt.strip()
    if not p:
        raise RequestError(400, "The prompt is empty: type what to draw (e.g. “a red seven on a black "
                                "background”).")  # fmt: skip
    if len(p) > MAX_PROMPT_CHARS:
        raise RequestError(400, f"The prompt is {len(p)} characters long; at most {MAX_PROMPT_CHARS} are accepted "
                                f"(the text encoder reads only its first {max_tokens - 2} tokens).")  # fmt: skip
    with lock or contextlib.nullcontext():  # the tokenizer is not thread-safe (TextEncoder.tokenize_lock)
        ids = tokenizer(p, truncation=False, verbose=False)["input_ids"]  # verbose: no "longer than 77" warning
        if len(ids) <= max_tokens:
            return p, ""
        kept = tokenizer.decode(ids[1 : max_tokens - 1], skip_special_tokens=True).strip()
    notice = (f"Prompt truncated: it is {len(ids) - 2} tokens and the text encoder reads the first {max_tokens - 2} "
              f"({max_tokens} with its start and end tokens), so the images are of: “{kept}”.")  # fmt: skip
    return p, notice


# ----------------------------------------------------------------------------------------------------------
# The model side.


@dataclasses.dataclass
class _Job:
    prompts: list[str]
    seeds: list[int]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    t_submit: float = dataclasses.field(default_factory=time.perf_counter)
    images: np.ndarray | None = None
    error: str = ""
    batch_images: int = 0  # images of the batch this job ran in (coalesced jobs, padding excluded)
    bucket: int = 0
    seconds: float = 0.0  # the batch's wall time
    queued_s: float = 0.0


class _Worker:
    """One model's device work: a worker thread takes jobs from a bounded queue and runs the waiting ones as one batch
    (up to the largest bucket) in the smallest compiled bucket that holds it; a warm-up thread compiles the buckets,
    smallest first. Until every bucket is compiled, a batch larger than the largest compiled one runs in chunks of
    it, so a request never waits for (or triggers) a compile once one bucket is ready.

    `run(bucket, seeds, prompts)` → uint8 images (len(prompts) ≤ bucket); `warm(bucket)` compiles one bucket.
    """

    def __init__(self, name: str, buckets: Sequence[int], run: Callable, warm: Callable, max_queue: int):
        self.name, self.buckets, self._run, self._warm = name, tuple(sorted(buckets)), run, warm
        self._q: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._max_queue = int(max_queue)
        self.compiled: list[int] = []  # ascending
        self.failed = ""  # a warm-up error: jobs get it as their error
        self.ready = threading.Event()  # every bucket compiled (or the warm-up failed)
        self.warm_s = 0.0
        self.batches = 0

    def start(self, first_now: bool = True) -> None:
        """`first_now`: compile the smallest bucket in the caller's thread first (the student: before the server
        listens); the other buckets compile in the background."""
        if first_now:
            self._warm_one(self.buckets[0])
        threading.Thread(target=self._warm_rest, name=f"serve-{self.name}-compile", daemon=True).start()
        threading.Thread(target=self._loop, name=f"serve-{self.name}", daemon=True).start()

    def _warm_one(self, bucket: int) -> None:
        t0 = time.perf_counter()
        self._warm(bucket)
        dt = time.perf_counter() - t0
        with self._cv:
            self.warm_s += dt
            self.compiled.append(bucket)
            self._cv.notify_all()
        logging.info("serve: %s compiled for a batch of %d in %.1f s", self.name, bucket, dt)

    def _warm_rest(self) -> None:
        try:
            for b in self.buckets[len(self.compiled) :]:
                self._warm_one(b)
        except Exception as e:  # noqa: BLE001 - the log has the traceback; the page gets the message
            logging.error("serve: %s warm-up failed:\n%s", self.name, traceback.format_exc())
            with self._cv:
                self.failed = f"{self.name} warm-up failed: {type(e).__name__}: {e}"
                self._cv.notify_all()
        self.ready.set()
        if not self.failed:
            logging.info("serve: %s ready: batches %s compiled (%.1f s of compiling)", self.name,
                         ",".join(map(str, self.buckets)), self.warm_s)  # fmt: skip

    def submit(self, prompts: list[str], seeds: list[int]) -> _Job:
        job = _Job(prompts, seeds)
        with self._cv:
            if len(self._q) >= self._max_queue:
                raise RequestError(503, f"The server is busy ({len(self._q)} requests are waiting for the "
                                        f"{self.name}); try again in a moment.")  # fmt: skip
            self._q.append(job)
            self._cv.notify_all()
        return job

    def _take(self) -> tuple[list[_Job], list[int]]:
        """The waiting jobs (coalesced up to the largest bucket) and the compiled buckets, once both exist."""
        with self._cv:
            while not self._q or not (self.compiled or self.failed):
                self._cv.wait()
            jobs = [self._q.popleft()]
            n = len(jobs[0].prompts)
            while self._q and n + len(self._q[0].prompts) <= self.buckets[-1]:
                n += len(self._q[0].prompts)
                jobs.append(self._q.popleft())
            return jobs, list(self.compiled)

    def _loop(self) -> None:
        while True:
            jobs, compiled = self._take()
            prompts = [p for j in jobs for p in j.prompts]
            seeds = [s for j in jobs for s in j.seeds]
            t0 = time.perf_counter()
            images, err, used = None, self.failed if not compiled else "", 0
            try:
                if compiled:
                    parts = []
                    for k in range(0, len(prompts), compiled[-1]):  # one call, or chunks until all are compiled
                        chunk = slice(k, k + compiled[-1])
                        bucket = next(b for b in compiled if b >= len(prompts[chunk]))
                        parts.append(self._run(bucket, seeds[chunk], prompts[chunk]))
                        used = max(used, bucket)
                    images = np.concatenate(parts)
            except Exception as e:  # noqa: BLE001 - the page gets the message, the log the traceback
                logging.error("serve: %s batch failed:\n%s", self.name, traceback.format_exc())
                images, err = None, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            self.batches += 1
            start = 0
            for j in jobs:
                k = len(j.prompts)
                j.images = None if images is None else images[start : start + k]
                j.error, j.batch_images, j.bucket, j.seconds, j.queued_s = err, len(prompts), used, dt, t0 - j.t_submit
                start += k
                j.done.set()


class Engine:
    """The served models: the student's buckets (and the teacher's, when loaded) behind their workers."""

    def __init__(self, sampler: OneStepSampler, *, max_images: int, teacher_ode: tuple[float, int] | None = None,
                 max_queue: int = 64):  # fmt: skip
        self.sampler = sampler
        self.max_images = int(max_images)
        self.buckets = buckets_for(self.max_images, sampler.mesh.size)
        self.samplers = {b: dataclasses.replace(sampler, batch_size=b) for b in self.buckets}
        self.teacher_ode = teacher_ode if sampler.teacher_params is not None else None
        self.tokenizer = sampler.text.tokenizers[0]
        self.max_tokens = int(sampler.text.max_lengths[0])
        h, w, _ = sampler.latent_shape
        vsf = sampler.gen.vae_scale_factor
        self.size = (h * vsf, w * vsf)
        self.student = _Worker("student", self.buckets, self._student, self._warm_student, max_queue)
        self.teacher = (_Worker("teacher", self.buckets, self._teacher, self._warm_teacher, max_queue)
                        if self.teacher_ode else None)  # fmt: skip

    def _noise(self, bucket: int, seeds: list[int]) -> np.ndarray:
        # drawn at the bucket's size (one compile per bucket), the padding rows dropped
        return noise_for_seeds(list(seeds) + [0] * (bucket - len(seeds)), self.sampler.latent_shape)[: len(seeds)]

    def _student(self, bucket: int, seeds: list[int], prompts: list[str]) -> np.ndarray:
        return self.samplers[bucket].images(self._noise(bucket, seeds), prompts)

    def _teacher(self, bucket: int, seeds: list[int], prompts: list[str]) -> np.ndarray:
        return self.samplers[bucket].teacher_images(self._noise(bucket, seeds), prompts, *self.teacher_ode)

    def _warm_student(self, bucket: int) -> None:
        self._student(bucket, [0] * bucket, [""] * bucket)

    def _warm_teacher(self, bucket: int) -> None:
        self._teacher(bucket, [0] * bucket, [""] * bucket)

    def start(self) -> None:
        """Compiles the student's smallest bucket (blocking) and starts the workers; the other buckets, and the
        teacher's, compile in the background."""
        self.student.start(first_now=True)
        if self.teacher:
            self.teacher.start(first_now=False)

    def compiled(self) -> dict[str, int]:
        """Entries in the jit caches: constant after start-up (no request compiles)."""
        out = {"student": sum(self.samplers[b]._student_fn._cache_size() for b in list(self.student.compiled)),
               "noise": _noise_batch._cache_size()}  # fmt: skip
        if self.teacher_ode:
            out["teacher"] = sum(self.samplers[b]._teacher_fn(*self.teacher_ode)._cache_size()
                                 for b in list(self.teacher.compiled))  # fmt: skip
        return out

    def info(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "unet": os.path.basename(os.path.dirname(s.source)) + "/" + os.path.basename(s.source),
            "height": self.size[0], "width": self.size[1], "max_images": self.max_images,
            "buckets": list(self.buckets), "devices": s.mesh.size, "max_tokens": self.max_tokens,
            "max_prompt_chars": MAX_PROMPT_CHARS, "seed_max": SEED_MAX,
            "ready": self.student.ready.is_set(), "compiled_buckets": list(self.student.compiled),
            "teacher": ({"guidance_scale": self.teacher_ode[0], "num_steps": self.teacher_ode[1],
                         "ready": self.teacher.ready.is_set(), "compiled_buckets": list(self.teacher.compiled)}
                        if self.teacher_ode else None),
            "compiled": self.compiled(),
            "batches": {"student": self.student.batches, "teacher": self.teacher.batches if self.teacher else 0},
        }  # fmt: skip

    def generate(self, body: Any) -> dict[str, Any]:
        """The response to a POST /api/generate body (a parsed JSON value); raises RequestError."""
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object with {', '.join(FIELDS)}; got {_shown(body)}.")
        unknown = sorted(k for k in body if k not in FIELDS)
        if unknown:
            raise RequestError(400, f"unknown field(s) {', '.join(map(_shown, unknown))}; the fields are "
                                    f"{', '.join(FIELDS)}.")  # fmt: skip
        n = parse_int(body, "num_images", "Number of images", 1, self.max_images, 1)
        seed = parse_int(body, "seed", "Seed", 0, SEED_MAX - (n - 1), 0)
        teacher = body.get("teacher", False)
        if not isinstance(teacher, bool):
            raise RequestError(400, f"teacher must be true or false; got {_shown(teacher)}.")
        if teacher and not self.teacher_ode:
            raise RequestError(400, "The teacher is not loaded on this server (config.serve.teacher=False).")
        prompt, notice = check_prompt(body.get("prompt", ""), self.tokenizer, self.max_tokens,
                                      self.sampler.text.tokenize_lock)  # fmt: skip
        t0 = time.perf_counter()
        seeds, prompts = [seed + i for i in range(n)], [prompt] * n
        jobs = {"student": self.student.submit(prompts, seeds)}
        if teacher:
            jobs["teacher"] = self.teacher.submit(prompts, seeds)
        out: dict[str, Any] = {"prompt": prompt, "notice": notice, "seed": seed, "num_images": n,
                               "height": self.size[0], "width": self.size[1]}  # fmt: skip
        for who, job in jobs.items():
            if not job.done.wait(WAIT_S):
                raise RequestError(503, f"The {who} did not answer within {WAIT_S:.0f} s; try again.")
            if job.error:
                raise RuntimeError(f"the {who} failed: {job.error}")
            out[who] = {"images": [png_data_url(x) for x in job.images],
                        "ms_per_image": 1000.0 * job.seconds / job.batch_images, "batch_images": job.batch_images,
                        "bucket": job.bucket, "queued_ms": 1000.0 * job.queued_s}  # fmt: skip
        if teacher:
            out["teacher"].update(guidance_scale=self.teacher_ode[0], num_steps=self.teacher_ode[1])
        out["total_ms"] = 1000.0 * (time.perf_counter() - t0)
        return out


# ----------------------------------------------------------------------------------------------------------
# HTTP.


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host of a Host header ("localhost:8000", "[::1]:8000", "127.0.0.1") without port or brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def make_handler(engine: Engine, page: bytes, loopback_only: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "d2g_jax-serve"
        sys_version = ""
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall between them

        def log_message(self, fmt, *args):  # noqa: D401 - quiet: the access log goes to absl's debug level
            logging.debug("serve: %s " + fmt, self.address_string(), *args)

        def send_error(self, code, message=None, explain=None):  # malformed requests, unknown methods
            self.close_connection = True
            self._json(int(code), {"error": message or HTTPStatus(int(code)).phrase})

        def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the page went away
                self.close_connection = True

        def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode("utf-8"), "application/json; charset=utf-8", extra)

        def _host_ok(self) -> bool:
            if not loopback_only:
                return True
            name = _host_name(self.headers.get("Host", ""))
            if name in LOOPBACK_NAMES or _is_loopback(name):
                return True
            self._json(403, {"error": f"Host {_shown(self.headers.get('Host', ''))} refused: this server answers "
                                      "to localhost only (config.serve.host)."})  # fmt: skip
            return False

        def _path(self) -> str:
            return urlsplit(self.path).path

        def do_GET(self):  # noqa: N802
            if not self._host_ok():
                return
            path = self._path()
            if path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8",
                           {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self' 'unsafe-inline'; "
                                                       "script-src 'self' 'unsafe-inline'"})  # fmt: skip
            elif path == "/api/info":
                self._json(200, engine.info())
            elif path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            elif path == "/api/generate":
                self._json(405, {"error": "/api/generate takes a POST with a JSON body."}, {"Allow": "POST"})
            else:
                self._json(404, {"error": f"Nothing at {_shown(path)}: the demo page is at /."})

        do_HEAD = do_GET  # noqa: N815

        def do_POST(self):  # noqa: N802
            if not self._host_ok():
                return
            path = self._path()
            if path != "/api/generate":
                self.close_connection = True
                status = 405 if path in ("/", "/index.html", "/api/info") else 404
                self._json(status, {"error": f"POST {_shown(path)}: the only POST route is /api/generate."})
                return
            try:
                body = self._body()
                out = engine.generate(body)
            except RequestError as e:
                self._json(e.status, {"error": str(e)})
                return
            except Exception as e:  # noqa: BLE001 - a message for the page, the traceback for the log
                logging.error("serve: request failed:\n%s", traceback.format_exc())
                self._json(500, {"error": f"Internal error ({type(e).__name__}: {e}); the server log has the details."})
                return
            self._json(200, out)

        def _body(self) -> Any:
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise RequestError(411, "A Content-Length header is required.")
            if not re.fullmatch(r"\d{1,12}", length.strip()):
                self.close_connection = True
                raise RequestError(400, f"Content-Length {_shown(length)} is not a number.")
            n = int(length)
            if n > MAX_BODY:
                self.close_connection = True  # the body is not read
                raise RequestError(413, f"The request body is {n} bytes; at most {MAX_BODY} are accepted.")
            raw = self.rfile.read(n)
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise RequestError(415, f"Content-Type {_shown(ctype)}: send the fields as application/json.")
            try:
                return json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(400, f"The body is not valid JSON ({e}).") from None

        def _not_allowed(self):
            self.close_connection = True
            self._json(405, {"error": f"{self.command} is not supported: GET / for the page, POST /api/generate."},
                       {"Allow": "GET, HEAD, POST"})  # fmt: skip

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):  # a dropped connection: one log line, no traceback on stderr
        logging.debug("serve: connection from %s ended with an error:\n%s", client_address, traceback.format_exc())


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(engine: Engine, host: str, port: int) -> ThreadingHTTPServer:
    """Binds `host:port` (port 0 = a free one: `server.server_address`); the page is read once, here."""
    with open(PAGE, "rb") as f:
        page = f.read()
    cls = _Server6 if ":" in host else _Server
    return cls((host, int(port)), make_handler(engine, page, loopback_only=_is_loopback(host)))


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(engine: Engine, host: str, port: int, t_start: float | None = None) -> None:
    """Compiles, binds and serves until interrupted (Ctrl-C, SIGTERM)."""
    engine.start()
    server = make_server(engine, host, port)
    url = url_of(server)
    if not _is_loopback(host):
        logging.warning("serve: bound to %s — the page is reachable from the network, without authentication.", host)
    since = f" ({time.perf_counter() - t_start:.1f} s after start)" if t_start is not None else ""
    teacher = (f"; the teacher ({engine.teacher_ode[1]} steps, CFG {engine.teacher_ode[0]:g}) and" if engine.teacher_ode
               else "; teacher not loaded;")  # fmt: skip
    logging.info("serve: listening on %s%s — up to %d images a request%s the batches %s compile in the background. "
                 "Ctrl-C stops.", url, since, engine.max_images, teacher, ",".join(map(str, engine.buckets[1:])) or
                 "(none left)")  # fmt: skip
    old = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (a service manager, `kill`) stops it too
        old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        logging.info("serve: stopped")
    finally:
        server.server_close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def load_engine(teacher_folder: str, unet_folder: str, *, resolution: int, max_images: int, mesh: Any,
                dtype: Any, teacher_ode: tuple[float, int] | None, max_queue: int) -> Engine:  # fmt: skip
    """The student (and teacher, when `teacher_ode` is set) loaded for serving."""
    sampler = OneStepSampler.load(teacher_folder, unet_folder, resolution=resolution,
                                  batch_size=shd.round_batch(1, mesh), mesh=mesh, dtype=dtype,
                                  with_teacher=teacher_ode is not None)  # fmt: skip
    return Engine(sampler, max_images=max_images, teacher_ode=teacher_ode, max_queue=max_queue)
