"""The dashboard's plots: each a function of plain data (lists, arrays, dicts) to a plotly Figure.

Nothing here reads files; :mod:`dashboards.data` gathers the numbers. Every figure carries its
numbers in ``fig.data`` (what a browser test reads back from the page's plotly divs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from dashboards.keys import FINGER_NAMES, KEY_NAMES
from dashboards.timeline import STATES

# One colour per unit state, used by every plot and the page's badges.
STATE_COLORS = {
    "pending": "#9aa5b1",
    "running": "#3b82f6",
    "succeeded": "#16a34a",
    "gated": "#f59e0b",
    "failed": "#dc2626",
}

_LAYOUT = dict(
    template="plotly_white",
    height=320,
    margin=dict(l=55, r=20, t=45, b=45),
    legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
)


def _figure(title: str, **layout) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=15)), **{**_LAYOUT, **layout})
    return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font=dict(size=14, color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def states_over_time(times: Sequence, counts: Mapping[str, Sequence[int]]) -> go.Figure:
    """Stacked area of how many units are in each state at each time (one trace per state)."""
    fig = _figure("Units by state over time", yaxis_title="units", hovermode="x unified")
    if len(times) == 0:
        return _empty(fig, "no units yet")
    for state in STATES:
        fig.add_trace(go.Scatter(
            x=list(times), y=list(counts.get(state, [0] * len(times))), name=state, mode="lines",
            stackgroup="units", line=dict(width=0.5, color=STATE_COLORS[state], shape="hv"),
        ))
    return fig


def throughput(bin_edges: Sequence, finished_per_bin: Sequence[int], per_hour: float | None) -> go.Figure:
    """Units finished per time bin (bars), titled with the recent rate in units per hour."""
    rate = "–" if per_hour is None else f"{per_hour:.1f} units/h"
    fig = _figure(f"Throughput ({rate})", yaxis_title="units finished", bargap=0.05)
    if len(finished_per_bin) == 0:
        return _empty(fig, "no unit has finished yet")
    edges = list(bin_edges)
    fig.add_trace(go.Bar(x=edges[:-1], y=list(finished_per_bin), name="finished",
                         marker_color=STATE_COLORS["succeeded"], offset=0,
                         width=[_ms(b) - _ms(a) for a, b in zip(edges[:-1], edges[1:])]))
    return fig


def _ms(t) -> float:
    """Milliseconds since the epoch (plotly's unit for bar widths on a date axis)."""
    return float(np.datetime64(t, "ms").astype("int64"))


def f1_histogram(f1s: Sequence[float], threshold: float, bins: int = 20) -> go.Figure:
    """Histogram of finished specialists' F1 on [0, 1] with the gate threshold as a vertical line
    (as RP1M fig. 4); the title counts how many pass."""
    f1 = np.asarray(list(f1s), dtype=float)
    passing = int((f1 >= threshold).sum())
    fig = _figure(f"F1 of finished specialists ({passing}/{len(f1)} ≥ {threshold:g})",
                  xaxis_title="F1", yaxis_title="specialists", bargap=0.05)
    counts, edges = np.histogram(f1, bins=bins, range=(0.0, 1.0))
    fig.add_trace(go.Bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=counts.tolist(), width=1.0 / bins,
                         name="specialists", marker_color="#6366f1",
                         customdata=np.stack([edges[:-1], edges[1:]], axis=1).tolist(),
                         hovertemplate="F1 %{customdata[0]:.2f}–%{customdata[1]:.2f}: %{y}<extra></extra>"))
    fig.add_vline(x=threshold, line=dict(color="#dc2626", dash="dash", width=2),
                  annotation_text=f"gate {threshold:g}", annotation_position="top left")
    fig.update_xaxes(range=[0, 1])
    return fig


def key_histogram(pressed_counts: Sequence[int], n_steps: int) -> go.Figure:
    """Bar per piano key (88, A0..C8): control steps in which that key was pressed, over the lake."""
    counts = np.asarray(list(pressed_counts), dtype=np.int64)
    if counts.shape != (88,):
        raise ValueError(f"key_histogram: expected 88 counts, got shape {counts.shape}")
    fig = _figure(f"Pressed keys across the lake ({n_steps:,} steps)", xaxis_title="key",
                  yaxis_title="steps pressed", bargap=0.1)
    black = np.array(["#" in name for name in KEY_NAMES])
    fig.add_trace(go.Bar(x=list(range(88)), y=counts.tolist(), name="pressed", customdata=KEY_NAMES,
                         marker_color=np.where(black, "#111827", "#94a3b8").tolist(),
                         hovertemplate="key %{x} (%{customdata}): %{y}<extra></extra>"))
    c_keys = [i for i, name in enumerate(KEY_NAMES) if name.startswith("C") and "#" not in name]
    fig.update_xaxes(tickvals=c_keys, ticktext=[KEY_NAMES[i] for i in c_keys], range=[-0.5, 87.5])
    return fig


def learning_curves(curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
                    metrics: Sequence[str], title: str = "Learning curves") -> go.Figure:
    """One subplot per metric, one line per run: ``curves[label][metric] = (steps, values)``."""
    from plotly.subplots import make_subplots

    metrics = list(metrics)
    fig = make_subplots(rows=1, cols=max(1, len(metrics)), subplot_titles=metrics, horizontal_spacing=0.08)
    # The legend below the axes: unit ids are long and would cover the subplot titles.
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=15)),
                      **{**_LAYOUT, "height": 400, "margin": dict(l=55, r=20, t=60, b=40),
                         "legend": dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0.0)})
    if not any(curves.get(label, {}).get(m) for label in curves for m in metrics):
        return _empty(fig, "no metrics logged yet")
    palette = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"]
    for i, label in enumerate(curves):
        for j, metric in enumerate(metrics):
            steps, values = curves[label].get(metric) or ([], [])
            fig.add_trace(go.Scatter(x=list(steps), y=list(values), mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=j == 0, marker=dict(size=4),
                                     line=dict(color=palette[i % len(palette)])),
                          row=1, col=j + 1)
        fig.update_xaxes(title_text="step")
    return fig


def finger_key_heatmap(counts: np.ndarray, title: str = "Which finger pressed which key") -> go.Figure:
    """Heatmap of a (10, 88) matrix: steps in which finger i was assigned key j by OT fingering."""
    counts = np.asarray(counts)
    if counts.shape != (len(FINGER_NAMES), 88):
        raise ValueError(f"finger_key_heatmap: expected shape (10, 88), got {counts.shape}")
    fig = _figure(title, xaxis_title="key", height=360, margin=dict(l=110, r=20, t=45, b=45))
    used = np.flatnonzero(counts.sum(axis=0))
    if used.size == 0:
        return _empty(fig, "no key to press in this rollout")
    # Only the span of keys that were played, so that the cells are readable.
    lo, hi = int(max(0, used.min() - 2)), int(min(87, used.max() + 2))
    fig.add_trace(go.Heatmap(z=counts[:, lo:hi + 1].tolist(), x=list(range(lo, hi + 1)), y=list(FINGER_NAMES),
                             customdata=[[KEY_NAMES[k] for k in range(lo, hi + 1)]] * len(FINGER_NAMES),
                             colorscale="Viridis", colorbar=dict(title="steps"),
                             hovertemplate="%{y} → key %{x} (%{customdata}): %{z}<extra></extra>"))
    fig.update_xaxes(tickvals=list(range(lo, hi + 1, 2)), ticktext=[KEY_NAMES[k] for k in range(lo, hi + 1, 2)])
    fig.update_yaxes(autorange="reversed")
    return fig


def gate_status(passing: int, needed: int, threshold: float, launched: bool) -> go.Figure:
    """A bar of passing shards against the number the gate needs before imitation learning starts."""
    state = "imitation job launched" if launched else ("open" if passing >= needed else "waiting")
    fig = _figure(f"Gate: {passing}/{needed} shards with F1 ≥ {threshold:g} ({state})", height=200,
                  xaxis_title="shards", showlegend=False)
    fig.add_trace(go.Bar(y=["passing"], x=[passing], orientation="h", name="passing",
                         marker_color="#16a34a" if passing >= needed else "#f59e0b",
                         text=[f"{passing}"], textposition="auto"))
    fig.add_vline(x=needed, line=dict(color="#111827", dash="dash", width=2),
                  annotation_text=f"needed {needed}", annotation_position="top right")
    fig.update_xaxes(range=[0, max(needed, passing) * 1.1 + 1])
    return fig


def evaluation_f1(f1: Mapping[str, Mapping[str, float]], groups: Sequence[str] = ("seen", "held-out")) -> go.Figure:
    """Grouped bars of an imitation policy's mean F1 on songs it was trained on (seen) and on
    held-out songs, one bar group per policy (RP1M table II): ``f1[policy][group]``."""
    fig = _figure("Imitation policy: evaluation F1", yaxis_title="F1", barmode="group", height=300)
    if not f1:
        return _empty(fig, "not evaluated yet (pianoforge eval --mlflow-uri ...)")
    colors = {"seen": "#2563eb", "held-out": "#f59e0b"}
    policies = list(f1)
    for group in groups:
        values = [f1[p].get(group) for p in policies]
        fig.add_trace(go.Bar(x=policies, y=values, name=group, marker_color=colors.get(group),
                             text=[f"{v:.3f}" if v is not None else "" for v in values], textposition="outside"))
    fig.update_yaxes(range=[0, 1.1])
    return fig
