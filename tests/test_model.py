import json
import math
import os

import numpy as np
import pytest

import torch
from PIL import Image

import xmodal
from xmodal.config import ModelConfig, TowerConfig
from xmodal.model import XModalModel


def small(loss="clip", freeze=False):
    return ModelConfig(embed_dim=16, loss=loss, towers={
        "image": TowerConfig(kind="cnn", image_size=32, freeze=freeze, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, projection="mlp",
                            options={"embed_dim": 16, "hidden": 16})})


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(str(p))
    return paths


def test_encode_is_normalised_and_keeps_input_order(images):
    torch.manual_seed(0)
    model = XModalModel(small()).eval()
    texts = ["a much longer caption about a red square", "red", "a green thing", ""]
    batch = model.encode("text", texts, batch_size=3)
    one_by_one = torch.cat([model.encode("text", [t]) for t in texts])
    assert batch.dtype == torch.float32 and batch.shape == (4, 16)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(batch, one_by_one, atol=1e-5, rtol=0)
    img = model.encode_image(images + [Image.open(images[0])])
    torch.testing.assert_close(img[0], img[3])  # a path and the same PIL image embed alike
    assert not model.training


def test_save_load_roundtrip(tmp_path, images):
    torch.manual_seed(0)
    model = XModalModel(small(loss="siglip"))
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    model.save(tmp_path / "run", extra={"step": 7})
    loaded = xmodal.load(tmp_path / "run")
    assert loaded.card["step"] == 7 and loaded.logit_bias.item() == -3.5
    torch.testing.assert_close(loaded.encode("image", images), model.encode("image", images))
    torch.testing.assert_close(loaded.encode("text", ["x y z"]), model.encode("text", ["x y z"]))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())


def test_saved_weights_are_as_readable_as_the_other_run_files(tmp_path):
    """safetensors writes owner-only files (0600); a run's weights get the umask's mode, as its card does."""
    old = os.umask(0o022)
    try:
        XModalModel(small()).save(tmp_path / "run")
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "model.json").stat().st_mode & 0o777 == 0o644


def test_load_reads_0d_scalars_of_older_files(tmp_path):
    """Learnable scalars are 1-element 1-D now (FSDP2 cannot shard 0-d parameters); files saved before hold 0-d."""
    from safetensors.torch import load_file, save_file
    model = XModalModel(small(loss="siglip"))
    model.save(tmp_path / "run")
    w = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert w["logit_scale"].shape == (1,) and w["logit_bias"].shape == (1,)
    save_file({k: v.reshape(()) if k.startswith("logit_") else v for k, v in w.items()},
              str(tmp_path / "run" / "model.safetensors"))
    _card_without_checksums(tmp_path / "run")
    loaded = xmodal.load(tmp_path / "run")
    assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.item() == pytest.approx(model.logit_scale.item())
    assert loaded.logit_bias.item() == -10.0
    assert loaded(dict(text=torch.zeros(1, 8, dtype=torch.long)))["logit_scale"].shape == ()


def _card_without_checksums(run):
    """The card as versions before checksums wrote it (no "files", no "checksum"), to go with weights of then."""
    card = json.loads((run / "model.json").read_text())
    del card["files"], card["checksum"]
    (run / "model.json").write_text(json.dumps(card))


def test_load_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an xmodal model folder"):
        xmodal.load(tmp_path)


def test_frozen_encoder_stays_in_eval_and_out_of_the_graph():
    model = XModalModel(small(freeze=True))
    model.train()
    tower = model.towers["image"]
    assert not tower.encoder.training and tower.projection.training
    assert all(not p.requires_grad for p in tower.encoder.parameters())
    out = model({"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 100, (2, 16))})
    out["image"].sum().backward()
    assert all(p.grad is None for p in tower.encoder.parameters())
    assert tower.projection.weight.grad is not None


def test_forward_on_cached_features_equals_full_forward():
    model = XModalModel(small()).eval()
    x = torch.randn(3, 3, 32, 32)
    feats = model.towers["image"].encoder(x)
    torch.testing.assert_close(model({"image:features": feats})["image"], model({"image": x})["image"])


def test_logit_scale_init_and_clamp():
    clip, sig = XModalModel(small("clip")), XModalModel(small("siglip"))
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert sig.logit_scale.item() == pytest.approx(math.log(10)) and sig.logit_bias.item() == -10
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    clip.clamp_logit_scale()
    assert clip.logit_scale.exp().item() == pytest.approx(100.0)


def test_an_index_of_an_older_format_run_accepts_the_model_loaded_from_it(tmp_path):
    """A run saved with 0-d scalars (before they became 1-element) re-serialises to other bytes once loaded, so its
    in-memory sha256 differs from the file's: the retriever must still accept the very model loaded from that file
    (same tensors), and refuse one whose weights changed."""
    import datasets
    from safetensors.torch import load_file, save_file

    from xmodal.retrieval import FingerprintMismatchError
    from xmodal.retrieval.retriever import Retriever, build_index

    run = XModalModel(small()).save(tmp_path / "run")
    w = load_file(str(run / "model.safetensors"))
    save_file({k: v.reshape(()) if k.startswith("logit_") else v for k, v in w.items()}, str(run / "model.safetensors"))
    _card_without_checksums(run)
    ds = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "text": ["a red square", "a green one", "blue"]})
    model = xmodal.load(run)
    build_index(model, ds, "text", tmp_path / "idx", run_dir=run, progress=False)
    hits = Retriever(tmp_path / "idx", model=model).search("a green one", "text", k=1)
    assert hits[0].metadata["id"] == "b"
    with torch.no_grad():
        model.towers["text"].projection[0].weight.add_(1e-3)  # changed after loading: another space
    with pytest.raises(FingerprintMismatchError):
        Retriever(tmp_path / "idx", model=model)


def _regression_model():
    from xmodal.config import TaskConfig
    from xmodal.tasks.heads import RegressionHead
    torch.manual_seed(0)
    model = XModalModel(small(), {"score": TaskConfig(kind="regression", modalities=["text"]),
                                  "late": TaskConfig(kind="regression", modalities=["image", "text"], fusion="late")})
    leaves = [m for m in model.heads.modules() if isinstance(m, RegressionHead)]
    assert len(leaves) == 3  # one head, and one per modality under late fusion
    for i, head in enumerate(leaves):
        head.fit_target_scale(torch.tensor([40.0, 80.0]) + i)  # mean 60 + i, std 20
    return model.eval(), leaves


def test_regression_target_scale_survives_save_and_load(tmp_path, images):
    model, leaves = _regression_model()
    model.save(tmp_path / "run")
    loaded = xmodal.load(tmp_path / "run")
    from xmodal.tasks.heads import RegressionHead
    got = [m for m in loaded.heads.modules() if isinstance(m, RegressionHead)]
    assert [(h.target_mean.item(), h.target_std.item()) for h in got] == [(60.0 + i, 20.0) for i in range(3)]
    texts = ["a red square", "green"]
    torch.testing.assert_close(loaded.predict("score", {"text": texts}), model.predict("score", {"text": texts}))
    inputs = {"image": images[:2], "text": texts}
    torch.testing.assert_close(loaded.predict("late", inputs), model.predict("late", inputs))


def test_regression_head_saved_before_target_scaling_loads_unscaled(tmp_path, images):
    """A file without target_mean/target_std (saved before they existed) loads with 0/1 and predicts what it did:
    the raw output of its layers."""
    from safetensors.torch import load_file, save_file
    model, leaves = _regression_model()
    model.save(tmp_path / "run")
    path = tmp_path / "run" / "model.safetensors"
    w = load_file(str(path))
    assert sum(k.endswith(("target_mean", "target_std")) for k in w) == 6
    save_file({k: v for k, v in w.items() if not k.endswith(("target_mean", "target_std"))}, str(path))
    _card_without_checksums(tmp_path / "run")
    loaded = xmodal.load(tmp_path / "run")
    from xmodal.tasks.heads import RegressionHead
    assert all((h.target_mean.item(), h.target_std.item()) == (0.0, 1.0)
               for h in loaded.heads.modules() if isinstance(h, RegressionHead))
    texts = ["a red square", "green"]
    scaled = model.predict("score", {"text": texts})
    torch.testing.assert_close(loaded.predict("score", {"text": texts}), (scaled - 60.0) / 20.0)


def test_the_weights_are_hashed_from_the_tensors_loaded_not_read_twice(tmp_path, monkeypatch):
    """Loading checks the weights' XXH3-128 from the tensors safetensors mapped (the file read once): that digest is
    the file's own (xxhash over its bytes), anything not mapped from the file gets None (the file is hashed
    instead), and a normal load never hashes the file separately."""
    import xxhash
    from safetensors.torch import load_file

    from xmodal import integrity
    torch.manual_seed(0)
    model = XModalModel(small(loss="siglip"))
    model.save(tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    tensors = load_file(str(weights))
    assert integrity.mapped_safetensors_digest(weights, tensors) == xxhash.xxh3_128(weights.read_bytes()).hexdigest()
    assert integrity.mapped_safetensors_digest(weights, {k: v.clone() for k, v in tensors.items()}) is None
    del tensors

    def no_second_read(*a, **k):
        raise AssertionError("the weights were hashed in a second pass over the file")
    monkeypatch.setattr(integrity, "digest_file", no_second_read)
    loaded = xmodal.load(tmp_path / "run")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    one_tower = XModalModel.from_pretrained(tmp_path / "run", towers=["text"]).state_dict()
    assert one_tower and all(k.startswith("towers.text.") or "towers." not in k for k in one_tower)
    for k, v in one_tower.items():
        assert torch.equal(v, model.state_dict()[k]), k


@pytest.mark.parametrize("size", [0, 1, 3 * 4096 - 1, 3 * 4096, 3 * 4096 + 5])
def test_files_are_hashed_a_window_at_a_time(tmp_path, monkeypatch, size):
    """digest_file maps at most ``_WINDOW`` bytes at once (mapped pages count in the resident set), and the windows
    give the checksum of the whole file (xxhash / hashlib over its bytes read plainly)."""
    import hashlib
    import mmap

    import xxhash

    from xmodal import integrity
    monkeypatch.setattr(integrity, "_WINDOW", mmap.ALLOCATIONGRANULARITY)  # 4 KiB on Linux: several windows
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    lengths = []
    real_mmap = mmap.mmap

    def recording(fileno, length, *a, **k):
        lengths.append(length)
        return real_mmap(fileno, length, *a, **k)
    monkeypatch.setattr(integrity.mmap, "mmap", recording)
    assert integrity.digest_file(path) == xxhash.xxh3_128(data).hexdigest()
    assert integrity.digest_file(path, "sha256") == hashlib.sha256(data).hexdigest()
    assert all(0 < n <= mmap.ALLOCATIONGRANULARITY for n in lengths)
    assert sum(lengths) == 2 * size


def test_load_says_when_the_model_folder_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an xmodal model folder: no such file or folder"):
        xmodal.load(tmp_path / "runs" / "typo")
