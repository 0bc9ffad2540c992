"""Load on the web app: N requests from T threads through gradio_client; median and p95 latency.

    python bench/app_load.py [--checkpoint CKPT] [--precision fp32|int8] [--requests 50] [--threads 8]
                             [--beam-size 3] [--out bench/results] [--client-process]
                             [--compare-empty [--rounds R]] [--name NAME]

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
from types import SimpleNamespace
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch
from gradio_client import Client, handle_file

from captioner.files import write_results
from captioner import Captioner
from captioner.inference import DEFAULT_CHECKPOINT, example_photos
from captioner.webapp import build_app, gallery_text, limit_malloc_arenas

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
    parser.add_argument("--precision", choices=["fp32", "int8"],
                        help="the app's CNN (as `python app.py --precision`; int8 needs `captioner calibrate-int8`)")
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
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare-empty: time the two apps this many times each, alternating (ABBA...), "
                             "so that the shared machine's changing load falls on both; reports each round's ratio")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    load_start = os.getloadavg()
    limit_malloc_arenas()  # as `python app.py` does

    captioner = Captioner.from_checkpoint(args.checkpoint, precision=args.precision)
    photos = example_photos()
    decoding = dict(beam_size=args.beam_size, max_length=20, length_penalty=0.0, no_repeat_ngram_size=3)
    alone = {p.name: captioner.caption(p, **decoding) for p in photos}
    expected = {name: gallery_text(caption) for name, caption in alone.items()}  # as the app shows it
    apps = {"app": launch(build_app(captioner))}
    if args.compare_empty:
        apps["empty"] = launch(empty_app(captioner, photos, alone))

    def load(url: str) -> tuple[list, float, float]:
        job = (url, photos, expected, decoding, args.threads, args.requests)
        if not args.client_process:
            return run_load(*job)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            return client.submit(run_load, *job).result()

    order = ["app", "empty"] if args.compare_empty else ["app"]
    timed: dict[str, list] = {name: [] for name in order}
    try:
        for round_ in range(args.rounds):
            for name in (order if round_ % 2 == 0 else order[::-1]):
                timed[name].append(load(apps[name][1]))
    finally:
        for app, _ in apps.values():
            app.close()
    rounds = [{name: summary(*timed[name][i], args.client_process) for name in order} for i in range(args.rounds)]
    results, wall, cpu = pooled(timed["app"])
    latencies = sorted(seconds for _, seconds in results)
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    shown = os.path.relpath(checkpoint, REPO) if checkpoint.resolve().is_relative_to(REPO) else str(checkpoint)
    empty = summary(*pooled(timed["empty"]), args.client_process) if args.compare_empty else None
    for one in rounds if args.compare_empty else []:
        one["ratio"] = one["app"]["requests_per_s"] / one["empty"]["requests_per_s"]
    result = {
        "command": " ".join(["python bench/app_load.py", *sys.argv[1:]]),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average_start": load_start[0],
                    "load_average_end": os.getloadavg()[0]},
        "checkpoint": f"{shown} (sha256 {hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]})",
        "precision": captioner.encoder.precision, "photos": [p.name for p in photos], "requests": args.requests,
        "threads": args.threads,
        "beam_size": args.beam_size,
        "clients": "own process" if args.client_process else "threads of the server's process",
        "rounds": args.rounds, "correct": sum(ok for ok, _ in results),
        "median_s": statistics.median(latencies), "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "requests_per_s": len(results) / wall, "wall_s": wall, "warm_up": True,
        **cpu_use(cpu, wall, len(results), args.client_process), "empty_app": empty, "per_round": rounds}
    report = markdown(result)
    write_results(args.out, args.name, result, report)
    print(report)


def launch(app) -> tuple:
    """(app, url): the app served on a free localhost port, in threads of this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return app, f"http://127.0.0.1:{port}/"


def pooled(runs: list[tuple[list, float, float]]) -> tuple[list, float, float]:
    """Several timed loads (run_load's results) as one: all their answers, and their wall and CPU seconds."""
    return [answer for answers, _, _ in runs for answer in answers], sum(r[1] for r in runs), sum(r[2] for r in runs)


def empty_app(captioner, photos: list[Path], alone: dict):
    """The app's page, endpoint and queue, whose batch function answers at once without the model: Gradio's own
    ceiling. Its captioner is a stand-in that the patched batch function recognises; the real app keeps the real
    function (the page looks caption_requests up on every call)."""
    import captioner.webapp as webapp

    stand_in = SimpleNamespace(config=captioner.config, cells=captioner.cells)
    cell = webapp.default_cell(captioner)
    answers = {p.name: ([(str(p), gallery_text(alone[p.name]))], [webapp.table_row(p.name, 1, alone[p.name], cell)])
               for p in photos}
    real = webapp.caption_requests

    def caption_requests(model, files, *options):
        if model is not stand_in:
            return real(model, files, *options)
        return tuple(map(list, zip(*[answers[Path(str(f[0])).name] for f in files])))

    webapp.caption_requests = caption_requests
    return build_app(stand_in)


def summary(answers: list, wall: float, cpu: float, client_process: bool) -> dict:
    return {"correct": sum(ok for ok, _ in answers), "requests_per_s": len(answers) / wall,
            **cpu_use(cpu, wall, len(answers), client_process)}


def markdown(result: dict) -> str:
    info = result["machine"]
    sent = result["requests"] * result.get("rounds", 1)
    return "\n".join([
        f"# The web app under load: {result['requests']} requests from {result['threads']} threads, "
        f"beam {result['beam_size']}", "",
        f"`{result['command']}`: the app (`captioner.webapp.build_app`, queued as `python app.py` serves it) on a "
        f"localhost port, model `{result['checkpoint']}` (its CNN in {result.get('precision', 'fp32')}), requests "
        f"through `gradio_client` (clients: {result['clients']}) cycling over the example "
        f"photos ({', '.join(result['photos'])}), after one untimed warm-up request per client; each answer is "
        "checked against the caption of that photo computed alone.", "",
        f"Machine: {info['processor']}, {info['cpu_count']} CPUs, {info['platform']}, Python {info['python']}, "
        f"torch {info['torch']} with {info['torch_threads']} threads; load average {info['load_average_start']:.1f} "
        f"at the start, {info['load_average_end']:.1f} at the end (the machine is shared).", "",
        "| correct | median latency | 95th percentile | requests/s |", "| --- | --- | --- | --- |",
        f"| {result['correct']}/{sent} | {result['median_s']:.2f} s | {result['p95_s']:.2f} s | "
        f"{result['requests_per_s']:.1f} |", ""]
        + ([f"The same load on an empty app of the same shape (the same page, endpoint and queue, answering at once "
            f"without the model), in the same run: {result['empty_app']['requests_per_s']:.1f} requests/s "
            f"({result['empty_app']['correct']}/{sent} correct); the app serves "
            f"**{result['requests_per_s'] / result['empty_app']['requests_per_s']:.2f}x** of that.", ""]
           if result.get("empty_app") else [])
        + (rounds_table(result) if result.get("empty_app") and result.get("rounds", 1) > 1 else [])
        + ([f"CPU of this process (server, model and clients) while timed: {result['cores_busy']:.2f} cores busy, "
            f"{result['cpu_ms_per_request']:.0f} ms a request; the empty app {result['empty_app']['cores_busy']:.2f} "
            f"cores, {result['empty_app']['cpu_ms_per_request']:.0f} ms: the model costs "
            f"{result['cpu_ms_per_request'] - result['empty_app']['cpu_ms_per_request']:.0f} ms of CPU a request "
            "under this load.", ""] if "cpu_ms_per_request" in (result.get("empty_app") or {}) else []))

def rounds_table(result: dict) -> list[str]:
    rounds = result["per_round"]
    ratios = sorted(one["ratio"] for one in rounds)
    rows = [f"| {i} | {one['app']['requests_per_s']:.2f} | {one['empty']['requests_per_s']:.2f} | {one['ratio']:.2f} | "
            + (f"{one['app']['cpu_ms_per_request'] - one['empty']['cpu_ms_per_request']:.0f} |"
               if "cpu_ms_per_request" in one["app"] else "- |") for i, one in enumerate(rounds, start=1)]
    spread = statistics.stdev(ratios) / len(ratios) ** 0.5
    return [f"Round by round ({len(rounds)} rounds of {result['requests']} requests each, the two apps alternating "
            f"ABBA...): median ratio **{statistics.median(ratios):.2f}x**, mean {statistics.mean(ratios):.2f} "
            f"(standard error {spread:.2f}), from {ratios[0]:.2f} to {ratios[-1]:.2f}.", "",
            "| round | app requests/s | empty requests/s | ratio | model's CPU ms a request |",
            "| --- | --- | --- | --- | --- |", *rows, ""]


if __name__ == "__main__":
    main()
