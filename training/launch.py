"""Run one SFT stage in its own process(es): the entry point for single- and multi-GPU launches.

``python -m training.launch --stage 2 --model CKPT --data sft_stage23_data.parquet --out DIR --settings '{...}'``
reads the Parquet table, builds :class:`~training.sft.TrainSettings` from the JSON, trains with
:func:`~training.sft.train_stage1` / :func:`~training.sft.train_trajectory_sft`, and the main process
writes the :class:`~training.sft.TrainResult` to ``--result-json``. The same module runs under
``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3: ``configs/accelerate/*.yaml``) or ``torchrun``, one
process per GPU; the HF Trainer picks the distributed setup up from the environment the launcher sets.

The library half is for the Dagster assets: :func:`launch_command` builds the argv,
:func:`run_launcher` runs it, streams every output line to a logger, and returns the result.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"
LAUNCHERS = ("python", "accelerate", "torchrun")
LABELS = {2: "labels_stage2", 3: "labels_stage3"}
TAIL_LINES = 40

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The training process failed; the message carries its exit code and the last lines it printed."""


# ---------------------------------------------------------------------------------------------- library


def _settings_json(settings) -> str:
    if isinstance(settings, str):
        return settings
    return json.dumps(asdict(settings) if hasattr(settings, "__dataclass_fields__") else dict(settings))


def default_result_json(out: str | Path) -> Path:
    return Path(str(out) + ".result.json")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(
    stage: int,
    model: str,
    data: str | Path,
    out: str | Path,
    settings,
    *,
    launcher: str = "python",
    num_processes: int = 1,
    accelerate_config: str | Path | None = None,
    labels: str | None = None,
    data_version: str = "",
    result_json: str | Path | None = None,
    resume_from: str | None = None,
) -> list[str]:
    """The argv that trains ``stage`` on the Parquet table ``data`` into ``out``.

    ``launcher``: ``python`` (one process, this interpreter), ``accelerate`` (``accelerate launch`` with
    ``accelerate_config``, a path or a name under ``configs/accelerate/``, and ``num_processes``), or
    ``torchrun`` (``torch.distributed.run --nproc_per_node num_processes``: plain DDP, also on CPU with gloo).
    On a machine without CUDA, ``accelerate`` gets ``--cpu`` and, when no config is given, ``cpu.yaml``.
    ``settings``: a :class:`~training.sft.TrainSettings`, a dict of its fields, or their JSON.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, not {launcher!r}")
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, not {stage!r}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, not {num_processes}")
    script = [
        "-m",
        "training.launch",
        "--stage",
        str(stage),
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--settings",
        _settings_json(settings),
        "--data-version",
        data_version,
        "--result-json",
        str(result_json or default_result_json(out)),
    ]
    if labels:
        script += ["--labels", labels]
    if resume_from:
        script += ["--resume-from", str(resume_from)]
    if launcher == "python":
        if num_processes != 1:
            raise ValueError("launcher 'python' runs one process; use 'accelerate' or 'torchrun' for num_processes > 1")
        return [sys.executable, *script]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(num_processes),
            *script,
        ]
    cuda = _cuda_available()
    config = resolve_accelerate_config(accelerate_config or ("multi_gpu" if cuda else "cpu"))
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(num_processes),
        "--quiet",
    ]  # --quiet: no launcher traceback after the child's
    if not cuda:
        argv.append("--cpu")
    return argv + script


def resolve_accelerate_config(config: str | Path) -> Path:
    """A path as given, else a name (with or without ``.yaml``) under ``configs/accelerate/``."""
    path = Path(config)
    if path.is_file():
        return path.resolve()
    for candidate in (REPO_ROOT / path, ACCELERATE_CONFIGS / path, ACCELERATE_CONFIGS / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"accelerate config {config!r} not found (shipped: {shipped})")


def _result_path(argv: Sequence[str]) -> Path:
    argv = list(argv)
    if "--result-json" not in argv:
        raise ValueError("argv has no --result-json (build it with launch_command)")
    return Path(argv[argv.index("--result-json") + 1])


def run_launcher(
    argv: Sequence[str],
    log: Callable[[str], object] = print,
    *,
    cwd: str | Path = REPO_ROOT,
    env: dict | None = None,
    tail: int = TAIL_LINES,
):
    """Run ``argv`` (from :func:`launch_command`), pass each output line to ``log`` as it arrives, return the
    :class:`~training.sft.TrainResult` the main process wrote.

    Runs in ``cwd`` (the repo root: ``training.launch`` imports from it, the DeepSpeed configs are named
    relative to it). A non-zero exit raises :class:`LaunchError` with the last ``tail`` lines; an
    interruption (a cancelled Dagster run) terminates the whole process group first.
    """
    from training.sft import TrainResult

    result_path = _result_path(argv)
    result_path.unlink(missing_ok=True)  # never read a previous run's result
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    child_env.setdefault("TQDM_MININTERVAL", "5")  # progress bars: one line per few seconds, not per refresh
    last: collections.deque[str] = collections.deque(maxlen=tail)
    first_traceback: list[str] = []  # torchrun prints its own traceback last; the child's root cause comes first
    proc = subprocess.Popen(
        list(argv),
        cwd=str(cwd),
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            line = raw.rstrip()
            if line:
                last.append(line)
                if (first_traceback or "Traceback (most recent call last)" in line) and len(first_traceback) < tail:
                    first_traceback.append(line)
                log(line)
        rc = proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    if rc != 0:
        first = ""
        if first_traceback and first_traceback[0] not in last:
            first = f"--- first traceback ({len(first_traceback)} lines) ---\n" + "\n".join(first_traceback) + "\n"
        raise LaunchError(
            f"training launcher exited with code {rc}: {' '.join(argv[:8])} ...\n{first}"
            f"--- last {len(last)} lines ---\n" + "\n".join(last)
        )
    if not result_path.is_file():
        raise LaunchError(
            f"training launcher exited 0 but wrote no result to {result_path}\n"
            f"--- last {len(last)} lines ---\n" + "\n".join(last)
        )
    return TrainResult(**json.loads(result_path.read_text()))


def _terminate(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and the workers it spawned (own session)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------- entry point


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState

        if PartialState._shared_state:  # initialised by the Trainer: the authority
            return PartialState().is_main_process
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")) == 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--model", required=True, help="start checkpoint (path or hub id)")
    p.add_argument("--data", required=True, help="Parquet table: sft_stage1_data (stage 1) or sft_stage23_data (2, 3)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--settings", default="{}", help="TrainSettings fields as a JSON object, or a path to a JSON file")
    p.add_argument("--labels", choices=sorted(LABELS.values()), help="stages 2/3: label column (default by stage)")
    p.add_argument("--data-version", default="", help="recorded in meta.json")
    p.add_argument("--result-json", help="where the main process writes the TrainResult (default OUT.result.json)")
    p.add_argument("--resume-from", help="a mid-training checkpoint (OUT.work/checkpoint-N)")
    args = p.parse_args(argv)
    if args.stage == 1 and args.labels:
        p.error("--labels is for stages 2 and 3")
    return args


def _settings(text: str):
    from training.sft import TrainSettings

    raw = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    unknown = sorted(set(raw) - set(TrainSettings.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"--settings: unknown TrainSettings fields {unknown}")
    return TrainSettings(**raw)


def main(argv: Sequence[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from qadata.io import write_with
    from training.sft import train_stage1, train_trajectory_sft

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(args.settings)
    if args.stage == 1:
        rows = pq.read_table(
            args.data, columns=["pair_id", "context_ids", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"]
        ).to_pylist()
    else:
        labels = args.labels or LABELS[args.stage]
        rows = pq.read_table(args.data, columns=["input_ids", labels]).to_pylist()
    if not rows:
        raise SystemExit(f"{args.data}: no rows to train on")
    log.info(
        "stage %d: %d rows from %s, model %s -> %s (rank %s of %s)",
        args.stage,
        len(rows),
        args.data,
        args.model,
        args.out,
        os.environ.get("RANK", "0"),
        os.environ.get("WORLD_SIZE", "1"),
    )
    if args.stage == 1:
        result = train_stage1(
            args.model, rows, args.out, settings, data_version=args.data_version, resume_from=args.resume_from
        )
    else:
        result = train_trajectory_sft(
            args.model,
            rows,
            labels,
            args.out,
            settings,
            stage=args.stage,
            data_version=args.data_version,
            resume_from=args.resume_from,
        )
    if _is_main_process():
        path = Path(args.result_json) if args.result_json else default_result_json(args.out)
        write_with(path, lambda tmp: tmp.write_text(json.dumps(asdict(result), indent=1)))
        log.info("result: %d steps in %.1fs -> %s", result.steps, result.wall_seconds, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
