"""Image augmentation is a function of (seed, epoch, row): a resumed run draws the same crops as the run it
continues, whatever the number of loader workers, and so ends with the same weights."""
import json
from pathlib import Path

import pytest
import torch

from test_engine import tiny
from xmodal.training.engine import MetricsLog, pretrain


def augmenting(manifest, out, workers: int, **train):
    """test_engine.py's tiny towers (no BatchNorm, no dropout) with the image tower's training augmentation (random
    resized crop + flip) on, for 10 steps."""
    cfg = tiny(manifest, out, **{"max_steps": 10, **train})
    cfg.model.towers["image"].augment = True
    cfg.data.num_workers = workers
    return cfg


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_augmentation_joins_the_uninterrupted_run(clipart, tmp_path, monkeypatch, workers):
    # 94 train rows, batch 16: 5 steps an epoch. The crash comes after step 9; the newest checkpoint is step 6, one
    # batch into the second epoch, and the loader had already fetched the batch after it
    from xmodal.data.loader import ManifestDataset
    epochs, real_set_epoch = [], ManifestDataset.set_epoch
    monkeypatch.setattr(ManifestDataset, "set_epoch", lambda self, e: (epochs.append(e), real_set_epoch(self, e)))
    full = pretrain(augmenting(clipart, tmp_path / "full", workers, save_every=3))
    assert sorted(set(epochs)) == [0, 1]  # the dataset hears each epoch (its crops' seed)
    real_write = MetricsLog.write

    def crashing_write(self, record):
        real_write(self, record)
        if record.get("step") == 9:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(MetricsLog, "write", crashing_write)
    cfg = augmenting(clipart, tmp_path / "resumed", workers, save_every=3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    pretrain(cfg, resume=True)

    a, b = losses(full), losses(tmp_path / "resumed")
    assert max(b) == max(a) == 10
    for step in range(1, 11):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    wa, wb = weights(full), weights(tmp_path / "resumed")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)


def test_row_seed_is_splitmix64():
    """The mixer is SplitMix64's: a generator seeded 0 outputs E220A839..., 6E789E6A..., 06C45D18..., F88BB8A8...
    (Vigna's splitmix64.c, the reference seeding of xoshiro), i.e. the mixer at 0, 1, 2, 3 golden-ratio steps."""
    from xmodal.data.loader import _splitmix64, row_seed

    gamma = 0x9E3779B97F4A7C15
    assert [_splitmix64((n * gamma) % 2 ** 64) for n in range(4)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    seeds = {row_seed(s, e, r) for s in (0, 1) for e in range(3) for r in range(1000)}
    assert len(seeds) == 6000 and all(0 <= x < 2 ** 63 for x in seeds)  # distinct, and a valid torch seed
    assert row_seed(0, 1, 2) != row_seed(0, 2, 1)


def _dataset(clipart):
    from xmodal.data.loader import ManifestDataset
    from xmodal.data.manifest import read_manifest
    from xmodal.data.table import Rows
    from xmodal.modalities.image import ImageTransform

    rows = Rows(read_manifest(clipart, split="train").rows.data.slice(0, 16))
    return ManifestDataset(rows, {"image": ImageTransform(32, (0.5,) * 3, (0.5,) * 3, augment=True)}, augment_seed=7)


def _crops(clipart, workers: int, epochs: int) -> list[torch.Tensor]:
    """Each epoch's augmented 32-px crops of the first 16 train rows, in row order (no shuffle), through a DataLoader
    with persistent workers, as training builds it."""
    from functools import partial

    from xmodal.batch import collate

    ds = _dataset(clipart)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=workers, persistent_workers=workers > 0,
                                         collate_fn=partial(collate))
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out.append(torch.cat([b["image"] for b in loader]))
    return out


def test_crops_are_a_function_of_seed_epoch_and_row_not_of_workers(clipart):
    main = _crops(clipart, 0, 3)
    torch.manual_seed(123)  # another global generator state: the crops do not depend on it
    again = _crops(clipart, 0, 3)
    workers = _crops(clipart, 2, 3)  # persistent workers read each epoch as the main process set it
    for epoch in range(3):
        torch.testing.assert_close(again[epoch], main[epoch], atol=0, rtol=0)
        torch.testing.assert_close(workers[epoch], main[epoch], atol=0, rtol=0)
    # new crops each epoch, and for (nearly) every row
    assert not torch.equal(main[0], main[1]) and not torch.equal(main[1], main[2])
    assert ((main[0] - main[1]).flatten(1).abs().amax(1) > 0).float().mean() > 0.8

    ds = _dataset(clipart)
    ds.set_epoch(2)
    before = torch.get_rng_state()
    item = ds[5]["image"]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator (dropout's) is left where it was
    torch.testing.assert_close(item, main[2][5], atol=0, rtol=0)
    ds.augment_seed = None  # without a seed: the global generator's draws, as before
    torch.manual_seed(0)
    a = ds[5]["image"]
    torch.manual_seed(0)
    torch.testing.assert_close(ds[5]["image"], a, atol=0, rtol=0)
    assert not torch.equal(a, item) and not torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_two_processes_draw_the_crops_of_one_process(clipart, tmp_path):
    """With augmentation on, 2 gloo processes of 8 rows each follow the 1-process curve at batch 16 into the second
    epoch (step 6 on): a row's crops depend on (seed, epoch, row) alone, and each process's dataset hears the epoch
    (Accelerate does not pass it to a dataset behind a sharded batch sampler)."""
    from test_engine import launch_two
    from xmodal.config import save_config

    one = pretrain(augmenting(clipart, tmp_path / "one", 0, max_steps=8))
    save_config(augmenting(clipart, tmp_path / "two", 0, max_steps=8, batch_size=8, log_every=2),
                tmp_path / "two.yaml")
    launch_two(tmp_path / "two.yaml")
    a, b = losses(one), losses(tmp_path / "two")
    assert sorted(b) == [2, 4, 6, 8]
    for step in b:  # a 2-process record is the mean over its window of 2 steps
        assert b[step] == pytest.approx((a[step - 1] + a[step]) / 2, abs=1e-4), step


def test_only_rows_with_a_random_transform_are_seeded(clipart, monkeypatch):
    """Seeding costs ~20 µs a row in the main process: a dataset of feature look-ups or unaugmented images skips it;
    an augmenting image transform, or a transform that does not say (a user's), is seeded."""
    import xmodal.data.loader as loader
    from xmodal.data.loader import ManifestDataset
    from xmodal.data.manifest import read_manifest
    from xmodal.data.table import Rows
    from xmodal.feature_cache import CachedFeatures
    from xmodal.modalities.image import ImageTransform

    rows = Rows(read_manifest(clipart, split="train").rows.data.slice(0, 4))
    seeds = []
    real = loader.seeded
    monkeypatch.setattr(loader, "seeded", lambda s: (seeds.append(s), real(s))[1])
    lookup = CachedFeatures({p: i for i, p in enumerate(rows["image"])}, torch.eye(4))
    for transform, random in [(lookup, False), (ImageTransform(32, (0.5,) * 3, (0.5,) * 3, augment=False), False),
                              (ImageTransform(32, (0.5,) * 3, (0.5,) * 3, augment=True), True),
                              (lambda path: torch.zeros(1), True)]:
        seeds.clear()
        ds = ManifestDataset(rows, {"image": transform}, augment_seed=0)
        ds[1]
        assert len(seeds) == int(random), transform
