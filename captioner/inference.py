"""The Python API: load a model once, caption photos.

    from captioner import Captioner
    captioner = Captioner.from_checkpoint("runs/flickr8k/best.pt")   # None: the shipped model
    captioner.caption(["photo.jpg"], beam_size=3)[0].text
    captioner.caption("photo.jpg", cells="lstm").text    # another cell the model holds (captioner.cells)

A Captioner is the encoder (photos -> features) and a CaptionWriter (features -> captions,
describe.py). `from_checkpoint` is the one way to build one: the CLI, the app, evaluation, Ray and
the benches all load models through it. Folders go through folders.caption_files.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_cells, load_checkpoint, load_domain, load_fallback
from .concepts import default_concept_words
from .config import Config, ConfigError, DecodeConfig, picked_cells, with_settings
from .describe import Caption, CaptionWriter, TagWriter, unchanged
from .devices import resolve_device
from .encoder import Encoder
from .onnx_runtime import DecoderSession, encoder_from_config
from .transform import ImageSource

__all__ = ["Caption", "Captioner", "DEFAULT_CHECKPOINT", "EXAMPLES_DIR", "example_photos"]

DEFAULT_CHECKPOINT = Path(__file__).parent / "models" / "default.pt"
EXAMPLES_DIR = Path(__file__).parent / "examples"

# Batch sizes per stage (bench/speed.py measures them). On a CPU, EfficientNet-Lite0 with channels-last is
# fastest a few images per call (on 2 cores, 1.5-2x faster at 2-4 images than at 16-32), while the
# decoder and beam search keep gaining from big batches (beam 3: about 15 images/s one at a time, 150 at 16,
# 300 at 128). So the CNN runs in chunks and their features gather into one big search batch.
CPU_ENCODER_BATCH = 4
DECODE_BATCH = 128


def example_photos() -> list[Path]:
    """The example photos that ship with the package (the app's examples and warm-up, the GPU test)."""
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


class Captioner:
    """Photos -> captions: the encoder makes features, the writer (describe.CaptionWriter) captions them."""

    def __init__(self, config: Config, encoder: Encoder, writer: CaptionWriter, device: torch.device):
        self.config, self.encoder, self.writer, self.device = config, encoder, writer, device

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "cpu", settings: Sequence[str] = (),
                        runtime: str | None = None, precision: str | None = None) -> "Captioner":
        """Load a checkpoint (the shipped default model when path is None) and the encoder it was trained on.

        `settings` ("routing.unsure_below=0.1", "decode.beam_size=5", ...) change its stored config for this
        run, as `--set` does on the command line; `runtime` (auto | torch | onnx) and `precision` (fp32 | int8)
        are the encoder.runtime and encoder.precision settings (how the CNN runs on a CPU).
        An encoder that is not the one the decoder was trained on is an error."""
        path = Path(path) if path else DEFAULT_CHECKPOINT
        if not path.is_file() and path == DEFAULT_CHECKPOINT:
            raise CheckpointError(f"no checkpoint given and no default model at {path}; "
                                  f"train one (captioner train) and pass --checkpoint")
        config, vocab, decoder, payload = load_checkpoint(path)
        runtime_settings = [f"encoder.{key}={value}" for key, value in (("runtime", runtime), ("precision", precision))
                            if value]
        config = with_settings(config, [*settings, *runtime_settings], str(path))
        device = resolve_device(device)
        encoder = encoder_from_config(config.encoder)
        check_encoder_fits(path, payload["encoder"], encoder)
        decoders = {cell: d.to(device).eval() for cell, d in load_cells(payload, path, config, decoder).items()}
        picked_cells(config.decode.cells, config.decoder.cell, decoders)  # say a missing cell now, not at the first photo
        encoder = encoder.to(device).eval()
        # The search steps the decoders in the encoder's runtime: on ONNX Runtime, a CPU's steps are faster.
        stepper = DecoderSession if encoder.runtime_on(device) == "onnx" else unchanged
        concept_words = default_concept_words()
        fallback = load_fallback(payload, path)
        tag_writer = TagWriter(fallback[0], fallback[1].to(device).eval(), encoder.class_weights(), concept_words,
                               stepper) if fallback else None
        writer = CaptionWriter(vocab, decoders, encoder.classify, concept_words, load_domain(payload, path),
                               tag_writer, stepper)
        return cls(config, encoder, writer, device)

    def with_settings(self, *settings: str) -> "Captioner":
        """The same model under other decode.* or routing.* settings ("routing.unsure_below=0")."""
        for setting in settings:
            if not setting.strip().startswith(("decode.", "routing.")):
                raise ConfigError(f"{setting}: only decode.* and routing.* settings change a loaded model "
                                  f"(load it again for the others)")
        changed = copy.copy(self)
        changed.config = with_settings(self.config, list(settings), "the model's config")
        picked_cells(changed.config.decode.cells, changed.config.decoder.cell, self.cells)
        return changed

    @property
    def cells(self) -> list[str]:
        """The photo decoders this model holds (decode.cells picks among them), its own first."""
        return list(self.writer.decoders)

    @property
    def vocab(self):
        return self.writer.vocab

    @property
    def decoder(self):
        return self.writer.decoder

    def decode_options(self, **overrides) -> DecodeConfig:
        """The model's decoding settings, with these (beam_size=5, ...) changed; None keeps a setting."""
        options = replace(self.config.decode, **{k: v for k, v in overrides.items() if v is not None})
        Config(decode=options).validate("decoding options")
        return options

    def describe(self, features: torch.Tensor, decode: DecodeConfig | None = None, n_best: int = 1,
                 word_probs: bool = False) -> list[list[Caption]]:
        """Features of a batch -> the n best captions per image, under the model's routing settings; with
        `word_probs`, the photo decoder's captions carry each word's probability (Caption.word_probs)."""
        return self.writer.describe(features, decode or self.config.decode, self.config.routing, n_best, word_probs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of transformed images -> the features the decoder reads (pooled, or grid cells for attention)."""
        return self.encoder.encode(images.to(self.device), grid=self.decoder.uses_grid)

    def encoder_batch_size(self, batch_size: int) -> int:
        """Images per CNN call for a batch of `batch_size`: a few on a CPU (CPU_ENCODER_BATCH), all on a GPU."""
        return max(1, min(batch_size, CPU_ENCODER_BATCH) if self.device.type == "cpu" else batch_size)

    @torch.inference_mode()
    def caption(self, images: Sequence[ImageSource] | ImageSource, n_best: int = 1, **options):
        """Caption paths, bytes or PIL images. One image -> Caption; a list -> list of Caption.

        With n_best > 1 each Caption becomes a list of the n best. A bad image raises ImageLoadError.
        `options` are decoding settings (beam_size=5, max_length=...).
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        decode = self.decode_options(**options)
        chunk = self.encoder_batch_size(DECODE_BATCH)
        pooled = []
        for start in range(0, len(batch), chunk):  # the CNN in small chunks, the search over everything at once
            tensors = torch.stack([self.encoder.transform.load(image) for image in batch[start:start + chunk]])
            pooled.append(self.encode(tensors))
        features, results = (torch.cat(pooled) if pooled else torch.zeros(0)), []
        for start in range(0, len(features), DECODE_BATCH):
            results += self.describe(features[start:start + DECODE_BATCH], decode, n_best)
        results = [r if n_best > 1 else r[0] for r in results]
        return results[0] if single else results


def check_encoder_fits(path: Path, trained_on: dict, encoder: Encoder) -> None:
    """The one rule for a checkpoint whose decoder was trained on another encoder's features: an error."""
    if int(trained_on["feature_dim"]) != encoder.feature_dim:
        raise CheckpointError(f"{path}: decoder expects {trained_on['feature_dim']}-d features but encoder "
                              f"{encoder.name} gives {encoder.feature_dim}")
    if trained_on.get("fingerprint") and trained_on["fingerprint"] != encoder.fingerprint():
        raise CheckpointError(f"{path}: trained on features of {trained_on.get('name')} (weights fingerprint "
                              f"{trained_on['fingerprint']}), but the encoder here is {encoder.name} "
                              f"({encoder.fingerprint()}): its captions would be garbage")
