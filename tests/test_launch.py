"""The SFT launcher (training.launch): shipped accelerate/DeepSpeed configs, argv building, and real launches
as subprocesses (plain python, `accelerate launch` on one CPU process, torchrun with two CPU processes)."""

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training.launch import (
    ACCELERATE_CONFIGS,
    REPO_ROOT,
    LaunchError,
    launch_command,
    resolve_accelerate_config,
    run_launcher,
)

SETTINGS = {"max_steps": 2, "learning_rate": 1e-2, "batch_size": 2, "max_length": 256}
# accelerate refuses these in an accelerate config that also names a deepspeed_config_file
DS_FIELDS_IGNORED = {
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
    "mixed_precision",
}


# ------------------------------------------------------------------------------------------------ configs


def test_every_shipped_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
    assert names == ["cpu", "deepspeed_zero2", "deepspeed_zero3", "multi_gpu"]
    kinds = {n: load_config_from_file(str(ACCELERATE_CONFIGS / f"{n}.yaml")) for n in names}
    assert kinds["cpu"].distributed_type == "NO" and kinds["cpu"].use_cpu and kinds["cpu"].num_processes == 1
    assert kinds["multi_gpu"].distributed_type == "MULTI_GPU" and kinds["multi_gpu"].mixed_precision == "bf16"
    for name, stage in (("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
        cfg = kinds[name]
        assert cfg.distributed_type == "DEEPSPEED" and cfg.mixed_precision is None
        assert not set(cfg.deepspeed_config) & DS_FIELDS_IGNORED
        ds_file = REPO_ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert (
            ds["gradient_accumulation_steps"] == "auto"
            and ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
        )
    # ZeRO-3 checkpoints are gathered into one 16-bit state dict on save (training.sft.save_checkpoint)
    assert (
        json.loads((REPO_ROOT / "configs/deepspeed/zero3.json").read_text())["zero_optimization"][
            "stage3_gather_16bit_weights_on_model_save"
        ]
        is True
    )


def test_launch_command_argv_parses_with_accelerate_cli(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    plain = launch_command(2, "m", "d.parquet", tmp_path / "o", SETTINGS, launcher="python")
    assert plain[:3] == [sys.executable, "-m", "training.launch"]
    assert json.loads(plain[plain.index("--settings") + 1]) == SETTINGS
    assert plain[plain.index("--result-json") + 1] == str(tmp_path / "o") + ".result.json"

    argv = launch_command(
        3,
        "m",
        "d.parquet",
        tmp_path / "o",
        SETTINGS,
        launcher="accelerate",
        num_processes=8,
        accelerate_config="deepspeed_zero3",
        labels="labels_stage3",
    )
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert args.module and args.quiet and args.training_script == "training.launch"
    assert args.config_file == str(ACCELERATE_CONFIGS / "deepspeed_zero3.yaml") and args.num_processes == 8
    assert args.cpu == (not torch.cuda.is_available())
    script = args.training_script_args
    assert script[script.index("--stage") + 1] == "3" and script[script.index("--labels") + 1] == "labels_stage3"

    with pytest.raises(ValueError):
        launch_command(2, "m", "d", "o", SETTINGS, launcher="python", num_processes=2)
    with pytest.raises(ValueError):
        launch_command(2, "m", "d", "o", SETTINGS, launcher="srun")
    with pytest.raises(FileNotFoundError, match="shipped: cpu"):
        resolve_accelerate_config("nope")


# ------------------------------------------------------------------------------------------------ real launches


@pytest.fixture(scope="module")
def stage23_parquet(embedded_tokenizer, tmp_path_factory):
    """A small sft_stage23_data table: input_ids with stage-2 (observations masked) and stage-3 labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, rows = embedded_tokenizer, []
    for i in range(6):
        prompt = tok.encode(f"Question {i}: where is Valdren?\n<think>", add_special_tokens=False)
        policy = tok.encode(" I search. <begin_search> Valdren </end_search>", add_special_tokens=False)
        obs = tok.encode("\n<search_result>\nValdren is in Norsland.\n</search_result>\n", add_special_tokens=False)
        answer = tok.encode(" So Norsland.</think>\n\n\\boxed{Norsland}", add_special_tokens=False)
        rows.append(
            {
                "trajectory_id": f"t{i}",
                "input_ids": prompt + policy + obs + answer,
                "labels_stage2": [-100] * len(prompt) + policy + [-100] * len(obs) + answer,
                "labels_stage3": [-100] * len(prompt) + policy + obs + answer,
            }
        )
    path = tmp_path_factory.mktemp("tables") / "sft_stage23_data" / "data.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _check(result, out: Path, lines: list[str]):
    assert result.steps == 2 and len(result.loss_curve) == 2 and result.path == str(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stage"] == 2 and meta["labels"] == "labels_stage2" and meta["steps"] == 2
    assert meta["data_version"] == "sft_stage23_data:6" and meta["examples"] == 6
    assert (out / "model.safetensors").is_file()
    assert json.loads(Path(str(out) + ".result.json").read_text())["steps"] == 2
    assert any("stage 2: 6 rows" in line for line in lines)  # the child's log reached the callback


@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_launch_stage2_as_subprocess(launcher, tiny_model, stage23_parquet, tmp_path):
    out = tmp_path / "sft_stage2_checkpoint"
    argv = launch_command(
        2,
        tiny_model,
        stage23_parquet,
        out,
        SETTINGS,
        launcher=launcher,
        accelerate_config="cpu" if launcher == "accelerate" else None,
        data_version="sft_stage23_data:6",
    )
    lines: list[str] = []
    result = run_launcher(argv, log=lines.append, env={"OMP_NUM_THREADS": "1"})
    _check(result, out, lines)


def test_torchrun_two_cpu_processes_write_one_checkpoint(tiny_model, stage23_parquet, tmp_path):
    """DDP over two gloo processes: both train, only rank 0 writes the checkpoint and the result."""
    out = tmp_path / "ddp"
    argv = launch_command(
        2,
        tiny_model,
        stage23_parquet,
        out,
        {**SETTINGS, "batch_size": 1},
        launcher="torchrun",
        num_processes=2,
        data_version="sft_stage23_data:6",
    )
    lines: list[str] = []
    result = run_launcher(argv, log=lines.append, env={"OMP_NUM_THREADS": "1"})
    _check(result, out, lines)
    assert any("rank 1 of 2" in line for line in lines)
    assert not list(out.parent.glob(".ddp.*"))  # no leftover temp/old directories from a second writer


def test_failed_launch_raises_with_the_childs_error(stage23_parquet, tmp_path):
    missing = tmp_path / "no_such_model"
    argv = launch_command(2, str(missing), stage23_parquet, tmp_path / "out", SETTINGS, launcher="python")
    lines: list[str] = []
    with pytest.raises(LaunchError) as err:
        run_launcher(argv, log=lines.append)
    header, _, tail = str(err.value).partition("--- last ")
    assert "exited with code 1" in header
    assert "Traceback" in tail and "Error" in lines[-1] and lines[-1] in tail  # the child's own exception
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.result.json").exists()
