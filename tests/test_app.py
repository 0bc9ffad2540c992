"""The Gradio app: the captioning function, the launched app through gradio_client, the page in a browser."""
from __future__ import annotations

import os
import platform
import shutil
import sys

import pytest

import captioner.webapp as webapp
from captioner import Captioner
from captioner.cli import main
from captioner.inference import EXAMPLES_DIR
from captioner.webapp import TABLE_HEADERS, build_app, caption_uploads, warm_up
from conftest import free_port, load_app_py

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def captioner(trained):
    return Captioner.from_checkpoint(trained[1] / "best.pt")


@pytest.fixture(scope="module")
def server(captioner):
    port = free_port()
    app = build_app(captioner)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size="1mb")
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_caption_function_reports_bad_files_and_n_best(captioner, tiny_flickr8k, tmp_path):
    good = str(tiny_flickr8k / "images" / "red_circle_2.jpg")
    bad = tmp_path / "letter.jpg"
    bad.write_text("Dear user, this is not a photo.")
    gallery, table = caption_uploads(captioner, [good, str(bad)], "beam", 3, 12, 0.0, 2, 3)
    assert len(gallery) == 1 and gallery[0][0] == good and gallery[0][1]
    ranks = [row for row in table if row[0] == "red_circle_2.jpg"]
    assert [row[1] for row in ranks] == [1, 2, 3] and ranks[0][3] >= ranks[2][3]
    error = [row for row in table if row[0] == "letter.jpg"][0]
    assert "not an image" in error[-1] and str(tmp_path) not in error[-1]
    row = dict(zip(TABLE_HEADERS, ranks[0]))
    assert row["confidence"] is not None and 0 <= row["confidence"] <= 1 and row["error"] == ""
    assert row["unsure"] in (True, False) and row["from tags"] in (True, False)
    gallery, table = caption_uploads(captioner, [good], "greedy", 5, 12, 0.0, 2, 3)
    assert len(table) == 1  # greedy gives one caption


def test_examples_ship_with_their_licences():
    examples = sorted(EXAMPLES_DIR.glob("*.jpg"))
    assert len(examples) >= 3
    licences = (EXAMPLES_DIR / "LICENSES.md").read_text()
    assert all(p.name in licences for p in examples)


def test_launched_app_answers_through_gradio_client(server, tiny_flickr8k):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    assert "/caption" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    gallery, table = client.predict([handle_file(str(tiny_flickr8k / "images" / "blue_square_2.jpg"))],
                                    "beam", 3, 12, 0.0, 2, 2, api_name="/caption")
    assert len(gallery) == 1 and gallery[0]["caption"]
    assert [row[1] for row in table["data"]] == [1, 2]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")
def test_page_in_a_real_browser_uploads_and_shows_a_caption(server, tiny_flickr8k, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page()
            page.goto(server)
            photo = tmp_path / "photo.jpg"  # a name without the words the caption should contain
            shutil.copy(tiny_flickr8k / "images" / "red_square_2.jpg", photo)
            page.locator("input[type=file]").first.set_input_files(str(photo))
            assert "square" not in page.locator("body").inner_text()
            page.get_by_role("button", name="Caption", exact=True).click()
            page.get_by_text("square").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            assert "square" in page.locator("body").inner_text()
        finally:
            browser.close()


def test_many_users_at_once_all_get_their_answer(server, tiny_flickr8k):
    import statistics
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    images = sorted((tiny_flickr8k / "images").glob("*.jpg"))
    clients = [Client(server, verbose=False) for _ in range(8)]
    expected = {}
    for image in images:
        gallery, _ = clients[0].predict([handle_file(str(image))], "beam", 2, 12, 0.0, 2, 1, api_name="/caption")
        expected[image.name] = gallery[0]["caption"]

    def request(i: int):
        image = images[i % len(images)]
        started = time.perf_counter()
        gallery, _ = clients[i % 8].predict([handle_file(str(image))], "beam", 2, 12, 0.0, 2, 1, api_name="/caption")
        return image.name, gallery[0]["caption"], time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(request, range(50)))
    assert len(results) == 50
    assert all(caption == expected[name] for name, caption, _ in results)
    latencies = sorted(r[2] for r in results)
    print(f"\n50 requests from 8 threads: median {statistics.median(latencies):.3f}s, "
          f"p95 {latencies[int(0.95 * len(latencies)) - 1]:.3f}s")


def test_oversize_upload_gets_a_clear_error(server, tmp_path):
    from gradio_client import Client, handle_file

    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2_000_000))
    with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
        Client(server, verbose=False).predict([handle_file(str(big))], "beam", 2, 12, 0.0, 2, 1, api_name="/caption")


def test_app_py_refuses_uploads_over_50_mb_and_takes_smaller_ones(trained, tiny_flickr8k, tmp_path, monkeypatch):
    # app.py as a user runs it (its own launch call and upload cap), kept from blocking so the test can talk to it.
    import gradio as gr
    from gradio_client import Client, handle_file

    app_py = load_app_py()
    launched, launch = [], gr.Blocks.launch

    def launch_in_the_background(self, *args, **kwargs):
        launched.append(self)
        return launch(self, *args, **{**kwargs, "prevent_thread_lock": True, "quiet": True})

    monkeypatch.setattr(gr.Blocks, "launch", launch_in_the_background)
    warmed = []
    monkeypatch.setattr(webapp, "warm_up", lambda captioner: warmed.append(len(launched)) or warm_up(captioner))
    port = free_port()
    assert app_py.main(["--checkpoint", str(trained[1] / "best.pt"), "--port", str(port)]) == 0
    assert warmed == [0]  # before it serves
    try:
        photo = (tiny_flickr8k / "images" / "red_square_2.jpg").read_bytes()
        mib = 1024 * 1024  # Gradio's "mb" (gradio.FileSize.MB)
        # A JPEG with padding after its end marker: Pillow reads the photo and ignores the rest.
        (tmp_path / "49mb.jpg").write_bytes(photo + b"\0" * (49 * mib))
        (tmp_path / "51mb.jpg").write_bytes(photo + b"\0" * (51 * mib))
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, _ = client.predict([handle_file(str(tmp_path / "49mb.jpg"))], "beam", 2, 12, 0.0, 2, 1,
                                    api_name="/caption")
        assert len(gallery) == 1 and "square" in gallery[0]["caption"]
        with pytest.raises(Exception, match="(?i)file size|too large|exceeds") as refused:
            client.predict([handle_file(str(tmp_path / "51mb.jpg"))], "beam", 2, 12, 0.0, 2, 1, api_name="/caption")
        print(f"\n51 MB upload refused: {refused.value}")
    finally:
        for app in launched:
            app.close()


def test_a_warmed_up_server_has_made_what_a_first_request_would_wait_for():
    """app.py captions the example photos before it serves: ONNX Runtime's sessions for the CNN and each of the
    shipped model's decoders are made then, so the first user waits no longer than the next (0.3 s against
    1.2 s here)."""
    pytest.importorskip("onnxruntime")
    shipped = Captioner.from_checkpoint()
    assert shipped.encoder.session._session is None and shipped.writer.searched._session is None
    warm_up(shipped)
    assert shipped.encoder.session._session is not None
    assert all(stepped._session is not None for stepped in shipped.writer.stepped.values())  # every cell's
    assert shipped.writer.tag_writer.searched.decoder._session is not None


def test_app_serves_the_int8_cnn_on_request_and_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    """`python app.py --precision int8` (a slow CPU's choice, as with `captioner caption`): without a calibrated
    graph it stops before serving and names the command that makes one."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    assert load_app_py().main(["--precision", "int8", "--port", str(free_port())]) == 1
    error = capsys.readouterr().err
    assert "no int8 graph" in error and "captioner calibrate-int8 --data-root" in error


def test_app_py_says_at_once_when_it_cannot_serve(trained, capsys):
    """A second `python app.py`, a port out of range, an address this machine does not have: one line each,
    before any model is loaded, instead of Gradio's traceback after the warm-up."""
    import socket

    app_py = load_app_py()
    checkpoint = str(trained[1] / "best.pt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app_py.main(["--checkpoint", checkpoint, "--port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert app_py.main(["--checkpoint", checkpoint, "--host", "192.0.2.1"]) == 1  # TEST-NET-1: nobody's address
    assert "cannot serve on 192.0.2.1:7860" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app_py.main(["--port", "99999"])
    assert "99999 is not a port" in capsys.readouterr().err
    # `captioner app`, for installs without the repo's app.py, is the same command.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--checkpoint", checkpoint, "--port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_the_app_caps_glibcs_malloc_arenas_unless_the_user_chose_a_number(monkeypatch):
    """A burst of requests runs 30-40 threads; glibc's default arenas kept RSS 25-30 MiB higher after each
    (bench/results/soak.md). A user's MALLOC_ARENA_MAX is left alone."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not webapp.limit_malloc_arenas()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc's mallopt only")
    assert webapp.limit_malloc_arenas()
