"""The report of an evaluation: report.md and the plots, from what evaluate.py (and label.py) wrote.

Reads EVAL_DIR/results.json, answers.jsonl, args.json and, when label.py has run, labels.json, and writes into
EVAL_DIR: report.md (the score models, every policy's rates with their 95% intervals, the judge's rates, the arena,
Elo), reward_vs_cost.png (every answer, the paper's picture), elo.png (2+ policies) and training_curves.png (reward,
cost and λ per rollout of the policies that are ppo_lagrangian.py runs, read from their metrics.jsonl).

    python bench/report.py runs/toy/eval
"""

import argparse
import json
from pathlib import Path

import numpy as np


def percent(share, interval=None):
    return f"{100 * share:.1f}%" + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def report_markdown(results, labels):
    """results.json (and labels.json) as tables; every rate with its 95% interval in brackets."""
    parts = ["# Safe RLHF evaluation", "Rates are followed by their 95% interval (Wilson) in brackets."]
    if "score_models" in results:
        rows = [
            [
                name,
                m["pairs"],
                percent(m["accuracy"], m["accuracy_ci95"]),
                percent(m["sign_accuracy"], m["sign_accuracy_ci95"]) if "sign_accuracy" in m else "-",
            ]
            for name, m in results["score_models"].items()
        ]
        parts += [
            f"## Score models on {results['preference_data']}",
            "accuracy: the better (reward) or unsafer (cost) answer scored higher; sign accuracy: C > 0 exactly "
            "for the answers labelled unsafe",
            table(["model", "pairs", "accuracy", "sign accuracy"], rows),
        ]
    if "policies" in results:
        decoding = "greedy" if results["greedy"] else f"sampled, {results['samples_per_prompt']} per prompt"
        judged = labels.get("policies", {})
        parts.append(
            f"## Policies: {results['prompts']} prompts from {results['prompt_data']} ({decoding})\n"
            "harmful: share of answers with C > 0; judge: the annotator of label.py "
            f"({labels.get('judge', 'none')}); length: answer tokens without EOS"
        )
        header = ["policy", "answers", "harmful", "mean reward", "mean cost", "mean length"]
        header += ["judge: harmful", "judge: helpful", "judge agrees with C's sign"] if judged else []
        for subset in ("all", "harmful_prompts", "benign_prompts"):
            rows = []
            for name, subsets in results["policies"].items():
                if subset in subsets:
                    s, j = subsets[subset], judged.get(name, {}).get(subset)
                    rows.append(
                        [
                            name,
                            s["answers"],
                            percent(s["harmful_rate"], s["harmful_rate_ci95"]),
                            f"{s['mean_reward']:.3f}",
                            f"{s['mean_cost']:.3f}",
                            f"{s['mean_length']:.1f}",
                        ]
                        + (
                            [
                                percent(j[k], j[k + "_ci95"])
                                for k in ("oracle_harmful_rate", "oracle_helpful_rate", "cost_oracle_agreement")
                            ]
                            if j
                            else []
                        )
                    )
            if rows:
                parts += [f"### {subset.replace('_', ' ')}", table(header, rows)]
    if results.get("arena"):
        cells = ("better_safe", "better_unsafe", "worse_safe", "worse_unsafe")
        rows = [
            [
                m["a"],
                m["b"],
                m["prompts"],
                *(f"{m[c]} ({percent(m[c + '_share'])})" for c in cells),
                percent(m["helpfulness_win_rate"], m["helpfulness_win_rate_ci95"]),
                percent(m["harmlessness_win_rate"], m["harmlessness_win_rate_ci95"]),
            ]
            for m in results["arena"]
        ]
        header = [
            "A",
            "B",
            "prompts",
            *(c.replace("_", " & ") for c in cells),
            "B wins helpfulness",
            "B wins harmlessness",
        ]
        parts += [
            "## Arena: B's answer against A's, per prompt",
            "better: R_B > R_A (worse includes ties); safe: C_B <= 0; win rates count ties as half",
            table(header, rows),
        ]
    if results.get("elo"):
        elo = results["elo"]
        rows = [
            [name, f"{elo['helpfulness'][name]:.1f}", f"{elo['harmlessness'][name]:.1f}"]
            for name in sorted(elo["helpfulness"], key=lambda n: -elo["helpfulness"][n])
        ]
        parts += [
            "## Elo (helpfulness judged by the reward model, harmlessness by the cost model)",
            f"K = {elo['k']}, initial {elo['initial']}, mean over {elo['rounds']} seeded shuffles of the matches",
            table(["policy", "helpfulness Elo", "harmlessness Elo"], rows),
        ]
    return "\n\n".join(parts) + "\n"


def plot_answers(records, results, path):
    """reward_vs_cost.png: every answer's cost and reward, each policy's mean as an X."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5.5))
    for i, name in enumerate(records):
        summary = results["policies"][name]["all"]
        label = f"{name}: C > 0 on {percent(summary['harmful_rate'], summary['harmful_rate_ci95'])}"
        axis.scatter(
            [r["cost"] for r in records[name]],
            [r["reward"] for r in records[name]],
            s=14,
            alpha=0.45,
            color=f"C{i % 10}",
            label=label,
        )
        axis.scatter(
            [summary["mean_cost"]],
            [summary["mean_reward"]],
            s=180,
            marker="X",
            color=f"C{i % 10}",
            edgecolor="black",
            zorder=3,
        )
    axis.axvline(0.0, color="black", linestyle="--", linewidth=1, label="cost = 0 (right: unsafe)")
    axis.axvspan(0.0, max(axis.get_xlim()[1], 0.0), color="red", alpha=0.05)
    axis.set(
        xlabel="cost C(x, y)   (lower: more harmless)",
        ylabel="reward R(x, y)   (higher: more helpful)",
        title="Every answer scored by the reward and cost models (X: the policy's mean)",
    )
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_elo(elo, path):
    """elo.png: both ladders, best at the top."""
    import matplotlib.pyplot as plt

    names = list(elo["helpfulness"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.6 * len(names)))
    for axis, ladder in zip(axes, ("helpfulness", "harmlessness")):
        ranked = sorted(names, key=lambda n: elo[ladder][n])
        bars = axis.barh(
            ranked,
            [elo[ladder][n] - elo["initial"] for n in ranked],
            left=elo["initial"],
            color=[f"C{names.index(n) % 10}" for n in ranked],
        )
        axis.bar_label(bars, labels=[f"{elo[ladder][n]:.0f}" for n in ranked], fontsize=9, padding=3)
        axis.axvline(elo["initial"], color="black", linewidth=0.8)
        spread = max(abs(elo[ladder][n] - elo["initial"]) for n in names) * 1.3 + 10
        axis.set(
            xlim=(elo["initial"] - spread, elo["initial"] + spread),
            xlabel="Elo rating",
            title=f"{ladder} Elo ({'reward' if ladder == 'helpfulness' else 'cost'} model as judge)",
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def training_curves(policies):
    """{name: (metrics rows, args)} of each policy whose directory holds a ppo_lagrangian.py run's metrics.jsonl."""
    curves = {}
    for spec in policies:
        name, _, path = spec.partition("=")
        metrics, args = Path(path) / "metrics.jsonl", Path(path) / "args.json"
        if metrics.is_file() and args.is_file() and json.loads(args.read_text()).get("script") == "ppo_lagrangian.py":
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            curves[name] = (rows, json.loads(args.read_text()))
    return curves


def plot_training_curves(curves, path, smoothing=5):
    """training_curves.png: mean reward, mean cost and λ per rollout (a moving average over SMOOTHING rollouts, raw
    values faint), the cost limit d of each Lagrangian run dashed."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, (name, (rows, run_args)) in enumerate(curves.items()):
        colour, steps, algorithm = f"C{(i + 1) % 10}", np.array([row["rollout"] for row in rows]), run_args["algorithm"]
        for axis, key in zip(axes, ("objective/reward", "objective/cost", "lagrange/lambda")):
            if key == "lagrange/lambda" and algorithm != "ppo_lag":
                continue  # λ moves only in PPO-Lagrangian (reward shaping's λ0 is a constant)
            values = np.array([row[key] for row in rows])
            window = min(smoothing, len(values))
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
            label = name if name == algorithm else f"{name} ({algorithm})"
            axis.plot(steps[len(steps) - len(smooth) :], smooth, color=colour, linewidth=2, label=label)
        if algorithm == "ppo_lag":
            axes[1].axhline(
                run_args["cost_limit"],
                color=colour,
                linestyle="--",
                linewidth=1,
                label=f"{name}: d = {run_args['cost_limit']} ({run_args['constraint']})",
            )
    titles = ("mean reward R(x, y) per rollout", "mean cost C(x, y) per rollout", "Lagrange multiplier λ")
    for axis, title in zip(axes, titles):
        axis.set(title=title, xlabel="rollout (PPO iteration)")
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval_dir", help="a finished output of evaluate.py")
    eval_dir = Path(parser.parse_args().eval_dir)
    results = json.loads((eval_dir / "results.json").read_text())
    labels = json.loads((eval_dir / "labels.json").read_text()) if (eval_dir / "labels.json").is_file() else {}
    (eval_dir / "report.md").write_text(report_markdown(results, labels))
    if "policies" in results:
        records = {}
        for line in (eval_dir / "answers.jsonl").read_text().splitlines():
            record = json.loads(line)
            records.setdefault(record["policy"], []).append(record)
        plot_answers(records, results, eval_dir / "reward_vs_cost.png")
        if results.get("elo"):
            plot_elo(results["elo"], eval_dir / "elo.png")
        curves = training_curves(json.loads((eval_dir / "args.json").read_text())["policy"])
        if curves:
            plot_training_curves(curves, eval_dir / "training_curves.png")
    print(f"wrote {eval_dir / 'report.md'} and the plots")


if __name__ == "__main__":
    main()
