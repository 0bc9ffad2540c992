"""Load on the web app: N requests from T threads through gradio_client; median and p95 latency.

    python bench/app_load.py [--checkpoint CKPT] [--requests 50] [--threads 8] [--beam-size 3]

Starts the app on a free localhost port with the given (default: shipped) model, checks every
answer against a caption computed alone, and prints the latencies and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from gradio_client import Client, handle_file

from captioner import Captioner
from captioner.webapp import EXAMPLES_DIR, build_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--beam-size", type=int, default=3)
    args = parser.parse_args()

    captioner = Captioner.from_checkpoint(args.checkpoint)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(captioner)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    photos = sorted(EXAMPLES_DIR.glob("*.jpg"))
    expected = {p.name: captioner.caption(p, beam_size=args.beam_size).text for p in photos}
    clients = [Client(url, verbose=False) for _ in range(args.threads)]

    def request(i: int):
        photo = photos[i % len(photos)]
        started = time.perf_counter()
        gallery, _ = clients[i % args.threads].predict([handle_file(str(photo))], "beam", args.beam_size, 20, 0.0,
                                                       3, 1, api_name="/caption")
        return gallery[0]["caption"] == expected[photo.name], time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        results = list(pool.map(request, range(args.requests)))
    wall = time.perf_counter() - started
    app.close()
    latencies = sorted(seconds for _, seconds in results)
    p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{args.requests} requests from {args.threads} threads, beam {args.beam_size}: "
          f"{sum(ok for ok, _ in results)}/{len(results)} correct, median {statistics.median(latencies):.2f}s, "
          f"p95 {p95:.2f}s, {len(results) / wall:.1f} requests/s")


if __name__ == "__main__":
    main()
