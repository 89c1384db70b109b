"""Small random-initialised CLIP / SigLIP models saved by the peer libraries themselves, in their own formats (no
weights can be downloaded here): an open_clip checkpoint file, an open_clip ``hf-hub:`` repo in a local Hugging Face
cache, and ``transformers`` ``save_pretrained`` folders of a ``CLIPModel`` and a ``SiglipModel``.

Each model's ``logit_scale`` (and SigLIP ``logit_bias``) is set to a value no initialisation has, so a test sees
whether it came along.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

OPEN_CLIP_NAME = "xmodal-vit-tiny"
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 37.0, 117.0, -12.5
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def open_clip_model(seed: int = 0):
    import open_clip

    from xmodal.modalities._openclip import register_open_clip_configs

    register_open_clip_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_NAME).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(CLIP_SCALE))
    return model


def open_clip_checkpoint(folder: Path, seed: int = 0) -> Path:
    """``torch.save({"state_dict": ...})`` as open_clip's training script writes its checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": open_clip_model(seed).state_dict()}, path)
    return path


def hub_snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in a Hugging Face cache, with ``refs/main`` pointing at it (what
    ``hf_hub_download`` reads with ``HF_HUB_OFFLINE=1``)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    snap = root / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def open_clip_hub_repo(cache: Path, repo: str = "xmodal-test/tiny-open-clip", seed: int = 1) -> str:
    """An open_clip hub repo (open_clip_config.json with a preprocess_cfg unlike the defaults: 0.5 mean/std, squash,
    bilinear) in the cache folder ``cache``; returns its ``hf-hub:`` name."""
    from safetensors.torch import save_file

    from xmodal.modalities._openclip import XMODAL_OPEN_CLIP_CONFIGS

    snap = hub_snapshot(cache, repo)
    config = {"model_cfg": XMODAL_OPEN_CLIP_CONFIGS[OPEN_CLIP_NAME],
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash",
                                 "interpolation": "bilinear"}}
    (snap / "open_clip_config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in open_clip_model(seed).state_dict().items()}
    save_file(sd, str(snap / "open_clip_model.safetensors"))
    return f"hf-hub:{repo}"


def clip_tokenizer_files(folder: Path) -> None:
    """OpenAI CLIP's BPE vocabulary (open_clip bundles it) as a transformers ``CLIPTokenizer``."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in st.encoder.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


_TOWER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)


def hf_clip_folder(folder: Path, seed: int = 2) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(_TOWER, max_position_embeddings=32, vocab_size=49408),
                        vision_config=dict(_TOWER, image_size=32, patch_size=8), projection_dim=48)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(CLIP_SCALE))
    model.save_pretrained(folder)
    clip_tokenizer_files(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def hf_siglip_folder(folder: Path, seed: int = 3) -> Path:
    """A SiglipModel with a CLIP BPE tokenizer (SigLIP's own is a SentencePiece model, and sentencepiece is not a
    dependency): SigLIP's text tower reads ids padded to its full length whatever the vocabulary."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(text_config=dict(_TOWER, max_position_embeddings=16, vocab_size=49408),
                          vision_config=dict(_TOWER, image_size=32, patch_size=8))
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(SIGLIP_SCALE))
        model.logit_bias.fill_(SIGLIP_BIAS)
    model.save_pretrained(folder)
    clip_tokenizer_files(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
    return folder
