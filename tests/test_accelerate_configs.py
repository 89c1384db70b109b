"""The shipped Accelerate configs (configs/accelerate/*.yaml) load with Accelerate's own config classes and turn into
the launch environment ``accelerate launch --config_file`` gives each process (a mistyped key would be dropped
silently by Accelerate, so the values that matter are checked in that environment)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def _launch_env(path: Path) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "xmodal.cli", "pretrain"])
    args = _validate_launch_command(args)[0]
    return prepare_multi_gpu_env(args)


def test_ddp_config():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_processes == 8 and cfg.num_machines == 1 and cfg.fsdp_config == {}
    env = _launch_env(CONFIGS / "ddp.yaml")
    assert env.get("ACCELERATE_USE_FSDP", "false") == "false"


def test_fsdp_config(monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cfg = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type == DistributedType.FSDP
    env = _launch_env(CONFIGS / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "ResidualAttentionBlock"
    for key, value in env.items():  # the plugin reads (and validates) its settings from the environment
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["ResidualAttentionBlock"]
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # FSDP2's no-offload policy, not CPUOffloadPolicy

