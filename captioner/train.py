"""Training, top to bottom: data -> cached features -> vocabulary -> decoder -> epochs with dev BLEU.

train.objective picks the loss: cross-entropy on the reference captions (xe), or self-critical
fine-tuning of a trained model (scst, captioner/scst.py) starting from train.init_from.

The run folder gets config.yaml, metrics.jsonl, curves.png, last.pt (everything --resume
needs) and best.pt (best dev BLEU-4). Checkpoints are written atomically.

Under torchrun the same loop runs DistributedDataParallel: each rank encodes a shard of the
images, takes its share of every global batch (train.batch_size is the global batch), and
decodes a shard of dev; only rank 0 writes files. One process without torchrun is the same
code with world size 1.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .confidence import DomainProfile
from .config import Config
from .data import CaptionDataset, ImageRecord, load_dataset
from .decoder import build_decoder
from .distributed import SINGLE, Ranks, all_gather, setup, shard, teardown, unshard, unshard_features
from .encoder import Encoder, encoder_from_config
from .features import FeatureTable, cached_features
from .inference import decode_features
from .metrics import caption_scores
from .scst import SelfCriticalLoss
from .text import Vocabulary, tokenize


class TrainingError(RuntimeError):
    pass


def prepare_features(config: Config, dataset: CaptionDataset, device, progress: bool = True,
                     encoder: Encoder | None = None, ranks: Ranks = SINGLE) -> tuple[FeatureTable, dict]:
    """Encode every image of every split once (or read the cache); returns the table and encoder info.

    Under torchrun each rank encodes (and caches) its shard of the images, then all ranks
    exchange them, so a rerun with the same number of processes reads its shard from the cache.
    """
    encoder = encoder or encoder_from_config(config.encoder)
    paths = shard(sorted({str(r.path) for records in dataset.splits.values() for r in records}), ranks)
    table = cached_features(encoder, paths, config.train.cache_dir, config.encoder.batch_size,
                            config.encoder.num_workers, device, progress and ranks.is_main,
                            grid=config.decoder.attention)
    table = unshard_features(table, ranks) if ranks.distributed else table
    for reason in table.failed.values() if ranks.is_main else ():
        print(f"warning: left out (unreadable image): {reason}", file=sys.stderr)
    info = {"name": encoder.name, "weights": config.encoder.weights, "fingerprint": encoder.fingerprint(),
            "feature_dim": encoder.feature_dim}
    return table, info


def readable(records: list[ImageRecord], table: FeatureTable) -> list[ImageRecord]:
    return [r for r in records if str(r.path) not in table.failed]


def caption_tensor(records: list[ImageRecord], vocab: Vocabulary, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All captions as one padded [N, max_words + 2] tensor (<bos> words <eos>) and each one's image row."""
    rows, images = [], []
    for image_index, record in enumerate(records):
        for caption in record.captions:
            ids = vocab.encode(tokenize(caption))[:max_words]
            if ids:
                rows.append([vocab.bos, *ids, vocab.eos])
                images.append(image_index)
    tokens = torch.full((len(rows), max_words + 2), vocab.pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, torch.tensor(images)


@torch.inference_mode()
def evaluate_features(decoder, vocab: Vocabulary, features: torch.Tensor, records: list[ImageRecord], decode,
                      device, batch_size: int = 256, progress: bool = False,
                      ranks: Ranks = SINGLE) -> tuple[dict[str, float], list[str]]:
    """Decode every image once, batched, and score it (BLEU-1..4, CIDEr-D, ROUGE-L) against all its references.

    Under torchrun each rank decodes a shard and every rank scores the gathered captions.
    """
    decoder.eval()
    mine = shard(features, ranks)
    captions = []
    for start in tqdm(range(0, len(mine), batch_size), desc="decoding", disable=not progress, file=sys.stderr):
        batch = mine[start:start + batch_size].to(device)
        captions += [hyps[0].text for hyps in decode_features(decoder, vocab, batch, decode)]
    captions = unshard(captions, ranks)
    references = [[tokenize(c) for c in r.captions] for r in records]
    return caption_scores(references, [c.split() for c in captions]), captions


def domain_profile(train_features: torch.Tensor, dev_features: torch.Tensor, config: Config) -> DomainProfile:
    """How familiar photos are to a model trained on these features (pooled; for attention, the grid's mean)."""
    if config.decoder.attention:
        train_features, dev_features = train_features.float().mean(1), dev_features.float().mean(1)
    return DomainProfile.fit(train_features, dev_features)


def fit_domain_profile(config: Config, device, progress: bool = True) -> DomainProfile:
    """The familiarity profile of a model trained by `config`, from its data's train and dev photos."""
    dataset = load_dataset(config.data)
    table, _ = prepare_features(config, dataset, device, progress)
    train_records, dev_records = readable(dataset.split("train"), table), readable(dataset.split("dev"), table)
    return domain_profile(table.lookup([r.path for r in train_records]), table.lookup([r.path for r in dev_records]),
                          config)


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


def run_is_finished(out_dir: str | Path, config: Config) -> bool:
    """Whether the run in out_dir has ended under config's epochs and patience, by the epoch loop's own
    rule (a tie with the best dev BLEU-4 is no improvement): training it again would train nothing."""
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    if not (out_dir / "best.pt").is_file() or not metrics.is_file():
        return False
    scores = [json.loads(line)["dev_bleu4"] for line in metrics.read_text().splitlines() if line.strip()]
    if not scores or len(scores) >= config.train.epochs:
        return bool(scores)
    since_best = len(scores) - 1 - scores.index(max(scores))
    return bool(config.train.patience) and since_best >= config.train.patience


def lr_lambda(config: Config, total_steps: int):
    warmup = config.train.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.train.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def plot_curves(history: list[dict], path: Path, reward_name: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if "train_reward" in history[-1]:  # self-critical: the loss is a policy gradient; the reward says more
        left.plot(epochs, [h["train_reward"] for h in history], marker="o")
        left.set(title="reward of sampled captions", xlabel="epoch", ylabel=reward_name)
    else:
        left.plot(epochs, [h["train_loss"] for h in history], marker="o")
        left.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    right.plot(epochs, [h["dev_bleu4"] for h in history], marker="o", color="tab:green")
    right.set(title="dev BLEU-4", xlabel="epoch", ylabel="BLEU-4 (nltk corpus_bleu)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def train(config: Config, resume: bool = False, progress: bool = True) -> Path:
    ranks, device = setup(config.train.device)
    try:
        return _train(config, resume, progress, ranks, device)
    finally:
        teardown()


def _train(config: Config, resume: bool, progress: bool, ranks: Ranks, device: torch.device) -> Path:
    out_dir = Path(config.train.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    main = ranks.is_main
    log = (lambda message: print(message, file=sys.stderr)) if main else (lambda message: None)
    state = None
    if resume:
        if not last_path.is_file():
            raise TrainingError(f"--resume: no {last_path} to resume from")
        state = read_checkpoint(last_path)
        if "training" not in state:
            raise CheckpointError(f"{last_path}: has no training state to resume from")
        saved = Config.from_dict(state["config"], source=str(last_path))
        config = replace(saved, train=replace(saved.train, epochs=config.train.epochs, patience=config.train.patience,
                                              device=config.train.device, threads=config.train.threads))
        if state["training"].get("world_size", 1) != ranks.world_size:
            log(f"note: {last_path} was trained with {state['training'].get('world_size', 1)} processes, resuming "
                f"with {ranks.world_size}: same global batch, but dropout draws differ")
    elif last_path.exists():
        raise TrainingError(f"{out_dir} already holds a run; pass --resume to continue it, "
                            f"or choose another train.out_dir")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    random.seed(config.train.seed)
    torch.manual_seed(config.train.seed + ranks.rank)  # dropout draws differ per rank; data order does not
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    dataset = load_dataset(config.data)
    for note in dataset.notes:
        log(f"note: {note}")
    table, encoder_info = prepare_features(config, dataset, device, progress, ranks=ranks)
    train_records, dev_records = readable(dataset.split("train"), table), readable(dataset.split("dev"), table)
    initial = None
    if state is not None:
        vocab = Vocabulary(state["vocab"])
    elif config.train.init_from:
        vocab, initial = initial_weights(config, encoder_info)
        log(f"starting from {config.train.init_from}")
    else:
        vocab = Vocabulary.build((tokenize(c) for r in train_records for c in r.captions), config.data.min_word_count)
    train_features = table.lookup([r.path for r in train_records])
    dev_features = table.lookup([r.path for r in dev_records])
    domain = domain_profile(train_features, dev_features, config).to_dict()
    tokens, image_rows = caption_tensor(train_records, vocab, config.data.max_caption_length)
    log(f"{len(train_records)} train images, {len(tokens)} captions, {len(dev_records)} dev images, "
        f"vocabulary {len(vocab)} words, device {device}"
        + (f", {ranks.world_size} processes" if ranks.distributed else ""))

    decoder = build_decoder(len(vocab), encoder_info["feature_dim"], config.decoder).to(device)
    if initial is not None:
        decoder.load_state_dict(initial)
    self_critical = None
    if config.train.objective == "scst":
        self_critical = SelfCriticalLoss([[tokenize(c) for c in r.captions] for r in train_records], vocab,
                                         config.train.samples_per_image, config.decode.max_length,
                                         config.decode.min_length, config.train.reward_bleu_weight)
    # A batch is train.batch_size captions (xe) or images, each sampled samples_per_image times (scst).
    batch_units = len(train_records) if self_critical else len(tokens)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    steps_per_epoch = math.ceil(batch_units / config.train.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch * config.train.epochs))
    # Summed here and divided by the global batch's token count below, so that the gradient
    # DDP averages over ranks equals the single-process gradient of the same global batch.
    loss_fn = nn.CrossEntropyLoss(ignore_index=vocab.pad, label_smoothing=config.train.label_smoothing,
                                  reduction="sum")
    history: list[dict] = []
    best_bleu4, bad_epochs, start_epoch = -1.0, 0, 1
    if state is not None:
        training = state["training"]
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        rng_states = training.get("rng_per_rank") or [training["rng"]]
        torch.set_rng_state(rng_states[ranks.rank] if ranks.rank < len(rng_states) else rng_states[0])
        history, best_bleu4 = list(training["history"]), float(training["best_bleu4"])
        bad_epochs, start_epoch = int(training["bad_epochs"]), int(training["epoch"]) + 1
        log(f"resuming {out_dir} after epoch {start_epoch - 1} (best dev BLEU-4 {best_bleu4:.4f})")
    model = decoder
    if ranks.distributed:
        model = nn.parallel.DistributedDataParallel(decoder, device_ids=[device] if device.type == "cuda" else None)

    dev_decode = replace(config.decode, beam_size=config.train.dev_beam_size)
    for epoch in range(start_epoch, config.train.epochs + 1):
        if config.train.patience and bad_epochs >= config.train.patience:
            break
        started = time.perf_counter()
        model.train()
        if self_critical:  # it samples and scores with the same network: no dropout
            for module in decoder.modules():
                if isinstance(module, nn.Dropout):
                    module.eval()
        order = torch.randperm(batch_units, generator=torch.Generator().manual_seed(config.train.seed * 1000 + epoch))
        loss_sum, token_count, reward_sum = torch.zeros((), dtype=torch.float64), 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.train.epochs}", disable=not (progress and main),
                   file=sys.stderr)
        for step in bar:
            global_batch = order[step * config.train.batch_size:(step + 1) * config.train.batch_size]
            batch, weight = shard(global_batch, ranks), 1.0
            if len(batch) == 0:  # a last global batch smaller than the world: still join the all-reduce
                batch, weight = global_batch[:1], 0.0
            if self_critical is None:
                global_count = int((tokens[global_batch, 1:] != vocab.pad).sum())  # the loss is per token
                captions = tokens[batch]
                captions = captions[:, : int((captions != vocab.pad).sum(1).max())].to(device)
                features = train_features[image_rows[batch]].to(device)
                logits = model(features, captions[:, :-1])
                summed = weight * loss_fn(logits.reshape(-1, logits.size(-1)), captions[:, 1:].reshape(-1))
            else:  # the loss is per sampled caption (its words' log-probabilities summed)
                global_count = len(global_batch) * config.train.samples_per_image
                summed, reward = self_critical(model, decoder, train_features[batch].to(device), batch)
                summed, reward_sum = weight * summed, reward_sum + weight * reward * len(batch)
            loss = summed * ranks.world_size / global_count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.train.grad_clip:
                nn.utils.clip_grad_norm_(decoder.parameters(), config.train.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += summed.detach().double().cpu()
            token_count += global_count
            if step % 20 == 0 and main:
                bar.set_postfix(loss=f"{float(loss_sum) * ranks.world_size / token_count:.3f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        train_seconds = time.perf_counter() - started
        train_loss = sum(all_gather(float(loss_sum), ranks)) / max(token_count, 1)
        reward = {"train_reward": round(sum(all_gather(reward_sum, ranks)) / batch_units, 5)} if self_critical else {}

        dev, _ = evaluate_features(decoder, vocab, dev_features, dev_records, dev_decode, device, ranks=ranks)
        record = {"epoch": epoch, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                  **reward, "train_seconds": round(train_seconds, 1), "dev_decode": f"beam {dev_decode.beam_size}",
                  **{f"dev_{k}": round(v, 5) if v is not None else None for k, v in dev.items()}}
        history.append(record)
        improved = dev["bleu4"] > best_bleu4
        best_bleu4, bad_epochs = (dev["bleu4"], 0) if improved else (best_bleu4, bad_epochs + 1)
        log(f"epoch {epoch}: loss {record['train_loss']:.3f}"
            + (f", sampled {self_critical.name} {reward['train_reward']:.3f}" if reward else "") + f", dev BLEU-4 {dev['bleu4']:.4f} "
            f"(BLEU-1 {dev['bleu1']:.4f}){' *best*' if improved else ''}, {train_seconds:.0f}s")

        rng_per_rank = all_gather(torch.get_rng_state(), ranks)
        if main:
            provenance = {"dataset": dataset.name, "data_root": config.data.root, "train_split": "train",
                          "train_images": len(train_records), "epoch": epoch, "dev": record,
                          "processes": ranks.world_size,
                          "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "torch": str(torch.__version__)}
            training = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank, "world_size": ranks.world_size,
                        "history": history, "best_bleu4": best_bleu4, "bad_epochs": bad_epochs}
            if improved:
                save_checkpoint(best_path, config, vocab, decoder, encoder_info, provenance, domain=domain)
            save_checkpoint(last_path, config, vocab, decoder, encoder_info, provenance, training=training,
                            domain=domain)
            write_text_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            plot_curves(history, out_dir / "curves.png", self_critical.name if self_critical else "")
    log(f"best dev BLEU-4 {best_bleu4:.4f}: {best_path}")
    return best_path
