"""ONNX Runtime: the default CPU encoder gives PyTorch's features and captions; int8 is calibrated by a
command; `captioner export --format onnx` captions with onnxruntime and numpy alone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioner import Captioner
from captioner.cli import main
from captioner.describe import decode_features
from captioner.encoder import EncoderError
from captioner.features import cached_features
from captioner.inference import DEFAULT_CHECKPOINT
from captioner.onnx_runtime import build_encoder, cache_dir

ort = pytest.importorskip("onnxruntime")
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "captioner" / "examples").glob("*.jpg"))


@pytest.fixture(autouse=True)
def own_graph_cache(tmp_path_factory, monkeypatch):
    """Exported graphs go to a cache of this test session, not the user's."""
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path_factory.getbasetemp() / "captioner-cache"))


@pytest.fixture
def shapes(tiny_flickr8k):
    return sorted(str(p) for p in (tiny_flickr8k / "images").glob("*.jpg"))


def test_onnx_encoder_gives_pytorchs_features_and_is_the_cpu_default(shapes):
    onnx, eager = build_encoder(image_size=64), build_encoder(image_size=64, runtime="torch")
    assert onnx.runtime == "onnx" and onnx.runtime_on("cuda:0") == "torch"  # GPUs keep torch
    assert eager.session is None and onnx.session.runtime == "onnx"  # onnx: a session attached to the torch CNN
    images = torch.stack([onnx.transform.load(p) for p in shapes[:6]])
    (pooled, grid), (eager_pooled, eager_grid) = onnx(images), eager(images)
    assert (pooled - eager_pooled).abs().max() < 1e-4 and (grid - eager_grid).abs().max() < 1e-4
    assert torch.equal(onnx.classify(pooled).argmax(1), eager.classify(eager_pooled).argmax(1))
    assert any(cache_dir().glob("*-fp32.onnx"))  # exported once, kept for the next process
    # The feature cache names runtime and precision: features of one runtime are never read as another's.
    assert onnx.cache_key().endswith("-onnx-fp32") and eager.cache_key().endswith("-torch-fp32")
    assert onnx.cache_key("cuda") == eager.cache_key()


@pytest.mark.parametrize("cell,attention,layers", [("gru", False, 1), ("lstm", False, 1), ("rnn", False, 1),
                                                   ("gru", False, 2), ("lstm", False, 2), ("lstm", True, 1)])
def test_decoder_step_on_onnx_runtime_gives_the_torch_decoders_numbers_and_captions(cell, attention, layers):
    from captioner.config import DecoderConfig
    from captioner.decoder import build_decoder
    from captioner.onnx_runtime import DecoderSession, folds
    from captioner.search import beam_search

    torch.manual_seed(0)
    decoder = build_decoder(40, 16, DecoderConfig(cell=cell, embed_dim=8, hidden_dim=12, attention=attention,
                                                  attention_dim=6, num_layers=layers)).eval()
    assert folds(decoder) == (not attention)  # the step graph written as the cell's equations, input table folded
    session = DecoderSession(decoder)
    features = torch.randn(5, 4, 16) if attention else torch.randn(5, 16)
    state = decoder.init_state(features)
    tokens = torch.arange(4, 9)
    (log_probs, next_state), (onnx_log_probs, onnx_next_state) = decoder.step(tokens, state), session.step(tokens, state)
    assert (onnx_log_probs - log_probs).abs().max() < 1e-5
    for ours, theirs in zip(*(s if isinstance(s, tuple) else (s,) for s in (onnx_next_state, next_state))):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    options = dict(beam_size=3, max_length=8, no_repeat_ngram_size=2, n_best=3)
    assert [[h.tokens for h in hyps] for hyps in beam_search(session, features, **options)] == \
           [[h.tokens for h in hyps] for hyps in beam_search(decoder, features, **options)]


def test_the_graph_cache_keeps_the_most_recently_used_step_graphs(tmp_path, monkeypatch):
    import os

    from captioner.config import DecoderConfig
    from captioner.decoder import build_decoder
    from captioner.onnx_runtime import STEP_GRAPHS_KEPT, decoder_step_graph

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    folder = cache_dir()
    folder.mkdir(parents=True)
    old = [folder / f"decoder-step-old{i:02d}-v2.onnx" for i in range(STEP_GRAPHS_KEPT + 4)]
    for age, path in enumerate(old):  # old[0] is the most recently used of them
        path.write_bytes(b"a graph of a model evaluated earlier")
        os.utime(path, (1e9 - age, 1e9 - age))
    encoder_graph_file = folder / "an-encoder-v2-fp32.onnx"
    encoder_graph_file.write_bytes(b"encoder graphs are never forgotten")
    os.utime(encoder_graph_file, (1, 1))
    decoder = build_decoder(30, 8, DecoderConfig(cell="gru", embed_dim=4, hidden_dim=6)).eval()
    new = decoder_step_graph(decoder, (torch.zeros(1, 2, 6),))
    kept = set(folder.glob("decoder-step-*.onnx"))
    assert len(kept) == STEP_GRAPHS_KEPT and new in kept and encoder_graph_file.is_file()
    assert kept == {new, *old[:STEP_GRAPHS_KEPT - 1]}  # the least recently used went
    from captioner import onnx_runtime

    monkeypatch.setattr(onnx_runtime, "export_decoder_step", lambda *args: pytest.fail("exported again"))
    assert decoder_step_graph(decoder, (torch.zeros(1, 2, 6),)) == new  # found in the cache


def test_an_unwritable_graph_cache_costs_time_not_captions(trained, shapes, tmp_path, monkeypatch):
    checkpoint = trained[1] / "best.pt"
    expected = [c.text for c in Captioner.from_checkpoint(checkpoint, runtime="torch").caption(shapes, beam_size=2)]
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "a-file"))  # the cache's folder cannot be made
    captioner = Captioner.from_checkpoint(checkpoint, runtime="onnx")
    with pytest.warns(UserWarning, match="cannot keep ONNX graphs .* CAPTIONER_CACHE"):
        captions = [c.text for c in captioner.caption(shapes, beam_size=2)]
    assert captions == expected


def test_runtime_choices_are_checked():
    with pytest.raises(EncoderError, match="int8 runs on ONNX Runtime"):
        build_encoder(image_size=64, runtime="torch", precision="int8")
    with pytest.raises(EncoderError, match="unknown runtime"):
        build_encoder(image_size=64, runtime="tensorrt")


def test_captions_are_the_same_on_either_runtime(trained, shapes):
    checkpoint = trained[1] / "best.pt"
    onnx = Captioner.from_checkpoint(checkpoint, runtime="onnx")
    eager = Captioner.from_checkpoint(checkpoint, runtime="torch")
    assert onnx.encoder.runtime == "onnx" and eager.encoder.runtime == "torch"
    assert onnx.writer.searched is not onnx.decoder and eager.writer.searched is eager.decoder  # the decoder's step too
    for beam_size in (1, 3):
        assert [c.text for c in onnx.caption(shapes, beam_size=beam_size)] == \
               [c.text for c in eager.caption(shapes, beam_size=beam_size)]


def test_int8_is_calibrated_by_a_command_and_used_when_asked(trained, tiny_flickr8k, tmp_path, shapes, capsys):
    checkpoint = trained[1] / "best.pt"
    with pytest.raises(EncoderError, match="captioner calibrate-int8"):
        Captioner.from_checkpoint(checkpoint, runtime="onnx", precision="int8").caption(shapes[0])
    assert main(["calibrate-int8", "--checkpoint", str(checkpoint), "--data-root", str(tiny_flickr8k),
                 "--images", "8", "--out", str(tmp_path / "int8.onnx"), "--no-progress"]) == 0
    assert "calibrated on 8 training photos" in capsys.readouterr().out and (tmp_path / "int8.onnx").is_file()
    int8 = Captioner.from_checkpoint(checkpoint, runtime="onnx", precision="int8")
    fp32 = Captioner.from_checkpoint(checkpoint, runtime="onnx")
    assert "-onnx-int8-" in int8.encoder.cache_key()
    images = torch.stack([fp32.encoder.transform.load(p) for p in shapes])
    close = torch.nn.functional.cosine_similarity(int8.encoder(images)[0], fp32.encoder(images)[0])
    # Close, not equal: 8 drawn shapes at 64 px calibrate poorly (bench/int8.py measures real photos).
    assert 0.6 < close.mean() < 0.9999, close
    assert all(c.text for c in int8.caption(shapes, beam_size=3))
    features = cached_features(int8.encoder, shapes, tmp_path / "cache", progress=False)
    assert features.features.shape == (len(shapes), 1280) and (tmp_path / "cache" / int8.encoder.cache_key()).is_dir()


def test_int8_calibrates_on_a_folder_of_your_own_photos(trained, shapes, tmp_path, capsys):
    """`calibrate-int8 --folder`: a user's own photos instead of a dataset's; unreadable files are skipped, and a
    folder with no image, or with none readable, is a one-line error."""
    checkpoint = str(trained[1] / "best.pt")
    folder = tmp_path / "mine"
    (folder / "holiday").mkdir(parents=True)
    for i, path in enumerate(shapes[:6]):
        shutil.copy(path, folder / "holiday" / f"{i}.jpg")
    (folder / "notes.txt").write_text("not a photo")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    out = tmp_path / "int8.onnx"
    calibrate = ["calibrate-int8", "--checkpoint", checkpoint, "--out", str(out), "--no-progress"]
    assert main([*calibrate, "--folder", str(folder)]) == 0
    assert f"calibrated on 6 photos of {folder}" in capsys.readouterr().out and out.is_file()  # not the broken one
    (tmp_path / "empty").mkdir()
    assert main([*calibrate, "--folder", str(tmp_path / "empty")]) == 1
    assert "no images found in this folder" in capsys.readouterr().err
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    assert main([*calibrate, "--folder", str(tmp_path / "unreadable")]) == 1
    assert "none of the 1 photos could be read" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a dataset or a folder, not both
        main([*calibrate, "--folder", str(folder), "--data-root", str(folder)])


def test_int8_weights_have_8_bits_only_where_no_cpu_saturates_them(trained, shapes, tmp_path):
    # x86 without VNNI sums pairs of u8 x s8 products in int16 for the matrix-product convolutions: their weights
    # keep 7 bits. Depthwise convolutions have kernels that widen first: 8 bits, and the fused kernels must still
    # compute what the QDQ graph says (ONNX Runtime with its graph optimizations off: no integer kernels).
    import onnx
    from onnx import numpy_helper

    from captioner.onnx_runtime import EncoderSession, encoder_graph, session_options
    from captioner.quantize import quantize_graph

    encoder = Captioner.from_checkpoint(trained[1] / "best.pt", runtime="onnx").encoder
    graph = tmp_path / "int8.onnx"
    quantize_graph(encoder_graph(encoder, "fp32"), graph, shapes, encoder.transform, progress=False)
    model = onnx.load(str(graph))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dequantized = {n.output[0]: weights.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    widest = {"depthwise": 0, "other": 0}
    for node in model.graph.node:
        quantized = dequantized.get(node.input[1]) if node.op_type == "Conv" else None
        if quantized is not None:
            kind = "depthwise" if quantized.shape[1] == 1 else "other"
            widest[kind] = max(widest[kind], int(np.abs(quantized.astype(np.int32)).max()))
    assert widest["other"] <= 64 and widest["depthwise"] > 64, widest

    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    images = torch.stack([encoder.transform.load(p) for p in shapes])
    expected = torch.from_numpy(unfused.run(["pooled"], {"images": images.numpy()})[0])
    agreement = torch.nn.functional.cosine_similarity(EncoderSession(graph)(images)[0], expected)
    # Rounding differs a little between the fused and the unfused arithmetic (0.9997 mean here); with 8-bit weights
    # everywhere, this CPU's (AVX2) saturated sums gave 0.988.
    assert agreement.mean() > 0.999 and agreement.min() > 0.995, agreement


def test_int8_calibration_takes_histogram_methods_and_float_layers_at_the_end(trained, shapes, tmp_path):
    # bench/int8_variants.py's settings. Histogram calibrators read every batch without asking for a range.
    from captioner.onnx_runtime import EncoderSession, encoder_graph
    from captioner.quantize import quantize_graph

    encoder = Captioner.from_checkpoint(trained[1] / "best.pt", runtime="onnx").encoder
    images = torch.stack([encoder.transform.load(p) for p in shapes])
    for name, options in {"percentile": {"method": "Percentile"},
                          "last-float": {"float_last_convolutions": 4, "weight_bits": 8}}.items():
        graph = tmp_path / f"{name}.onnx"
        quantize_graph(encoder_graph(encoder, "fp32"), graph, shapes, encoder.transform, progress=False, **options)
        close = torch.nn.functional.cosine_similarity(EncoderSession(graph)(images)[0], encoder(images)[0])
        assert 0.6 < close.mean() < 0.9999, (name, close)


# --- the exported model, run with onnxruntime and numpy alone -------------------------------------------------

def load_image(path: str, image: dict) -> np.ndarray:
    """captioner.json's image steps, with Pillow and numpy."""
    size = image["size"]
    with Image.open(path) as picture:
        if picture.format == "JPEG":
            picture.draft("RGB", (size, size))
        picture = ImageOps.exif_transpose(picture).convert("RGB")
    pixels = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    return ((pixels - np.array(image["mean"], np.float32)) / np.array(image["std"], np.float32)).transpose(2, 0, 1)


def greedy_with_onnx(folder: Path, paths: list[str]) -> list[str]:
    """A greedy caption per image from the exported files: the loop captioner.json describes."""
    spec = json.loads((folder / "captioner.json").read_text())
    session = {name: ort.InferenceSession(str(folder / graph["file"]), providers=["CPUExecutionProvider"])
               for name, graph in spec["graphs"].items()}
    images = np.stack([load_image(p, spec["image"]) for p in paths])
    features = session["encoder"].run([spec["decoder"]["features"]], {"images": images})[0]
    state = session["decoder_init"].run(None, {"features": features})
    decode, ids = spec["decode"], spec["special_ids"]
    n = decode["no_repeat_ngram_size"]
    tokens = np.full(len(paths), ids["bos"], dtype=np.int64)
    words: list[list[int]] = [[] for _ in paths]
    done = np.zeros(len(paths), dtype=bool)
    for step in range(decode["max_length"]):
        inputs = {"tokens": tokens, **dict(zip(spec["decoder"]["state"], state))}
        log_probs, *state = session["decoder_step"].run(None, inputs)
        log_probs[:, spec["never_emitted"]] = -np.inf
        if step < decode["min_length"]:
            log_probs[:, ids["eos"]] = -np.inf
        for row, generated in enumerate(words):
            if n and len(generated) >= n:
                prefix = generated[len(generated) - n + 1:]
                for start in range(len(generated) - n + 1):
                    if generated[start:start + n - 1] == prefix:
                        log_probs[row, generated[start + n - 1]] = -np.inf
            if np.isinf(log_probs[row]).all():
                log_probs[row, ids["eos"]] = 0.0
        tokens = log_probs.argmax(1)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                done[row] = token == ids["eos"]
                if not done[row]:
                    words[row].append(token)
        if done.all():
            break
    return [" ".join(spec["vocab"][t] for t in row) for row in words]


def test_exported_onnx_model_captions_like_the_package(trained, shapes, tmp_path, capsys):
    checkpoint = trained[1] / "best.pt"
    assert main(["export", str(checkpoint), str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    assert "decoder_step.onnx" in capsys.readouterr().out
    spec = json.loads((tmp_path / "onnx" / "captioner.json").read_text())
    assert spec["decode"]["max_length"] == 10 and spec["vocab"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert len(spec["tags"]["class_words"]) == 1000
    package = Captioner.from_checkpoint(checkpoint).caption(shapes, beam_size=1)
    assert greedy_with_onnx(tmp_path / "onnx", shapes) == [c.text for c in package]
    assert_declared_shapes_are_real(tmp_path / "onnx")


def assert_declared_shapes_are_real(folder: Path) -> None:
    """What a graph file declares of each input's and output's shape (read by Netron, converters to other
    formats, runtimes that plan with it): "batch" on the batch axis and a size on every other, the sizes the
    graph computes. (ONNX Runtime infers them again when it loads a graph, so only the file shows a wrong one.)"""
    import onnx

    spec = json.loads((folder / "captioner.json").read_text())
    for graph in spec["graphs"].values():
        model = onnx.load(str(folder / graph["file"]), load_external_data=False)
        declared = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                    for value in [*model.graph.input, *model.graph.output]}
        for name, shape in declared.items():
            assert shape.count("batch") == 1 and all(isinstance(d, int) for d in shape if d != "batch"), \
                (graph["file"], name, shape)
        session = ort.InferenceSession(str(folder / graph["file"]), providers=["CPUExecutionProvider"])
        feeds = {i.name: np.zeros([3 if d == "batch" else d for d in declared[i.name]],
                                  dtype=np.int64 if i.type == "tensor(int64)" else np.float32)
                 for i in session.get_inputs()}
        for output, value in zip(session.get_outputs(), session.run(None, feeds)):
            assert list(value.shape) == [3 if d == "batch" else d for d in declared[output.name]], \
                (graph["file"], output.name)


def test_shipped_model_exported_to_onnx_captions_the_example_photos_as_the_package(tmp_path):
    """The scene decoder's greedy captions (the package routes unsure photos to its fallback, not exported)."""
    from captioner.export_onnx import export_onnx

    export_onnx(DEFAULT_CHECKPOINT, tmp_path)
    photos = [str(p) for p in EXAMPLES]
    captioner = Captioner.from_checkpoint()
    features = torch.stack([captioner.encoder.transform.load(p) for p in photos])
    options = captioner.decode_options(beam_size=1)
    features = captioner.encode(features)
    package = [c[0].text for c in decode_features(captioner.decoder, captioner.vocab, features, options)]
    assert greedy_with_onnx(tmp_path, photos) == package
    assert len(set(package)) == len(package)
    assert_declared_shapes_are_real(tmp_path)  # the exporter's own guesses had a grid [batch, 1280, batch, ?]


def test_shipped_model_captions_the_example_photos_alike_on_either_runtime():
    """Both decoders (the scene's and the fallback's, behind OnceOnlyWords) step on ONNX Runtime by default."""
    photos = [str(p) for p in EXAMPLES]
    onnx, eager = Captioner.from_checkpoint(runtime="onnx"), Captioner.from_checkpoint(runtime="torch")
    assert [c.text for c in onnx.caption(photos)] == [c.text for c in eager.caption(photos)]
    assert any(c.from_tags for c in onnx.caption(photos))
