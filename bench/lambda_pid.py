"""PID Lagrangian against the paper's SGD step on log λ, on pipeline runs (issue 11).

For each pipeline output directory given (e.g. one per seed), this re-runs that pipeline's `ppo_lag` with the very
same arguments (read from OUT/ppo_lag/args.json) except `--lambda_update pid`, into OUT/ppo_lag_pid, evaluates it on
the same held-out prompts, labels its answers with the pipeline's judge (label.py), and compares the two runs' λ and
episode cost J_C per rollout:

    λ overshoot          peak λ - final λ          (final: the mean over the last 10 rollouts)
    violation area       Σ_k max(0, J_C,k - d)     (cost units × rollouts: how much, and how long, J_C was above d)
    undershoot area      Σ_k max(0, d - J_C,k)     (how far below the limit the policy was pushed: caution it paid for)
    final distance to d  the distance of J_C from d over the last 10 rollouts

Run (after `bash run_pipeline.sh --seed S --out runs/toy-sS` for S = 0, 1, 2):
    python bench/lambda_pid.py runs/toy-s0 runs/toy-s1 runs/toy-s2 --plot docs/lambda_pid.png
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LAST = 10  # rollouts averaged for the "final" figures


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def figures(rows, cost_limit):
    lam = np.array([row["lagrange/lambda"] for row in rows])
    cost = np.array([row["objective/episode_cost"] for row in rows])
    final_lambda = lam[-LAST:].mean()
    return {
        "peak λ": lam.max(),
        "peak at rollout": int(lam.argmax()) + 1,
        "final λ": final_lambda,
        "λ overshoot": lam.max() - final_lambda,
        "violation area": np.clip(cost - cost_limit, 0, None).sum(),
        "undershoot area": np.clip(cost_limit - cost, 0, None).sum(),
        "final distance to d": abs(cost[-LAST:].mean() - cost_limit),
    }


def oracle_rates(labels_file, policy):
    policies = json.loads(Path(labels_file).read_text())["policies"][policy]  # label.py's labels.json
    return 100 * policies["harmful_prompts"]["oracle_harmful_rate"], 100 * policies["benign_prompts"][
        "oracle_helpful_rate"
    ]


def run_pid(out, extra):
    """OUT/ppo_lag_pid: the pipeline's ppo_lag arguments with --lambda_update pid (and `extra`), then its evaluation
    and the judge's labels (the judge of the pipeline's OUT/eval/labels.json)."""
    args = json.loads((out / "ppo_lag" / "args.json").read_text())
    target = out / "ppo_lag_pid"
    if not (target / "metrics.jsonl").is_file():
        skip = {"script", "world_size", "rollout_batch_size", "minibatches_per_rollout", "output_dir", "lambda_update"}
        command = [sys.executable, "ppo_lagrangian.py", "--output_dir", str(target), "--lambda_update", "pid"]
        for key, value in args.items():
            if key in skip or value is None:
                continue
            command += [f"--{key}", str(value)]  # (booleans as --flag True/False, which HfArgumentParser reads)
        subprocess.run(command + extra, cwd=REPO, check=True)
    evaluation = out / "eval_pid"
    if not (evaluation / "results.json").is_file():
        eval_args = (
            json.loads((out / "eval" / "args.json").read_text()) if (out / "eval" / "args.json").is_file() else {}
        )
        subprocess.run(
            [
                sys.executable,
                "evaluate.py",
                "--policy",
                f"ppo_lag_pid={target}",
                "--prompt_data",
                eval_args.get("prompt_data", "data/toy/eval_prompts.jsonl"),
                "--reward_model",
                str(out / "reward"),
                "--cost_model",
                str(out / "cost"),
                "--max_length",
                "128",
                "--max_new_tokens",
                "48",
                "--per_device_batch_size",
                "50",
                "--seed",
                str(args["seed"]),
                "--output_dir",
                str(evaluation),
            ],
            cwd=REPO,
            check=True,
        )
    if not (evaluation / "labels.json").is_file():
        judge = json.loads((out / "eval" / "labels.json").read_text())["judge"]
        subprocess.run([sys.executable, "label.py", str(evaluation), "--judge", judge], cwd=REPO, check=True)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "runs", nargs="+", help="pipeline output directories (each with sft, reward, cost, ppo_lag, eval)"
    )
    parser.add_argument("--plot", default="", help="write the λ and J_C curves of both updates to this PNG")
    parser.add_argument(
        "--pid", nargs="*", default=[], help="extra ppo_lagrangian.py flags for the PID runs, e.g. --pid --pid_kp 0.1"
    )
    args = parser.parse_args()
    curves, table = [], {"sgd": [], "pid": []}
    for out in map(Path, args.runs):
        pid_run = run_pid(out, args.pid)
        cost_limit = json.loads((out / "ppo_lag" / "args.json").read_text())["cost_limit"]
        for name, run, results, policy in (
            ("sgd", out / "ppo_lag", out / "eval" / "labels.json", "ppo_lag"),
            ("pid", pid_run, out / "eval_pid" / "labels.json", "ppo_lag_pid"),
        ):
            rows = read_metrics(run)
            harmful, helpful = oracle_rates(results, policy)
            table[name].append(
                {**figures(rows, cost_limit), "harmful on harmful (%)": harmful, "helpful on benign (%)": helpful}
            )
            curves.append((name, out.name, rows, cost_limit))
    pid_args = json.loads((Path(args.runs[0]) / "ppo_lag_pid" / "args.json").read_text())
    print(
        f"PID gains K_P {pid_args['pid_kp']}, K_I {pid_args['pid_ki']}, K_D {pid_args['pid_kd']}; "
        f"λ_max {pid_args['lambda_max']}; "
        f"{len(args.runs)} runs: {', '.join(args.runs)}"
    )
    keys = list(table["sgd"][0])
    print(
        "| figure | "
        + " | ".join(f"SGD on log λ: {Path(r).name}" for r in args.runs)
        + " | mean | "
        + " | ".join(f"PID: {Path(r).name}" for r in args.runs)
        + " | mean |"
    )
    print("|---" * (2 * len(args.runs) + 3) + "|")
    for key in keys:
        cells = []
        for name in ("sgd", "pid"):
            values = [row[key] for row in table[name]]
            cells += [f"{v:.3g}" for v in values] + [f"**{np.mean(values):.3g}**"]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(curves, args.plot)
        print(f"wrote {args.plot}")


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"sgd": ("C3", "SGD on log λ (the paper's)"), "pid": ("C0", "PID Lagrangian")}
    labelled = set()
    for name, _seed, rows, _cost_limit in curves:
        colour, label = styles[name]
        steps = [row["rollout"] for row in rows]
        label = None if name in labelled else label
        labelled.add(name)
        left.plot(steps, [row["lagrange/lambda"] for row in rows], color=colour, alpha=0.7, linewidth=1.2, label=label)
        right.plot(
            steps, [row["objective/episode_cost"] for row in rows], color=colour, alpha=0.7, linewidth=1.2, label=label
        )
    right.axhline(curves[0][3], color="black", linestyle="--", linewidth=1, label=f"cost limit d = {curves[0][3]}")
    left.set(title="Lagrange multiplier λ (one line per seed)", xlabel="rollout (PPO iteration)", ylabel="λ")
    right.set(title="episode cost J_C (window mean)", xlabel="rollout (PPO iteration)", ylabel="J_C")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
