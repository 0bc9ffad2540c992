"""Plot the rounds of `bench/app_load.py --compare-empty --rounds R` runs: each round's ratio to the empty app, and
each round's two rates (above the target's line, a round meets it).

    python bench/plot_app_rounds.py bench/results/app_load-rounds-{1,2,3,4}.json --out bench/results/app_load-rounds.png
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET = 0.85  # issue 14: the app under 8 clients serves >= 0.85x an empty Gradio app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="app_load JSON files written with --compare-empty --rounds")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()

    figure, (by_round, rates) = plt.subplots(1, 2, figsize=(11, 5))
    ratios, empty_rates, start = [], [], 1
    for path in args.results:
        rounds = json.loads(Path(path).read_text())["per_round"]
        if not rounds or "ratio" not in rounds[0]:
            parser.error(f"{path}: not a run with --compare-empty --rounds")
        run = [r["ratio"] for r in rounds]
        ratios += run
        empty_rates += [r["empty"]["requests_per_s"] for r in rounds]
        label = Path(path).stem
        by_round.plot(range(start, start + len(run)), run, "o", label=label)
        rates.plot([r["empty"]["requests_per_s"] for r in rounds], [r["app"]["requests_per_s"] for r in rounds], "o",
                   label=label)
        start += len(run)
    median = statistics.median(ratios)
    by_round.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET}x")
    by_round.axhline(median, color="grey", linewidth=1, label=f"median {median:.2f}x")
    by_round.set_xlabel("round (the two apps alternating ABBA)")
    by_round.set_ylabel("app requests/s / empty app's")
    by_round.set_title(f"{len(ratios)} rounds under 8 clients")
    by_round.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    span = [min(empty_rates), max(empty_rates)]
    rates.plot(span, [TARGET * x for x in span], "k--", linewidth=1, label=f"app = {TARGET} x empty app")
    rates.set_xlabel("empty app, requests/s in the round")
    rates.set_ylabel("app, requests/s in the round")
    rates.set_title("each round's two rates (the machine's load moves both)")
    rates.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"{len(ratios)} rounds, median {median:.3f}, mean {statistics.mean(ratios):.3f}: {args.out}")


if __name__ == "__main__":
    main()
