"""Shared fixtures: a tiny Flickr8k-layout dataset of drawn shapes, and a tiny-model config."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from captioner.cli import main
from captioner.config import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square")

TORCH_THREADS = 2
torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def torch_threads():
    """Each test starts with torch on TORCH_THREADS threads. Training in this process applies train.threads to
    the whole process (test_interruptions.py trains on 1), which would otherwise carry over into the tests after
    it: their float sums, and the model `trained` makes when one of them is the first to ask for it."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)

# Gradio's files (uploads, and what gradio_client downloads) in a folder of this run's, set before any test module
# imports Gradio, which reads GRADIO_TEMP_DIR then: not in /tmp/gradio, shared with every other run and app.
GRADIO_TEMP_DIR = Path(tempfile.mkdtemp(prefix="captioner-tests-gradio-"))
os.environ["GRADIO_TEMP_DIR"] = str(GRADIO_TEMP_DIR)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no background requests from the servers the tests start
# Settings a shell may carry that would send the tests' servers, Ray instance or training elsewhere.
for variable in ("RAY_ADDRESS", "GRADIO_SERVER_PORT", "GRADIO_SERVER_NAME", "MASTER_ADDR", "MASTER_PORT",
                 "WORLD_SIZE", "RANK", "LOCAL_RANK"):
    os.environ.pop(variable, None)


def pytest_unconfigure(config):
    shutil.rmtree(GRADIO_TEMP_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def run_graph_cache(tmp_path_factory):
    """ONNX graphs in this run's cache (test_onnx.py's too), not the user's ~/.cache/captioner: what a concurrent
    run, the user's commands or another version of the code put there cannot change what a test sees.
    Subprocesses (torchrun, `python app.py`, `python -m captioner`, Ray's workers) inherit it."""
    os.environ["CAPTIONER_CACHE"] = str(tmp_path_factory.getbasetemp() / "captioner-cache")


def load_app_py():
    """The repo's app.py as a module, as `python app.py` runs it (it is a script beside the package, not in it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_py", REPO / "app.py")
    app_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_py)
    return app_py


_RESERVED_PORTS: list[socket.socket] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that stays this test's until the session ends, with nothing listening on it.

    The port is held by a socket bound with SO_REUSEADDR that never listens. The kernel gives a held port to no
    one else: not to another bind to port 0 and not to an outgoing connection, in this process or any other. A
    server that sets SO_REUSEADDR too (uvicorn under Gradio, webapp.cannot_serve_on) binds and listens on it; a
    connection to it while no server listens is refused. (Binding port 0, closing the socket and returning the
    number left the port free for anyone until the server bound it: a race the suite lost now and then.)"""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    _RESERVED_PORTS.append(holder)
    return holder.getsockname()[1]


def draw(color: str, shape: str, seed: int, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    offset = 8 + (seed * 7) % 20
    box = (offset, offset, offset + 50, offset + 50)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLORS[color])
    return image


def make_flickr8k(root: Path) -> Path:
    """Flickr8k release layout: images/, Flickr8k.token.txt and three split files (24 images)."""
    images = root / "images"
    images.mkdir(parents=True)
    token_lines, names = [], []
    for color in COLORS:
        for shape in SHAPES:
            for seed in range(3):
                name = f"{color}_{shape}_{seed}.jpg"
                draw(color, shape, seed).save(images / name, quality=95)
                names.append(name)
                captions = [f"A {color} {shape} on a white background .", f"a {color} {shape} .",
                            f"A {shape} that is {color} .", f"The {color} {shape} is drawn on white .",
                            f"a big {color} {shape}"]
                token_lines += [f"{name}#{i}\t{c}" for i, c in enumerate(captions)]
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    splits = {"train": [n for n in names if not n.endswith(("_2.jpg",))],
              "dev": [n for n in names if n.endswith("_2.jpg") and "circle" in n],
              "test": [n for n in names if n.endswith("_2.jpg") and "square" in n]}
    for split, file in (("train", "trainImages"), ("dev", "devImages"), ("test", "testImages")):
        (root / f"Flickr_8k.{file}.txt").write_text("\n".join(splits[split]) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_flickr8k(tmp_path_factory) -> Path:
    return make_flickr8k(tmp_path_factory.mktemp("flickr8k"))


def tiny_config(data_root: Path, out_dir: Path, cache_dir: Path, **train) -> Config:
    values = {
        "data": {"format": "flickr8k", "root": str(data_root), "min_word_count": 1},
        # torch, not ONNX Runtime: the tiny model is borderline, and on ONNX Runtime features (equal to 1e-5) it
        # trains to name 2 colours of 4 instead of 3; tests/test_onnx.py covers that runtime.
        "encoder": {"image_size": 64, "batch_size": 8, "num_workers": 0, "runtime": "torch"},
        "decoder": {"embed_dim": 32, "hidden_dim": 48, "dropout": 0.1},
        "decode": {"beam_size": 2, "max_length": 10},
        "train": {"out_dir": str(out_dir), "cache_dir": str(cache_dir), "epochs": 3, "batch_size": 16,
                  "lr": 0.01, "warmup_steps": 1, "patience": 0, "device": "cpu", **train},
    }
    return Config.from_dict(values)


@pytest.fixture(scope="session")
def trained(tiny_flickr8k, tmp_path_factory):
    """One tiny LSTM run (15 epochs of 10 steps) shared by the tests below."""
    work = tmp_path_factory.mktemp("run")
    config = tiny_config(tiny_flickr8k, work / "run", work / "cache", epochs=15, batch_size=8)
    config_path = work / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0
    return config_path, work / "run"
