"""The machine's limit, measured in the same run as a benchmark: matmul GFLOP/s and memory bandwidth.

Run (a command, not a test)::

    python -m benchmarks.roofline [--threads N] [--repeats 5] [--out benchmarks/RESULTS.md]

It times torch matmuls at the shapes the embedded model runs (SmolLM2-135M: hidden 576, MLP 1536, vocabulary
49,152; a prefill/training block of 512 tokens (128 for the LM head) and a decode step of a batch of 24), in fp32 and bf16, and a large
tensor copy for memory bandwidth; each figure is the best of ``--repeats`` (the machine is shared: the best is the
closest to what the hardware can do, the spread is printed too). Throughput benchmarks import
:func:`probe` and :func:`model_flops_per_token` to print their tokens/s as a fraction of the measured limit
(FLOPs per processed token from the model's config: about 2 x parameters for inference, 6 x for training, plus
attention). Replaces the ``<!-- roofline:begin -->`` ... ``<!-- roofline:end -->`` block of ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"
# (name, M, K, N): tokens x in-features x out-features of the embedded model's matmuls
SHAPES = (
    ("prefill 512 x MLP up (576->1536)", 512, 576, 1536),
    ("prefill 512 x attention proj (576->576)", 512, 576, 576),
    ("prefill 128 x LM head (576->49152)", 128, 576, 49152),
    ("decode 24 x MLP up (576->1536)", 24, 576, 1536),
)


@dataclass
class Roofline:
    """Measured limits: GFLOP/s per (dtype, shape) and GB/s of memory copy (best of the repeats, and all of them)."""

    threads: int
    gflops: dict[tuple[str, str], float] = field(default_factory=dict)
    gflops_runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    bandwidth_gbs: float = 0.0
    bandwidth_runs: list[float] = field(default_factory=list)

    def peak(self, dtype: str = "float32", prefix: str = "prefill") -> float:
        """The best GFLOP/s among the shapes whose name starts with ``prefix`` (the compute limit of that regime)."""
        vals = [v for (d, name), v in self.gflops.items() if d == dtype and name.startswith(prefix)]
        return max(vals) if vals else float("nan")


def _best(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocations, kernel selection)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


def probe(threads: int | None = None, repeats: int = 5, target_seconds: float = 0.15) -> Roofline:
    """Time the model's matmul shapes in fp32 and bf16 and a 256 MiB tensor copy on this machine, now. Each timed
    run repeats its matmul for about ``target_seconds`` (bf16 without hardware support can be 10-50x slower than
    fp32: a fixed iteration count would take minutes)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    roof = Roofline(threads=torch.get_num_threads())
    for dtype in ("float32", "bfloat16"):
        dt_ = getattr(torch, dtype)
        for name, m, k, n in SHAPES:
            a, b = torch.randn(m, k, dtype=dt_), torch.randn(k, n, dtype=dt_)
            t0 = time.perf_counter()
            torch.mm(a, b)
            iters = max(1, int(target_seconds / max(time.perf_counter() - t0, 1e-6)))

            def run(a=a, b=b, iters=iters):
                for _ in range(iters):
                    torch.mm(a, b)

            flops = 2.0 * m * k * n * iters
            runs = [flops / s / 1e9 for s in _best(run, repeats)]
            roof.gflops[(dtype, name)], roof.gflops_runs[(dtype, name)] = max(runs), runs
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).normal_()  # 256 MiB
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * 4  # read + write
    runs = [moved / s / 1e9 for s in _best(lambda: dst.copy_(src), repeats)]
    roof.bandwidth_gbs, roof.bandwidth_runs = max(runs), runs
    return roof


def model_flops_per_token(config, *, training: bool, context: int = 512, trainable_fraction: float = 1.0) -> float:
    """FLOPs per processed token of a decoder-only transformer with this ``config`` (a transformers config):
    2 x non-embedding parameters forward (+ the LM head, 2 x hidden x vocabulary) plus attention scores and
    values (2 x 2 x layers x context x hidden, context = mean attended length); training adds the backward pass,
    2x the forward for the ``trainable_fraction`` of layers that get gradients (about 6x parameters when all do)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = h // heads
    per_layer = h * h * 2 + 2 * h * kv_heads * head_dim + 3 * h * inter  # q, o; k, v; gate, up, down
    forward = 2 * layers * per_layer + 2 * h * config.vocab_size + 4 * layers * context * h
    if not training:
        return float(forward)
    return float(forward + 2 * forward * trainable_fraction)


def fraction_of_limit(tokens_per_s: float, flops_per_token: float, gflops_limit: float) -> float:
    """Achieved FLOP/s (tokens/s x FLOPs per token) as a fraction of the measured limit."""
    return tokens_per_s * flops_per_token / (gflops_limit * 1e9)


def spread(runs: list[float]) -> str:
    """min-max and median of a list of measurements."""
    return f"{min(runs):.1f}-{max(runs):.1f} (median {statistics.median(runs):.1f})"


def markdown(roof: Roofline) -> str:
    """The roofline section of RESULTS.md."""
    cpu = os.cpu_count()
    rows = "\n".join(
        f"| {dtype} | {name} | {roof.gflops[(dtype, name)]:.1f} | {spread(roof.gflops_runs[(dtype, name)])} |"
        for dtype in ("float32", "bfloat16")
        for name, *_ in SHAPES
    )
    ratio = roof.peak("bfloat16") / roof.peak("float32")
    return f"""{BEGIN}
## Roofline of this machine (`python -m benchmarks.roofline`)

Measured {dt.datetime.now().strftime("%Y-%m-%d %H:%M")} on {cpu} CPU cores, {roof.threads} torch threads: torch matmul
GFLOP/s at the embedded model's shapes (best of the repeats; the spread shows how shared the machine was) and memory
bandwidth (256 MiB copy, read + write).

| dtype | shape | GFLOP/s (best) | runs: min-max (median) |
|---|---|---:|---:|
{rows}

Memory copy: **{roof.bandwidth_gbs:.1f} GB/s** (runs {spread(roof.bandwidth_runs)}).
Compute limit used by the throughput benchmarks: fp32 prefill-shaped matmul **{roof.peak("float32"):.1f} GFLOP/s**;
bf16 ÷ fp32 = {ratio:.2f}x (below 1: this CPU has no bf16 instructions, so bf16 is emulated and slower).
{END}"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args(argv)
    from benchmarks.rollout import write_section

    md = markdown(probe(args.threads, args.repeats))
    print(md)
    write_section(args.out, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
