"""The built-in modalities — image, text, audio — declared without importing their code.

Each builder is named as ``"module:function"`` and imported on first use, so knowing which modalities exist (the
CLI's query flags, a manifest's columns) costs no torch import. A plugin may do the same, or pass functions.
"""
from __future__ import annotations

from .registry import Modality, TowerKind

IMAGE_OPTIONS = frozenset({"mean", "std", "resize_mode", "interpolation"})  # every image kind: preprocessing
RNN_OPTIONS = frozenset({"embed_dim", "hidden", "layers", "dropout", "vocab_size"})
AUDIO_OPTIONS = frozenset({"sample_rate", "n_mels", "max_seconds", "min_seconds", "win_ms", "hop_ms", "f_min",
                           "f_max", "mel_scale"})
CNN_OPTIONS = AUDIO_OPTIONS | {"channels", "convs_per_stage"}
TRANSFORMER_OPTIONS = AUDIO_OPTIONS | {"patch", "width", "layers", "heads"}
RESEMBLYZER_OPTIONS = frozenset({"max_seconds", "min_seconds"})

_I, _T, _A = "xmodal.modalities.image:", "xmodal.modalities.text:", "xmodal.modalities.audio:"
_H = "xmodal.modalities.hf_clip:"  # a transformers CLIPModel / SiglipModel's towers

IMAGE = Modality(
    "image", value="path", check_file=_I + "check_image_file", hf_feature="Image", read_bytes=_I + "read_image_bytes",
    kinds={"open_clip": TowerKind(_I + "build_open_clip_vision", _I + "build_image_transform",
                                  IMAGE_OPTIONS | {"vision_cfg", "embed_dim", "quick_gelu"}),
           "cnn": TowerKind(_I + "build_cnn", _I + "build_image_transform",
                            IMAGE_OPTIONS | {"channels", "convs_per_stage"}),
           "timm": TowerKind(_I + "build_timm", _I + "build_image_transform", IMAGE_OPTIONS | {"model_kwargs"}),
           "efficientnet_lite0": TowerKind(_I + "build_efficientnet_lite0", _I + "build_image_transform",
                                           IMAGE_OPTIONS),
           "hf_clip": TowerKind(_H + "build_hf_clip_vision", _H + "build_hf_clip_image_transform")},
    query_help="query image file", shard_keys=("jpg", "jpeg", "png", "webp"),
)

# Text transforms are deterministic (tokenisation), so a frozen text tower's features are always cacheable.
TEXT = Modality(
    "text", value="string", augments=False,
    kinds={"open_clip": TowerKind(_T + "build_open_clip_text", _T + "build_text_transform",
                                  frozenset({"text_cfg", "embed_dim", "quick_gelu"})),
           "lstm": TowerKind(_T + "build_rnn", _T + "build_text_transform", RNN_OPTIONS),
           "gru": TowerKind(_T + "build_rnn", _T + "build_text_transform", RNN_OPTIONS),
           "hf": TowerKind(_T + "build_hf", _T + "build_text_transform", frozenset({"pool_layers"})),
           "hf_clip": TowerKind(_H + "build_hf_clip_text", _T + "build_text_transform")},
    query_help="query text", shard_keys=("txt",),
)

AUDIO = Modality(
    "audio", value="path", check_file=_A + "check_audio_file", hf_feature="Audio", read_bytes=_A + "read_audio_bytes",
    kinds={"cnn": TowerKind(_A + "build_audio_cnn", _A + "build_audio_transform", CNN_OPTIONS),
           "transformer": TowerKind(_A + "build_audio_transformer", _A + "build_audio_transform",
                                    TRANSFORMER_OPTIONS),
           "resemblyzer": TowerKind(_A + "build_resemblyzer", _A + "build_audio_transform", RESEMBLYZER_OPTIONS)},
    query_help="query audio file", shard_keys=("flac", "wav", "mp3", "ogg"),
)

BUILTIN = (IMAGE, TEXT, AUDIO)
