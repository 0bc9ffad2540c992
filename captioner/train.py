"""Training, top to bottom: open the run (or resume it) -> data (cached features, vocabulary, captions)
-> decoder, optimizer and learning-rate schedule -> epochs, each scored on dev -> checkpoints.

The same loop trains both decoders: the photo decoder on a caption dataset's photos (their cached
features), and the tag decoder (`data.format: captions`, configs/tag-decoder.yaml) on captions alone,
each with a tag vector drawn from its own words (tag_data.py). What differs is the TrainingData: the
decoder's inputs for a batch of captions, and how dev is scored (train.select_by picks best.pt).

train.objective picks the loss: cross-entropy on the reference captions (xe), or self-critical
fine-tuning of a trained model (scst, captioner/scst.py) starting from train.init_from.

The run folder gets config.yaml, metrics.jsonl, curves.png, last.pt (everything --resume
needs: optimizer, schedule, random states) and best.pt (best dev BLEU-4). Files are written
atomically (files.py). A resumed run keeps its own config: only the settings in RESUMABLE may
differ from it, any other difference is refused rather than silently ignored.

Under torchrun the same loop runs DistributedDataParallel: each rank encodes a shard of the
images, takes its share of every global batch (train.batch_size is the global batch), and
decodes a shard of dev; only rank 0 writes files. One process without torchrun is the same
code with world size 1.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .confidence import DomainProfile
from .config import Config, upgraded
from .data import ImageRecord, load_dataset
from .decoder import build_decoder
from .distributed import Ranks, all_gather, setup, shard, teardown
from .evaluate import encoder_info, evaluate_features, prepare_features, readable
from .files import plot_curves, read_metrics, write_metrics, write_text_atomic
from .onnx_runtime import encoder_from_config
from .routing import mentions_person
from .scst import SelfCriticalLoss
from .tag_data import TagCaptions, TagDev
from .text import Vocabulary, tokenize

# What --resume takes from the command line; every other setting must be the run's own.
RESUMABLE = ("train.epochs", "train.patience", "train.device", "train.threads", "train.cache_dir")


class TrainingError(RuntimeError):
    pass


def train(config: Config, resume: bool = False, progress: bool = True) -> Path:
    ranks, device = setup(config.train.device)
    try:
        return _train(config, resume, progress, ranks, device)
    finally:
        teardown()


def _train(config: Config, resume: bool, progress: bool, ranks: Ranks, device: torch.device) -> Path:
    log = (lambda message: print(message, file=sys.stderr)) if ranks.is_main else (lambda message: None)
    config, state = open_run(config, resume, ranks, log)
    data = load_training_data(config, state, device, progress, ranks, log)
    # Seeded here, after the features: extracting them (a cold cache) draws from torch's generator (DataLoader
    # seeds), reading them (a warm cache) does not, and the decoder's initial weights must not depend on which.
    torch.manual_seed(config.train.seed + ranks.rank)  # dropout draws differ per rank; data order does not
    learner = build_learner(config, data, device)
    standing = restore_training(state, learner, config, ranks, device, log) if state else Standing()
    if ranks.distributed:
        learner.model = nn.parallel.DistributedDataParallel(learner.decoder,
                                                            device_ids=[device] if device.type == "cuda" else None)

    dev_decode = replace(config.decode, beam_size=config.train.dev_beam_size)
    select_by = config.train.select_by
    for epoch in range(standing.epoch + 1, config.train.epochs + 1):
        if config.train.patience and standing.bad_epochs >= config.train.patience:
            break
        started = time.perf_counter()
        train_loss, reward = train_epoch(learner, data, config, epoch, ranks, device, progress)
        train_seconds = time.perf_counter() - started
        dev = data.score_dev(learner.decoder, dev_decode, device, ranks)  # {} when there is no dev set
        record = {"epoch": epoch, "train_loss": train_loss, "lr": learner.scheduler.get_last_lr()[0],
                  **({"train_reward": round(reward, 5)} if learner.self_critical else {}),
                  "train_seconds": round(train_seconds, 1), "dev_decode": f"beam {dev_decode.beam_size}",
                  **{f"dev_{k}": round(v, 5) if v is not None else None for k, v in dev.items()}}
        improved = standing.add(record, dev.get(select_by))
        log(f"epoch {epoch}: loss {train_loss:.3f}"
            + (f", sampled {learner.self_critical.name} {record['train_reward']:.3f}" if learner.self_critical else "")
            + (f", dev BLEU-4 {dev['bleu4']:.4f} (BLEU-1 {dev['bleu1']:.4f}, CIDEr-D {dev['cider_d']:.4f})"
               if dev else "") + f"{' *best*' if improved else ''}, {train_seconds:.0f}s")
        save_epoch(config, data, learner, standing, improved, ranks, device)
    best_path = Path(config.train.out_dir) / "best.pt"
    log(f"best dev {select_by} {standing.best_score:.4f}: {best_path}" if standing.best_score is not None
        else f"no dev set: the last epoch is {best_path}")
    return best_path


# --- the run: new, or resumed from last.pt ---------------------------------------------------------

def open_run(config: Config, resume: bool, ranks: Ranks, log) -> tuple[Config, dict | None]:
    """The run's config and, with --resume, the checkpoint it continues from; writes config.yaml."""
    out_dir = Path(config.train.out_dir)
    last_path = out_dir / "last.pt"
    state = None
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"--resume: no {last_path} to resume from")
        state = read_checkpoint(last_path)
        if "training" not in state:
            raise CheckpointError(f"{last_path}: has no training state to resume from")
        config = resumed_config(config, Config.from_dict(upgraded(state["config"]), source=str(last_path)), last_path)
        if state["training"].get("world_size", 1) != ranks.world_size:
            log(f"note: {last_path} was trained with {state['training'].get('world_size', 1)} processes, resuming "
                f"with {ranks.world_size}: same global batch, but dropout draws differ")
    elif last_path.exists():
        raise TrainingError(f"{out_dir} already holds a run; pass --resume to continue it, "
                            f"or choose another train.out_dir")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config, state


def resumed_config(given: Config, saved: Config, last_path: Path) -> Config:
    """The run's own config with the RESUMABLE settings (and the folder it is in) taken from `given`.

    Any other setting of `given`, from --set or the config file, that differs from the run's is an
    error: the weights, vocabulary and optimizer state were made under the run's config."""
    run, here = _flat(saved.to_dict()), _flat(given.to_dict())
    differ = [key for key in here if key not in (*RESUMABLE, "train.out_dir") and here[key] != run.get(key)]
    if differ:
        changes = "; ".join(f"{key}: the run's {run.get(key)!r}, here {here[key]!r}" for key in differ)
        raise TrainingError(f"--resume: this config differs from the run's ({last_path}) in {changes}. A resumed run "
                            f"keeps its config; only {', '.join(RESUMABLE)} can change. Resume with the run's own "
                            f"config (--config {last_path.parent / 'config.yaml'}), or train into another "
                            f"train.out_dir")
    taken = {key.split(".", 1)[1]: here[key] for key in (*RESUMABLE, "train.out_dir")}
    return replace(saved, train=replace(saved.train, **taken))


def _flat(values: dict) -> dict:
    return {f"{section}.{key}": value for section, settings in values.items() for key, value in settings.items()}


def run_is_finished(out_dir: str | Path, config: Config) -> bool:
    """Whether the run in out_dir has ended under config's epochs and patience, by the epoch loop's own
    rule (a tie with the best dev score is no improvement): training it again would train nothing."""
    if not (Path(out_dir) / "best.pt").is_file():
        return False
    scores = [row[f"dev_{config.train.select_by}"] for row in read_metrics(out_dir)]
    if not scores or len(scores) >= config.train.epochs:
        return bool(scores)
    since_best = len(scores) - 1 - scores.index(max(scores))
    return bool(config.train.patience) and since_best >= config.train.patience


# --- data: features of the readable images, vocabulary, captions as token ids -----------------------

@dataclass
class TrainingData:
    provenance: dict  # what the model learnt from, for its checkpoints
    encoder_info: dict
    vocab: Vocabulary
    tokens: torch.Tensor  # every training caption, <bos> words <eos>, padded: [captions, longest]
    lengths: torch.Tensor  # each caption's length in tokens, <bos> and <eos> included
    inputs: Callable[[torch.Tensor, int], torch.Tensor]  # (caption rows, epoch) -> the decoder's inputs for them
    score_dev: Callable[..., dict]  # (decoder, decode, device, ranks) -> dev scores ({}: no dev set)
    domain: dict | None  # how familiar photos are to this model (confidence.py), stored in its checkpoints
    initial_weights: dict | None  # the decoder weights of train.init_from
    train_records: list[ImageRecord] = field(default_factory=list)  # photos: self-critical training's references
    train_features: torch.Tensor | None = None  # photos: each image's features, in train_records' order


def load_training_data(config: Config, state: dict | None, device, progress: bool, ranks: Ranks,
                       log) -> TrainingData:
    if config.data.format == "captions":
        return load_tag_training_data(config, state, progress, log)
    dataset = load_dataset(config.data)
    for note in dataset.notes:
        log(f"note: {note}")
    table, encoder_info = prepare_features(config, dataset, device, progress, ranks=ranks)
    train_records, dev_records = readable(dataset.split("train"), table), readable(dataset.split("dev"), table)
    vocab, initial = starting_vocabulary(config, state, encoder_info, log,
                                         lambda: (tokenize(c) for r in train_records for c in r.captions))
    train_features = table.lookup([r.path for r in train_records])
    dev_features = table.lookup([r.path for r in dev_records])
    domain = domain_profile(train_features, dev_features, config, train_records).to_dict()
    tokens, caption_images = caption_tensor(train_records, vocab, config.data.max_caption_length)
    log(f"{len(train_records)} train images, {len(tokens)} captions, {len(dev_records)} dev images, "
        f"vocabulary {len(vocab)} words, device {device}"
        + (f", {ranks.world_size} processes" if ranks.distributed else ""))

    def score_dev(decoder, decode, device, ranks):
        return evaluate_features(decoder, vocab, dev_features, dev_records, decode, device, ranks=ranks)[0]

    provenance = {"dataset": dataset.name, "data_root": config.data.root, "train_split": "train",
                  "train_images": len(train_records)}
    return TrainingData(provenance, encoder_info, vocab, tokens, (tokens != vocab.pad).sum(1),
                        lambda rows, epoch: train_features[caption_images[rows]], score_dev, domain, initial,
                        train_records, train_features)


def load_tag_training_data(config: Config, state: dict | None, progress: bool, log) -> TrainingData:
    """Captions alone, each with a tag vector drawn from its own words every epoch (tag_data.py)."""
    captions = TagCaptions(config, log)
    encoder = encoder_from_config(config.encoder)
    info = encoder_info(encoder, config)
    vocab, initial = starting_vocabulary(config, state, info, log, lambda: captions.captions)
    tokens = captions.tokens(vocab, config.data.max_caption_length)
    dev = TagDev(config.data.dev_folder, encoder, config.train.cache_dir, progress) if config.data.dev_folder else None
    log(f"{len(tokens)} captions, vocabulary {len(vocab)} words, {captions.size} concept words")

    def score_dev(decoder, decode, device, ranks):
        return dev.score(decoder, vocab, decode) if dev else {}

    provenance = {"captions": config.data.annotations, "caption_count": len(tokens),
                  "without_people": config.data.without_people}
    return TrainingData(provenance, info, vocab, tokens, (tokens != vocab.pad).sum(1), captions, score_dev, None,
                        initial)


def starting_vocabulary(config: Config, state: dict | None, info: dict, log,
                        training_captions: Callable) -> tuple[Vocabulary, dict | None]:
    """The vocabulary (and initial weights) a run starts from: a resumed run's own, train.init_from's, or one
    built from the training captions."""
    if state is not None:
        return Vocabulary(state["vocab"]), None
    if config.train.init_from:
        log(f"starting from {config.train.init_from}")
        return initial_weights(config, info)
    return Vocabulary.build(training_captions(), config.data.min_word_count), None


def caption_tensor(records: list[ImageRecord], vocab: Vocabulary, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All captions as one padded tensor (<bos> words <eos>, at most max_words words) and each one's image row."""
    rows, images = [], []
    for image_index, record in enumerate(records):
        for caption in record.captions:
            ids = vocab.encode(tokenize(caption))[:max_words]
            if ids:
                rows.append(torch.tensor([vocab.bos, *ids, vocab.eos]))
                images.append(image_index)
    if not rows:
        return torch.zeros(0, 2, dtype=torch.long), torch.tensor(images)
    return pad_sequence(rows, batch_first=True, padding_value=vocab.pad), torch.tensor(images)


def initial_weights(config: Config, encoder_info: dict) -> tuple[Vocabulary, dict]:
    """Vocabulary and decoder weights of train.init_from, checked to fit this run's encoder and decoder."""
    path = config.train.init_from
    saved, vocab, source_decoder, source = load_checkpoint(path)
    if replace(saved.decoder, dropout=0.0) != replace(config.decoder, dropout=0.0):
        raise CheckpointError(f"train.init_from {path}: its decoder {asdict(saved.decoder)} does not fit this "
                              f"config's decoder {asdict(config.decoder)} (only dropout may differ)")
    if (source["encoder"].get("fingerprint"), saved.encoder.image_size) != (encoder_info["fingerprint"],
                                                                              config.encoder.image_size):
        raise CheckpointError(f"train.init_from {path}: it was trained on features of {source['encoder'].get('name')} "
                              f"at {saved.encoder.image_size} px (weights {source['encoder'].get('fingerprint')}), "
                              f"this config's encoder is {encoder_info['name']} at {config.encoder.image_size} px "
                              f"(weights {encoder_info['fingerprint']})")
    return vocab, source_decoder.state_dict()


def person_share(records: list[ImageRecord]) -> torch.Tensor:
    """Each photo's share of references that name a person: what the person probe learns from."""
    return torch.tensor([sum(mentions_person(tokenize(c)) for c in r.captions) / max(len(r.captions), 1)
                         for r in records])


def domain_profile(train_features: torch.Tensor, dev_features: torch.Tensor, config: Config,
                   train_records: list[ImageRecord]) -> DomainProfile:
    """How familiar photos are to a model trained on these features (pooled; for attention, the grid's mean),
    with a person probe learnt from the training photos' references (`train_records`, in the features' order)."""
    if config.decoder.attention:
        train_features, dev_features = train_features.float().mean(1), dev_features.float().mean(1)
    return DomainProfile.fit(train_features, dev_features, person_share=person_share(train_records))


def fit_domain_profile(config: Config, device, progress: bool = True) -> DomainProfile:
    """The familiarity profile of a model trained by `config`, from its data's train and dev photos."""
    dataset = load_dataset(config.data)
    table, _ = prepare_features(config, dataset, device, progress)
    train_records, dev_records = readable(dataset.split("train"), table), readable(dataset.split("dev"), table)
    return domain_profile(table.lookup([r.path for r in train_records]), table.lookup([r.path for r in dev_records]),
                          config, train_records)


# --- the model: decoder, loss, optimizer, schedule --------------------------------------------------

@dataclass
class Learner:
    decoder: nn.Module  # the weights that are saved
    model: nn.Module  # the decoder, or under torchrun the DistributedDataParallel wrapping it
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    loss_fn: nn.Module
    self_critical: SelfCriticalLoss | None
    batch_units: int  # what train.batch_size counts: captions (xe) or images, each sampled several times (scst)
    steps_per_epoch: int


def build_learner(config: Config, data: TrainingData, device) -> Learner:
    decoder = build_decoder(len(data.vocab), data.encoder_info["feature_dim"], config.decoder).to(device)
    if data.initial_weights is not None:
        decoder.load_state_dict(data.initial_weights)
    self_critical = None
    if config.train.objective == "scst":
        self_critical = SelfCriticalLoss([[tokenize(c) for c in r.captions] for r in data.train_records], data.vocab,
                                         config.train.samples_per_image, config.decode.max_length,
                                         config.decode.min_length, config.train.reward_bleu_weight,
                                         config.train.unseen_trigram_penalty)
    batch_units = len(data.train_records) if self_critical else len(data.tokens)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    steps_per_epoch = math.ceil(batch_units / config.train.batch_size)
    scheduler = learning_rate_schedule(optimizer, config, steps_per_epoch * config.train.epochs)
    # Summed here and divided by the global batch's token count in train_epoch, so that the gradient
    # DDP averages over ranks equals the single-process gradient of the same global batch.
    loss_fn = nn.CrossEntropyLoss(ignore_index=data.vocab.pad, label_smoothing=config.train.label_smoothing,
                                  reduction="sum")
    return Learner(decoder, decoder, optimizer, scheduler, loss_fn, self_critical, batch_units, steps_per_epoch)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: Config, total_steps: int) -> LRScheduler:
    """train.warmup_steps of linear warmup to train.lr, then (train.lr_schedule) cosine decay to 5% of it
    at total_steps, or constant."""
    warmup = config.train.warmup_steps
    if config.train.lr_schedule == "constant":  # LinearLR holds its end value once warmed up
        return LinearLR(optimizer, start_factor=1 / warmup if warmup > 0 else 1.0, total_iters=max(warmup - 1, 0))
    if warmup <= 0:
        return CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=0.05 * config.train.lr)
    warm = LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=0.05 * config.train.lr)
    return SequentialLR(optimizer, [warm, cosine], milestones=[warmup])


# --- resuming: weights, optimizer, schedule, random states, the log so far ---------------------------

@dataclass
class Standing:
    """The epochs so far: their metrics rows, the best dev score (train.select_by) and how many epochs since it
    improved."""
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    bad_epochs: int = 0

    @property
    def epoch(self) -> int:
        return len(self.history)

    def add(self, record: dict, dev_score: float | None) -> bool:
        """Log an epoch; whether its dev score (unrounded) improved on the best (a tie does not). Without a
        dev set (None) every epoch is the best so far."""
        self.history.append(record)
        improved = dev_score is None or self.best_score is None or dev_score > self.best_score
        self.best_score, self.bad_epochs = (dev_score, 0) if improved else (self.best_score, self.bad_epochs + 1)
        return improved


def restore_training(state: dict, learner: Learner, config: Config, ranks: Ranks, device, log) -> Standing:
    training = state["training"]
    learner.decoder.load_state_dict(state["decoder"])
    learner.optimizer.load_state_dict(training["optimizer"])
    saved_epochs = state["config"]["train"]["epochs"]
    if saved_epochs == config.train.epochs and set(training["scheduler"]) == set(learner.scheduler.state_dict()):
        learner.scheduler.load_state_dict(training["scheduler"])
    else:  # train.epochs changed, or a schedule of an older version: the schedule is a function of the step
        if saved_epochs != config.train.epochs:
            log(f"note: train.epochs {saved_epochs} -> {config.train.epochs}: the learning-rate schedule now spans "
                f"{config.train.epochs} epochs")
        fast_forward(learner.scheduler, int(training["epoch"]) * learner.steps_per_epoch)
    restore_random_states(training, ranks, device)
    best = training.get("best_score", training.get("best_bleu4"))  # best_bleu4: runs saved before select_by
    standing = Standing(list(training["history"]), best, int(training["bad_epochs"]))
    log(f"resuming {Path(config.train.out_dir)} after epoch {standing.epoch}"
        + (f" (best dev {config.train.select_by} {best:.4f})" if best is not None else ""))
    return standing


def random_states(ranks: Ranks, device) -> dict:
    """Every rank's random state (dropout and sampling draw from it): the CPU's, and its GPU's when it trains
    on one. Every rank must call this."""
    states = {"rng_per_rank": all_gather(torch.get_rng_state(), ranks)}
    if device.type == "cuda":
        states["cuda_rng_per_rank"] = all_gather(torch.cuda.get_rng_state(device), ranks)
    return states


def restore_random_states(training: dict, ranks: Ranks, device) -> None:
    def this_ranks(states: list):
        return states[ranks.rank] if ranks.rank < len(states) else states[0]

    torch.set_rng_state(this_ranks(training.get("rng_per_rank") or [training["rng"]]))
    if training.get("cuda_rng_per_rank") and device.type == "cuda":
        torch.cuda.set_rng_state(this_ranks(training["cuda_rng_per_rank"]), device)


def fast_forward(scheduler: LRScheduler, steps: int) -> None:
    """Step a new schedule to `steps`: its learning rate is then what a run begun with it would have there."""
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the restored optimizer holds the old schedule's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": nothing is trained here
        for _ in range(steps):
            scheduler.step()


# --- an epoch --------------------------------------------------------------------------------------

def train_epoch(learner: Learner, data: TrainingData, config: Config, epoch: int, ranks: Ranks, device,
                progress: bool) -> tuple[float, float]:
    """One pass in this epoch's order; the mean loss (per token, or per sampled caption for scst) and the
    mean reward of the sampled captions (scst; else 0)."""
    decoder, model, self_critical = learner.decoder, learner.model, learner.self_critical
    model.train()
    if self_critical:  # it samples and scores with the same network: no dropout
        for module in decoder.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
    batch_size = config.train.batch_size
    epoch_order = torch.Generator().manual_seed(config.train.seed * 1000 + epoch)  # the same on every rank
    order = torch.randperm(learner.batch_units, generator=epoch_order)
    loss_sum, count, reward_sum = torch.zeros((), dtype=torch.float64), 0, 0.0
    bar = tqdm(range(learner.steps_per_epoch), desc=f"epoch {epoch}/{config.train.epochs}",
               disable=not (progress and ranks.is_main), file=sys.stderr)
    for step in bar:
        global_batch = order[step * batch_size:(step + 1) * batch_size]
        batch, weight = shard(global_batch, ranks), 1.0
        if len(batch) == 0:  # a last global batch smaller than the world: still join the all-reduce
            batch, weight = global_batch[:1], 0.0
        if self_critical is None:  # the loss is per token
            global_count = int(data.lengths[global_batch].sum()) - len(global_batch)  # all but <bos> are predicted
            captions = data.tokens[batch, : int(data.lengths[batch].max())].to(device)
            logits = model(data.inputs(batch, epoch).to(device), captions[:, :-1])
            summed = weight * learner.loss_fn(logits.reshape(-1, logits.size(-1)), captions[:, 1:].reshape(-1))
        else:  # the loss is per sampled caption (its words' log-probabilities summed)
            global_count = len(global_batch) * config.train.samples_per_image
            summed, reward = self_critical(model, decoder, data.train_features[batch].to(device), batch)
            summed, reward_sum = weight * summed, reward_sum + weight * reward * len(batch)
        loss = summed * ranks.world_size / global_count
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip:
            nn.utils.clip_grad_norm_(decoder.parameters(), config.train.grad_clip)
        learner.optimizer.step()
        learner.scheduler.step()
        loss_sum += summed.detach().double().cpu()
        count += global_count
        if step % 20 == 0 and ranks.is_main:
            bar.set_postfix(loss=f"{float(loss_sum) * ranks.world_size / count:.3f}",
                            lr=f"{learner.scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    train_loss = sum(all_gather(float(loss_sum), ranks)) / max(count, 1)
    return train_loss, sum(all_gather(reward_sum, ranks)) / learner.batch_units if self_critical else 0.0


def save_epoch(config: Config, data: TrainingData, learner: Learner, standing: Standing, improved: bool,
               ranks: Ranks, device) -> None:
    """last.pt (with all --resume needs), best.pt when dev improved, metrics.jsonl and curves.png."""
    rng = random_states(ranks, device)  # every rank takes part; rank 0 writes
    if not ranks.is_main:
        return
    out_dir, record = Path(config.train.out_dir), standing.history[-1]
    provenance = {**data.provenance, "epoch": record["epoch"], "dev": record, "processes": ranks.world_size,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": str(torch.__version__)}
    training = {"epoch": record["epoch"], "optimizer": learner.optimizer.state_dict(),
                "scheduler": learner.scheduler.state_dict(), "rng": rng["rng_per_rank"][0], **rng,
                "world_size": ranks.world_size, "history": standing.history, "best_score": standing.best_score,
                "bad_epochs": standing.bad_epochs}
    weights = (config, data.vocab, learner.decoder, data.encoder_info, provenance)
    if improved:
        save_checkpoint(out_dir / "best.pt", *weights, domain=data.domain)
    save_checkpoint(out_dir / "last.pt", *weights, training=training, domain=data.domain)
    write_metrics(out_dir, standing.history)
    plot_curves({"": standing.history}, out_dir / "curves.png",
                learner.self_critical.name if learner.self_critical else "reward")
