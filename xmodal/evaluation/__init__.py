"""Evaluation: metrics, evaluating a model on a manifest, evaluating a built index, and plots.

* :mod:`.metrics`: Recall@K, ranks, accuracy, F1, mAP, regression metrics — plain functions on tensors;
* :mod:`.evaluate`: retrieval, zero-shot and head metrics of a model over a manifest;
* :mod:`.index_eval`: Recall@K / mAP of a built index through its search;
* :mod:`.plots`: training curves, confusion matrices, space maps, recall matrices.
"""
