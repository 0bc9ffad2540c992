"""Decoder steps on int8 weights: do the captions stay, and how much cheaper is a mix of several cells?

    python bench/int8_steps.py [--checkpoint captioner/models/default.pt] [--data-root DIR] --folder PHOTOS
                               [--cells gru gru:0.7,lstm:0.3] [--partner CKPT --partner-weight 0.4]
                               [--calls 50] [--out bench/results] [--name int8-steps]

Each decode.cells setting is captioned twice on ONNX Runtime: with the decoder's step graph as shipped
(fp32) and with that graph's matrix products quantized to int8 weights (onnxruntime's dynamic quantization:
no calibration, activations quantized per step). Per setting: Flickr8k dev scores as `captioner caption`
captions them (routing included), how many dev captions the int8 steps change, and one photo's caption
time (bench/cell_latency.py's turns). With --partner, a second run of the model's own cell mixes into it
(bench/seed_partner.py) as one more setting. Research code: the package steps in fp32.
Writes NAME.md and NAME.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from captioner.evaluate import describe_and_score
from captioner.files import write_results
from captioner.inference import DEFAULT_CHECKPOINT, Captioner
from captioner.onnx_runtime import DecoderSession, decoder_step_graph, inference_session

from cell_latency import latencies  # bench/, beside this script
from seed_partner import load_partner, with_partners, with_stepped
from tune_cells import featured_splits, load_on_data


class Int8StepSession(DecoderSession):
    """A DecoderSession whose step graph's MatMul and Gemm weights are int8 (quantized once, cached beside it)."""

    def step(self, tokens: torch.Tensor, state):
        if self._session is None:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            graph = decoder_step_graph(self.decoder, state if isinstance(state, tuple) else (state,))
            if not isinstance(graph, Path):  # an unwritable cache hands back bytes: quantize from a file
                graph, graph_bytes = Path(tempfile.mkdtemp()) / "step.onnx", graph
                graph.write_bytes(graph_bytes)
            int8 = graph.with_name("int8-steps-" + graph.name)  # a name the cache's clean-up of step graphs skips
            if not int8.is_file():
                quantize_dynamic(graph, int8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
            self.int8_graph, self._session = int8, inference_session(int8, self.threads)
        return super().step(tokens, state)


def with_int8_steps(captioner: Captioner) -> Captioner:
    """The same captioner, every cell stepping on its int8 graph."""
    return with_stepped(captioner, {cell: Int8StepSession(d) for cell, d in captioner.writer.decoders.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.relpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--data-root", help="where the checkpoint's dataset is, if not at its data.root")
    parser.add_argument("--folder", required=True, help="photos to time, one per call")
    parser.add_argument("--cells", nargs="+", default=["gru", "gru:0.7,lstm:0.3"])
    parser.add_argument("--partner", help="a second run of the model's own cell, mixed into it (one more setting)")
    parser.add_argument("--partner-weight", type=float, default=0.4, help="the model's weight beside the partner")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="int8-steps")
    args = parser.parse_args(argv)

    fp32 = load_on_data(args.checkpoint, args.data_root, runtime="onnx")
    int8 = with_int8_steps(fp32)
    runs = {}
    for cells in args.cells:
        runs[f"{cells} fp32"] = fp32.with_settings(f"decode.cells={cells}")
        runs[f"{cells} int8"] = int8.with_settings(f"decode.cells={cells}")
    if args.partner:
        partner = load_partner(fp32, args.partner)
        mix = f"{fp32.decoder.cell}:{args.partner_weight:g} + partner:{1 - args.partner_weight:g}"
        runs[f"{mix} fp32"] = with_partners(fp32, [partner], args.partner_weight)
        runs[f"{mix} int8"] = with_partners(int8, [Int8StepSession(partner.decoder)], args.partner_weight)

    features, records = featured_splits(fp32, ("dev",))["dev"]
    rows, texts = {}, {}
    for name, captioner in runs.items():
        scores, texts[name] = describe_and_score(captioner, features, records)
        fp32_texts = texts[name.replace(" int8", " fp32")]
        rows[name] = {**{k: round(scores[k], 4) for k in ("bleu1", "bleu4", "cider_d")},
                      "changed_captions": sum(a.text != b.text for a, b in zip(texts[name], fp32_texts))}
        print(name, json.dumps(rows[name]), flush=True)
    photos = sorted(Path(args.folder).glob("*.jpg"))[:args.calls + 5]
    for name, timing in latencies(runs, photos).items():
        rows[name].update(timing)
    write(args, rows, len(records), len(photos) - 5)


def write(args, rows: dict[str, dict], dev_images: int, calls: int) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    lines = [f"`python {' '.join(sys.argv)}`: Flickr8k dev ({dev_images} photos, routing included) and one photo per "
             f"call ({calls} calls per setting, taking turns). Machine: {machine}; load average "
             f"{os.getloadavg()[0]:.1f} at the end (the machine is shared).", "",
             "| setting | steps | BLEU-1 | BLEU-4 | CIDEr-D | dev captions changed | median ms | 90th percentile ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        setting, steps = name.rsplit(" ", 1)
        lines.append(f"| {setting} | {steps} | {r['bleu1']:.4f} | {r['bleu4']:.4f} | {r['cider_d']:.4f} | "
                     f"{r['changed_captions']} | {r['median_ms']} | {r['p90_ms']} |")
    write_results(args.out, args.name, {"checkpoint": args.checkpoint, "partner": args.partner, "machine": machine,
                                        "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
