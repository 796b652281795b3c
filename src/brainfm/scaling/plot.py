"""Log-log plot of the scale table: parameters against measured throughput, and against memory
(predicted per GPU for the plan, predicted and measured for the measured runs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainfm.io import save_figure


def _num(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series([float("nan")] * len(frame), index=frame.index)
    return pd.to_numeric(frame[column], errors="coerce")


def plot_scale(frame: pd.DataFrame, path: Path | str | None = None, fig=None):
    """Draw the scale table ``frame`` (rows of ``scale.csv``) in two log-log panels.

    Left: measured samples/s (all ranks) against total parameters, one line per model and
    device. Right: GiB against parameters: activations and step working memory of the plan's
    micro-batch (bf16-mixed), model states on one GPU and per GPU under DDP, what one GPU needs
    in all, the A100 capacities, and the measured runs' predicted and measured peaks.

    Returns the path written (``path`` given, atomically) or the figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = frame.copy()
    frame["_params"] = _num(frame, "params_total")
    frame = frame.sort_values("_params")
    if fig is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    else:
        axes = fig.subplots(1, 2)
    ax_t, ax_m = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(frame["model"].astype(str)))
    measured_any = False
    for i, model in enumerate(models):
        color = colors[i % len(colors)]
        part = frame[frame["model"].astype(str) == model]
        x = part["_params"]
        meas = part[_num(part, "samples_per_s") > 0]
        if len(meas):
            measured_any = True
            for device, grp in meas.groupby(meas.get("measured_device", pd.Series("", index=meas.index)).astype(str)):
                ax_t.plot(grp["_params"], _num(grp, "samples_per_s"), "o-", color=color, label=f"{model}, {device}")
        prefix = f"{model}: " if len(models) > 1 else ""
        ax_m.plot(x, _num(part, "one_gpu_gib"), "-", color=color, lw=2, label=f"{prefix}one GPU in all (bf16-mixed)")
        ax_m.plot(x, _num(part, "states_ddp_gib"), "--", color=color, label=f"{prefix}model states per GPU, DDP")
        ax_m.plot(x, _num(part, "act_gib"), ":", color=color, label=f"{prefix}activations (batch {part['batch_size'].iloc[0]})")
        if len(meas):
            ax_m.plot(meas["_params"], _num(meas, "measured_peak_gib"), "s", color=color, ms=7,
                      label=f"{prefix}measured peak ({meas['measured_precision'].iloc[0]})")
            ax_m.plot(meas["_params"], _num(meas, "predicted_peak_gib"), "x", color="k", ms=8,
                      label=f"{prefix}predicted peak, same run")
    for gib, name in ((40, "A100 40 GB"), (80, "A100 80 GB")):
        ax_m.axhline(gib, color="0.6", lw=0.8)
        ax_m.text(frame["_params"].min(), gib * 1.05, name, fontsize=8, color="0.4")
    ax_t.set(xscale="log", yscale="log", xlabel="parameters", ylabel="samples / s (measured)",
             title="Throughput")
    if not measured_any:
        ax_t.text(0.5, 0.5, "no measured sizes", transform=ax_t.transAxes, ha="center")
    else:
        ax_t.legend(fontsize=8)
    ax_m.set(xscale="log", yscale="log", xlabel="parameters", ylabel="GiB", title="Memory")
    ax_m.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    return save_figure(fig, path, dpi=120)
