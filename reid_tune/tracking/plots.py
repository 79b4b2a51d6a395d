"""CMC curves as figures and PNGs, for a trial's validation and the champion's test (matplotlib only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cmc_plot(cmc: list[float], path: Path, *, title: str, ranks: int = 20) -> None:
    """Save the CMC curve (first ``ranks`` ranks) as a PNG (see :func:`cmc_figure`)."""
    import matplotlib.pyplot as plt

    fig = cmc_figure(cmc, title=title, ranks=ranks)
    fig.savefig(path)
    plt.close(fig)


def cmc_figure(cmc: list[float], *, title: str, ranks: int = 20) -> Any:
    """The CMC curve of the first ``ranks`` ranks, its y-axis fitted to the values and rank-1/5/10
    written on it, so that curves near the top still show their differences."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a driver or on CI
    import matplotlib.pyplot as plt

    shown = [100 * v for v in cmc[:ranks]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(range(1, len(shown) + 1), shown, marker=".")
    for rank in (1, 5, 10):
        if rank <= len(shown):
            ax.annotate(
                f"rank-{rank}: {shown[rank - 1]:.1f}%",
                (rank, shown[rank - 1]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
            )
    low, high = min(shown), max(shown)
    margin = max(2.0, 0.1 * (high - low))
    ax.set(
        xlabel="rank",
        ylabel="matching rate (%)",
        title=title,
        xlim=(0.5, ranks + 0.5),
        xticks=[1, *range(5, ranks + 1, 5)],
        ylim=(max(0.0, low - margin), min(100.0, high + margin)),
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
