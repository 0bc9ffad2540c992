"""Load on the web app: N requests from T threads through gradio_client; median and p95 latency.

    python bench/app_load.py [--checkpoint CKPT] [--requests 50] [--threads 8] [--beam-size 3] [--out bench/results]
                             [--client-process] [--compare-empty] [--name NAME]

Starts the app on a free localhost port with the given (default: shipped) model, sends each client one
untimed warm-up request, times the N requests, checks every answer against a caption computed alone, and
prints the latencies and the machine.
Writes app_load.md and app_load.json to --out (--name changes the names).
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch
from gradio_client import Client, handle_file

from captioner.files import write_results
from captioner import Captioner
from captioner.inference import DEFAULT_CHECKPOINT
from captioner.webapp import EXAMPLES_DIR, build_app, gallery_text

REPO = Path(__file__).resolve().parents[1]


def run_load(url: str, photos: list[Path], expected: dict, decoding: dict, threads: int,
             requests: int) -> tuple[list, float, float]:
    """`requests` requests from `threads` gradio_client threads: [(answer correct, seconds)], wall seconds and the
    CPU seconds this process spent meanwhile (server, model and, when they are threads here, the clients)."""
    clients = [Client(url, verbose=False) for _ in range(threads)]

    def request(i: int):
        photo = photos[i % len(photos)]
        started = time.perf_counter()
        gallery, _ = clients[i % threads].predict(
            [handle_file(str(photo))], "beam", decoding["beam_size"], decoding["max_length"],
            decoding["length_penalty"], decoding["no_repeat_ngram_size"], 1, api_name="/caption")
        return gallery[0]["caption"] == expected[photo.name], time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # Untimed warm-up, one request per client: the first request a Gradio app serves imports matplotlib's
        # backend (0.75 s) and more. Timed cold, that one-off cost fell on whichever app ran first.
        list(pool.map(request, range(threads)))
        started, cpu_started = time.perf_counter(), time.process_time()
        results = list(pool.map(request, range(threads, threads + requests)))
    return results, time.perf_counter() - started, time.process_time() - cpu_started


def cpu_use(cpu: float, wall: float, requests: int, client_process: bool) -> dict:
    """Cores busy and CPU per request in the server's process; with the clients elsewhere it misses theirs."""
    if client_process:
        return {}
    return {"cores_busy": cpu / wall, "cpu_ms_per_request": 1000 * cpu / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="app_load", help="writes NAME.md and NAME.json")
    parser.add_argument("--client-process", action="store_true",
                        help="run the clients in a process of their own, as real users are (default: threads of "
                             "this process, where they share the server's and the model's interpreter lock)")
    parser.add_argument("--compare-empty", action="store_true",
                        help="then the same load on an empty app of the same shape (the same page, endpoint and "
                             "queue, answering at once without the model): Gradio's own ceiling on this machine")
    args = parser.parse_args()
    load_start = os.getloadavg()

    captioner = Captioner.from_checkpoint(args.checkpoint)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(captioner)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    photos = sorted(EXAMPLES_DIR.glob("*.jpg"))
    decoding = dict(beam_size=args.beam_size, max_length=20, length_penalty=0.0, no_repeat_ngram_size=3)
    expected = {p.name: gallery_text(captioner.caption(p, **decoding)) for p in photos}  # as the app shows it

    def load(url: str) -> tuple[list, float]:
        job = (url, photos, expected, decoding, args.threads, args.requests)
        if not args.client_process:
            return run_load(*job)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            return client.submit(run_load, *job).result()

    results, wall, cpu = load(url)
    app.close()
    empty = None
    if args.compare_empty:
        import captioner.webapp as webapp

        answers = {p.name: ([(str(p), expected[p.name])], [[p.name, 1, expected[p.name], 0.0, "", None, ""]])
                   for p in photos}

        def answer_at_once(_, files, *options):  # the app's batch function, without the model
            return tuple(map(list, zip(*[answers[Path(str(f[0])).name] for f in files])))

        real, webapp.caption_requests = webapp.caption_requests, answer_at_once  # looked up on every call
        try:
            empty_app = build_app(captioner)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                empty_port = probe.getsockname()[1]
            empty_app.launch(server_name="127.0.0.1", server_port=empty_port, prevent_thread_lock=True, quiet=True)
            empty_results, empty_wall, empty_cpu = load(f"http://127.0.0.1:{empty_port}/")
            empty_app.close()
        finally:
            webapp.caption_requests = real
        empty = {"correct": sum(ok for ok, _ in empty_results), "requests_per_s": len(empty_results) / empty_wall,
                 **cpu_use(empty_cpu, empty_wall, len(empty_results), args.client_process)}
    latencies = sorted(seconds for _, seconds in results)
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    shown = os.path.relpath(checkpoint, REPO) if checkpoint.resolve().is_relative_to(REPO) else str(checkpoint)
    result = {
        "command": " ".join(["python bench/app_load.py", *sys.argv[1:]]),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average_start": load_start[0],
                    "load_average_end": os.getloadavg()[0]},
        "checkpoint": f"{shown} (sha256 {hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]})",
        "photos": [p.name for p in photos], "requests": args.requests, "threads": args.threads,
        "beam_size": args.beam_size, "clients": "own process" if args.client_process else "threads of the server's process",
        "correct": sum(ok for ok, _ in results),
        "median_s": statistics.median(latencies), "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "requests_per_s": len(results) / wall, "wall_s": wall, "warm_up": True,
        **cpu_use(cpu, wall, len(results), args.client_process), "empty_app": empty}
    report = markdown(result)
    write_results(args.out, args.name, result, report)
    print(report)


def markdown(result: dict) -> str:
    info = result["machine"]
    return "\n".join([
        f"# The web app under load: {result['requests']} requests from {result['threads']} threads, "
        f"beam {result['beam_size']}", "",
        f"`{result['command']}`: the app (`captioner.webapp.build_app`, queued as `python app.py` serves it) on a "
        f"localhost port, model `{result['checkpoint']}`, requests through `gradio_client` (clients: "
        f"{result['clients']}) cycling over the example "
        f"photos ({', '.join(result['photos'])}), after one untimed warm-up request per client; each answer is "
        "checked against the caption of that photo computed alone.", "",
        f"Machine: {info['processor']}, {info['cpu_count']} CPUs, {info['platform']}, Python {info['python']}, "
        f"torch {info['torch']} with {info['torch_threads']} threads; load average {info['load_average_start']:.1f} "
        f"at the start, {info['load_average_end']:.1f} at the end (the machine is shared).", "",
        "| correct | median latency | 95th percentile | requests/s |", "| --- | --- | --- | --- |",
        f"| {result['correct']}/{result['requests']} | {result['median_s']:.2f} s | {result['p95_s']:.2f} s | "
        f"{result['requests_per_s']:.1f} |", ""]
        + ([f"The same load on an empty app of the same shape (the same page, endpoint and queue, answering at once "
            f"without the model), in the same run: {result['empty_app']['requests_per_s']:.1f} requests/s "
            f"({result['empty_app']['correct']}/{result['requests']} correct); the app serves "
            f"**{result['requests_per_s'] / result['empty_app']['requests_per_s']:.2f}x** of that.", ""]
           if result.get("empty_app") else [])
        + ([f"CPU of this process (server, model and clients) while timed: {result['cores_busy']:.2f} cores busy, "
            f"{result['cpu_ms_per_request']:.0f} ms a request; the empty app {result['empty_app']['cores_busy']:.2f} "
            f"cores, {result['empty_app']['cpu_ms_per_request']:.0f} ms: the model costs "
            f"{result['cpu_ms_per_request'] - result['empty_app']['cpu_ms_per_request']:.0f} ms of CPU a request "
            "under this load.", ""] if "cpu_ms_per_request" in (result.get("empty_app") or {}) else []))

if __name__ == "__main__":
    main()
