"""The RL stages: GRPO (TRL) over AutoCoA rollouts in the simulated and the real environment.

:func:`train_grpo` trains one checkpoint: each optimizer step samples ``questions_per_step``
questions, rolls out ``num_generations`` trajectories each with the live policy
(:mod:`training.grpo_rollout`), scores them (:mod:`training.rewards`: exact match + format
penalties, each logged) and takes a GRPO step. ``simulated_fraction`` of the steps (the first ones)
run in the simulated environment, where the policy writes its own ``<search_result>`` blocks and
no search call is made (RL-1); the rest search for real (RL-2). The checkpoint directory is written
atomically, like the SFT stages: safetensors + tokenizer + ``meta.json`` (settings, reward, per
component reward, KL and loss curves, the per-batch cost table and its totals, wall time, root model).

The paper's profile (set by the pipeline config, not here): 48 questions x 5 samples per step,
learning rate 7e-7, KL coefficient 0.001, temperature 0.6, up to 10 searches, responses up to 8192
tokens, 96 steps of which 80 simulated then 16 real (``PAPER_SIMULATED_FRACTION``). TRL's KL term
(``beta``) is the low-variance k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` per token, the
one the paper (after DeepSeekMath/R1) uses; ``beta=0`` skips the reference model.

Pure CoT prompts are mixed into every step (section 3.1: "pure CoT data is mixed into both SFT and
RL"): ``round(cot_fraction * questions_per_step)`` of each step's questions are rendered with the CoT
template and rolled out with the tool off. The paper gives no RL share; its profile uses the SFT mix's
1:5 CoT:CoA ratio (1,000 : 5,000), ``PAPER_COT_FRACTION`` = 1/6, i.e. 8 of the 48 questions per step.
The dataset is laid out step by step (:func:`step_rows`) and read in order (``shuffle_dataset=False``),
so step ``s`` trains on rows ``[s * questions_per_step, (s + 1) * questions_per_step)``.

Batch layout: one step's ``questions_per_step x num_generations`` completions are one TRL generation
batch, split as ``micro_batch`` completions per forward/backward on each of ``num_processes`` processes
times ``grad_accum`` accumulation steps (:func:`batch_layout`; TRL's ``steps_per_generation`` =
``grad_accum``, so ``generation_batch_size`` is exactly the step's completions: on-policy, one generation
per optimizer step).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.prompts import PromptTemplate, template_for
from agent.rollout import RolloutConfig
from training.grpo_rollout import (
    PAPER_SIMULATED_FRACTION,
    CostLedger,
    EngineFactory,
    SearchFn,
    SimulationSchedule,
    cot_config,
    make_rollout_func,
)
from training.rewards import COMPONENTS, RewardSettings, trl_reward_funcs, trl_reward_weights
from training.sft import load_model, log_history, root_model, save_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "PAPER_COT_FRACTION",
    "PAPER_SIMULATED_FRACTION",
    "GrpoResult",
    "GrpoSettings",
    "batch_layout",
    "cot_per_step",
    "grpo_config",
    "step_rows",
    "train_grpo",
]

# the SFT mix's CoT:CoA ratio (1,000 : 5,000), used for RL too: the paper states no RL share
PAPER_COT_FRACTION = 1 / 6


@dataclass(frozen=True)
class GrpoSettings:
    """The knobs of one GRPO run; defaults are sized for a CPU smoke run, the paper's are in the module doc."""

    max_steps: int = 4
    learning_rate: float = 1e-6
    questions_per_step: int = 2  # paper: 48
    num_generations: int = 4  # samples per question, GRPO's group (paper: 5)
    micro_batch: int | None = None  # completions per forward/backward per process (TRL per_device_train_batch_size)
    grad_accum: int | None = None  # TRL gradient_accumulation_steps; None: what completes the step
    num_processes: int = 1  # processes (GPUs) the run is launched on; must be TRL's world size
    cot_fraction: float = 0.0  # share of each step's questions prompted as pure CoT (tool off); paper 1/6
    beta: float = 0.001  # KL coefficient (k3 estimator)
    temperature: float = 0.6
    top_p: float = 0.95
    max_actions: int = 10  # T: searches per trajectory
    max_completion_tokens: int = 1024  # paper: 8192; the rollout context is the longest prompt + this
    max_turn_tokens: int = 512  # tokens per generation call between actions
    answer_tokens: int = 24  # budget of a forced answer
    search_k: int = 3
    loss_type: str = "dapo"  # TRL's default: token-level normalisation over the batch
    epsilon: float = 0.2  # PPO clip
    max_grad_norm: float = 1.0
    seed: int = 0
    lora: dict | None = None  # e.g. {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    gradient_checkpointing: bool = False
    use_vllm: bool = False  # TRL's colocated vLLM (GPU); the rollout wraps it, see grpo_rollout.policy_engine
    vllm_gpu_memory_utilization: float = 0.3
    mask_simulated_observations: bool = True  # keep policy-written result blocks out of the loss
    save_steps: int | None = None


@dataclass
class GrpoResult:
    path: str
    steps: int
    simulated_steps: int
    reward_curve: list[float] = field(default_factory=list)
    reward_components: dict[str, list[float]] = field(default_factory=dict)
    kl_curve: list[float] = field(default_factory=list)
    loss_curve: list[float] = field(default_factory=list)
    cost: list[dict] = field(default_factory=list)
    cost_totals: dict = field(default_factory=dict)
    wall_seconds: float = 0.0


def batch_layout(settings: GrpoSettings) -> tuple[int, int]:
    """Validate the settings; returns (micro batch, gradient accumulation steps) per process.

    One step's ``questions_per_step x num_generations`` completions must be exactly
    ``micro_batch x grad_accum x num_processes``: TRL then generates once per optimizer step.
    """
    for name in (
        "max_steps",
        "questions_per_step",
        "num_generations",
        "max_actions",
        "max_completion_tokens",
        "num_processes",
    ):
        if getattr(settings, name) < 1:
            raise ValueError(f"GrpoSettings.{name} must be >= 1, got {getattr(settings, name)}")
    if settings.num_generations < 2:
        raise ValueError("GrpoSettings.num_generations must be >= 2: GRPO's advantage is relative within a group")
    if not 0.0 <= settings.cot_fraction <= 1.0:
        raise ValueError(f"GrpoSettings.cot_fraction must be within [0, 1], got {settings.cot_fraction}")
    total = settings.questions_per_step * settings.num_generations
    if total % settings.num_processes:
        raise ValueError(
            f"questions_per_step x num_generations = {total} completions per step cannot be split over "
            f"num_processes={settings.num_processes}"
        )
    per_process = total // settings.num_processes
    micro = settings.micro_batch or (per_process // settings.grad_accum if settings.grad_accum else per_process)
    accum = settings.grad_accum or (per_process // micro if micro else 0)
    if micro < 1 or accum < 1 or micro * accum * settings.num_processes != total:
        raise ValueError(
            f"GrpoSettings: micro_batch={settings.micro_batch} x grad_accum={settings.grad_accum} x "
            f"num_processes={settings.num_processes} must equal questions_per_step x num_generations = "
            f"{settings.questions_per_step} x {settings.num_generations} = {total} (one generation "
            "batch per optimizer step)"
        )
    return micro, accum


def cot_per_step(settings: GrpoSettings) -> int:
    """Questions of each step prompted as pure CoT: ``round(cot_fraction x questions_per_step)``."""
    return round(settings.cot_fraction * settings.questions_per_step)


def step_rows(questions: Sequence[dict], settings: GrpoSettings) -> list[tuple[dict, str]]:
    """The questions of every step in order, each with its mode (``"cot"`` / ``"coa"``): ``max_steps`` blocks of
    ``questions_per_step``, exactly :func:`cot_per_step` CoT ones per block.

    Questions are dealt from seeded shuffles of the pool; a pass that does not fill its last block carries the
    rest into the next pass, so every question is used once before any is used again and no block repeats one.
    """
    per_step, k = settings.questions_per_step, cot_per_step(settings)
    if len(questions) < per_step:
        raise ValueError(f"{len(questions)} questions cannot fill GrpoSettings.questions_per_step={per_step}")
    rng = random.Random(settings.seed)
    carry: list[int] = []
    out: list[tuple[dict, str]] = []
    while len(out) < settings.max_steps * per_step:
        carried = set(carry)
        rest = [i for i in range(len(questions)) if i not in carried]
        rng.shuffle(rest)
        deck = carry + rest
        full = len(deck) // per_step * per_step
        deck, carry = deck[:full], deck[full:]
        for b in range(0, full, per_step):
            cot = set(rng.sample(range(per_step), k))
            out += [(questions[i], "cot" if j in cot else "coa") for j, i in enumerate(deck[b : b + per_step])]
    return out[: settings.max_steps * per_step]


def _check_questions(settings: GrpoSettings, questions: Sequence[dict]) -> None:
    if len(questions) < settings.questions_per_step:
        raise ValueError(
            f"{len(questions)} questions cannot fill GrpoSettings.questions_per_step={settings.questions_per_step}"
        )
    for q in questions:
        missing = [k for k in ("question_id", "question", "gold_answers") if k not in q]
        if missing:
            raise ValueError(f"question {q.get('question_id', q)!r} lacks {missing}")
        golds = q["gold_answers"]
        if isinstance(golds, str) or not golds or not all(isinstance(g, str) for g in golds):
            raise ValueError(f"question {q['question_id']!r}: gold_answers must be a non-empty list of strings")


def launched_processes() -> int:
    """The processes this run was launched on: ``WORLD_SIZE``, which torchrun and ``accelerate launch`` set."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _same_world(settings: GrpoSettings, world: int, micro: int, accum: int) -> None:
    if world != settings.num_processes:
        raise ValueError(
            f"GrpoSettings.num_processes={settings.num_processes} but this run has {world} process(es): "
            f"micro_batch {micro} x grad_accum {accum} x {world} would not make one step's "
            f"{settings.questions_per_step} x {settings.num_generations} completions (launch it on "
            f"{settings.num_processes} processes, or set num_processes, micro_batch and grad_accum for "
            "this one)"
        )


def grpo_config(settings: GrpoSettings, output_dir: str | Path, *, max_context: int):
    """The ``GRPOConfig`` for ``settings`` (one generation batch per optimizer step: on-policy, μ = 1)."""
    import torch
    from trl import GRPOConfig

    micro, accum = batch_layout(settings)
    _same_world(settings, launched_processes(), micro, accum)  # before TRL's own batch checks, which say less
    cuda = torch.cuda.is_available()
    if settings.use_vllm and not cuda:
        raise ValueError(
            "GrpoSettings.use_vllm needs a GPU (TRL's colocated vLLM); the CPU path uses the live transformers policy"
        )
    extra = (
        dict(
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            vllm_max_model_length=max_context + settings.answer_tokens + 16,
        )
        if settings.use_vllm
        else {}
    )
    args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum,
        num_generations=settings.num_generations,
        shuffle_dataset=False,
        num_iterations=1,
        beta=settings.beta,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_completion_length=settings.max_completion_tokens,
        loss_type=settings.loss_type,
        epsilon=settings.epsilon,
        max_grad_norm=settings.max_grad_norm,
        reward_weights=trl_reward_weights(),
        seed=settings.seed,
        logging_steps=1,
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=settings.gradient_checkpointing,
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_vllm=settings.use_vllm,
        **extra,
    )
    _same_world(settings, args.world_size, micro, accum)
    want = settings.questions_per_step * settings.num_generations
    if args.generation_batch_size != want or args.steps_per_generation != accum:
        raise RuntimeError(
            f"TRL's generation batch is {args.generation_batch_size} completions over "
            f"{args.steps_per_generation} steps, not one step's {want}: has GRPOConfig's rule changed?"
        )
    return args


def train_grpo(
    model_path: str,
    questions: Sequence[dict],
    out: str | Path,
    settings: GrpoSettings = GrpoSettings(),
    *,
    search: SearchFn | None = None,
    simulated_fraction: float = 1.0,
    reward_settings: RewardSettings = RewardSettings(),
    template: PromptTemplate | None = None,
    cot_template: PromptTemplate | None = None,
    engine_factory: EngineFactory | None = None,
    data_version: str = "",
    stage: str = "rl",
    resume_from: str | None = None,
) -> GrpoResult:
    """GRPO on ``questions`` (dicts with ``question_id``, ``question``, ``gold_answers``) from ``model_path``.

    The first ``round(simulated_fraction * max_steps)`` steps roll out in the simulated environment,
    the rest call ``search`` (``queries -> [(rendered results, passage ids)]``, e.g.
    :func:`agent.rollout.search_tool`), required when any step is real. Prompts use ``template``
    (default: the CoA template of the chain's root model); the ``cot_fraction`` share of each step's
    questions use ``cot_template`` (default: the root model's CoT template) and roll out with the tool off
    (:func:`step_rows`). ``engine_factory(trainer)`` overrides the
    sampling engine (a context manager; default: the live policy). Writes the checkpoint to ``out``.
    ``resume_from`` (a ``<out>.work/checkpoint-N`` written with ``save_steps``) keeps the schedule, which
    reads the global step; the cost table then covers only the batches generated by this call.
    """
    from datasets import Dataset
    from trl import GRPOTrainer

    batch_layout(settings)
    _check_questions(settings, questions)
    schedule = SimulationSchedule.from_fraction(simulated_fraction, settings.max_steps)
    if schedule.simulated_steps < settings.max_steps and search is None:
        real = settings.max_steps - schedule.simulated_steps
        raise ValueError(
            f"simulated_fraction={simulated_fraction} leaves {real} real-environment steps, "
            "which need a `search` function"
        )
    out = Path(out)
    model, tok = load_model(model_path, settings)
    templates = {
        "coa": template or template_for("coa", root_model(model_path)),
        "cot": cot_template or template_for("cot", root_model(model_path)),
    }
    for mode, t in templates.items():
        if t.mode != mode:
            raise ValueError(f"the {mode} prompts need a {mode} template, got {t.id!r} ({t.mode})")
    plan = step_rows(questions, settings)
    rendered = {(id(q), mode): templates[mode].render(tok, q["question"]) for q, mode in plan}
    prompt_modes: dict[str, str] = {}
    for (_, mode), p in rendered.items():
        if prompt_modes.setdefault(p, mode) != mode:
            raise ValueError("a CoT and a CoA prompt render the same text: the rollout could not tell them apart")
    max_prompt = max(len(tok.encode(p, add_special_tokens=False)) for p in prompt_modes)
    rollout_config = RolloutConfig(
        max_actions=settings.max_actions,
        max_context=max_prompt + settings.max_completion_tokens,
        max_turn_tokens=settings.max_turn_tokens,
        answer_tokens=settings.answer_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        search_k=settings.search_k,
        seed=settings.seed,
    )
    # gold_answers reach the reward functions as a dataset column (TRL passes every column as kwargs); the
    # rows are in step order and TRL reads them so (shuffle_dataset=False)
    dataset = Dataset.from_list(
        [
            {
                "prompt": rendered[(id(q), mode)],
                "question_id": str(q["question_id"]),
                "gold_answers": list(q["gold_answers"]),
                "mode": mode,
                "template": templates[mode].id,
            }
            for q, mode in plan
        ]
    )
    ledger = CostLedger()
    rollout_func = make_rollout_func(
        search=search,
        schedule=schedule,
        rollout_config=rollout_config,
        ledger=ledger,
        engine_factory=engine_factory,
        mask_simulated_observations=settings.mask_simulated_observations,
        prompt_modes=prompt_modes,
        cot_rollout_config=cot_config(rollout_config, settings.max_completion_tokens),
    )
    args = grpo_config(settings, Path(str(out) + ".work"), max_context=rollout_config.max_context)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward_funcs(reward_settings),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        rollout_func=rollout_func,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    result = GrpoResult(
        str(out),
        trainer.state.global_step,
        schedule.simulated_steps,
        log_history(trainer, "reward"),
        {name: log_history(trainer, f"rewards/{name}/mean") for name in COMPONENTS},
        log_history(trainer, "kl"),
        log_history(trainer, "loss"),
        ledger.rows(),
        ledger.totals(),
        wall,
    )
    log.info(
        "GRPO: %d steps (%d simulated) in %.0fs, cost %s",
        result.steps,
        result.simulated_steps,
        wall,
        result.cost_totals,
    )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    save_checkpoint(
        trainer,
        policy,
        tok,
        out,
        {
            "stage": stage,
            "base_model": model_path,
            "root_model": root_model(model_path),
            "data_version": data_version,
            "template": templates["coa"].id,
            "cot_template": templates["cot"].id,
            "cot_per_step": cot_per_step(settings),
            "settings": asdict(settings),
            "reward_settings": asdict(reward_settings),
            "rollout": asdict(rollout_config),
            "simulated_fraction": simulated_fraction,
            "simulated_steps": result.simulated_steps,
            "steps": result.steps,
            "reward_curve": result.reward_curve,
            "reward_components": result.reward_components,
            "kl_curve": result.kl_curve,
            "loss_curve": result.loss_curve,
            "cost": result.cost,
            "cost_totals": result.cost_totals,
            "wall_seconds": wall,
            "questions": len(questions),
        },
    )
    return result
