"""SFT throughput benchmark: trajectory SFT tokens/s of random padded batches, length-bucketed batches and
sequence packing, side by side, and as a fraction of this machine's measured limit (:mod:`benchmarks.roofline`).

Run (a command, not a test)::

    python -m benchmarks.sft [--home var] [--steps 6] [--batch 4] [--max-length 1024] [--rounds 2]
                             [--out benchmarks/RESULTS.md]

The three arms run interleaved, ``--rounds`` times each (the machine is shared: the spread is reported); the
roofline probe runs in the same process before the arms.

Both runs train the embedded SmolLM2-135M (full fine-tuning, fp32 on CPU / bf16 on GPU) with
``training.sft.train_trajectory_sft`` on the same rows: the CoA trajectories of a materialised home
(``<home>/tables/coa_trajectories``, all of them: throughput does not care about correctness), with
stage-2 labels. Tokens/s counts the non-padding tokens the model trained on (the Trainer's
``num_input_tokens_seen`` with ``non_padding``) per second of training, so padding saved by packing
shows up as throughput. Replaces the ``<!-- sft:begin -->`` … ``<!-- sft:end -->``
block of ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- sft:begin -->", "<!-- sft:end -->"


def padding_ceiling(lengths: list[int], batch: int, draws: int = 2000, seed: int = 0) -> float:
    """Token slots of padded batches (batch × longest row) ÷ real tokens, over random batches of ``batch`` rows."""
    import random

    rng = random.Random(seed)
    slots = real = 0
    for _ in range(draws):
        pick = rng.sample(lengths, min(batch, len(lengths)))
        slots += len(pick) * max(pick)
        real += sum(pick)
    return slots / real if real else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("AUTOCOA_HOME", REPO / "var")))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each arm")
    ap.add_argument("--trainable-layers", type=int, default=10, help="top layers trained (the embedded default)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from agent.models import ensure_embedded_checkpoint
    from benchmarks.rollout import write_section
    from training.sft import TrainSettings, train_trajectory_sft
    from training.sft_data import stage23_rows

    files = sorted(glob.glob(str(args.home / "tables" / "coa_trajectories" / "partition=*" / "data.parquet")))
    if not files:
        print(f"no coa_trajectories under {args.home}; run `autocoa run` first", file=sys.stderr)
        return 2
    trajs = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    rows = stage23_rows(trajs, args.max_length)
    need = args.steps * args.batch
    rows = (rows * (need // max(1, len(rows)) + 1))[: max(need * 4, len(rows))]  # enough for the unpacked run
    lengths = [len(r["input_ids"]) for r in rows]
    ceiling = padding_ceiling(lengths, args.batch)
    ckpt = ensure_embedded_checkpoint(Path(tempfile.gettempdir()) / "autocoa-models")
    from transformers import AutoConfig

    from benchmarks.roofline import fraction_of_limit, model_flops_per_token, probe, spread

    roof = probe(repeats=3)
    limit = roof.peak("float32")
    arms = {
        "random padded batches": {"length_buckets": False},
        "length-bucketed batches": {"length_buckets": True},
        "packing (TRL bfd)": {"packing": True},
    }
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for arm, kw in arms.items():  # interleaved: a slow minute of the machine hits every arm alike
            with tempfile.TemporaryDirectory() as tmp:
                s = TrainSettings(
                    max_steps=args.steps,
                    learning_rate=1e-5,
                    batch_size=args.batch,
                    max_length=args.max_length,
                    trainable_layers=args.trainable_layers,
                    seed=r,
                    **kw,
                )
                res = train_trajectory_sft(str(ckpt), rows, "labels_stage2", Path(tmp) / "out", s, stage=2)
            seen = res.metrics["tokens_seen"]  # non-padding tokens the model trained on (Trainer's own count)
            runs[arm].append({"train_seconds": res.wall_seconds, "tokens": seen, "tps": seen / res.wall_seconds})
            print(
                f"round {r + 1} {arm}: {seen} tokens in {res.wall_seconds:.1f}s = {seen / res.wall_seconds:.1f} tok/s",
                flush=True,
            )
    config = AutoConfig.from_pretrained(ckpt)
    layers = config.num_hidden_layers
    share = (args.trainable_layers or layers) / layers
    mean_len = sum(lengths) / len(lengths)
    fpt = model_flops_per_token(config, training=True, context=int(mean_len / 2), trainable_fraction=share)
    import statistics

    med = {a: statistics.median(x["tps"] for x in v) for a, v in runs.items()}
    base = med["random padded batches"]
    table = "\n".join(
        f"| {a} | {statistics.median(x['tokens'] for x in v):.0f} | {spread([x['tps'] for x in v])} | "
        f"{med[a] / base:.2f}x | {fraction_of_limit(med[a], fpt, limit):.0%} |"
        for a, v in runs.items()
    )
    results = {False: {"tps": med["length-bucketed batches"]}, True: {"tps": med["packing (TRL bfd)"]}}
    ratio = results[True]["tps"] / results[False]["tps"]
    device = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    md = f"""{BEGIN}
## SFT throughput (`python -m benchmarks.sft`)

Measured {dt.datetime.now().strftime("%Y-%m-%d %H:%M")} on {device}, {roof.threads} torch threads: embedded SmolLM2-135M,
top {args.trainable_layers or layers} of {layers} layers trained, {args.steps} steps of batch {args.batch}, max length
{args.max_length}, {args.rounds} interleaved rounds per arm, on the CoA trajectories of `{args.home}` (mean
{mean_len:.0f} tokens, max {max(lengths)}). Tokens/s counts non-padding tokens trained on.

| arm | tokens trained | tokens/s: min-max (median) | ÷ random batches | of the fp32 limit |
|---|---:|---:|---:|---:|
{table}

Limit: fp32 matmul {limit:.1f} GFLOP/s measured in this run (`benchmarks.roofline`), {fpt / 1e6:.0f} MFLOP per trained
token (forward of every layer and the LM head, backward of the trained layers, attention at half the mean length).
Packing ÷ length buckets: **{ratio:.2f}x**. Padding ceiling of random batches for these lengths: {ceiling:.2f}x (token
slots of random padded batches of {args.batch} ÷ real tokens: what removing padding alone could gain); length buckets
gain {med["length-bucketed batches"] / base:.2f}x over random batches against that ceiling, with no cross-sample attention.
GPU (R1-Distill-Qwen-1.5B-shaped model, MFU): not measured in this session (no GPU machine was lent to it).
{END}"""
    print(md)
    write_section(args.out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
