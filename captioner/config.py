"""The run configuration: nested dataclasses loaded from YAML, checked strictly.

Every value a run depends on lives here, so a checkpoint that stores `asdict(config)` can
rebuild its model, transform and data without any other file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override that is malformed, unknown or out of range."""


@dataclass
class DataConfig:
    format: str = "flickr8k"  # flickr8k | karpathy | csv | refs | captions (captions alone: a tag decoder's data)
    root: str = "data/flickr8k"  # dataset folder (flickr8k), or folder the image paths are relative to
    annotations: str = ""  # karpathy: dataset_*.json; csv: image,caption[,split] file; captions: a caption text file
    dev_folder: str = ""  # captions: a refs.jsonl folder of photos to pick epochs on, captioned from their tags
    without_people: bool = False  # captions: leave out captions naming a person (tags cannot tell one is there)
    min_word_count: int = 5  # words seen fewer times in train captions become <unk>
    max_caption_length: int = 30  # longer training captions are truncated (in words)


@dataclass
class EncoderConfig:
    name: str = "efficientnet_lite0"
    weights: str = "default"  # default | none | path to a state_dict file
    image_size: int = 224  # images are resized to image_size x image_size (aspect not kept, as the training photos)
    batch_size: int = 16
    num_workers: int = 1  # processes decoding images while the CNN runs
    runtime: str = "auto"  # auto: ONNX Runtime on a CPU when installed, torch on a GPU | torch | onnx (onnx_runtime.py);
    # captioning steps the decoders in the same runtime (training always uses torch)
    precision: str = "fp32"  # fp32 | int8: the CNN quantized by `captioner calibrate-int8` (ONNX Runtime, CPU)


@dataclass
class DecoderConfig:
    cell: str = "lstm"  # lstm | gru | rnn
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    attention: bool = False  # True: soft attention over the encoder's grid (Show, Attend and Tell)
    attention_dim: int = 256
    inputs: str = "features"  # features: CNN features (the photo decoder); tags: the photo's tags (the tag decoder)


@dataclass
class DecodeConfig:
    beam_size: int = 3
    max_length: int = 20
    min_length: int = 1
    length_penalty: float = 0.0  # hypothesis score = log-prob / (words + 1)**length_penalty
    no_repeat_ngram_size: int = 3  # 0 disables repeat blocking
    cells: str = ""  # the photo decoders that write: "" the checkpoint's own; one it holds (rnn | lstm | gru); or
    # several, "gru:0.5,lstm:0.3,rnn:0.2", whose next-word distributions mix with those weights (decoder.Ensemble)


@dataclass
class RoutingConfig:
    """Which decoder writes a photo's caption and when it is unsure (routing.py applies them)."""
    unsure_below: float = 0.05  # familiarity under which a photo is unfamiliar: unsure, written from its tags
    unseen_dog_below: float = 0.05  # a caption naming a dog the encoder's dog tag gives less than this is unsure
    unseen_person_below: float = 0.75  # ... or a person the person probe gives less than this (0: off)
    people_sure_above: float = 0.999  # an unfamiliar photo the probe gives more keeps the photo's caption (1: off)


@dataclass
class TrainConfig:
    out_dir: str = "runs/flickr8k"
    cache_dir: str = ".cache/features"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 200
    patience: int = 3  # stop after this many epochs without a better dev score (0: never)
    select_by: str = "bleu4"  # the dev score that picks best.pt: bleu4 | cider_d
    dev_beam_size: int = 1  # decoding used for model selection on dev
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads (0: torch's default)
    objective: str = "xe"  # xe: cross-entropy on the references | scst: self-critical, CIDEr-D reward (captioner/scst.py)
    init_from: str = ""  # a checkpoint whose decoder weights and vocabulary the run starts from (scst needs one)
    samples_per_image: int = 5  # scst: captions sampled per image; each is judged against the other samples' mean
    reward_bleu_weight: float = 0.0  # scst: reward = CIDEr-D + this x smoothed sentence BLEU-4 (metrics.SentenceBleu)
    unseen_trigram_penalty: float = 0.0  # scst: minus this for each word triple no training caption has ("in the ball")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        config = _build(cls, values or {}, source, prefix="")
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        checks = [
            (self.data.format in ("flickr8k", "karpathy", "csv", "refs", "captions"),
             "data.format must be flickr8k, karpathy, csv, refs or captions"),
            ((self.data.format == "captions") == (self.decoder.inputs == "tags"),
             "data.format captions (captions alone) and decoder.inputs tags go together"),
            (self.data.format == "captions" or not (self.data.dev_folder or self.data.without_people),
             "data.dev_folder and data.without_people are for data.format captions"),
            (self.data.min_word_count >= 1, "data.min_word_count must be >= 1"),
            (self.data.max_caption_length >= 1, "data.max_caption_length must be >= 1"),
            (self.encoder.weights != "", "encoder.weights must be 'default', 'none' or a file path"),
            (self.encoder.image_size >= 32, "encoder.image_size must be >= 32"),
            (self.encoder.batch_size >= 1, "encoder.batch_size must be >= 1"),
            (self.encoder.num_workers >= 0, "encoder.num_workers must be >= 0"),
            (self.encoder.runtime in ("auto", "torch", "onnx"), "encoder.runtime must be auto, torch or onnx"),
            (self.encoder.precision in ("fp32", "int8"), "encoder.precision must be fp32 or int8"),
            (self.decoder.cell in CELL_NAMES, "decoder.cell must be lstm, gru or rnn"),
            (self.decoder.embed_dim >= 1 and self.decoder.hidden_dim >= 1, "decoder sizes must be >= 1"),
            (self.decoder.num_layers >= 1, "decoder.num_layers must be >= 1"),
            (0.0 <= self.decoder.dropout < 1.0, "decoder.dropout must be in [0, 1)"),
            (not self.decoder.attention or self.decoder.num_layers == 1,
             "decoder.attention supports decoder.num_layers: 1 only"),
            (self.decoder.attention_dim >= 1, "decoder.attention_dim must be >= 1"),
            (self.decoder.inputs in ("features", "tags"), "decoder.inputs must be features or tags"),
            (not (self.decoder.inputs == "tags" and self.decoder.attention), "decoder.inputs: tags has no attention"),
            *((0.0 <= getattr(self.routing, name) <= 1.0, f"routing.{name} must be in [0, 1]")
              for name in ("unsure_below", "unseen_dog_below", "unseen_person_below", "people_sure_above")),
            (self.decode.beam_size >= 1, "decode.beam_size must be >= 1"),
            (self.decode.max_length >= 1, "decode.max_length must be >= 1"),
            (0 <= self.decode.min_length <= self.decode.max_length, "decode.min_length must be in [0, max_length]"),
            (self.decode.no_repeat_ngram_size >= 0, "decode.no_repeat_ngram_size must be >= 0"),
            (cell_weights(self.decode.cells) is not None,
             "decode.cells must be a cell (rnn, lstm or gru) or cells with weights, e.g. gru:0.6,lstm:0.4"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
            (0.0 <= self.train.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
            (self.train.lr_schedule in ("cosine", "constant"), "train.lr_schedule must be cosine or constant"),
            (self.train.patience >= 0, "train.patience must be >= 0"),
            (self.train.dev_beam_size >= 1, "train.dev_beam_size must be >= 1"),
            (self.train.objective in ("xe", "scst"), "train.objective must be xe or scst"),
            (self.train.objective == "xe" or self.decoder.inputs == "features",
             "train.objective scst needs photos: decoder.inputs features"),
            (self.train.select_by in ("bleu4", "cider_d"), "train.select_by must be bleu4 or cider_d"),
            (self.train.objective != "scst" or bool(self.train.init_from),
             "train.objective scst fine-tunes a trained model: set train.init_from to its checkpoint"),
            (self.train.reward_bleu_weight >= 0, "train.reward_bleu_weight must be >= 0"),
            (self.train.unseen_trigram_penalty >= 0, "train.unseen_trigram_penalty must be >= 0"),
            (self.train.samples_per_image >= 2, "train.samples_per_image must be >= 2 (the baseline is the other samples)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")


CELL_NAMES = ("lstm", "gru", "rnn")


def cell_weights(cells: str) -> dict[str, float] | None:
    """decode.cells as {cell: weight}, the weights summing to 1 ({} for ""); None when it is malformed.
    "gru" -> {gru: 1}; "gru,lstm" -> equal weights; "gru:3,lstm:1" -> {gru: 0.75, lstm: 0.25}."""
    weights = {}
    for part in filter(None, (p.strip() for p in cells.split(","))):
        name, _, weight = part.partition(":")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            return None
    if any(name not in CELL_NAMES or not 0 < w < math.inf for name, w in weights.items()):
        return None
    if len(weights) != len([p for p in cells.split(",") if p.strip()]):
        return None  # a cell named twice
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def picked_cells(cells: str, own: str, held) -> dict[str, float]:
    """The photo decoders decode.cells picks among those a model holds, with their weights ("": its own cell)."""
    weights = cell_weights(cells) or {own: 1.0}
    missing = sorted(set(weights) - set(held))
    if missing:
        raise ConfigError(f"decode.cells asks for {', '.join(missing)}, but this model has "
                          f"{', '.join(sorted(held))} decoders only")
    return weights


def upgraded(values: dict) -> dict:
    """A checkpoint's config values as this version reads them. Checkpoints written before the routing
    section kept its four settings under decode, and a tag decoder's data.format named no format of its own."""
    decode, decoder = values.get("decode"), values.get("decoder")
    if isinstance(decode, dict) and set(decode) & set(ROUTING_KEYS):
        routing = {**{k: decode[k] for k in ROUTING_KEYS if k in decode}, **(values.get("routing") or {})}
        values = {**values, "decode": {k: v for k, v in decode.items() if k not in ROUTING_KEYS}, "routing": routing}
    if isinstance(decoder, dict) and decoder.get("inputs") == "tags":
        values = {**values, "data": {**values.get("data", {}), "format": "captions"}}
    return values


ROUTING_KEYS = tuple(f.name for f in dataclasses.fields(RoutingConfig))
# What describes the trained model itself: a run's --set cannot change it (the weights would not fit).
MODEL_KEYS = ("decoder.", "encoder.name", "encoder.image_size")


def _build(cls, values: Any, source: str, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, source, key + ".")
        else:
            kwargs[name] = _coerce(value, kind, source, key)
    return cls(**kwargs)


def _coerce(value: Any, kind: type, source: str, key: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `section.key=value` overrides."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, encoder, decoder, decode, routing, train)")
    for override in overrides or []:
        apply_override(values, override)
    return Config.from_dict(values, source)


def with_settings(config: Config, settings: list[str], source: str) -> Config:
    """`config` with `section.key=value` settings applied, for one run of a trained model (caption, evaluate,
    the app, export): anything but what describes the model itself (MODEL_KEYS) may change."""
    if not settings:
        return config
    values = config.to_dict()
    for setting in settings:
        if setting.strip().startswith(MODEL_KEYS):
            raise ConfigError(f"--set {setting}: {setting.partition('=')[0].strip()} describes the trained model "
                              f"and cannot change (train another model instead)")
        apply_override(values, setting)
    return Config.from_dict(values, source=f"{source} with --set {' '.join(settings)}")


def apply_override(values: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. train.epochs=5")
    section, name = parts
    values.setdefault(section, {})
    if not isinstance(values[section], dict):
        raise ConfigError(f"--set {override!r}: '{section}' is not a section")
    try:
        values[section][name] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        values[section][name] = raw
