"""The Python API: load a checkpoint once, caption images or precomputed features.

    from captioner import Captioner
    captioner = Captioner.from_checkpoint("runs/flickr8k/best.pt")
    captioner.caption(["photo.jpg"], beam_size=3)[0].text
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_domain, load_fallback
from .concepts import Tag, default_concept_words
from .confidence import DomainProfile
from .config import Config, ConfigError, DecodeConfig
from .decoder import CaptionDecoder
from .encoder import Encoder, encoder_from_config
from .fallback import OnceOnlyWords, TagDecoder, WordBorrowing
from .features import iter_image_batches
from .metrics import mentions_dog, mentions_person
from .search import beam_search, greedy_search
from .text import Vocabulary
from .transform import ImageSource

DEFAULT_CHECKPOINT = Path(__file__).parent / "models" / "default.pt"
EXAMPLES_DIR = Path(__file__).parent / "examples"

# Batch sizes per stage (bench/speed.py measures them). On a CPU, EfficientNet-Lite0 with channels-last is
# fastest a few images per call (on 2 cores, 1.5-2x faster at 2-4 images than at 16-32), while the
# decoder and beam search keep gaining from big batches (beam 3: about 15 images/s one at a time, 150 at 16,
# 300 at 128). So the CNN runs in chunks and their features gather into one big search batch.
CPU_ENCODER_BATCH = 4
DECODE_BATCH = 128
GPU_DECODE_WORKERS = 8


@dataclass
class Caption:
    text: str
    score: float  # log-probability / (words + 1)**length_penalty
    finished: bool  # False when cut at max_length
    tags: list[Tag] = field(default_factory=list)  # what the encoder's ImageNet head sees, as caption words
    confidence: float | None = None  # how familiar the photo is to the model, in [0, 1] (None: not known)
    unsure: bool = False  # confidence < decode.unsure_below: the photo is unlike the model's training photos
    from_tags: bool = False  # written by the fallback decoder from the tags (fallback.py), not from the photo


def example_photos() -> list[Path]:
    """The example photos that ship with the package (the app's examples and warm-up, the GPU test)."""
    return sorted(EXAMPLES_DIR.glob("*.jpg"))


def resolve_device(device: str) -> torch.device:
    """auto (the GPU when torch sees one), cpu, cuda or cuda:N; a ConfigError that names the problem otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested, but torch {torch.__version__} sees no CUDA GPU here: "
                              f"use cpu (or auto)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r} requested, but this machine has {count} CUDA GPU(s): "
                              f"cuda:0 to cuda:{count - 1}")
    return resolved


def decode_features(decoder, vocab: Vocabulary, features: torch.Tensor, options: DecodeConfig,
                    n_best: int = 1) -> list[list[Caption]]:
    """Features [B, D] -> the n best captions per image, batched."""
    common = dict(max_length=options.max_length, min_length=options.min_length,
                  no_repeat_ngram_size=options.no_repeat_ngram_size, length_penalty=options.length_penalty)
    if options.beam_size == 1 and n_best == 1:
        results = [[h] for h in greedy_search(decoder, features, **common)]
    else:
        results = beam_search(decoder, features, beam_size=max(options.beam_size, n_best), n_best=n_best, **common)
    return [[Caption(" ".join(vocab.decode(h.tokens)), h.score, h.finished) for h in hyps] for hyps in results]


class Captioner:
    def __init__(self, config: Config, vocab: Vocabulary, decoder: CaptionDecoder, encoder: Encoder,
                 device: str = "cpu", domain: DomainProfile | None = None,
                 fallback: tuple[Vocabulary, TagDecoder] | None = None):
        self.device = resolve_device(device)
        self.config, self.vocab = config, vocab
        self.decoder = decoder.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.concept_words = default_concept_words()
        self.domain = domain
        self.fallback = (fallback[0], fallback[1].to(self.device).eval()) if fallback else None
        # The search steps the decoders in the encoder's runtime: on ONNX Runtime, a CPU's steps are faster.
        self.searched = self.on_step_runtime(self.decoder)
        # Captions from a few tags repeat their nouns ("a sink and a sink"): each content word once.
        self.searched_fallback = OnceOnlyWords(self.on_step_runtime(self.fallback[1]), fallback[0]) if fallback else None
        self.borrowing = WordBorrowing(self.concept_words, fallback[0], encoder.class_weights()) if fallback else None

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "cpu",
                        encoder_weights: str | None = None, runtime: str | None = None,
                        precision: str | None = None) -> "Captioner":
        """Load a checkpoint (the shipped default model when path is None) and the encoder it was trained on.

        `runtime` (auto | torch | onnx) and `precision` (fp32 | int8) choose how the CNN runs on a CPU
        (default: the checkpoint's encoder config, auto and fp32 unless set)."""
        if path is None:
            path = DEFAULT_CHECKPOINT
            if not path.is_file():
                raise CheckpointError(f"no checkpoint given and no default model at {path}; "
                                      f"train one (captioner train) and pass --checkpoint")
        config, vocab, decoder, payload = load_checkpoint(path)
        if encoder_weights:
            config.encoder.weights = encoder_weights
        config.encoder.runtime = runtime or config.encoder.runtime
        config.encoder.precision = precision or config.encoder.precision
        encoder = encoder_from_config(config.encoder)
        info = payload["encoder"]
        if encoder.feature_dim != decoder.feature_dim:
            raise CheckpointError(f"{path}: decoder expects {decoder.feature_dim}-d features but encoder "
                                  f"{encoder.name} gives {encoder.feature_dim}")
        if info.get("fingerprint") and info["fingerprint"] != encoder.fingerprint():
            print(f"warning: {path} was trained on {info.get('name')} weights with fingerprint {info['fingerprint']}, "
                  f"but the loaded encoder's is {encoder.fingerprint()}: captions may be poor", file=sys.stderr)
        return cls(config, vocab, decoder, encoder, device, load_domain(payload, path), load_fallback(payload, path))

    def on_step_runtime(self, decoder):
        if self.encoder.runtime_on(self.device) != "onnx":
            return decoder
        from .onnx_runtime import DecoderSession

        return DecoderSession(decoder)

    def decode_options(self, **overrides) -> DecodeConfig:
        options = replace(self.config.decode, **{k: v for k, v in overrides.items() if v is not None})
        probe = Config(decode=options)
        probe.validate("decoding options")
        return options

    @torch.inference_mode()
    def describe(self, features: torch.Tensor, decode: DecodeConfig, n_best: int = 1) -> list[list[Caption]]:
        """Features of a batch -> the n best captions per image, each with the image's tags and confidence.

        A caption is unsure when the photo is unfamiliar (confidence < decode.unsure_below), when it names a
        dog the encoder does not see (dog tag < decode.unseen_dog_below), or when it names a person the
        person probe does not see (< decode.unseen_person_below). With a fallback decoder, unsure photos'
        captions are written from their tags instead, except unfamiliar photos the probe is sure show
        people (> decode.people_sure_above): the Flickr8k decoder knows people, the fallback never names them,
        and photos without a single tag, which give the fallback nothing to write from.
        """
        pooled = features.float().mean(1) if self.decoder.uses_grid else features
        class_probs = self.encoder.classify(pooled)
        tags = self.concept_words.tags(class_probs)
        confidence = self.domain.familiarity(pooled).tolist() if self.domain else [None] * len(features)
        person = self.domain.person.probability(pooled).tolist() if self.domain and self.domain.person else None
        unfamiliar = [c is not None and c < decode.unsure_below for c in confidence]
        shows_people = [p > decode.people_sure_above for p in person] if person else [False] * len(features)
        # The fallback writes from the tags alone: with none ("nothing the model knows") it would invent its
        # favourite subject ("a large white dog..."), so such a photo keeps the caption written from it.
        writable = [bool(self.fallback) and bool(t) for t in tags]
        to_fallback = [w and u and not p for w, u, p in zip(writable, unfamiliar, shows_people)]
        results: list[list[Caption]] = [[] for _ in range(len(features))]
        from_photo = [i for i, moved in enumerate(to_fallback) if not moved]
        if from_photo:
            rows = torch.tensor(from_photo, device=features.device)
            for i, captions in zip(from_photo, decode_features(self.searched, self.vocab, features[rows], decode, n_best)):
                results[i] = captions
        dog = self.concept_words.word_probabilities(class_probs)[:, self.concept_words.words.index("dog")].tolist()
        unseen = [False] * len(features)
        for i in from_photo:  # Flickr8k's prior writes dogs and people into photos of anything: check them
            words = results[i][0].text.split()
            unseen[i] = (mentions_dog(words) and dog[i] < decode.unseen_dog_below) \
                or (person is not None and mentions_person(words) and person[i] < decode.unseen_person_below)
        unsure = [u or s for u, s in zip(unfamiliar, unseen)]
        from_tags = [i for i in range(len(features)) if to_fallback[i] or (unseen[i] and writable[i])]
        if from_tags:
            vocab, decoder = self.fallback
            tag_vectors, renames = self.borrowing.lend(decoder.tag_vectors([tags[i] for i in from_tags]))
            captions = decode_features(self.searched_fallback, vocab, tag_vectors.to(features.device), decode, n_best)
            for i, image_captions, image_renames in zip(from_tags, captions, renames):
                results[i] = [replace(c, text=self.borrowing.rename(c.text, image_renames), from_tags=True)
                              for c in image_captions]
        for captions, image_tags, image_confidence, image_unsure in zip(results, tags, confidence, unsure):
            for caption in captions:
                caption.tags, caption.confidence, caption.unsure = image_tags, image_confidence, image_unsure
        return results

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of transformed images -> the features the decoder reads (pooled, or grid cells for attention)."""
        return self.encoder.encode(images.to(self.device), grid=self.decoder.uses_grid)

    def encoder_batch_size(self, batch_size: int) -> int:
        """Images per CNN call for a batch of `batch_size`: a few on a CPU (CPU_ENCODER_BATCH), all on a GPU."""
        return max(1, min(batch_size, CPU_ENCODER_BATCH) if self.device.type == "cpu" else batch_size)

    def default_workers(self) -> int:
        """Processes decoding image files. On a GPU, where the CNN and the search take milliseconds a batch and
        decoding sets the pace, one per spare core up to GPU_DECODE_WORKERS (bench/gpu_folder.py, an H200 with
        16 cores: 198 images/s with 1, 951 with 8, 1,048 with 15). On a CPU whose cores torch's threads already
        fill, none (there a decoding process only takes turns with the CNN, and costs more than it hides:
        bench/speed.py); one where the CNN leaves CPU time over."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if self.device.type != "cpu":
            return max(1, min(GPU_DECODE_WORKERS, cpus - 1))
        return 0 if torch.get_num_threads() >= cpus else 1

    @torch.inference_mode()
    def caption(self, images: Sequence[ImageSource] | ImageSource, n_best: int = 1, **options):
        """Caption paths, bytes or PIL images. One image -> Caption; a list -> list of Caption.

        With n_best > 1 each Caption becomes a list of the n best. A bad image raises ImageLoadError.
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

    def use_device_in_thread(self) -> None:
        """Make this model's GPU current in a new thread (else cuBLAS warns that the thread has no CUDA context)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index if self.device.index is not None else torch.cuda.current_device())

    @torch.inference_mode()
    def caption_files(self, paths: Sequence[str | Path], batch_size: int = DECODE_BATCH,
                      num_workers: int | None = None, n_best: int = 1,
                      **options) -> Iterator[tuple[int, list[Caption] | None, str | None]]:
        """(index, captions, None) or (index, None, error) per path, as each batch of `batch_size` is done.

        `num_workers` processes (None: default_workers) decode the files while the CNN encodes them a few
        at a time (encoder_batch_size); the features gather until `batch_size` images are encoded, then the
        search decodes them as one batch, in a thread, while the CNN goes on with the next batch (the search's
        bookkeeping and the image decoding each leave a core idle that the other can use; with the decoding
        thread of iter_image_batches, 7-14% more images/s on 2 cores in bench/speed.py). A batch's captions
        come once the next batch is encoded, or at the end. Captions are the same as one image at a time
        (search is exact per image); an unreadable file's error comes as soon as it is found.
        """
        decode = self.decode_options(**options)
        chunk = self.encoder_batch_size(batch_size)
        num_workers = self.default_workers() if num_workers is None else num_workers
        waiting: list[int] = []
        pooled: list[torch.Tensor] = []
        searcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-search",
                                      initializer=self.use_device_in_thread)
        searching: list[Future] = []  # the previous batch's search, at most one

        def search(indices: list[int], features: torch.Tensor) -> list[tuple[int, list[Caption], None]]:
            return [(index, c, None) for index, c in zip(indices, self.describe(features, decode, n_best))]

        def finish_search():
            while searching:
                yield from searching.pop().result()

        def flush():
            if waiting:
                batch = (list(waiting), torch.cat(pooled))
                waiting.clear()
                pooled.clear()
                yield from finish_search()
                searching.append(searcher.submit(search, *batch))

        try:
            for indices, images, errors in iter_image_batches([str(p) for p in paths], self.encoder.transform, chunk,
                                                              num_workers):
                for index, reason in errors:
                    yield index, None, reason
                if images is not None:
                    pooled.append(self.encode(images))
                    waiting += indices
                if len(waiting) >= batch_size:
                    yield from flush()
            yield from flush()
            yield from finish_search()
        finally:
            searcher.shutdown(wait=True, cancel_futures=True)
