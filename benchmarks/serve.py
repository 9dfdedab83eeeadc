"""Throughput and latency of ``rahf serve`` under concurrent clients, against ``RAHFScorer`` in-process.

    python benchmarks/serve.py [--checkpoint DIR] [--clients 16] [--images 4] [--requests 4]
                               [--image-size 256] [--max-batch 32] [--max-wait-ms 10] [--decode constrained]
                               [--threads 0] [--json out.json]

Starts ``python -m rahf serve`` on a free localhost port (a seeded, untrained ``tiny`` checkpoint
is written to a temporary directory when ``--checkpoint`` is not given), then ``--clients``
threads, each with its own :class:`rahf.client.RAHFClient`, send ``--requests`` requests of
``--images`` distinct images each (scores + misaligned words, no heatmaps), all at once, after one
untimed warm-up round. Images are smooth random RGB pictures encoded as PNG before the clock
starts (encoding is the client's cost, not the server's). Prints images/s, requests/s, p50/p99
request latency, the server's mean batch size, and the ratio to ``RAHFScorer.score`` called
in-process on the same images with ``batch_size=--max-batch`` (the server's batch composition
when the clients keep it busy), timed after the server has stopped.

Every answer is checked: each request carries its own prompt, which must come back on each of
its items in order, and each item's scores must equal the in-process scores of that image
(|Δ| < 1e-4); a lost, failed or mixed-up answer is counted and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

WORDS = "a yellow cat on a red mat next to two blue squares and one small green star in the corner".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smooth_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A picture-like image: an 8×8 random colour field upsampled (bicubic) plus mild noise."""
    low = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    a = np.asarray(low, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def tiny_checkpoint(directory: Path) -> Path:
    import torch

    from rahf import RAHF, RAHFConfig

    torch.manual_seed(0)
    RAHF(RAHFConfig.preset("tiny")).save_pretrained(directory)
    return directory


def start_server(checkpoint: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rahf", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(max(256, args.clients * args.images)), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device:
        cmd += ["--device", args.device]
    return subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def wait_healthy(client, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    from rahf.client import ServerError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if client.health()["model_loaded"]:
                return
        except (httpx.TransportError, ServerError):
            time.sleep(0.25)
    raise SystemExit("the server did not come up")


def run_round(url: str, requests: list[list[dict]], options: dict) -> tuple[float, list, list]:
    """Each client thread sends its list of requests in turn; returns (wall s, latencies, answers)."""
    from rahf.client import RAHFClient

    n_clients = len(requests)
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    answers: list[list] = [[] for _ in range(n_clients)]
    barrier = threading.Barrier(n_clients + 1)

    def worker(c: int) -> None:
        with RAHFClient(url, timeout=600, retries=5) as client:
            barrier.wait()
            for items in requests[c]:
                t = time.perf_counter()
                try:
                    answers[c].append(client.score_raw(items, options))
                except Exception as e:  # noqa: BLE001 - counted as a lost answer
                    answers[c].append(e)
                latencies[c].append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(n_clients)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return time.perf_counter() - t0, [x for lat in latencies for x in lat], answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a save_pretrained directory (default: a fresh tiny one)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--requests", type=int, default=4, help="timed requests per client")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--decode", default="constrained", choices=["constrained", "free", "none"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads, server and in-process (0: torch's default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch

    from rahf import RAHFScorer
    from rahf.client import RAHFClient

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="rahf-bench-serve-")
    checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tmp.name) / "tiny")

    rng = np.random.default_rng(0)
    rounds = 1 + args.requests  # one warm-up round
    plan = []  # plan[r][c] = (prompt, [PIL images])
    for r in range(rounds):
        plan.append([(f"request {r}-{c} " + " ".join(rng.choice(WORDS, size=10)),
                      [smooth_image(rng, args.image_size) for _ in range(args.images)]) for c in range(args.clients)])
    from rahf.client import encode_image

    bodies = [[[{"image": encode_image(png(im)), "prompt": p} for im in ims] for p, ims in rnd] for rnd in plan]
    payload = np.mean([sum(len(it["image"]) for it in items) for rnd in bodies for items in rnd])
    outputs = ["scores"] + (["misaligned_words"] if args.decode != "none" else [])
    options = {"outputs": outputs, "decode": args.decode}

    # ---------------------------------------------------------------- server
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    proc = start_server(checkpoint, port, args)
    try:
        with RAHFClient(url) as probe:
            wait_healthy(probe, proc)
            run_round(url, bodies[0], options)  # warm-up
            h0 = probe.health()
            timed = [[bodies[1 + r][c] for r in range(args.requests)] for c in range(args.clients)]
            wall, latencies, answers = run_round(url, timed, options)
            h1 = probe.health()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    n_images = args.clients * args.requests * args.images
    served = n_images / wall
    batches = h1["batches"] - h0["batches"]
    mean_batch = (h1["items_scored"] - h0["items_scored"]) / max(1, batches)

    # ---------------------------------------------------------------- in-process, same images
    scorer = RAHFScorer.from_pretrained(checkpoint, device=args.device)
    decode = None if args.decode == "none" else args.decode
    images = [im for r in range(1, rounds) for c in range(args.clients) for im in plan[r][c][1]]
    prompts = [plan[r][c][0] for r in range(1, rounds) for c in range(args.clients) for _ in range(args.images)]
    scorer.score(images[:args.max_batch], prompts[:args.max_batch], batch_size=args.max_batch, decode=decode)
    t0 = time.perf_counter()
    ref = scorer.score(images, prompts, batch_size=args.max_batch, decode=decode)
    local_wall = time.perf_counter() - t0
    local = n_images / local_wall
    index = {(r, c, k): ref[((r - 1) * args.clients + c) * args.images + k]
             for r in range(1, rounds) for c in range(args.clients) for k in range(args.images)}

    # ---------------------------------------------------------------- checks
    lost = mixed = 0
    for c in range(args.clients):
        for r, answer in enumerate(answers[c], 1):
            if isinstance(answer, Exception) or len(answer) != args.images:
                lost += 1
                continue
            for k, res in enumerate(answer):
                e = index[r, c, k]
                if res.get("index") != k or res.get("prompt") != e.prompt or any(
                        abs(res["scores"][s] - e.scores[s]) > 1e-4 for s in e.scores) or (
                        decode and res.get("misaligned_words") != e.misaligned_words):
                    mixed += 1
    lost += args.clients * args.requests - sum(len(a) for a in answers)

    lat = np.array(latencies) * 1000
    result = {
        "clients": args.clients, "images_per_request": args.images, "requests": args.clients * args.requests,
        "image_size": args.image_size, "decode": args.decode, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "payload_bytes_per_request": float(payload),
        "served_images_per_s": served, "served_requests_per_s": args.clients * args.requests / wall,
        "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": mean_batch, "torch_threads": torch.get_num_threads(),
        "in_process_images_per_s": local, "ratio": served / local,
        "lost": lost, "mixed_up": mixed, "loadavg_1m_before": load_before,
    }
    print(f"rahf serve: {args.clients} clients × {args.requests} requests × {args.images} images of "
          f"{args.image_size} px ({payload / 1024:.0f} KiB base64 per request), decode {args.decode}, "
          f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, {torch.get_num_threads()} torch threads")
    print(f"  served       {served:8.1f} images/s  {result['served_requests_per_s']:7.1f} requests/s   "
          f"latency p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms   "
          f"mean batch {mean_batch:.1f}")
    print(f"  in-process   {local:8.1f} images/s  (RAHFScorer.score, batch {args.max_batch})")
    print(f"  ratio        {100 * served / local:8.1f} %")
    print(f"  answers      {lost} lost, {mixed} mixed up (of {args.clients * args.requests} requests)")
    if load_before is not None:
        print(f"  load average before the run: {load_before:.2f} on {os.cpu_count()} cores")
    write_json(args.json, {"info": machine_info(torch.device(args.device or "cpu")), "result": result})
    print(json.dumps(result))
    tmp.cleanup()
    return 1 if lost or mixed else 0


if __name__ == "__main__":
    sys.exit(main())
