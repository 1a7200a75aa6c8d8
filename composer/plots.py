"""Pictures as PNG: a task graph, and a similarity heatmap.

Both draw on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot: no display needed, and no global backend switched under a caller's notebook.
Files are written atomically (temp file + rename). Both stay legible for 20+ names:
the figure grows with the number of nodes / names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from composer.atomic import atomic_path

__all__ = ["ROLE_COLOURS", "draw_graph", "learning_curves", "similarity_heatmap", "weights_per_class"]

ROLE_COLOURS = {"source": "#4C72B0", "subtask": "#55A868", "target": "#C44E52", None: "#9A9A9A"}
_COLUMNS = ("source", "subtask", "target", None)  # left to right
_METRIC_COLOURS = ["#8172B2", "#DD8452", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
_NODE_SIZE = 420  # points^2


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


# --- the task graph ------------------------------------------------------------------


def _layered_positions(G: nx.MultiDiGraph) -> dict[Any, tuple[float, float]]:
    """Columns by role (sources, subtasks, targets), rows ordered to cut crossings."""
    columns = [[n for n, d in G.nodes(data=True) if d.get("role") == role] for role in _COLUMNS]
    other = [n for n, d in G.nodes(data=True) if d.get("role") not in _COLUMNS]
    columns[-1] += other
    columns = [c for c in columns if c]
    x_of = {n: float(i) for i, col in enumerate(columns) for n in col}

    def place(col: list) -> dict:
        h = len(col)
        return {n: (h - 1) / 2.0 - i for i, n in enumerate(col)}

    y = {}
    for col in columns:
        y.update(place(col))
    U = nx.Graph(G.to_undirected())
    # barycenter sweeps: sort each column by the mean height of its neighbours elsewhere
    for sweep in range(6):
        order = range(len(columns)) if sweep % 2 == 0 else reversed(range(len(columns)))
        for ci in order:
            col = columns[ci]

            def bary(n, col_index=ci):
                ys = [y[m] for m in U[n] if m != n and x_of[m] != col_index]
                return sum(ys) / len(ys) if ys else y[n]

            col.sort(key=lambda n: -bary(n))
            y.update(place(col))
    return {n: (x_of[n] * 3.0, y[n]) for n in G.nodes}


def _box_gap(a: np.ndarray, b: np.ndarray, inch: np.ndarray, size: tuple[float, float]) -> float:
    """>= 1 when boxes of ``size`` inches centred at a and b (data units) do not overlap."""
    d = np.abs(a - b) * inch
    return float(max(d[0] / size[0], d[1] / size[1]))


def _bezier(p1: np.ndarray, p2: np.ndarray, rad: float, t: np.ndarray, inch: np.ndarray) -> np.ndarray:
    """Points [len(t), 2] (data units) on matplotlib's arc3 curve from p1 to p2.

    arc3 bends in display space, so the control point is found in inches.
    """
    a, b = p1 * inch, p2 * inch
    ctrl = (a + b) / 2 + rad * np.array([b[1] - a[1], -(b[0] - a[0])])
    t = t[:, None]
    return ((1 - t) ** 2 * a + 2 * (1 - t) * t * ctrl + t**2 * b) / inch


def _clear_bend(
    p1: np.ndarray, p2: np.ndarray, rad: float, nodes: list[np.ndarray], inch: np.ndarray
) -> float:
    """A bend for an edge that skips a column, so it does not run through the nodes on its way."""
    between = [q for q in nodes if min(p1[0], p2[0]) < q[0] < max(p1[0], p2[0])]
    if not between:
        return rad
    t = np.linspace(0.05, 0.95, 37)
    q = np.stack(between)  # [Q, 2]

    def clearance(r: float) -> float:
        curve = _bezier(p1, p2, r, t, inch)  # [T, 2]
        d = np.hypot(*((curve[:, None, :] - q[None, :, :]) * inch).transpose(2, 0, 1))
        return float(d.min())

    best = max((rad, 0.06, -0.06, 0.12, -0.12, 0.2, -0.2), key=lambda r: (min(clearance(r), 0.22), -abs(r)))
    return best


def _fmt_weight(w: Any) -> str | None:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)):
        return None if w is None else str(w)
    if not math.isfinite(w):
        return str(w)
    return f"{w:.2f}"


def draw_graph(G: nx.MultiDiGraph, path: str | os.PathLike, title: str | None = None, dpi: int = 150) -> Path:
    """Draw a task graph to a PNG: roles as colours, part_of solid, similar dashed, weights as labels.

    Layout: one column per role (sources left, subtasks middle, targets right), edges
    left to right; within a column nodes are ordered to cut crossings. Similar edges are
    coloured by metric. Returns the path.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    pos = _layered_positions(G)
    n_cols = len({x for x, _ in pos.values()}) or 1
    tallest = max([sum(1 for p in pos.values() if p[0] == x) for x in {p[0] for p in pos.values()}] or [1])
    longest = max([len(str(n)) for n in G.nodes] or [4])
    width = max(7.0, 2.6 * n_cols + 0.16 * longest * 2 + 2.0)
    height = max(4.0, 0.62 * tallest + 1.6)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    pad_x = 0.9 + 0.07 * longest
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)

    metrics = sorted(
        {str(d.get("metric")) for _, _, d in G.edges(data=True) if d.get("relation") == "similar"}
    )
    metric_colour = {m: _METRIC_COLOURS[i % len(_METRIC_COLOURS)] for i, m in enumerate(metrics)}
    radius_pt = math.sqrt(_NODE_SIZE) / 2.0 + 2.0

    # edges first, under the nodes; parallel and same-column edges get a bend
    label_spots: list[np.ndarray] = []
    node_spots = [np.array(p) for p in pos.values()]
    span_x, span_y = ax.get_xlim(), ax.get_ylim()
    # inches per data unit (the axes take about 0.775 x 0.77 of the figure)
    inch = np.array([0.775 * width / (span_x[1] - span_x[0]), 0.77 * height / (span_y[1] - span_y[0])])
    left = min(xs)
    name_boxes = []  # (centre, combined box size) of each node's name, as obstacles for weight labels
    for n, (x, y) in pos.items():
        w_in = 0.085 * len(str(n)) + 0.1
        side = -1 if (x == left and n_cols > 1) else 1
        centre = np.array([x + side * (0.2 + w_in / 2) / inch[0], y])
        name_boxes.append((centre, ((w_in + 0.32) / 2 + 0.04, 0.24)))
    pair_count: dict[tuple, int] = {}
    for u, v, d in G.edges(data=True):
        pair = (u, v)
        i = pair_count.get(pair, 0)
        pair_count[pair] = i + 1
        (x1, y1), (x2, y2) = pos[u], pos[v]
        same_col = x1 == x2
        rad = (0.35 if same_col else 0.0) + 0.15 * i * (1 if i % 2 else -1)
        if not same_col and i == 0:
            rad = _clear_bend(np.array([x1, y1]), np.array([x2, y2]), rad, node_spots, inch)
        part_of = d.get("relation") == "part_of"
        colour = "#333333" if part_of else metric_colour.get(str(d.get("metric")), "#8172B2")
        ax.add_patch(
            FancyArrowPatch(
                (x1, y1),
                (x2, y2),
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>",
                mutation_scale=13,
                shrinkA=radius_pt,
                shrinkB=radius_pt,
                linewidth=1.6 if part_of else 1.2,
                linestyle="-" if part_of else (0, (5, 3)),
                color=colour,
                alpha=0.9,
                zorder=1,
            )
        )
        text = _fmt_weight(d.get("weight"))
        if text is None:
            continue
        # a label spot along the edge, clear of the labels and nodes already there
        p1, p2 = np.array([x1, y1]), np.array([x2, y2])
        best, best_gap = None, -1.0
        for t in (0.5, 0.4, 0.6, 0.32, 0.68, 0.25, 0.75, 0.45, 0.55, 0.2, 0.8):
            spot = _bezier(p1, p2, rad, np.array([t]), inch)[0]
            gap = min(
                [_box_gap(spot, s, inch, (0.42, 0.2)) for s in label_spots]
                + [_box_gap(spot, q, inch, (0.36, 0.3)) for q in node_spots]
                + [_box_gap(spot, c, inch, size) for c, size in name_boxes]
                + [9.0]
            )
            if gap > best_gap:
                best, best_gap = spot, gap
            if gap >= 1.0:
                break
        label_spots.append(best)
        ax.text(
            best[0],
            best[1],
            text,
            fontsize=8,
            ha="center",
            va="center",
            color=colour,
            zorder=3,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        )

    # nodes and their names: left column labels on the left, others on the right
    for n, d in G.nodes(data=True):
        x, y = pos[n]
        ax.scatter(
            [x],
            [y],
            s=_NODE_SIZE,
            color=ROLE_COLOURS.get(d.get("role"), ROLE_COLOURS[None]),
            edgecolors="white",
            linewidths=1.5,
            zorder=4,
        )
        on_left = x == left and n_cols > 1
        ax.annotate(
            str(n),
            (x, y),
            xytext=(-14 if on_left else 14, 0),
            textcoords="offset points",
            ha="right" if on_left else "left",
            va="center",
            fontsize=10,
            zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )

    roles_present = [r for r in _COLUMNS if any(d.get("role") == r for _, d in G.nodes(data=True))]
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markersize=10,
            color=ROLE_COLOURS[r],
            label=r if r else "undeclared",
        )
        for r in roles_present
    ]
    if any(d.get("relation") == "part_of" for _, _, d in G.edges(data=True)):
        handles.append(Line2D([], [], color="#333333", linewidth=1.6, label="part_of (subtask → task)"))
    for m in metrics:
        handles.append(
            Line2D(
                [],
                [],
                color=metric_colour[m],
                linewidth=1.2,
                linestyle=(0, (5, 3)),
                label=f"similar ({m})" if m != "None" else "similar",
            )
        )
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=min(4, len(handles)),
        frameon=False,
        fontsize=9,
    )
    ax.set_title(title or f"task graph: {G.graph.get('name', '')}", fontsize=12)
    return _save(fig, path, dpi)


# --- similarity heatmap ----------------------------------------------------------------


def _fmt_cells(values: np.ndarray) -> str:
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 0.0
    return "{:.0f}" if top >= 100 else "{:.1f}" if top >= 10 else "{:.2f}"


def similarity_heatmap(
    matrix: Any,
    row_names: Sequence[str],
    col_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "prompt similarity",
    cbar_label: str | None = None,
    dpi: int = 150,
    centre: float | None = None,
) -> Path:
    """Draw matrix [N, M] (a torch tensor or array) as an annotated heatmap PNG.

    Names on both axes, a colour bar, the values written in the cells when N <= 25 and
    M <= 25. The figure grows with N and M. With ``centre`` (e.g. 0 for gains) the colours
    diverge from it (blue below, red above, limits symmetric about it); else viridis. Returns the path.
    """
    from matplotlib.figure import Figure

    data = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    if data.ndim != 2 or data.shape != (len(row_names), len(col_names)):
        raise ValueError(
            f"heatmap matrix has shape {list(data.shape)} but there are {len(row_names)} row names "
            f"and {len(col_names)} column names"
        )
    N, M = data.shape
    annotate = N <= 25 and M <= 25
    cell = 0.5 if annotate else max(0.12, min(0.5, 12.0 / max(N, M)))
    longest = max([len(str(s)) for s in list(row_names) + list(col_names)] or [4])
    name_in = 0.075 * longest + 0.3
    fig = Figure(figsize=(max(4.0, cell * M + name_in + 1.6), max(3.0, cell * N + name_in + 0.8)))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if centre is not None:
        reach = max(abs(vmin - centre), abs(vmax - centre)) or 0.5
        vmin, vmax = centre - reach, centre + reach
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    import matplotlib

    cmap = matplotlib.colormaps["viridis" if centre is None else "RdBu_r"].with_extremes(bad="#DDDDDD")
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
    font = 9 if max(N, M) <= 30 else 7 if max(N, M) <= 60 else 5
    ax.set_xticks(
        range(M), [str(s) for s in col_names], rotation=55, ha="right", rotation_mode="anchor", fontsize=font
    )
    ax.set_yticks(range(N), [str(s) for s in row_names], fontsize=font)
    ax.set_xticks(np.arange(-0.5, M, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, N, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if annotate:
        fmt = _fmt_cells(data)
        for i in range(N):
            for j in range(M):
                v = data[i, j]
                if not math.isfinite(v):
                    continue
                frac = (v - vmin) / (vmax - vmin)
                # viridis turns light above ~0.6; RdBu is light in its middle, dark at both ends
                bright = frac > 0.6 if centre is None else abs(frac - 0.5) < 0.3
                ax.text(
                    j,
                    i,
                    fmt.format(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if bright else "white",
                )
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, shrink=0.9)
    if cbar_label:
        bar.set_label(cbar_label)
    ax.set_title(title, fontsize=11)
    return _save(fig, path, dpi)


# --- composition and training ----------------------------------------------------------

def weights_per_class(per_class: dict[str, Sequence[float]], names: Sequence[str], path: str | os.PathLike,
                      title: str = "attention weights per class", dpi: int = 150) -> Path:
    """Grouped bars: for each class, the mean attention weight of each candidate prompt. Returns the path."""
    from matplotlib.figure import Figure

    classes = list(per_class)
    data = np.asarray([per_class[c] for c in classes], dtype=np.float64)  # [C, K+1]
    if data.shape[1] != len(names):
        raise ValueError(f"{data.shape[1]} weights per class but {len(names)} names")
    C, K = data.shape
    fig = Figure(figsize=(max(5.0, 0.9 * C * K / 2 + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / K
    x = np.arange(C)
    for k in range(K):
        ax.bar(x + (k - (K - 1) / 2) * width, data[:, k], width, label=str(names[k]),
               color=_METRIC_COLOURS[k % len(_METRIC_COLOURS)])
    ax.set_xticks(x, classes)
    ax.set_ylabel("mean attention weight")
    ax.set_ylim(0, max(1e-6, float(data.max())) * 1.15)
    ax.legend(fontsize=8, frameon=False, ncols=min(K, 4))
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi)


def learning_curves(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | os.PathLike,
                    title: str = "dev score during training", ylabel: str = "dev accuracy",
                    baseline: str | None = None, dpi: int = 150) -> Path:
    """One line per arm: {arm: (steps, scores)}. ``baseline`` is drawn dashed and black. Returns the path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, (arm, (steps, scores)) in enumerate(curves.items()):
        if arm == baseline:
            ax.plot(steps, scores, "k--", marker="o", ms=3, lw=1.6, label=arm)
        else:
            ax.plot(steps, scores, marker="o", ms=3, lw=1.4, label=arm,
                    color=_METRIC_COLOURS[i % len(_METRIC_COLOURS)])
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path, dpi)
