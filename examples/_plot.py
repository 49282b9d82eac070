"""The --plot of the examples: curves against steps, saved to a PNG (needs matplotlib)."""

from __future__ import annotations


def plot_curves(
    steps: list[int], curves: dict[str, list[float]], path: str, xlabel: str, ylabel: str, log: bool = False
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(steps, values, "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")
