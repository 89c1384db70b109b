"""Modality dropout hides (row, modality) pairs at rate p, never a row's last modality, keeping tensors and masks
aligned; a linear probe of the shared space (frozen projections) trains only its head."""
import pytest
import torch

from xmodal.config import ConfigError, config_from_dict
from xmodal.batch import drop_modalities


def batch(n=4000, image_missing_every=5):
    """Row i's features hold i, so which rows survive can be read back from the tensors."""
    rows = torch.arange(n, dtype=torch.float32)
    has_image = torch.tensor([i % image_missing_every != 0 for i in range(n)])
    return {"image:features": rows[has_image][:, None].repeat(1, 3), "image:mask": has_image,
            "text": rows[:, None].repeat(1, 2), "label": ["x"] * n}


def test_rates_alignment_and_at_least_one_modality_per_row():
    torch.manual_seed(0)
    b = batch()
    out = drop_modalities(b, ["image", "text"], p=0.3)
    img, txt = out["image:mask"], out["text:mask"]
    assert (img | txt).all()  # every row keeps something
    assert not (img & ~b["image:mask"]).any()  # nothing absent comes back
    both = b["image:mask"]
    # Rows with both: each dropped w.p. 0.3, but a row losing both gets one back -> P(kept) = 0.7 + 0.09/2.
    assert img[both].float().mean().item() == pytest.approx(0.745, abs=0.025)
    assert txt[both].float().mean().item() == pytest.approx(0.745, abs=0.025)
    assert txt[~both].all()  # text is the only modality of image-less rows: never dropped
    torch.testing.assert_close(out["image:features"][:, 0], torch.nonzero(img).flatten().float())
    torch.testing.assert_close(out["text"][:, 0], torch.nonzero(txt).flatten().float())
    assert out["label"] is b["label"]


def test_p_zero_changes_nothing_and_one_modality_is_left_alone():
    b = batch(50)
    out = drop_modalities(b, ["image", "text"], p=0.0)
    assert torch.equal(out["image:features"], b["image:features"]) and out["text:mask"].all()
    assert drop_modalities({"text": b["text"]}, ["image", "text"], p=0.9) == {"text": b["text"]}


def test_config_rejects_modality_dropout_where_it_cannot_apply():
    towers = {"image": {"kind": "cnn"}, "text": {"kind": "lstm"}}
    base = {"model": {"towers": towers}}
    with pytest.raises(ConfigError, match=r"tasks.t.modality_dropout: must be in \[0, 1\)"):
        config_from_dict({**base, "tasks": {"t": {"kind": "classification", "modalities": ["image", "text"],
                                                  "modality_dropout": 1.0}}})
    with pytest.raises(ConfigError, match="tasks.t.modality_dropout: applies to heads over several"):
        config_from_dict({**base, "tasks": {"t": {"kind": "classification", "modalities": ["text"],
                                                  "modality_dropout": 0.2}}})
