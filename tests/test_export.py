"""``xmodal export --format hf``: a run fine-tuned from an open_clip checkpoint / a transformers CLIP folder becomes
a hub folder that open_clip / transformers load themselves and ``xmodal.load("hf-hub:ORG/NAME")`` reads back
through a local Hugging Face cache, all with the run's own embeddings; the card carries the run's metrics."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image

import _peer_models as peers
import xmodal
from xmodal.cli import main
from xmodal.data import read_manifest

torch.set_num_threads(2)
TEXTS = ["a red fire truck", "an owl on a branch", "a smiling sun"]


def _train(tmp_path, clipart, pretrained, **train):
    cfg = {"output_dir": str(tmp_path / "run"), "seed": 0, "model": {"pretrained": pretrained},
           "data": {"train": str(clipart), "train_split": "train", "eval_split": "test", "max_rows": 40},
           "train": {"batch_size": 8, "max_steps": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False, **train},
           "log": {"backend": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    return tmp_path / "run"


def _to_cache(folder, cache, repo):
    snap = peers.hub_snapshot(cache, repo)
    shutil.copytree(folder, snap, dirs_exist_ok=True)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _images(clipart, n=4):
    return list(read_manifest(clipart, split="test").dataset["image"][:n])


def test_open_clip_run_exports_for_open_clip_and_reads_back_from_the_hub(tmp_path, clipart, hub_cache):
    import open_clip

    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    run = _train(tmp_path, clipart, {"library": "open_clip", "name": peers.OPEN_CLIP_NAME, "weights": str(ckpt),
                                     "freeze": ["image"]})
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--repo", "xmodal-test/lit",
                 "--license", "mit"]) == 0
    assert {"README.md", "open_clip_config.json", "open_clip_model.safetensors", "xmodal"} <= {
        p.name for p in out.iterdir()}
    trained = xmodal.load(run)
    images = _images(clipart)
    want_img, want_txt = trained.encode("image", images), trained.encode("text", TEXTS)

    # the model card: hub metadata from the run (its data, its final evaluation's metrics, the licence)
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "open_clip"
    assert meta["datasets"] == [clipart.parent.name]
    results = meta["model-index"][0]["results"][0]
    assert meta["model-index"][0]["name"] == "lit"
    got = {m["type"]: m["value"] for m in results["metrics"]}
    assert got and all(abs(got[k] - v) < 1e-6 for k, v in trained.card["eval"].items() if k in got)
    assert set(got) == {k for k in trained.card["eval"] if not k.rpartition("/")[2].startswith("n_")}
    assert "text->image/R@1" in got and "base_model" not in meta  # started from a local checkpoint, not a hub repo

    _to_cache(out, hub_cache, "xmodal-test/lit")
    ref, _, preprocess = open_clip.create_model_and_transforms("hf-hub:xmodal-test/lit")
    tok = open_clip.get_tokenizer("hf-hub:xmodal-test/lit")
    with torch.no_grad():
        ref_img = ref.eval().encode_image(torch.stack([preprocess(Image.open(p)) for p in images]), normalize=True)
        ref_txt = ref.encode_text(tok(TEXTS), normalize=True)
    torch.testing.assert_close(ref_img, want_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_txt, want_txt, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.isclose(ref.logit_scale.exp(), trained({})["logit_scale"])

    back = xmodal.load("hf-hub:xmodal-test/lit")
    assert back.cfg.towers["image"].name == "hf-hub:xmodal-test/lit"
    assert torch.equal(back.encode("image", images), want_img) and torch.equal(back.encode("text", TEXTS), want_txt)


def test_transformers_run_exports_for_transformers_and_reads_back(tmp_path, clipart, hub_cache):
    from transformers import AutoModel, AutoTokenizer

    folder = peers.hf_clip_folder(tmp_path / "clip")
    run = _train(tmp_path, clipart, {"library": "transformers", "name": str(folder)}, encoder_lr=1e-4)
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--repo", "xmodal-test/ft-clip"]) == 0
    trained = xmodal.load(run)
    want = trained.encode("text", TEXTS)
    src = AutoModel.from_pretrained(folder).eval()
    ref, tok = AutoModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        feats = ref.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt")).pooler_output
        assert not torch.equal(ref.text_projection.weight, src.text_projection.weight)  # it is the fine-tuned one
    torch.testing.assert_close(torch.nn.functional.normalize(feats, dim=-1), want, atol=1e-5, rtol=1e-5)
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert meta["library_name"] == "transformers" and meta["license"] == "other"

    _to_cache(out, hub_cache, "xmodal-test/ft-clip")
    back = xmodal.load("hf-hub:xmodal-test/ft-clip")
    assert torch.equal(back.encode("text", TEXTS), want)
    images = _images(clipart)
    assert torch.equal(back.encode("image", images), trained.encode("image", images))


def test_export_refuses_a_used_folder_and_leaves_nothing_when_it_fails(tmp_path, clipart, monkeypatch, capsys):
    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    run = _train(tmp_path, clipart, {"library": "open_clip", "name": peers.OPEN_CLIP_NAME, "weights": str(ckpt)},
                 max_steps=1)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--format", "hf", "--out", str(used)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["keep.txt"]

    import xmodal.export.model_card as card

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(card, "model_card", broken)
    before = set(tmp_path.iterdir())
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "new")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before  # no folder, no temporary left behind


def test_a_pair_memory_the_peer_format_cannot_hold_is_named(tmp_path, clipart, caplog):
    """open_clip's files embed plainly; the export says so (the memory stays in the xmodal/ subfolder)."""
    from xmodal.config import ModelConfig, PairMemoryConfig, PretrainedConfig
    from xmodal.model import XModalModel

    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    model = XModalModel(ModelConfig(pretrained=PretrainedConfig(library="open_clip", name=peers.OPEN_CLIP_NAME,
                                                                weights=str(ckpt)),
                                    pair_memory=PairMemoryConfig(k=2))).eval()
    images, texts = _images(clipart, 3), TEXTS
    with torch.no_grad():
        model.pair_memory.fill({m: model.towers[m].encoder(torch.stack([model.transform(m)(v) for v in values]))
                                for m, values in (("image", images), ("text", texts))})
    model.save(tmp_path / "run")
    with caplog.at_level("WARNING", logger="xmodal.export.hub"):
        assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "export")]) == 0
    assert ("export: the open_clip files embed plainly: this model's pair memory (3 training pairs, "
            "model.pair_memory) has no place in that format") in caplog.text
    assert len(xmodal.load(tmp_path / "export").pair_memory) == 3  # the xmodal/ subfolder keeps it


def test_the_cli_takes_an_exported_folder_and_an_hf_hub_repo_as_run(tmp_path, clipart, hub_cache, capsys,
                                                                    monkeypatch):
    """``--run`` takes what ``xmodal.load`` takes: every verb answers from an export, or from its hub repo, exactly as
    from the run folder it was exported from."""
    cfg = {"output_dir": str(tmp_path / "run"), "seed": 0,
           "model": {"embed_dim": 32, "towers": {
               "image": {"kind": "cnn", "image_size": 32, "options": {"channels": [8, 16]}},
               "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 16, "hidden": 16}}}},
           "data": {"train": str(clipart), "train_split": "train", "eval_split": "test"},
           "train": {"batch_size": 16, "max_steps": 3, "progress": False}, "log": {"backend": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "for-hub"),
                 "--repo", "xmodal-test/toy"]) == 0
    _to_cache(tmp_path / "for-hub", hub_cache, "xmodal-test/toy")
    capsys.readouterr()

    def cli_json(*argv):
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)

    evaluate = ["--manifest", str(clipart), "--split", "test", "--max-rows", "60", "--json"]
    want = cli_json("evaluate", "--run", str(run), *evaluate)
    want_run_eval = xmodal.load(run).card["eval"]
    assert want["text->image/n_queries"] > 0
    assert cli_json("evaluate", "--run", str(out), *evaluate) == want
    assert cli_json("evaluate", "--run", "hf-hub:xmodal-test/toy", *evaluate) == want

    monkeypatch.chdir(tmp_path)  # plots of a hub model go to ./plots, not into the Hugging Face cache
    assert main(["evaluate", "--run", "hf-hub:xmodal-test/toy", *evaluate, "--plots"]) == 0
    assert (tmp_path / "plots" / "shared_space.png").is_file() or any((tmp_path / "plots").iterdir())
    assert not any(p.name == "plots" for p in hub_cache.rglob("*"))
    capsys.readouterr()

    hits = {}
    for name, model in (("run", run), ("export", out), ("hub", "hf-hub:xmodal-test/toy")):
        idx = tmp_path / f"index-{name}"
        assert main(["index", "--run", str(model), "--manifest", str(clipart), "--split", "test",
                     "--out", str(idx)]) == 0
        capsys.readouterr()
        hits[name] = cli_json("query", "--index", str(idx), "--text", "a red car", "-k", "5", "--json")["hits"]
    assert json.loads((tmp_path / "index-export" / "index.json").read_text())["model"]["run_dir"] == str(
        (out / "xmodal").absolute())
    assert hits["export"] == hits["run"] and hits["hub"] == hits["run"] and len(hits["run"]) == 5
    from xmodal.retrieval import Retriever  # the Python API takes the same: the run's index, queried via its export
    want_hits = Retriever(tmp_path / "index-run").search("a red car", "text", k=5)
    for model in (out, "hf-hub:xmodal-test/toy"):
        assert Retriever(tmp_path / "index-run", model=model).search("a red car", "text", k=5) == want_hits

    # an export keeps no config.yaml: the hubness bank must be named, in one line; a folder with no model, as before
    assert main(["evaluate", "--run", str(out), *evaluate, "--hubness", "csls"]) == 2
    assert "give the query bank with --bank-manifest and --bank-split" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path), *evaluate]) == 2
    assert "not an xmodal model folder" in capsys.readouterr().err
    # a bank that holds the scored rows is said to (here: every split of the scored manifest), a training bank not
    assert main(["evaluate", "--run", str(out), *evaluate, "--hubness", "csls", "--bank-manifest", str(clipart)]) == 0
    assert "the query bank holds the rows being scored" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(out), *evaluate, "--hubness", "csls", "--bank-manifest", str(clipart),
                 "--bank-split", "train"]) == 0
    assert "rows being scored" not in capsys.readouterr().err

    # the export is as shareable as a folder mkdir makes; its card loads it by the folder's name, counts as counts
    (tmp_path / "made-by-mkdir").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "made-by-mkdir").stat().st_mode & 0o777
    card = (out / "README.md").read_text()
    assert 'xmodal.load("export")  # the path of this folder' in card
    assert f"| text->image/n_queries | {int(want_run_eval['text->image/n_queries'])} |" in card

    # an export exports again (here for a repo), keeping what the run trained on; its plots go to ./plots
    again = tmp_path / "again"
    assert main(["export", str(out), "--format", "hf", "--out", str(again), "--repo", "me/toy"]) == 0
    meta = yaml.safe_load((again / "README.md").read_text().split("---")[1])
    assert meta["datasets"] == [clipart.parent.name] and meta["model-index"][0]["name"] == "toy"
    assert xmodal.load(again).state_dict().keys() == xmodal.load(run).state_dict().keys()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(again), *evaluate, "--plots"]) == 0
    assert not (again / "xmodal" / "plots").exists() and any((tmp_path / "plots").iterdir())


def test_the_card_names_the_selected_step_and_loads_by_the_folder_name(tmp_path):
    from xmodal.config import config_from_dict
    from xmodal.export.model_card import model_card

    cfg = config_from_dict({"model": {"embed_dim": 16, "towers": {
        "image": {"kind": "cnn", "image_size": 32, "options": {"channels": [4, 8]}},
        "text": {"kind": "lstm", "context_length": 8, "options": {"embed_dim": 8, "hidden": 8}}}}})
    card = {"step": 660, "selection": {"metric": "R@1", "step": 570, "of": 660},
            "eval": {"text->image/R@1": 0.39, "text->image/n_queries": 695.0}, "datasets": ["openclipart"]}
    text = model_card(xmodal.XModalModel(cfg.model), card, tmp_path / "run", None, None, None,
                      out=tmp_path / "my-export")
    assert "Step 570 of 660, selected by validation R@1" in text
    assert 'model = xmodal.load("my-export")  # the path of this folder' in text
    assert "| text->image/n_queries | 695 |" in text and "| text->image/R@1 | 0.3900 |" in text
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["datasets"] == ["openclipart"]  # no config.yaml beside: the names the card recorded
    assert "Step 660;" in model_card(xmodal.XModalModel(cfg.model), {"step": 660}, tmp_path / "run", None, None,
                                     None)
