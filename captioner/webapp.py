"""The Gradio app: upload one or more pictures, get captions (and the n best with scores).

`caption_uploads` is the whole behaviour and is what the named API endpoint `/caption` runs;
`build_app` only lays out the page around it.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .caption import tags_text
from .inference import Caption, Captioner

EXAMPLES_DIR = Path(__file__).parent / "examples"
MAX_FILE_SIZE = "20mb"
TABLE_HEADERS = ["file", "rank", "caption", "score", "error", "confidence", "the photo shows"]


def gallery_text(caption: Caption) -> str:
    """The caption under a photo; an unsure one says so and names what the encoder does see."""
    if not caption.unsure:
        return caption.text
    seen = tags_text(caption.tags) or "nothing the model knows"
    if caption.from_tags:
        return f"{caption.text} (unsure: this photo is unlike the ones the model learned from, so the caption is " \
               f"written from what its encoder sees: {seen})"
    return f"{caption.text} (unsure: this photo is unlike the ones the model learned from; it seems to show {seen})"


def caption_uploads(captioner: Captioner, files, decoding: str = "beam", beam_size: int = 3, max_length: int = 20,
                    length_penalty: float = 0.0, no_repeat_ngram_size: int = 3, n_best: int = 1):
    """Caption each uploaded file: (gallery of (image, caption), table rows with the n best or the error)."""
    if not files:
        raise gr.Error("Upload at least one image.")
    if isinstance(files, (str, Path)):
        files = [files]
    beam = 1 if decoding == "greedy" else int(beam_size)
    n_best = max(1, min(int(n_best), beam))
    paths = [str(getattr(file, "name", file)) for file in files]
    results = {index: (captions, error) for index, captions, error in captioner.caption_files(
        paths, num_workers=0, n_best=n_best, beam_size=beam, max_length=int(max_length),
        length_penalty=float(length_penalty), no_repeat_ngram_size=int(no_repeat_ngram_size))}
    gallery, table = [], []
    for index, path in enumerate(paths):
        captions, error = results[index]
        name = Path(path).name
        if error is not None:
            table.append([name, None, "", None, error.replace(path, name), None, ""])
            continue
        gallery.append((path, gallery_text(captions[0])))
        table += [[name, rank, c.text, round(c.score, 3), "", None if c.confidence is None else round(c.confidence, 3),
                   tags_text(c.tags)] for rank, c in enumerate(captions, start=1)]
    if not gallery:
        gr.Warning("None of the uploaded files could be read as an image; see the table.")
    return gallery, table


def build_app(captioner: Captioner) -> gr.Blocks:
    defaults = captioner.config.decode
    with gr.Blocks(title="captioner") as app:
        gr.Markdown("# captioner\nUpload photos; a CNN encoder and a recurrent decoder describe them. "
                    "*Confidence* is how familiar a photo is to the model (the share of its held-out photos that "
                    "look no more familiar); below 0.05 the caption is marked unsure. *The photo shows* lists what "
                    "the encoder's ImageNet classifier sees, as caption words.")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", type="filepath")
                decoding = gr.Radio(["beam", "greedy"], value="beam", label="Decoding")
                beam_size = gr.Slider(1, 10, value=max(defaults.beam_size, 1), step=1, label="Beam size")
                max_length = gr.Slider(5, 40, value=defaults.max_length, step=1, label="Maximum length (words)")
                length_penalty = gr.Slider(0.0, 2.0, value=defaults.length_penalty, step=0.1,
                                           label="Length penalty (score / length^p)")
                no_repeat = gr.Slider(0, 4, value=defaults.no_repeat_ngram_size, step=1,
                                      label="Block repeated n-grams of size (0: off)")
                n_best = gr.Slider(1, 5, value=1, step=1, label="Captions per image (n best)")
                button = gr.Button("Caption", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Captions", columns=3, height="auto")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="All captions with scores", wrap=True)
        examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
        if examples:
            gr.Examples([[[p]] for p in examples], inputs=[files], label="Example photos")
        button.click(lambda *args: caption_uploads(captioner, *args),
                     [files, decoding, beam_size, max_length, length_penalty, no_repeat, n_best],
                     [gallery, table], api_name="caption")
    app.queue(default_concurrency_limit=2, max_size=64)
    return app
