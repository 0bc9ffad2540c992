"""A long day's load on the web app, as users run it: does it stay answering, and does it hold nothing?

    python bench/soak.py [--minutes 10] [--clients 6] [--every 10] [--bursts-every 120] [--burst 100]
                         [--checkpoint CKPT] [--out bench/results] [--name soak]

Starts `python app.py` in a subprocess with its own Gradio temp folder, then for --minutes sends a mix from
--clients concurrent gradio_client clients: ordinary photos (each a slightly different copy of an example
photo, as users' photos differ), HEIC photos, large photos near the 50 MB cap, and bad files (not an image,
truncated, empty, over the cap); every --bursts-every seconds, --burst requests at once, more than the queue
holds (none in the first or last minute). Every --every seconds it records the server's RSS, open files and
threads (/proc), the temp folder's size and files, requests answered and failed, and latency percentiles.
After the load it waits for the forgetting (40 s) and measures the temp folder again.
Writes NAME.md, NAME.json and NAME.png to --out (captioner.files.write_results).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from captioner.files import write_results
from captioner.inference import example_photos
from speed import percentile  # bench/speed.py's nearest-rank percentile, beside this script

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
# The mix each client draws from (weights): mostly ordinary photos, a few of everything else.
MIX = {"photo": 70, "heic": 8, "large": 2, "not_image": 5, "truncated": 5, "empty": 5, "over_cap": 2}
GOOD = {"photo", "heic", "large"}
ARGS = ("beam", 3, 20, 0.0, 3, 1)
AFTER_FORGETTING = 40  # seconds after the last answer: the app deletes an answer's files 30 s after it


def make_inputs(folder: Path, variants: int, seed: int) -> dict[str, list[Path]]:
    """The files the clients send: `variants` distinct ordinary photos, HEIC ones, and each kind of bad file."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    photos, heics = [], []
    examples = example_photos()
    for index in range(variants):
        image = Image.open(examples[index % len(examples)]).convert("RGB")
        x, y = rng.randrange(image.width - 8), rng.randrange(image.height - 8)
        image.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (x, y, x + 8, y + 8))
        photos.append(folder / f"user-photo-{index}.jpg")
        image.save(photos[-1], quality=90)
        if index < 8:
            heics.append(folder / f"IMG_{index:04d}.heic")
            image.save(heics[-1])
    data = photos[0].read_bytes()
    (folder / "big-photo.jpg").write_bytes(data + b"\0" * (45 * MIB))  # Pillow reads the photo, skips the rest
    (folder / "too-big.jpg").write_bytes(data + b"\0" * (51 * MIB))
    (folder / "letter.jpg").write_text("Dear user, this is not a photo.")
    (folder / "cut-short.jpg").write_bytes(data[: len(data) // 3])
    (folder / "nothing.jpg").write_bytes(b"")
    return {"photo": photos, "heic": heics, "large": [folder / "big-photo.jpg"],
            "not_image": [folder / "letter.jpg"], "truncated": [folder / "cut-short.jpg"],
            "empty": [folder / "nothing.jpg"], "over_cap": [folder / "too-big.jpg"]}


def start_server(port: int, temp: Path, log: Path, checkpoint: str | None) -> subprocess.Popen:
    """`python app.py` as users start it, with its own temp folder; returns once it answers."""
    from gradio_client import Client

    env = {**os.environ, "GRADIO_TEMP_DIR": str(temp), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--port", str(port)] + (["--checkpoint", checkpoint] if checkpoint else [])
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"soak: the app stopped at start; see {log}")
        try:
            Client(f"http://127.0.0.1:{port}/", verbose=False)
            return server
        except Exception:
            time.sleep(1)  # a bench, not a test: wait for the model to load
    server.kill()
    raise SystemExit("soak: the app did not answer within 5 minutes")


def classify(kind: str, outcome, error: Exception | None) -> tuple[str, str]:
    """(verdict, message): "ok" (captioned, or a bad file clearly refused), "busy" (a full queue), "fail"."""
    if error is not None:
        text = str(error)
        if "Queue is full" in text:
            return "busy", text
        if kind == "over_cap" and re.search(r"(?i)file size|too large|exceeds", text):
            return "ok", text
        return "fail", f"{type(error).__name__}: {text}"[:300]
    gallery, table = outcome
    errors = [row[-1] for row in table["data"] if row[-1]]
    if kind in GOOD:
        good = len(gallery) == 1 and gallery[0]["caption"] and not errors
        return ("ok", gallery[0]["caption"]) if good else ("fail", f"not captioned: {errors}")
    if kind == "over_cap":
        return "fail", "an upload over the cap was accepted"
    clear = not gallery and errors and "Traceback" not in errors[0]
    return ("ok", errors[0]) if clear else ("fail", f"no clear error: {gallery} {errors}")


class Load:
    """The requests sent and what came back: (started, seconds, kind, verdict, message, burst)."""

    def __init__(self, url: str, inputs: dict, clients: int, seed: int):
        from gradio_client import Client

        self.url, self.inputs = url, inputs
        # A browser waits for a slow upload; httpx's default 5 s gives up during a burst on 2 cores.
        self.clients = [Client(url, verbose=False, download_files=False, httpx_kwargs={"timeout": 300})
                        for _ in range(clients)]
        self.records: list[tuple] = []
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.stop = threading.Event()

    def send(self, client, kind: str, burst: bool) -> None:
        from gradio_client import handle_file

        path = self.rng.choice(self.inputs[kind])
        started = time.monotonic()
        outcome, error = None, None
        try:
            outcome = client.predict([handle_file(str(path))], *ARGS, api_name="/caption")
        except Exception as failure:  # what the user sees: judged by classify
            error = failure
        verdict, message = classify(kind, outcome, error)
        with self.lock:
            self.records.append((started, time.monotonic() - started, kind, verdict, message, burst))

    def user(self, index: int) -> None:
        """One client's loop: a request from the mix, a short pause (a person choosing the next photo), again."""
        kinds, weights = list(MIX), list(MIX.values())
        while not self.stop.is_set():
            self.send(self.clients[index], self.rng.choices(kinds, weights)[0], burst=False)
            self.stop.wait(self.rng.uniform(0, 0.5))

    def burst(self, size: int) -> None:
        """`size` ordinary photos at once, more than the queue holds: the rest should be told it is busy."""
        with ThreadPoolExecutor(max_workers=size) as pool:
            for index in range(size):
                pool.submit(self.send, self.clients[index % len(self.clients)], "photo", True)


def proc_status(pid: int) -> dict:
    """The server's RSS (MiB), threads and open files, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
            "open_files": len(os.listdir(f"/proc/{pid}/fd"))}


def folder_size(folder: Path) -> tuple[float, int]:
    """(MiB, files) in the temp folder, while the app deletes files and folders in it."""
    sizes = []
    for parent, _, names in os.walk(folder):  # os.walk skips a folder deleted under it; rglob raises
        for name in names:
            try:
                sizes.append(os.stat(os.path.join(parent, name)).st_size)
            except FileNotFoundError:
                continue
    return sum(sizes) / MIB, len(sizes)


def sample(load: Load, pid: int, temp: Path, began: float, since: float) -> dict:
    """One row of the time series: the server now, and the requests answered since the last row."""
    with load.lock:
        records = list(load.records)
    window = [r[1] for r in records if r[0] + r[1] > since and r[2] == "photo" and r[3] == "ok" and not r[5]]
    size, files = folder_size(temp)
    return {"t_s": round(time.monotonic() - began, 1), **proc_status(pid), "temp_mib": round(size, 2),
            "temp_files": files, "answered": sum(r[3] == "ok" for r in records),
            "busy": sum(r[3] == "busy" for r in records), "failed": sum(r[3] == "fail" for r in records),
            "p50_s": percentile(window, 0.5), "p95_s": percentile(window, 0.95), "p99_s": percentile(window, 0.99)}


def run(load: Load, pid: int, temp: Path, args) -> list[dict]:
    """The load for --minutes, sampled every --every seconds, with a burst every --bursts-every seconds."""
    began = time.monotonic()
    end = began + args.minutes * 60
    series = [sample(load, pid, temp, began, began)]
    users = [threading.Thread(target=load.user, args=(i,), daemon=True) for i in range(len(load.clients))]
    for user in users:
        user.start()
    next_burst, bursts = began + 90, []
    while time.monotonic() < end:
        last = time.monotonic()
        if args.bursts_every and next_burst <= last < end - 75:
            bursts.append(threading.Thread(target=load.burst, args=(args.burst,), daemon=True))
            bursts[-1].start()
            next_burst += args.bursts_every
        time.sleep(max(0.0, min(args.every, end - last)))
        series.append(sample(load, pid, temp, began, last))
    load.stop.set()
    for thread in users + bursts:
        thread.join()
    return series


def minute_p95(records: list, first: bool, began: float, ended: float) -> float | None:
    """p95 latency of ordinary photos (not in a burst) answered in the first or the last minute."""
    low, high = (began, began + 60) if first else (ended - 60, ended)
    return percentile([r[1] for r in records if low <= r[0] + r[1] <= high and r[2] == "photo" and r[3] == "ok"
                       and not r[5]], 0.95)


def checks(records: list, series: list, after: dict, log_text: str, began: float, ended: float) -> dict:
    """The done-when of the soak, each with its figures and whether it held."""
    good = [r for r in records if r[2] in GOOD and r[3] != "busy"]
    bad = [r for r in records if r[2] not in GOOD and r[3] != "busy"]
    warm = next(row for row in series if row["t_s"] >= min(150, series[-1]["t_s"] / 4))
    last = series[-1]
    first_p95, last_p95 = minute_p95(records, True, began, ended), minute_p95(records, False, began, ended)
    server_errors = len(re.findall(r"Traceback|Exception in ASGI|\bERROR\b", log_text))
    return {
        "good_captioned": {"held": all(r[3] == "ok" for r in good), "captioned": sum(r[3] == "ok" for r in good),
                           "sent": len(good), "failures": sorted({r[4] for r in good if r[3] == "fail"})[:5]},
        "bad_answered_clearly": {"held": all(r[3] == "ok" for r in bad), "clear": sum(r[3] == "ok" for r in bad),
                                 "sent": len(bad), "failures": sorted({r[4] for r in bad if r[3] == "fail"})[:5]},
        "no_server_error": {"held": server_errors == 0, "tracebacks_or_errors_in_log": server_errors},
        "rss_growth_after_warm_up": {"held": last["rss_mib"] <= 1.10 * warm["rss_mib"], "warm_t_s": warm["t_s"],
                                     "warm_mib": warm["rss_mib"], "end_mib": last["rss_mib"],
                                     "growth": last["rss_mib"] / warm["rss_mib"] - 1},
        "open_files_flat": {"held": last["open_files"] <= warm["open_files"] + 5, "warm": warm["open_files"],
                            "end": last["open_files"], "max": max(r["open_files"] for r in series)},
        "threads_flat": {"held": last["threads"] <= warm["threads"] + 5, "warm": warm["threads"],
                         "end": last["threads"], "max": max(r["threads"] for r in series)},
        "temp_folder_bounded": {"held": after["temp_files"] <= series[0]["temp_files"],
                                "start_files": series[0]["temp_files"], "max_mib": max(r["temp_mib"] for r in series),
                                "max_files": max(r["temp_files"] for r in series), "after_forgetting": after},
        "p95_last_minute_within_25pc": {"held": bool(first_p95 and last_p95 and last_p95 <= 1.25 * first_p95),
                                        "first_minute_s": first_p95, "last_minute_s": last_p95},
    }


def plot(series: list, path: Path) -> None:
    """One figure over time: memory, files and threads, the temp folder, latency, requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [row["t_s"] / 60 for row in series]
    figure, axes = plt.subplots(1, 5, figsize=(22, 4))
    panels = [("server RSS (MiB)", ["rss_mib"]), ("server", ["open_files", "threads"]),
              ("temp folder", ["temp_mib", "temp_files"]), ("ordinary photo latency (s)", ["p50_s", "p95_s", "p99_s"]),
              ("requests (cumulative)", ["answered", "busy", "failed"])]
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            axis.plot(t, [row[key] if row[key] is not None else float("nan") for row in series], label=key)
        axis.set_title(title)
        axis.set_xlabel("minutes")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def kinds_table(records: list) -> list[str]:
    rows = ["| kind | sent | answered as expected | busy (queue full) | failed |", "| --- | --- | --- | --- | --- |"]
    for kind in MIX:
        mine = [r for r in records if r[2] == kind]
        rows.append(f"| {kind} | {len(mine)} | {sum(r[3] == 'ok' for r in mine)} | {sum(r[3] == 'busy' for r in mine)} "
                    f"| {sum(r[3] == 'fail' for r in mine)} |")
    return rows


def markdown(result: dict) -> str:
    info, done = result["machine"], result["checks"]
    lines = [f"# Soak: the web app for {result['minutes']} minutes, {result['clients']} clients and bursts", "",
             f"`{result['command']}`: `python app.py` (the shipped model unless --checkpoint) in a subprocess with its "
             f"own Gradio temp folder; {result['clients']} gradio_client clients send a mix ({result['mix']}) with "
             f"0-0.5 s pauses, and every {result['bursts_every']} s (none in the first or last minute) a burst of "
             f"{result['burst']} ordinary photos at once, more than the queue's 64 places.", "",
             f"Machine: {info['cpus']} CPUs, {info['platform']}, Python {info['python']}; load average "
             f"{info['load_start']:.1f} at the start, {info['load_end']:.1f} at the end (the machine is shared).", "",
             *kinds_table(result["records_summary"]), "", "| done when | held | figures |", "| --- | --- | --- |"]
    for name, check in done.items():
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in check.items() if k != "held")
        lines.append(f"| {name.replace('_', ' ')} | {'yes' if check['held'] else '**no**'} | {figures} |")
    lines += ["", f"Time series every {result['every']} s: [`{result['name']}.json`]({result['name']}.json); "
              f"plot: [`{result['name']}.png`]({result['name']}.png).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    parser.add_argument("--bursts-every", type=float, default=120, help="seconds between bursts (0: none)")
    parser.add_argument("--burst", type=int, default=100, help="requests in a burst")
    parser.add_argument("--checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="soak", help="writes NAME.md, NAME.json and NAME.png")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="captioner-soak-"))
    try:
        result = soak(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = markdown(result)
    write_results(args.out, args.name, {k: v for k, v in result.items() if k != "records_summary"}, report)
    plot(result["series"], Path(args.out) / f"{args.name}.png")
    print(report)


def soak(args, work: Path) -> dict:
    """Serve, load, sample, wait for the forgetting, stop: the result (without the plot)."""
    from socket import socket

    inputs = make_inputs(work / "inputs", variants=40, seed=args.seed)
    temp, log = work / "gradio", work / "server.log"
    with socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load_start = os.getloadavg()[0]
    server = start_server(port, temp, log, args.checkpoint)
    try:
        load = Load(f"http://127.0.0.1:{port}/", inputs, args.clients, args.seed)
        began = time.monotonic()
        series = run(load, server.pid, temp, args)
        ended = time.monotonic()
        time.sleep(AFTER_FORGETTING)
        size, files = folder_size(temp)
        after = {"seconds_after_last_answer": AFTER_FORGETTING, "temp_mib": round(size, 2), "temp_files": files}
    finally:
        server.terminate()
        server.wait(timeout=60)
    records = [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in load.records]
    return {"command": "python " + " ".join(sys.argv), "name": args.name, "minutes": args.minutes,
            "clients": args.clients, "every": args.every, "bursts_every": args.bursts_every, "burst": args.burst,
            "mix": ", ".join(f"{k} {v}%" for k, v in MIX.items()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_start": load_start, "load_end": os.getloadavg()[0]},
            "checks": checks(records, series, after, log.read_text(errors="replace"), began, ended),
            "series": series, "records_summary": records,
            "kinds": {kind: {verdict: sum(r[2] == kind and r[3] == verdict for r in records)
                             for verdict in ("ok", "busy", "fail")} for kind in MIX},
            "requests": {"sent": len(records), "ok": sum(r[3] == "ok" for r in records),
                         "busy": sum(r[3] == "busy" for r in records), "failed": sum(r[3] == "fail" for r in records)}}


if __name__ == "__main__":
    main()
