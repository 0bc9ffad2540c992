"""Plot the rounds of `bench/app_load.py --compare-empty --rounds R` runs: each round's ratio to the empty app, and
each round's two rates (above the target's line, a round meets it). Runs of the int8 CNN (`--precision int8`) are
triangles, with a median of their own.

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
    ratios: dict[str, list[float]] = {}  # per precision of the app's CNN
    empty_rates, start = [], 1
    for path in args.results:
        result = json.loads(Path(path).read_text())
        rounds, precision = result["per_round"], result.get("precision", "fp32")
        if not rounds or "ratio" not in rounds[0]:
            parser.error(f"{path}: not a run with --compare-empty --rounds")
        run = [r["ratio"] for r in rounds]
        ratios.setdefault(precision, []).extend(run)
        empty_rates += [r["empty"]["requests_per_s"] for r in rounds]
        label, marker = Path(path).stem, "o" if precision == "fp32" else "^"
        by_round.plot(range(start, start + len(run)), run, marker, label=label)
        rates.plot([r["empty"]["requests_per_s"] for r in rounds], [r["app"]["requests_per_s"] for r in rounds],
                   marker, label=label)
        start += len(run)
    by_round.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET}x")
    for (precision, values), style in zip(ratios.items(), ["-", ":"]):
        by_round.axhline(statistics.median(values), color="grey", linestyle=style, linewidth=1,
                         label=f"{precision} CNN: median {statistics.median(values):.2f}x of {len(values)}")
    by_round.set_xlabel("round (the two apps alternating ABBA)")
    by_round.set_ylabel("app requests/s / empty app's")
    by_round.set_title(f"{sum(map(len, ratios.values()))} rounds under 8 clients")
    by_round.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    span = [min(empty_rates), max(empty_rates)]
    rates.plot(span, [TARGET * x for x in span], "k--", linewidth=1, label=f"app = {TARGET} x empty app")
    rates.set_xlabel("empty app, requests/s in the round")
    rates.set_ylabel("app, requests/s in the round")
    rates.set_title("each round's two rates (the machine's load moves both)")
    rates.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    for precision, values in ratios.items():
        print(f"{precision} CNN: {len(values)} rounds, median {statistics.median(values):.3f}, "
              f"mean {statistics.mean(values):.3f}, {sum(v >= TARGET for v in values)} at {TARGET}x or more")
    print(args.out)


if __name__ == "__main__":
    main()
