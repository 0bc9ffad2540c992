"""The app keeps no one's photos, asks for a password where others can reach it, and says when it is busy."""
from __future__ import annotations

import os
import shutil
import threading

import httpx
import pytest

import captioner.webapp as webapp
from captioner import Captioner
from captioner.config import ConfigError
from captioner.webapp import build_app, exposure_warning, kept_files, password_check, read_password
from conftest import GRADIO_TEMP_DIR, free_port, load_app_py

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
CAPTION_ARGS = ("beam", 2, 12, 0.0, 2, 1)


@pytest.fixture(scope="module")
def captioner(trained):
    return Captioner.from_checkpoint(trained[1] / "best.pt")


def serve(app, **launch) -> str:
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch)
    return f"http://127.0.0.1:{port}/"


def temp_files(name: str | None = None) -> list:
    return [p for p in GRADIO_TEMP_DIR.rglob(name or "*") if p.is_file()]


def test_uploads_and_previews_are_deleted_after_the_answer_and_no_empty_file_is_left(captioner, tiny_flickr8k,
                                                                                       tmp_path):
    from gradio_client import Client, handle_file
    from PIL import Image

    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    photo = tmp_path / "private-holiday.jpg"  # a name no other test uses
    shutil.copy(tiny_flickr8k / "images" / "red_square_2.jpg", photo)
    Image.open(photo).save(tmp_path / "private-phone.heic")  # the gallery shows a JPEG preview of it
    app = build_app(captioner, forget_after=0)
    url = serve(app)
    try:
        empty_before = {p for p in temp_files() if p.stat().st_size == 0}
        client = Client(url, verbose=False, download_files=False)  # nothing of the answer fetched back
        gallery, table = client.predict([handle_file(str(photo)), handle_file(str(tmp_path / "private-phone.heic"))],
                                        *CAPTION_ARGS, api_name="/caption")
        assert len(gallery) == 2 and all(row[-1] == "" for row in table["data"])
        assert app.forgetter.wait_until_done(timeout=60)
        forgotten = {p.rsplit("/", 1)[-1] for p in app.forgetter.forgotten}
        assert {"private-holiday.jpg", "private-phone.heic"} <= forgotten
        assert any(name.startswith("preview-") for name in forgotten)  # the HEIC's browser view
        assert temp_files("private-*") == [] and temp_files("preview-*") == []
        assert {p for p in temp_files() if p.stat().st_size == 0} == empty_before  # no empty file per request
        kept = kept_files(app)
        assert kept and all(os.path.exists(p) for p in kept)  # the example photos stay
    finally:
        app.close()


def test_the_forgetter_leaves_files_outside_the_temp_folder_alone(tiny_flickr8k):
    forgetter = webapp.Forgetter(GRADIO_TEMP_DIR, after=0)
    forgetter.later([str(tiny_flickr8k / "images" / "red_square_2.jpg"), str(GRADIO_TEMP_DIR)])
    assert forgetter.wait_until_done(timeout=60) and not forgetter.forgotten and forgetter.count == 0
    assert (tiny_flickr8k / "images" / "red_square_2.jpg").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it")
def test_a_photo_uploaded_through_the_page_is_deleted_after_its_answer(captioner, tiny_flickr8k, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    photo = tmp_path / "private-page-photo.jpg"
    shutil.copy(tiny_flickr8k / "images" / "blue_square_2.jpg", photo)
    app = build_app(captioner, forget_after=0)
    url = serve(app)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                page.locator("input[type=file]").first.set_input_files(str(photo))
                page.get_by_role("button", name="Caption", exact=True).click()
                page.get_by_text("square").first.wait_for(timeout=60_000)
            finally:
                browser.close()
        assert app.forgetter.wait_until_done(timeout=60)
        assert any(p.endswith("/private-page-photo.jpg") for p in app.forgetter.forgotten)
        assert temp_files("private-page-photo.jpg") == []
    finally:
        app.close()


def test_a_password_protects_the_page_and_the_api(captioner, tiny_flickr8k):
    from gradio_client import Client, handle_file

    app = build_app(captioner)
    url = serve(app, auth=password_check("correct horse"))
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False)  # no password: not even the API's description
        with pytest.raises(Exception):
            Client(url, verbose=False, auth=("anyone", "wrong horse"))
        refused = httpx.post(f"{url}gradio_api/call/caption", json={"data": [[], *CAPTION_ARGS]})
        assert refused.status_code in (401, 403)
        assert httpx.get(f"{url}config").status_code in (401, 403)
        client = Client(url, verbose=False, auth=("anyone", "correct horse"))
        gallery, _ = client.predict([handle_file(str(tiny_flickr8k / "images" / "red_square_2.jpg"))], *CAPTION_ARGS,
                                    api_name="/caption")
        assert len(gallery) == 1 and gallery[0]["caption"]
    finally:
        app.close()


def test_an_app_others_can_reach_without_a_password_is_warned_about():
    assert "public link (--share)" in exposure_warning("127.0.0.1", True, None)
    assert "0.0.0.0, which other machines can reach" in exposure_warning("0.0.0.0", False, None)
    assert exposure_warning("my-laptop.example", False, None)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, False, None) is None
    assert exposure_warning("0.0.0.0", True, "a password") is None


def test_app_py_warns_without_a_password_and_never_shows_one(trained, tmp_path, monkeypatch, capsys):
    app_py = load_app_py()
    checkpoint = str(trained[1] / "best.pt")
    monkeypatch.delenv(webapp.PASSWORD_VARIABLE, raising=False)
    # TEST-NET-1, nobody's address: the warning comes first, then the app stops, as it cannot listen there.
    assert app_py.main(["--checkpoint", checkpoint, "--host", "192.0.2.1"]) == 1
    error = capsys.readouterr().err
    assert "no password is set" in error and "--password-file" in error and "cannot serve on 192.0.2.1" in error
    monkeypatch.setenv(webapp.PASSWORD_VARIABLE, "s3cret-from-env")
    assert app_py.main(["--checkpoint", checkpoint, "--host", "192.0.2.1"]) == 1
    out = capsys.readouterr()
    assert "no password" not in out.err and "s3cret" not in out.err + out.out
    monkeypatch.delenv(webapp.PASSWORD_VARIABLE)
    (tmp_path / "password").write_text("s3cret-from-file\n")
    assert app_py.main(["--checkpoint", checkpoint, "--host", "192.0.2.1", "--password-file",
                        str(tmp_path / "password")]) == 1
    out = capsys.readouterr()
    assert "no password" not in out.err and "s3cret" not in out.err + out.out
    assert app_py.main(["--checkpoint", checkpoint, "--password-file", str(tmp_path / "nowhere")]) == 1
    assert "cannot read --password-file" in capsys.readouterr().err


def test_the_password_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(webapp.PASSWORD_VARIABLE, raising=False)
    assert read_password(None) is None
    monkeypatch.setenv(webapp.PASSWORD_VARIABLE, "from env")
    assert read_password(None) == "from env"
    (tmp_path / "password").write_text("from file\n")
    assert read_password(str(tmp_path / "password")) == "from file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_password(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read --password-file"):
        read_password(str(tmp_path / "missing"))
    check = password_check("from file")
    assert check("anyone", "from file") and not check("anyone", "from fil")


def test_a_full_queue_says_busy_and_the_app_answers_normally_after(captioner, tiny_flickr8k, monkeypatch):
    from gradio_client import Client, handle_file

    started, release = threading.Event(), threading.Event()
    real = webapp.caption_requests

    def held(*args):  # the first batch waits here until the test lets it go: the queue fills behind it
        started.set()
        release.wait(timeout=120)
        return real(*args)

    monkeypatch.setattr(webapp, "caption_requests", held)
    app = build_app(captioner, queue_size=1)
    url = serve(app)
    photo = handle_file(str(tiny_flickr8k / "images" / "red_square_2.jpg"))
    try:
        client = Client(url, verbose=False, download_files=False)
        first = client.submit([photo], *CAPTION_ARGS, api_name="/caption")
        assert started.wait(timeout=120)  # the first request is being captioned: the queue is empty
        waiting = httpx.post(f"{url}gradio_api/call/caption", json={"data": [[], *CAPTION_ARGS]})
        assert waiting.status_code == 200  # the second waits: the queue is full
        refused = httpx.post(f"{url}gradio_api/call/caption", json={"data": [[], *CAPTION_ARGS]})
        assert refused.status_code == 503 and "Queue is full" in refused.text
        with pytest.raises(Exception, match="Queue is full! Please try again"):
            client.predict([photo], *CAPTION_ARGS, api_name="/caption")
        release.set()
        assert first.result(timeout=120)[0][0]["caption"]
        gallery, _ = client.predict([photo], *CAPTION_ARGS, api_name="/caption")  # after the burst: as before
        assert len(gallery) == 1 and gallery[0]["caption"]
    finally:
        release.set()
        app.close()
