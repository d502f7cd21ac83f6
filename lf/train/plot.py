"""The loss plot: output_dir/training_loss.png (and training_eval_loss.png with evaluations, training_reward.png
for ppo), from the run's log."""

from __future__ import annotations

import math
import os

KEYS = ("loss", "eval_loss", "reward")  # reward: ppo's


def file_name(key: str) -> str:
    return f"training_{key}.png"


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, weighted more heavily for long curves (so both short and long runs read well),
    started from the first value."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot_loss(output_dir: str, log_history: list[dict], keys=KEYS) -> list[str]:
    """Writes one PNG per key that has values; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    written = []
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        if not points:
            continue
        steps, values = zip(*points)
        figure = plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        plt.title(f"training {key.replace('_', ' ')} of {os.path.basename(os.path.abspath(output_dir))}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = os.path.join(output_dir, file_name(key))
        plt.savefig(path, format="png", dpi=100)
        plt.close(figure)
        written.append(path)
    return written
