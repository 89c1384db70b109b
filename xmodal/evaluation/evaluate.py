"""Evaluate a shared space on a manifest: cross-modal Recall@K both ways, and CLIP-style zero-shot classification."""
from __future__ import annotations

from collections import Counter
from itertools import permutations
from typing import Sequence

import torch

from ..retrieval.hubness import Hubness, hub_penalty
from .metrics import rank_summary, retrieval_ranks, topk_accuracy

# A few of CLIP's generic ImageNet prompt templates (Radford et al. 2021, open_clip zero_shot_metadata); generic on
# purpose: they must work on data we have never seen, not only on the bundled sets.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a rendering of a {}.",
    "{}.",
)


def _present(values: Sequence) -> list[int]:
    return [i for i, v in enumerate(values) if v is not None and v != ""]


def evaluate_retrieval(model, dataset, modalities: Sequence[str] | None = None, batch_size: int = 64,
                       progress: bool = False, *, embedded: dict | None = None,
                       dims: Sequence[int] | None = None, hubness: Hubness | None = None,
                       banks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Recall@1/5/10, median and mean rank for every ordered pair of modalities (``"text->image/R@1"``, ...).

    ``dims`` (default: the model's ``matryoshka_dims``): the same again for each prefix of the embeddings, truncated
    and renormalised as ``model.encode(..., dim=)`` does (``"text->image@64/R@1"``, ...).

    Each distinct value (image path, caption) is embedded once and is one query or gallery item; its positives are
    the values it shares a row with — so five captions of one image all count as that image's positives.
    ``embedded``: a dict that receives ``{modality: (distinct values, their embeddings)}``, for reuse (zero-shot in
    :func:`evaluate` classifies the same inputs).

    ``hubness`` (with ``banks``: each query modality's query bank, e.g. its training split's embeddings): rank by
    the hubness-reduced score (:mod:`xmodal.retrieval.hubness`) instead of the plain similarity.
    """
    modalities = [m for m in (modalities or model.modalities) if m in dataset.column_names and m in model.towers]
    cols = {m: dataset[m] for m in modalities}
    uniq, inverse, emb = {}, {}, {}
    for m in modalities:
        values = cols[m]
        index: dict = {}
        inverse[m] = [index.setdefault(v, len(index)) if v not in (None, "") else -1 for v in values]
        uniq[m] = list(index)
    paired = {m for a, b in permutations(modalities, 2) if any(qa >= 0 and ib >= 0 for qa, ib in
                                                              zip(inverse[a], inverse[b])) for m in (a, b)}
    for m in modalities:
        if m in paired:  # a modality that shares no row with another has nothing to retrieve: not embedded
            emb[m] = model.encode(m, uniq[m], batch_size=batch_size, progress=progress)
            if embedded is not None:
                embedded[m] = (uniq[m], emb[m])
    results: dict[str, float] = {}
    full = getattr(getattr(model, "cfg", None), "embed_dim", None)
    dims = getattr(getattr(model, "cfg", None), "matryoshka_dims", None) if dims is None else dims
    for d in [None, *[d for d in (dims or []) if d != full]]:
        e = emb if d is None else {m: torch.nn.functional.normalize(x[:, :d], dim=-1) for m, x in emb.items()}
        for a, b in permutations(modalities, 2):
            pairs = {(qa, ib) for qa, ib in zip(inverse[a], inverse[b]) if qa >= 0 and ib >= 0}
            if not pairs:
                continue
            pos = torch.tensor(sorted(pairs), dtype=torch.long).T
            queries = torch.unique(pos[0])  # only values that have a partner in modality b are queries
            remap = torch.full((len(uniq[a]),), -1, dtype=torch.long)
            remap[queries] = torch.arange(len(queries))
            penalty = None
            if hubness is not None and hubness.method != "none":
                if not banks or a not in banks:
                    raise ValueError(f"hubness {hubness.method}: no query bank of {a} embeddings")
                bank = banks[a] if d is None else torch.nn.functional.normalize(banks[a][:, :d], dim=-1)
                penalty = hub_penalty(bank, e[b], hubness)
            ranks = retrieval_ranks(e[a][queries], e[b], torch.stack([remap[pos[0]], pos[1]]),
                                    item_penalty=penalty)
            name = f"{a}->{b}" if d is None else f"{a}->{b}@{d}"
            for key, value in rank_summary(ranks).items():
                results[f"{name}/{key}"] = value
            results[f"{name}/n_queries"] = float(len(queries))
            results[f"{name}/n_items"] = float(len(uniq[b]))
    return results


def query_banks(model, dataset, modalities: Sequence[str] | None = None, batch_size: int = 64,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """Each modality's query bank for hubness reduction: the embeddings of its distinct values in ``dataset``
    (the training rows: queries like those the model will be asked, none of them an evaluation query)."""
    modalities = [m for m in (modalities or model.modalities) if m in dataset.column_names and m in model.towers]
    return {m: model.encode(m, list(dict.fromkeys(v for v in dataset[m] if v not in (None, ""))),
                            batch_size=batch_size, progress=progress) for m in modalities}


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The prompt templates, each checked to hold exactly one ``{}`` (where the class name goes)."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise ValueError("templates: at least one prompt template is needed, e.g. 'a photo of a {}.'")
    for t in templates:
        try:
            ok = t.count("{}") == 1 and t.format("x") is not None
        except (IndexError, KeyError, ValueError):  # other braces: '{0}', '{name}', a lone '{'
            ok = False
        if not ok:
            raise ValueError(f"template {t!r}: needs exactly one {{}} where the class name goes (and no other "
                             f"braces), e.g. 'a photo of a {{}}.'")
    return templates


@torch.inference_mode()
def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES,
                         batch_size: int = 256) -> torch.Tensor:
    """Class weights ``[embed_dim, n_classes]`` from prompts: each class's template embeddings averaged and
    re-normalised (prompt ensembling, Radford et al. 2021 §3.1.4; open_clip ``build_zero_shot_classifier``)."""
    templates = check_templates(templates)
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = model.encode("text", prompts, batch_size=batch_size)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).T


def evaluate_zero_shot(model, dataset, modality: str = "image", label_column: str = "label",
                       templates: Sequence[str] = PROMPT_TEMPLATES, batch_size: int = 64,
                       progress: bool = False, embedded: tuple[list, torch.Tensor] | None = None) -> dict[str, float]:
    """Accuracy of classifying ``modality`` inputs (any modality, text too) into the label column's class names by
    text prompts: ``top1``, ``top5`` (only with more than 5 classes: with 5 or fewer it is 1 by construction),
    ``n_classes``, and two baselines: ``chance_top1`` (1 / classes) and ``majority_top1`` (always answering the most
    frequent class of these rows, which imbalanced data makes far higher than chance).

    ``embedded``: ``(values, embeddings)`` already computed for this modality (by :func:`evaluate_retrieval`); used
    when it covers every input, else the inputs are embedded here."""
    rows = _present(dataset[modality])
    labels = [dataset[label_column][i] for i in rows]
    rows = [r for r, y in zip(rows, labels) if y not in (None, "")]
    labels = [str(dataset[label_column][i]) for i in rows]
    classnames = sorted(set(labels))
    if len(classnames) < 2:
        return {}
    weights = zero_shot_classifier(model, classnames, templates)
    inputs = [dataset[modality][i] for i in rows]
    feats = None
    if embedded is not None:
        try:
            position = {v: j for j, v in enumerate(embedded[0])}
            picked = [position.get(v) for v in inputs]
        except TypeError:  # unhashable values (decoded images): embed them here
            picked = [None]
        if None not in picked:
            feats = embedded[1][torch.tensor(picked, dtype=torch.long)]
    if feats is None:
        feats = model.encode(modality, inputs, batch_size=batch_size, progress=progress)
    targets = torch.tensor([classnames.index(y) for y in labels])
    acc = topk_accuracy(feats @ weights, targets, ks=(1, 5) if len(classnames) > 5 else (1,))
    out = {f"zero_shot/{k}": v for k, v in acc.items()}
    out["zero_shot/n_classes"] = float(len(classnames))
    out["zero_shot/chance_top1"] = 1.0 / len(classnames)
    out["zero_shot/majority_top1"] = max(Counter(labels).values()) / len(labels)
    return out


def default_zero_shot_modalities(model, dataset) -> list[str]:
    """The modalities :func:`evaluate` classifies zero-shot by default: the run's non-text modalities that the data
    has values for; text itself only when the data has no other (text prompts against text inputs, e.g. reviews)."""
    if "text" not in model.towers:  # the prompts are text
        return []
    have = [m for m in model.modalities if m in dataset.column_names and m in model.towers and _present(dataset[m])]
    return [m for m in have if m != "text"] or [m for m in have if m == "text"]


def evaluate(model, dataset, zero_shot: bool = True, batch_size: int = 64, progress: bool = False,
             embedded: dict | None = None, *, label_column: str = "label",
             templates: Sequence[str] = PROMPT_TEMPLATES,
             zero_shot_modalities: Sequence[str] | None = None, hubness: Hubness | None = None,
             banks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Everything that applies to this dataset: retrieval between its modality columns, and zero-shot
    classification (``zero_shot/<modality>/...``, see :func:`evaluate_zero_shot`) into ``label_column``'s classes by
    ``templates``, of ``zero_shot_modalities`` (default: :func:`default_zero_shot_modalities`).
    ``embedded``: a dict that receives ``{modality: (distinct values, their embeddings)}`` (for the plots).
    ``hubness``, ``banks``: hubness reduction of the retrieval rankings (see :func:`evaluate_retrieval`)."""
    embedded = {} if embedded is None else embedded  # each modality's values embedded once, for everything
    results = evaluate_retrieval(model, dataset, batch_size=batch_size, progress=progress, embedded=embedded,
                                 hubness=hubness, banks=banks)
    if zero_shot and label_column in dataset.column_names and "text" in model.towers:
        mods = default_zero_shot_modalities(model, dataset) if zero_shot_modalities is None else zero_shot_modalities
        for m in mods:
            results.update({k.replace("zero_shot/", f"zero_shot/{m}/"): v for k, v in
                            evaluate_zero_shot(model, dataset, m, label_column, templates, batch_size=batch_size,
                                               progress=progress, embedded=embedded.get(m)).items()})
    return results


# ---------------------------------------------------------------------------------------------------- task heads

def predict_outputs(model, task: str, dataset, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Head outputs (logits or scores) for every row of ``dataset``, from the task's input modalities."""
    head = model.heads[task]
    inputs = {m: dataset[m] for m in head.modalities if m in dataset.column_names}
    if not inputs:
        raise ValueError(f"task {task}: the data has none of its input columns {head.modalities}")
    return model.predict(task, inputs, batch_size=batch_size, progress=progress)


def evaluate_task(model, task: str, dataset, batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """Held-out metrics of a head: accuracy and macro-F1 (classification), micro/macro-F1 and mAP (multi-label), MAE, RMSE
    Pearson r and R² (regression)."""
    from .metrics import classification_metrics, multilabel_metrics, regression_metrics
    from ..tasks.head import targets

    cfg = model.tasks[task]
    outputs = predict_outputs(model, task, dataset, batch_size, progress)
    y = targets(cfg, dataset[cfg.target], f"task {task}: ")
    pred = model.heads[task].predict(outputs)
    if cfg.kind == "regression":
        return regression_metrics(pred, y)
    if cfg.kind == "multilabel":
        return multilabel_metrics(pred, y.bool(), scores=outputs)
    return classification_metrics(pred, y, len(cfg.classes))
