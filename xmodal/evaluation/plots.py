"""Pictures people would rather look at than read: training curves, confusion matrices, a 2-D map of the space.

``xmodal evaluate --plots`` calls :func:`write_plots`; each figure is a PNG in the run's ``plots/`` folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_MAP_POINTS = 2000  # per modality: a readable scatter, and PCA stays instant


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


BASELINES = {"chance_": "--", "majority_": ":"}  # eval keys drawn as reference lines, with their line style
FEW_POINTS = 30  # a series with at most this many points gets a marker on each (one point alone is no line)


def _markers(n: int) -> dict:
    return {"marker": "o", "markersize": 4 if n > 1 else 6} if n <= FEW_POINTS else {}


def training_curves(metrics_path: Path, out: Path) -> Path | None:
    """Loss (per task) and every eval metric against the step, from ``metrics.jsonl``; series of few points get
    markers, and a zero-shot chance level (``chance_top1``) is a dashed reference line, the majority-class rate
    (``majority_top1``) a dotted one."""
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    series: dict[str, dict[int, float]] = {}
    for rec in records:  # a resumed run repeats steps: the last record of a step wins
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and (key.startswith("loss") or
                                                                       key.startswith("eval/")):
                series.setdefault(key, {})[rec["step"]] = value
    # chance_top1 (1 / n_classes) and majority_top1 (the most frequent class's share) are constants of the eval set,
    # not results: reference lines, not curves
    chances = [k for k in series if k.startswith("eval/") and any(b in k for b in BASELINES)]
    evals = [k for k in series if k.startswith("eval/") and k not in chances
             and any(s in k for s in ("R@10", "top1", "accuracy", "macro_f1", "mae"))]
    losses = [k for k in series if k.startswith("loss")]
    if not losses:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    for k in losses:
        steps = sorted(series[k])
        axes[0, 0].plot(steps, [series[k][s] for s in steps], label=k, **_markers(len(steps)))
    axes[0, 0].set(xlabel="step", ylabel="training loss", title="training loss")
    axes[0, 0].legend(fontsize=8)
    if evals:
        for k in evals:
            steps = sorted(series[k])
            axes[0, 1].plot(steps, [series[k][s] for s in steps], marker="o", label=k.removeprefix("eval/"))
        for k in chances:
            base = next(b for b in BASELINES if b in k)
            if k.replace(base, "") in evals:  # the baseline of a plotted top-1 curve
                level = series[k][max(series[k])]
                axes[0, 1].axhline(level, color="grey", linestyle=BASELINES[base], linewidth=1,
                                   label=f"{base.rstrip('_')}: {k.removeprefix('eval/')} = {level:.3g}")
        axes[0, 1].set(xlabel="step", title="held-out metrics")
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def confusion_plot(matrix: torch.Tensor, classes: list[str], title: str, out: Path) -> Path:
    """Row-normalised confusion matrix (true class per row), counts written in the cells."""
    plt = _pyplot()
    n = len(classes)
    norm = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def space_map(embeddings: dict[str, torch.Tensor], labels: dict[str, list] | None, out: Path) -> Path:
    """PCA of the shared space to 2-D (one projection for all modalities, so they are comparable): left coloured
    by modality, right by label."""
    plt = _pyplot()
    names = list(embeddings)
    all_x = torch.cat([embeddings[m] for m in names])
    mean = all_x.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(all_x - mean, q=2, center=False)
    classes = sorted({str(y) for ys in labels.values() for y in ys}) if labels else []
    legend_cols = -(-len(classes) // LEGEND_ROWS) if len(classes) <= len(label_colours()) else 0
    fig, axes = plt.subplots(1, 2 if labels else 1, figsize=(12 + 1.6 * legend_cols if labels else 6, 5),
                             squeeze=False)
    for m in names:
        xy = (embeddings[m] - mean) @ v
        axes[0, 0].scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5, label=m)
    axes[0, 0].set(title="shared space (PCA) by modality")
    axes[0, 0].legend(markerscale=3)
    if labels:
        _label_panel(axes[0, 1], {m: (embeddings[m] - mean) @ v for m in names}, labels, classes, legend_cols)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


LEGEND_ROWS = 20  # legend entries per column, beside the panel


def label_colours() -> list:
    """60 distinct colours (matplotlib's tab20, tab20b, tab20c): one per label up to 60 labels."""
    plt = _pyplot()
    return [plt.get_cmap(name)(i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]


def _label_panel(ax, xy: dict[str, torch.Tensor], labels: dict[str, list], classes: list[str], legend_cols: int):
    """Points coloured by label, marker by modality. Up to 60 labels each has its own colour and a legend entry
    (beside the panel, 20 a column); with more, colours repeat, so the 20 largest labels are written at their
    points' centroid instead."""
    colours = label_colours()
    markers = "os^D"
    for i, (m, points) in enumerate(xy.items()):
        c = [colours[classes.index(str(y)) % len(colours)] for y in labels[m]]
        ax.scatter(points[:, 0], points[:, 1], s=5, alpha=0.6, c=c, marker=markers[i % len(markers)])
    ax.set(title=f"by label ({len(classes)}; marker = modality)")
    if legend_cols:
        for j, c in enumerate(classes):
            ax.scatter([], [], color=colours[j], label=c, s=10)
        ax.legend(fontsize=7, ncol=legend_cols, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  markerscale=1.5)
        return
    everything = torch.cat(list(xy.values()))
    every_label = [str(y) for m in xy for y in labels[m]]
    for c in sorted(classes, key=every_label.count, reverse=True)[:LEGEND_ROWS]:
        centre = everything[[i for i, y in enumerate(every_label) if y == c]].mean(0)
        ax.annotate(c, (float(centre[0]), float(centre[1])), fontsize=7, ha="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})


def recall_matrix(results: dict[str, float], out: Path, k: int = 10) -> Path | None:
    """Query modality × gallery modality heat map of Recall@k (chance, k / gallery size, in each cell): every
    direction at a glance, including pairs never trained together (emergent alignment)."""
    pairs = {tuple(key.split("/")[0].split("->")): v for key, v in results.items() if key.endswith(f"/R@{k}")}
    if not pairs:
        return None
    mods = sorted({m for pair in pairs for m in pair})
    plt = _pyplot()
    grid = torch.full((len(mods), len(mods)), float("nan"))
    for (a, b), v in pairs.items():
        grid[mods.index(a), mods.index(b)] = v
    fig, ax = plt.subplots(figsize=(1.6 * len(mods) + 2, 1.4 * len(mods) + 1.2))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis")
    for (a, b), v in pairs.items():
        items = results.get(f"{a}->{b}/n_items")
        chance = f"\nchance {min(1.0, k / items):.3f}" if items else ""
        ax.text(mods.index(b), mods.index(a), f"{v:.3f}{chance}", ha="center", va="center", fontsize=8,
                color="white" if v < 0.6 else "black")
    ax.set(xticks=range(len(mods)), xticklabels=mods, yticks=range(len(mods)), yticklabels=mods,
           xlabel="gallery", ylabel="query", title=f"Recall@{k}, every direction")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _shared_space_map(model, dataset, embedded: dict | None, out: Path) -> Path | None:
    """:func:`space_map` of the data's modality columns (at most ``MAX_MAP_POINTS`` each), coloured by ``label`` when
    the data has one; reuses the ``embedded`` values."""
    embeddings, labels = {}, {}
    for m in model.modalities:
        if m not in dataset.column_names:
            continue
        rows = [i for i, v in enumerate(dataset[m]) if v not in (None, "")][:MAX_MAP_POINTS]
        if rows:
            values = [dataset[m][i] for i in rows]
            known, emb = (embedded or {}).get(m, ((), None))
            at = {v: j for j, v in enumerate(known)}
            reuse = emb is not None and all(v in at for v in values)
            embeddings[m] = emb[[at[v] for v in values]] if reuse else model.encode(m, values)
            if "label" in dataset.column_names:
                labels[m] = [dataset["label"][i] for i in rows]
    if not embeddings:
        return None
    return space_map(embeddings, labels if len(labels) == len(embeddings) else None, out)


def write_plots(run_dir: str | Path, model, dataset, out_dir: Path, results: dict | None = None,
                embedded: dict | None = None, *, tasks: dict | None = None, shared_space: bool = True) -> list[Path]:
    """Every plot that applies: curves (from the run), confusion matrices, the 2-D map (modality columns of the data,
    with ``label`` when present), and with evaluation ``results`` holding retrieval figures, the Recall@10 matrix of
    every direction. ``embedded``: ``{modality: (values, embeddings)}`` already computed (by
    :func:`xmodal.evaluate.evaluate`), reused for the map.

    ``tasks``: ``{head: its rows}`` to draw confusion matrices for (its classification heads; ``xmodal evaluate``
    passes the heads it evaluated, on the rows it evaluated them on); default: each classification head whose target
    and one of whose input columns the data has. ``shared_space=False`` leaves out the map (a ``--task`` evaluation
    is about one head)."""
    from .evaluate import predict_outputs
    from .metrics import confusion_matrix
    from ..tasks.head import targets

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [training_curves(Path(run_dir) / "metrics.jsonl", out_dir / "training_curves.png")]
    cols = dataset.column_names
    if tasks is None:
        tasks = {name: dataset for name, cfg in model.tasks.items() if name in model.heads and cfg.target in cols
                 and any(m in cols for m in cfg.modalities)}
    for name, rows in tasks.items():
        cfg = model.tasks[name]
        if cfg.kind == "classification":
            pred = model.heads[name].predict(predict_outputs(model, name, rows))
            cm = confusion_matrix(pred, targets(cfg, rows[cfg.target]), len(cfg.classes))
            written.append(confusion_plot(cm, cfg.classes, f"{name}: confusion", out_dir / f"confusion_{name}.png"))
    if shared_space:
        written.append(_shared_space_map(model, dataset, embedded, out_dir / "space_map.png"))
    if results:
        written.append(recall_matrix(results, out_dir / "recall_matrix.png"))
    return [p for p in written if p is not None]
