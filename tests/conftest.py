import os

# Tests never touch the network: no hub look-ups, wandb stays local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def clipart(tmp_path_factory):
    """A small slice of the real Open Clip Art corpus (rendered SVGs with their human-written titles)."""
    from xmodal.data.corpora.openclipart import prepare_openclipart
    return prepare_openclipart(tmp_path_factory.mktemp("clipart"), image_size=48, limit=120, progress=False)
