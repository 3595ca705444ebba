"""Training curves as a PNG inside each stage's artifact (linked from its Prefect report).

Reads the stage's train_log.jsonl (rows of `group/name` metrics, the same in every stage) and
draws one panel per metric group that the log has.
"""

from __future__ import annotations

import json
from pathlib import Path

# One panel per metric group (stages/metrics.py), in this order; other groups are not drawn.
PANELS = ("train", "eval", "loss", "rollout", "rl", "gold", "policy", "critic")
MAX_LINES = 8   # a panel with more series (per-domain losses of a big mixture) keeps the first


def curves(log: Path, out: Path, title: str) -> Path | None:
    """Write `out` (PNG) from the rows of `log`; None when the log has nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    panels = {}
    names = sorted({k for r in rows for k in r if "/" in k})
    for panel in PANELS:
        series = {}
        for k in [n for n in names if n.split("/")[0] == panel and n != "train/lr"][:MAX_LINES]:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))
                   and isinstance(r.get("step"), (int, float))]
            if len(pts) >= 2:
                series[k] = pts
        if series:
            panels[panel] = series
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.4)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
