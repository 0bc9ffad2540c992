"""The three cells in users' hands: a model holding several photo decoders, `--cell` choosing one, and their
ensemble in greedy and beam search (exact against exhaustive search, in PyTorch and on ONNX Runtime)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.checkpoint import CheckpointError
from captioner.config import ConfigError, cell_weights, load_config
from captioner.data import load_csv, load_dataset
from captioner.decoder import Ensemble
from captioner.describe import decode_features
from captioner import search
from captioner.search import beam_search, greedy_search
from test_search import best_caption, exhaustive_captions, random_decoder, random_features

import cell_latency  # bench/, on pytest's path (pyproject.toml)
import cell_memory
import distill
import int8_steps
import seed_partner
import tune_cells

CELLS = ("gru", "lstm", "rnn")


def random_ensemble(vocab_size: int, seed: int, weights=(0.5, 0.3, 0.2)) -> Ensemble:
    members = {cell: random_decoder(vocab_size, seed * 3 + i, cell) for i, cell in enumerate(CELLS)}
    return Ensemble(members, dict(zip(CELLS, weights)))


def test_an_ensemble_step_is_the_weighted_mixture_of_its_cells_distributions():
    ensemble = random_ensemble(12, 0)
    features, tokens = torch.randn(5, 16), torch.randint(4, 12, (5,))
    with torch.no_grad():
        mixed, state = ensemble.step(tokens, ensemble.init_state(features))
        expected = sum(weight * member.step(tokens, member.init_state(features))[0].exp()
                       for member, weight in zip(ensemble.members.values(), ensemble.weights.values()))
    torch.testing.assert_close(mixed.exp(), expected)
    torch.testing.assert_close(mixed.exp().sum(1), torch.ones(5))  # a distribution: scores stay log-probabilities
    assert isinstance(state[1], tuple)  # each member keeps its own state: the LSTM its (h, c)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_wide_beam_over_the_ensemble_equals_exhaustive_search(length_penalty):
    for seed in range(3):
        ensemble, features = random_ensemble(8, seed), torch.randn(1, 16)
        best_score, best_words = best_caption(exhaustive_captions(ensemble, features, max_length=5), length_penalty)
        found = beam_search(ensemble, features, beam_size=1280, max_length=5, length_penalty=length_penalty)[0][0]
        assert found.tokens == best_words
        assert found.score == pytest.approx(best_score, abs=1e-4)


def test_the_ensemble_finds_a_caption_no_single_cell_prefers():
    """Greedy over the mixture is not any member's greedy caption on some images: the cells write together."""
    ensemble = random_ensemble(30, 4, weights=(1 / 3, 1 / 3, 1 / 3))
    features = random_features(ensemble.members["gru"], 40)
    together = [h.tokens for h in greedy_search(ensemble, features, max_length=8)]
    alone = [[h.tokens for h in greedy_search(member, features, max_length=8)] for member in ensemble.members.values()]
    assert sum(all(t != a[i] for a in alone) for i, t in enumerate(together)) > 0


@pytest.mark.parametrize("beam_size", [1, 3])
def test_word_probabilities_are_the_models_own_and_multiply_to_the_captions_probability(beam_size):
    """Caption.word_probs, teacher forced after the search: the words' and <eos>'s log-probabilities sum to the
    log-probability the search scored (for a single cell and for the mixture alike)."""
    from captioner.describe import decode_features
    from captioner.config import DecodeConfig
    from captioner.text import Vocabulary

    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *(f"w{i}" for i in range(17))])
    for model in (random_decoder(len(vocab), 3, "gru"), random_ensemble(len(vocab), 3)):
        features = torch.randn(6, 16)
        options = DecodeConfig(beam_size=beam_size, max_length=9, no_repeat_ngram_size=2)
        captions = decode_features(model, vocab, features, options, n_best=1, word_probs=True)
        for row, (caption,) in enumerate(captions):
            assert len(caption.word_probs) == len(caption.text.split()) and all(0 < p <= 1 for p in caption.word_probs)
            tokens = vocab.encode(caption.text.split()) + ([search.EOS_ID] if caption.finished else [])
            forced = search.word_log_probs(model, features[row:row + 1], [tokens])[0]
            assert sum(forced) == pytest.approx(caption.score, abs=1e-4)  # length penalty 0: the score is the log-prob
            assert [math.log(p) for p in caption.word_probs] == pytest.approx(forced[:len(caption.word_probs)], abs=1e-5)


def test_the_ensemble_beam_is_batched_like_the_single_cells():
    ensemble = random_ensemble(25, 1)
    features = torch.randn(6, 16)
    batched = beam_search(ensemble, features, beam_size=3, max_length=9, no_repeat_ngram_size=2, n_best=2)
    greedy = greedy_search(ensemble, features, max_length=9, no_repeat_ngram_size=2)
    for i in range(6):
        single = beam_search(ensemble, features[i:i + 1], beam_size=3, max_length=9, no_repeat_ngram_size=2, n_best=2)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert [h.score for h in single] == pytest.approx([h.score for h in batched[i]], abs=1e-4)
        one = beam_search(ensemble, features[i:i + 1], beam_size=1, max_length=9, no_repeat_ngram_size=2)[0][0]
        assert one.tokens == greedy[i].tokens


def test_the_ensemble_on_onnx_runtime_steps_writes_the_same_captions(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from captioner.onnx_runtime import DecoderSession

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    ensemble = random_ensemble(25, 2)
    on_onnx = Ensemble({cell: DecoderSession(m) for cell, m in ensemble.members.items()}, ensemble.weights)
    features = torch.randn(7, 16)
    for found, expected in zip(beam_search(on_onnx, features, beam_size=3, max_length=9),
                               beam_search(ensemble, features, beam_size=3, max_length=9)):
        assert found[0].tokens == expected[0].tokens
        assert found[0].score == pytest.approx(expected[0].score, abs=1e-4)
    assert all(m._session is not None for m in on_onnx.members.values())


def test_decode_cells_reads_one_cell_or_weighted_cells_and_refuses_anything_else(tmp_path):
    assert cell_weights("gru") == {"gru": 1.0}
    assert cell_weights("gru:3,lstm:1") == {"gru": 0.75, "lstm": 0.25}
    assert cell_weights("rnn,lstm,gru") == pytest.approx({"rnn": 1 / 3, "lstm": 1 / 3, "gru": 1 / 3})
    for bad in ("transformer", "gru:0", "gru:-1", "gru,gru", "gru:x"):
        with pytest.raises(ConfigError, match="decode.cells must be"):
            load_config(None, [f"decode.cells={bad}"])


@pytest.fixture(scope="module")
def three_cells(trained, tmp_path_factory):
    """The shared tiny LSTM run, a GRU and an RNN trained on the same data, and one file holding all three."""
    config_path, lstm_run = trained
    work = tmp_path_factory.mktemp("cells")
    for cell in ("gru", "rnn"):
        assert main(["train", "--config", str(config_path), "--set", f"decoder.cell={cell}", "--set", "train.epochs=4",
                     "--set", f"train.out_dir={work / cell}", "--no-progress"]) == 0
    model = work / "three.pt"
    assert main(["export", str(lstm_run / "best.pt"), str(model), "--add-cell", str(work / "gru" / "best.pt"),
                 "--add-cell", str(work / "rnn" / "best.pt")]) == 0
    return model, work


def test_one_file_holds_three_cells_and_each_writes_its_own_captions(three_cells, tiny_flickr8k):
    model, work = three_cells
    payload = torch.load(model, weights_only=True)
    assert sorted(payload["cells"]) == ["gru", "rnn"] and payload["config"]["decoder"]["cell"] == "lstm"
    captioner = Captioner.from_checkpoint(model)
    assert captioner.cells == ["lstm", "gru", "rnn"]
    photos = sorted((tiny_flickr8k / "images").glob("*.jpg"))[:12]
    written = {}
    for cell in ("lstm", "gru", "rnn"):
        written[cell] = [c.text for c in captioner.caption(photos, cells=cell)]
        alone = Captioner.from_checkpoint(work / "gru" / "best.pt") if cell == "gru" else None
        if alone:  # a cell in the shipped file writes what its own checkpoint writes (fp16 weights aside)
            same = [c.text for c in alone.caption(photos)]
            assert sum(a == b for a, b in zip(same, written[cell])) >= len(photos) - 1
    assert written["lstm"] == [c.text for c in captioner.caption(photos)]  # the default: the file's own cell
    assert len({tuple(texts) for texts in written.values()}) == 3  # the cells differ, and so do their captions
    together = captioner.caption(photos, cells="lstm:0.5,gru:0.3,rnn:0.2")
    assert all(c.text and math.isfinite(c.score) for c in together)


def test_caption_and_evaluate_take_a_cell_and_name_what_the_model_lacks(three_cells, tiny_flickr8k, capsys, tmp_path):
    model, work = three_cells
    photo = str(sorted((tiny_flickr8k / "images").glob("*.jpg"))[0])
    outputs = {}
    for cell in ("rnn", "lstm", "gru", "gru,lstm"):
        assert main(["caption", photo, "--checkpoint", str(model), "--cell", cell]) == 0
        outputs[cell] = capsys.readouterr().out
    assert all(out.strip() for out in outputs.values())
    assert main(["evaluate", "--checkpoint", str(model), "--split", "test", "--cell", "rnn",
                 "--out", str(tmp_path / "rnn.jsonl")]) == 0
    assert "BLEU" in capsys.readouterr().out
    assert main(["caption", photo, "--checkpoint", str(work / "gru" / "best.pt"), "--cell", "rnn"]) == 1
    assert "decode.cells asks for rnn, but this model has gru decoders only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="asks for lstm"):
        Captioner.from_checkpoint(work / "rnn" / "best.pt").caption(photo, cells="lstm")


def test_the_ensemble_can_be_the_shipped_default_and_export_checks_its_cells(three_cells, tmp_path, capsys):
    model, work = three_cells
    default = tmp_path / "ensemble.pt"
    assert main(["export", str(model), str(default), "--set", "decode.cells=lstm:0.6,gru:0.4"]) == 0
    captioner = Captioner.from_checkpoint(default)
    assert captioner.config.decode.cells == "lstm:0.6,gru:0.4" and captioner.cells == ["lstm", "gru", "rnn"]
    assert main(["export", str(work / "gru" / "best.pt"), str(tmp_path / "bad.pt"), "--set", "decode.cells=rnn"]) == 1
    assert "asks for rnn" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()
    assert main(["export", str(model), str(tmp_path / "twice.pt"), "--add-cell", str(work / "gru" / "best.pt")]) == 1
    assert "already has a gru decoder" in capsys.readouterr().err


def test_the_app_compares_the_cells_side_by_side_on_a_users_photo(three_cells, tiny_flickr8k):
    from captioner.webapp import COMPARE, TABLE_HEADERS, caption_uploads, cell_choices, default_cell, gallery_text

    model, _ = three_cells
    captioner = Captioner.from_checkpoint(model)
    assert cell_choices(captioner) == ["lstm", "gru", "rnn", COMPARE] and default_cell(captioner) == "lstm"
    photos = [str(p) for p in sorted((tiny_flickr8k / "images").glob("*.jpg"))[:3]]
    gallery, table = caption_uploads(captioner, photos, "beam", 2, 10, 0.0, 2, 2, COMPARE)
    assert len(gallery) == 3
    for (_, text), photo in zip(gallery, photos):
        lines = text.splitlines()
        assert [line.split(" ")[0] for line in lines] == ["lstm", "gru", "rnn"]
        for line, cell in zip(lines, ("lstm", "gru", "rnn")):  # each cell's own best caption, score, word by word
            alone = captioner.caption(photo, cells=cell, beam_size=2, max_length=10, no_repeat_ngram_size=2)
            assert line.startswith(f"{cell} ({alone.score:.2f}): ")
            if alone.from_tags:
                assert line.endswith(gallery_text(alone))
            else:
                assert [w for w in line.split(": ", 1)[1].split() if not w.startswith(("(", "["))] == alone.text.split()
    rows = [dict(zip(TABLE_HEADERS, row)) for row in table]
    assert [(r["cell"], r["rank"]) for r in rows[:6]] == [("lstm", 1), ("lstm", 2), ("gru", 1), ("gru", 2),
                                                         ("rnn", 1), ("rnn", 2)]
    _, table = caption_uploads(captioner, photos[:1], "beam", 2, 10, 0.0, 2, 1, "rnn")
    assert [row[TABLE_HEADERS.index("cell")] for row in table] == ["rnn"]


def test_tune_cells_picks_cells_weights_and_beam_on_dev_and_scores_test_for_the_pick_only(three_cells, tmp_path):
    assert tune_cells.candidates(["gru", "lstm"], 0.25) == ["gru", "lstm", "gru:0.25,lstm:0.75", "gru:0.5,lstm:0.5",
                                                           "gru:0.75,lstm:0.25"]
    model, _ = three_cells
    tune = ["--checkpoint", str(model), "--step", "0.5", "--beam-sizes", "1", "2", "--top", "2", "--out", str(tmp_path)]
    tune_cells.main(tune + ["--min-gain", "0", "--name", "tuned"])
    result = json.loads((tmp_path / "tuned.json").read_text())
    dev = result["dev"]
    assert len(dev) == 3 + 3 + 2  # each cell alone and each pair at 0.5/0.5 at beam 2; the best two at beam 1 too
    best = max(dev, key=lambda r: (r["bleu4"], r["cider_d"]))
    assert result["pick"] == best
    assert [result["test"][k]["cells"] for k in result["test"]] == [best["cells"], "lstm", "lstm", "gru", "rnn"]
    assert "Dev, best first" in (tmp_path / "tuned.md").read_text()

    # A gain smaller than --min-gain keeps the best cell alone at the model's beam (one step per word, not several).
    tune_cells.main(tune + ["--min-gain", "1", "--name", "strict"])
    strict = json.loads((tmp_path / "strict.json").read_text())
    alone = max((r for r in strict["dev"] if "," not in r["cells"] and r["beam_size"] == 2),
                key=lambda r: (r["bleu4"], r["cider_d"]))
    assert strict["pick"] == alone
    assert list(strict["test"])[:2] == ["dev pick", "dev best"] or best == alone


def test_the_seed_partner_bench_mixes_a_second_run_of_the_models_cell_into_it(three_cells, trained, tiny_flickr8k,
                                                                               tmp_path):
    """w = 1 is the model as it ships, w = 0 the partner alone (its own checkpoint's captions), between: a mixture."""
    model, work = three_cells
    _, lstm_run = trained
    partner = lstm_run / "last.pt"  # another LSTM of the same data: the run's last epoch, not its best
    seed_partner.main(["--checkpoint", str(model), "--partner", str(partner), "--weights", "1", "0.5", "0",
                       "--out", str(tmp_path), "--name", "p"])
    rows = {r["model_weight"]: r for r in json.loads((tmp_path / "p.json").read_text())["dev"]}
    dev = {name: tune_cells.featured_splits(Captioner.from_checkpoint(path), ("dev",))["dev"]
           for name, path in (("model", model), ("partner", partner))}
    beam = Captioner.from_checkpoint(model).config.decode.beam_size
    as_shipped = tune_cells.scored(Captioner.from_checkpoint(model), dev["model"], "lstm", beam)
    alone = tune_cells.scored(Captioner.from_checkpoint(partner), dev["partner"], "lstm", beam)
    assert as_shipped["bleu4"] != alone["bleu4"]  # two different decoders, so the rows below tell them apart
    assert {k: rows[1][k] for k in tune_cells.METRICS} == {k: as_shipped[k] for k in tune_cells.METRICS}
    assert {k: rows[0][k] for k in tune_cells.METRICS} == {k: alone[k] for k in tune_cells.METRICS}
    assert "| 0.5 |" in (tmp_path / "p.md").read_text()
    # Two partners share 1 - w: the same checkpoint twice is that checkpoint.
    seed_partner.main(["--checkpoint", str(model), "--partner", str(partner), str(partner), "--weights", "0",
                       "--out", str(tmp_path), "--name", "twice"])
    twice = json.loads((tmp_path / "twice.json").read_text())["dev"][0]
    assert {k: twice[k] for k in tune_cells.METRICS} == {k: alone[k] for k in tune_cells.METRICS}
    folder = tmp_path / "photos-unlike-these"
    (folder / "images").mkdir(parents=True)
    for photo in sorted((tiny_flickr8k / "images").glob("*.jpg"))[:6]:
        shutil.copy(photo, folder / "images" / photo.name)
        with (folder / "refs.jsonl").open("a") as refs:
            refs.write(json.dumps({"image": photo.name, "refs": ["a red ball on the grass"]}) + "\n")
    seed_partner.main(["--checkpoint", str(model), "--partner", str(partner), "--weights", "0.5", "--cells",
                       "lstm:0.5,gru:0.5", "--folders", str(folder), "--out", str(tmp_path), "--name", "with-gru"])
    row = json.loads((tmp_path / "with-gru.json").read_text())["dev"][0]
    assert row["cells"] == "lstm:0.5,gru:0.5"  # the mixed LSTM writes with the GRU
    assert set(row["photos-unlike-these"]) == {"cider_d", "person_dog_hallucination"}
    with pytest.raises(CheckpointError, match=r"a gru decoder .* the model's cell \(lstm\)"):
        seed_partner.main(["--checkpoint", str(model), "--partner", str(work / "gru" / "best.pt"), "--out", str(tmp_path)])


def test_the_distill_bench_writes_teacher_captions_for_train_only_and_a_run_trains_on_them(three_cells, trained,
                                                                                          tiny_flickr8k, tmp_path):
    """Train photos get the teacher's n best (+ references), dev and test keep their references, the image paths
    are the dataset's own (one feature cache), and a run starting from the model trains on the file."""
    model, _ = three_cells
    config_path, lstm_run = trained
    teacher = tmp_path / "teacher.csv"
    distill.main(["--checkpoint", str(model), "--partner", str(lstm_run / "last.pt"), "--weight", "1", "--n-best", "2",
                  "--references", "1", "--out", str(teacher)])
    captioner = Captioner.from_checkpoint(model)
    original, taught = load_dataset(captioner.config.data), load_csv(teacher, tiny_flickr8k / "images")
    for split in ("dev", "test"):
        assert sorted((str(r.path), r.captions) for r in taught.split(split)) == \
            sorted((str(r.path), r.captions) for r in original.split(split))
    features, records = tune_cells.featured_splits(captioner, ("train",))["train"]
    best = decode_features(captioner.writer.searched, captioner.vocab, features, captioner.config.decode, 2)
    written = {str(r.path): r.captions for r in taught.split("train")}  # w = 1: the teacher is the model itself
    assert written == {str(r.path): [c.text for c in b] + r.captions[:1] for r, b in zip(records, best)}
    assert main(["train", "--config", str(config_path), "--set", "data.format=csv", "--set",
                 f"data.annotations={teacher}", "--set", f"data.root={tiny_flickr8k / 'images'}", "--set",
                 f"train.init_from={model}", "--set", "train.epochs=1", "--set", f"train.out_dir={tmp_path / 'run'}",
                 "--no-progress"]) == 0


def test_the_int8_steps_bench_scores_and_times_each_setting_with_fp32_and_int8_steps(three_cells, trained,
                                                                                  tiny_flickr8k, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, _ = three_cells
    _, lstm_run = trained
    int8_steps.main(["--checkpoint", str(model), "--folder", str(tiny_flickr8k / "images"), "--cells", "lstm",
                     "lstm:0.5,gru:0.5", "--partner", str(lstm_run / "last.pt"), "--calls", "2", "--out", str(tmp_path),
                     "--name", "i"])
    rows = json.loads((tmp_path / "i.json").read_text())["rows"]
    assert list(rows) == ["lstm fp32", "lstm int8", "lstm:0.5,gru:0.5 fp32", "lstm:0.5,gru:0.5 int8",
                          "lstm:0.4 + partner:0.6 fp32", "lstm:0.4 + partner:0.6 int8"]
    assert all(r["median_ms"] > 0 and 0 <= r["changed_captions"] for r in rows.values())
    assert all(rows[name]["changed_captions"] == 0 for name in rows if name.endswith("fp32"))  # the reference itself
    # The int8 steps write nearly the same captions (near-ties may flip), through int8 graphs.
    fp32 = Captioner.from_checkpoint(model, runtime="onnx")
    int8 = int8_steps.with_int8_steps(fp32)
    photos = sorted((tiny_flickr8k / "images").glob("*.jpg"))[:8]
    same = sum(a.text == b.text for a, b in zip(fp32.caption(photos), int8.caption(photos)))
    assert same >= 6
    graph = onnx.load(int8.writer.stepped["lstm"].int8_graph)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in graph.graph.node}


def test_onnx_export_writes_the_chosen_cell_and_refuses_an_ensemble(three_cells, tmp_path):
    pytest.importorskip("onnxruntime")
    from captioner.export_onnx import export_onnx

    model, _ = three_cells
    manifest = export_onnx(model, tmp_path / "rnn", ["decode.cells=rnn"], int8=False)
    assert manifest["decoder"]["cell"] == "rnn" and manifest["decode"]["cells"] == ""
    with pytest.raises(ConfigError, match="choose one with --set decode.cells=CELL"):
        export_onnx(model, tmp_path / "both", ["decode.cells=rnn,gru"], int8=False)


def test_the_memory_bench_measures_every_cell_a_model_file_holds(three_cells, tmp_path):
    model, _ = three_cells
    assert cell_memory.main(["--model", str(model), "--length", "7", "--out", str(tmp_path),
                                           "--name", "m"]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert [r["cell"] for r in result["cells"]] == ["lstm", "gru", "rnn"]
    assert all(r["gradient_relative_by_steps_back"][0] == 1.0 for r in result["cells"])
    assert (tmp_path / "m.png").stat().st_size > 0


def test_the_latency_bench_times_each_cell_and_mix_in_turn(three_cells, tiny_flickr8k, tmp_path):
    model, _ = three_cells
    cell_latency.main(["--checkpoint", str(model), "--folder", str(tiny_flickr8k / "images"),
                                     "--calls", "3", "--cells", "rnn", "gru:0.5,lstm:0.5", "--out", str(tmp_path),
                                     "--name", "t"])
    result = json.loads((tmp_path / "t.json").read_text())
    assert list(result["latency"]) == ["rnn", "gru:0.5,lstm:0.5"] and result["calls"] == 3
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in result["latency"].values())
