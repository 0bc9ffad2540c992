"""The Gradio app: upload one or more pictures, get captions (and the n best with scores).

`caption_requests` is the whole behaviour: the named API endpoint `/caption` runs it on batches of
concurrent requests (`caption_uploads` is one request); `build_app` only lays out the page around it.
"""
from __future__ import annotations

import ctypes
import errno
import hmac
import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path

import gradio as gr

from .caption import tags_text
from .config import ConfigError, cell_weights, picked_cells
from .describe import Caption
from .folders import caption_files
from .forget import Forgetter
from .inference import Captioner, example_photos
from .transform import load_image

MAX_FILE_SIZE = "50mb"  # room for big phone JPEGs (up to 200 megapixels), which are read at a reduced scale
MAX_BATCH = 16  # concurrent requests captioned together
BROWSER_FORMATS = {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".avif"}
GALLERY_SIZE = 512
QUEUE_SIZE = 64  # requests waiting; one more is told the app is busy
FORGET_AFTER = 30.0  # seconds an answer's files stay: time for a browser to fetch the gallery's images
# Gradio's own sweep (every minute, files over 15 minutes old): uploads that no request ever captioned.
UNCAPTIONED_UPLOADS = (60, 900)
PASSWORD_VARIABLE = "CAPTIONER_APP_PASSWORD"
# glibc's malloc arenas for the server's threads: its default (8 per core) left RSS 25-30 MiB higher after each
# burst of requests; two kept it flat (bench/results/soak.md). A user's MALLOC_ARENA_MAX wins.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
# The table's columns: those of `captioner caption`'s rows (caption.py FIELDS), with the file's name and the rank.
TABLE_HEADERS = ["file", "rank", "caption", "score", "confidence", "unsure", "from tags", "the photo shows", "cell",
                 "error"]
TABLE_TYPES = ["str", "number", "str", "number", "number", "bool", "bool", "str", "str", "str"]
TABLE_WIDTHS = ["12%", "5%", "25%", "8%", "9%", "7%", "7%", "13%", "7%", "7%"]
# The cell choices besides the model's cells: its ensemble (when its decode.cells names several) and all side by side.
TOGETHER, COMPARE = "together", "compare side by side"


def table_row(name: str, rank: int, caption: Caption, cell: str) -> list:
    confidence = None if caption.confidence is None else round(caption.confidence, 3)
    return [name, rank, caption.text, round(caption.score, 3), confidence, caption.unsure, caption.from_tags,
            tags_text(caption.tags), cell, ""]


def table_error_row(name: str, error: str) -> list:
    return [name, None, "", None, None, None, None, "", "", error]


def cell_choices(captioner: Captioner) -> list[str]:
    """The app's choice of photo decoder: each cell the model holds, its ensemble, and all side by side."""
    if len(captioner.cells) == 1:
        return list(captioner.cells)
    together = [TOGETHER] if len(cell_weights(captioner.config.decode.cells) or {}) > 1 else []
    return [*captioner.cells, *together, COMPARE]


def default_cell(captioner: Captioner) -> str:
    """The choice that writes what `captioner caption` writes: the model's decode.cells."""
    weights = picked_cells(captioner.config.decode.cells, captioner.config.decoder.cell, captioner.cells)
    return TOGETHER if len(weights) > 1 else next(iter(weights))


def cells_settings(captioner: Captioner, choice: str | None) -> tuple[tuple[str, str], ...]:
    """(label, decode.cells) of each caption a choice writes per photo: one, or each cell's for COMPARE."""
    choice = choice or default_cell(captioner)
    if choice == COMPARE:
        return tuple((cell, cell) for cell in captioner.cells)
    if choice == TOGETHER:
        return ((TOGETHER, captioner.config.decode.cells),)
    if choice not in captioner.cells:
        raise gr.Error(f"cell {choice!r}: this model has {', '.join(cell_choices(captioner))}")
    return ((choice, choice),)


def uploads_as_paths(files: gr.File) -> gr.File:
    """gr.File(type="filepath") less the empty temp file that Gradio makes, and never deletes, for every file it
    passes on (gradio 6.31, components/file.py `_process_single_file`): each upload is passed on as its path.
    (The instance's method, not a subclass: Gradio writes a .pyi beside the module of every Component subclass.)"""
    files._process_single_file = lambda data: gr.utils.NamedString(data.path)
    return files


def temp_folder() -> Path:
    """Where Gradio keeps uploads: GRADIO_TEMP_DIR, else the system's temp folder's gradio/."""
    return Path(gr.utils.get_upload_folder())


def browser_view(path: str) -> str:
    """What the gallery shows: the file itself where browsers display its format, else a JPEG preview in the
    app's temp folder (a phone's HEIC or a TIFF would show as a broken image), which is forgotten with it."""
    if Path(path).suffix.lower() in BROWSER_FORMATS:
        return path
    preview = load_image(path, draft_size=GALLERY_SIZE)
    preview.thumbnail((GALLERY_SIZE, GALLERY_SIZE))
    temp_folder().mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="preview-", suffix=".jpg", dir=temp_folder())
    with os.fdopen(handle, "wb") as file:
        preview.convert("RGB").save(file, format="JPEG", quality=85)
    return name


def gallery_text(caption: Caption) -> str:
    """The caption under a photo; an unsure one says so and names what the encoder does see."""
    if not caption.unsure:
        return caption.text
    seen = tags_text(caption.tags) or "nothing the model knows"
    if caption.from_tags:
        return f"{caption.text} (unsure of this photo, so the caption is written from what the encoder sees: {seen})"
    return f"{caption.text} (unsure: the photo is unlike the model's training photos, or the caption names what " \
           f"the encoder does not see; it seems to show {seen})"


def compared_text(labelled: list[tuple[str, Caption]]) -> str:
    """The captions under a photo in the side-by-side view: each cell's, its score, and where the cell was
    unsure: each word's probability (given the words before it) after it."""
    def words(caption: Caption) -> str:
        if caption.word_probs is None:  # written from the tags
            return gallery_text(caption)
        text = " ".join(f"{word} ({p:.2f})" for word, p in zip(caption.text.split(), caption.word_probs))
        return text + (" [unsure]" if caption.unsure else "")

    return "\n".join(f"{label} ({caption.score:.2f}): {words(caption)}" for label, caption in labelled)


def caption_uploads(captioner: Captioner, files, decoding: str = "beam", beam_size: int = 3, max_length: int = 20,
                    length_penalty: float = 0.0, no_repeat_ngram_size: int = 3, n_best: int = 1, cell: str = ""):
    """Caption each uploaded file: (gallery of (image, caption), table rows with the n best or the error)."""
    galleries, tables = caption_requests(captioner, [files], [decoding], [beam_size], [max_length], [length_penalty],
                                         [no_repeat_ngram_size], [n_best], [cell])
    return galleries[0], tables[0]


def caption_requests(captioner: Captioner, files: list, decoding: list, beam_size: list, max_length: list,
                     length_penalty: list, no_repeat_ngram_size: list, n_best: list,
                     cell: list | None = None) -> tuple[list, list]:
    """Gradio's batch function: several users' requests at once, each argument a list with one item per request.

    Requests with the same decoding options are captioned together, in one `caption_files` call: one pass of the
    CNN and one search batch for all their photos (captions are the same as alone: the search is exact per image).
    `cell` is each request's choice of photo decoder (cell_choices; "" the model's default).
    Returns (galleries, tables), one per request. A request alone gets Gradio's error for no files and its warning
    for no readable image; in a batch, where an error would fail the others too, the table says so.
    """
    if len(files) == 1 and not files[0]:
        raise gr.Error("Upload at least one image.")
    galleries: list = [[] for _ in files]
    tables: list = [[] for _ in files]
    groups: dict[tuple, list[tuple[int, list[str]]]] = {}
    for request, request_files in enumerate(files):
        if not request_files:
            tables[request] = [table_error_row("", "Upload at least one image.")]
            continue
        beam = 1 if decoding[request] == "greedy" else int(beam_size[request])
        options = (beam, max(1, min(int(n_best[request]), beam)), int(max_length[request]),
                   float(length_penalty[request]), int(no_repeat_ngram_size[request]),
                   cells_settings(captioner, cell[request] if cell else None))
        paths = paths_of(request_files)
        groups.setdefault(options, []).append((request, paths))
    for (beam, best, longest, penalty, no_repeat, cells), members in groups.items():
        paths = [path for _, request_paths in members for path in request_paths]
        results = {index: (captions, error) for index, captions, error in caption_files(
            captioner, paths, num_workers=0, n_best=best, cells=[setting for _, setting in cells],
            word_probs=len(cells) > 1, beam_size=beam, max_length=longest, length_penalty=penalty,
            no_repeat_ngram_size=no_repeat)}
        offset = 0
        for request, request_paths in members:
            for index, path in enumerate(request_paths, start=offset):
                captions, error = results[index]
                name = Path(path).name
                if error is not None:
                    tables[request].append(table_error_row(name, error.replace(path, name)))
                    continue
                per_cell = [(label, captions[i * best:(i + 1) * best]) for i, (label, _) in enumerate(cells)]
                text = compared_text([(label, c[0]) for label, c in per_cell]) if len(cells) > 1 \
                    else gallery_text(captions[0])
                galleries[request].append((browser_view(path), text))
                tables[request] += [table_row(name, rank, c, label) for label, ranked in per_cell
                                    for rank, c in enumerate(ranked, start=1)]
            offset += len(request_paths)
    if len(files) == 1 and not galleries[0]:
        gr.Warning("None of the uploaded files could be read as an image; see the table.")
    return galleries, tables


def warm_up(captioner: Captioner) -> None:
    """Make a new server's first request as fast as the next ones (0.3 s against 1.2 s here): caption the example
    photos once with every cell, which makes ONNX Runtime's sessions for the CNN and all the decoders, and settle
    matplotlib's default backend, which Gradio otherwise does while it serves the first request."""
    import matplotlib

    matplotlib.get_backend()
    for _, _, error in caption_files(captioner, example_photos(), num_workers=0, cells=captioner.cells):
        if error is not None:  # a damaged install: say so, and serve anyway
            print(f"app: warning: could not caption an example photo: {error}", file=sys.stderr)


def paths_of(files) -> list[str]:
    """The paths of one request's uploads (a list of paths or of file objects, or one path)."""
    if not files:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    return [str(getattr(file, "name", file)) for file in files]


def answer_and_forget(captioner: Captioner, forgetter: Forgetter, *lists) -> tuple[list, list]:
    """caption_requests, then the requests' uploads and previews are handed to the forgetter: deleted a little
    after the answer goes out (FORGET_AFTER), whatever the answer was."""
    made: list[str] = []
    try:
        galleries, tables = caption_requests(captioner, *lists)
        made = [image for gallery in galleries for image, _ in gallery]
        return galleries, tables
    finally:
        forgetter.later([path for files in lists[0] for path in paths_of(files)] + made)


def kept_files(app: gr.Blocks) -> set[str]:
    """The files the app's components keep (the example photos' cached copies), which are no one's upload."""
    return set().union(*(getattr(block, "keep_in_cache", set()) for block in app.blocks.values()))


def build_app(captioner: Captioner, forget_after: float = FORGET_AFTER, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The page, and its API endpoint `/caption`; `app.forgetter` deletes each answer's files."""
    defaults = captioner.config.decode
    with gr.Blocks(title="captioner", delete_cache=UNCAPTIONED_UPLOADS) as app:
        gr.Markdown("# captioner\nUpload photos; a CNN encoder and a recurrent decoder describe them. "
                    "A caption marked *unsure* may be wrong: the photo is unlike the model's training photos, or "
                    "the caption names a person or a dog the model cannot see. *The photo shows* lists what the "
                    "CNN recognises, and *from tags* marks a caption written from those words instead of from "
                    "the photo.")
        with gr.Row():
            with gr.Column(scale=1):
                files = uploads_as_paths(gr.File(label="Images", file_count="multiple", type="filepath"))
                decoding = gr.Radio(["beam", "greedy"], value="beam", label="Decoding")
                beam_size = gr.Slider(1, 10, value=max(defaults.beam_size, 1), step=1, label="Beam size")
                max_length = gr.Slider(5, 40, value=defaults.max_length, step=1, label="Maximum length (words)")
                length_penalty = gr.Slider(0.0, 2.0, value=defaults.length_penalty, step=0.1,
                                           label="Length penalty (score / length^p)")
                no_repeat = gr.Slider(0, 4, value=defaults.no_repeat_ngram_size, step=1,
                                      label="Block repeated n-grams of size (0: off)")
                n_best = gr.Slider(1, 5, value=1, step=1, label="Captions per image (n best)")
                cell = gr.Radio(cell_choices(captioner), value=default_cell(captioner), label="Decoder cell",
                                info="a plain RNN forgets the photo fast; LSTM and GRU keep it through their gates",
                                visible=len(captioner.cells) > 1)
                button = gr.Button("Caption", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Captions", columns=3, height="auto")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=TABLE_TYPES, column_widths=TABLE_WIDTHS,
                                     label="All captions with scores", wrap=True)
        examples = [str(p) for p in example_photos()]
        if examples:
            gr.Examples([[[p]] for p in examples], inputs=[files], label="Example photos")
            # Their copies in the temp folder, just made: kept, by Gradio's sweep and the forgetter alike.
            files.keep_in_cache.update(files.temp_files)
        # Concurrent users' requests wait while a batch runs, then go together (up to MAX_BATCH requests):
        # one CNN pass and one beam search for all their photos instead of one each.
        app.forgetter = Forgetter(temp_folder(), forget_after, keep=lambda: kept_files(app))
        button.click(lambda *lists: answer_and_forget(captioner, app.forgetter, *lists),
                     [files, decoding, beam_size, max_length, length_penalty, no_repeat, n_best, cell],
                     [gallery, table], api_name="caption", batch=True, max_batch_size=MAX_BATCH, concurrency_limit=1)
    app.queue(max_size=queue_size)
    return app


def cannot_serve_on(host: str, port: int) -> str | None:
    """Why the app could not listen on host:port (in use, or an address this machine does not have), or None."""
    try:
        with socket.socket() as probe:
            # As uvicorn binds (SO_REUSEADDR): a port whose earlier connections linger in TIME_WAIT, as after
            # stopping a server that served a browser, is free to it; only a socket that listens there is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is in use (another app running?): use --port N"
        return f"cannot serve on {host}:{port}: {error.strerror or error} (check --host)"
    return None


def read_password(password_file: str | None = None) -> str | None:
    """The app's password: the first line of `password_file`, else $CAPTIONER_APP_PASSWORD, else None."""
    if password_file:
        try:
            lines = Path(password_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(f"cannot read --password-file {password_file}: {error.strerror or error}")
        if not lines or not lines[0].strip():
            raise ConfigError(f"--password-file {password_file} is empty: put the password on its first line")
        return lines[0].strip()
    return os.environ.get(PASSWORD_VARIABLE) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: reachable by whoever resolves it


def exposure_warning(host: str, share: bool, password: str | None) -> str | None:
    """The warning for an app that others can reach (a public link, or an address not this machine's own)
    with no password; None where there is a password or only this machine can reach it."""
    if password or not (share or not is_loopback(host)):
        return None
    where = "a public link (--share)" if share else f"{host}, which other machines can reach"
    return (f"app: warning: anyone who can reach {where} can use the app and see its answers: no password is "
            f"set (put one in a file for --password-file, or in ${PASSWORD_VARIABLE})")


def password_check(password: str):
    """Gradio's auth: any user name, this password (compared in constant time)."""
    return lambda username, given: hmac.compare_digest(given.encode(), password.encode())


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before the server starts its threads; whether it took (glibc only)."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):  # not glibc
        return False


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          device: str = "cpu", runtime: str | None = None, precision: str | None = None,
          settings: list[str] = (), password: str | None = None) -> int:
    """`python app.py` and `captioner app`: load the model, warm it up, serve until stopped. `runtime`,
    `precision` and `settings` change the model's config (Captioner.from_checkpoint); a `password` protects the
    page and the API alike."""
    limit_malloc_arenas()  # before any thread allocates
    warning = exposure_warning(host, share, password)
    if warning:
        print(warning, file=sys.stderr)
    problem = cannot_serve_on(host, port)  # before the model loads: say it at once
    if problem:
        raise ConfigError(problem)
    captioner = Captioner.from_checkpoint(checkpoint, device=device, settings=settings, runtime=runtime,
                                          precision=precision)
    warm_up(captioner)
    build_app(captioner).launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                                show_error=True, auth=password_check(password) if password else None,
                                auth_message="captioner: any user name, and the app's password")
    return 0
