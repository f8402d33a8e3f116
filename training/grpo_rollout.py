"""The AutoCoA rollout as TRL's ``rollout_func``: multi-turn trajectories from the live policy, token-exact.

TRL 1.16's ``GRPOTrainer`` calls ``rollout_func(prompts, trainer)`` once per generation batch with
one prompt per completion: its ``RepeatSampler`` already repeated every dataset row
``num_generations`` times in consecutive runs (``_generate_and_score_completions`` takes
``prompts = [x["prompt"] for x in inputs]`` over those rows; rewards and extra fields are then
indexed per row). The docstring's "no duplication" means the trainer adds none on top of the
sampler's. :func:`check_groups` asserts that layout, and one trajectory is returned per entry.

What TRL does with the returned ``logprobs`` (read in ``grpo_trainer.py``): they become
``sampling_per_token_logps`` and are used only by the vLLM importance-sampling correction
(``use_vllm`` and ``vllm_importance_sampling_correction``) and by the off-policy mask
(``off_policy_mask_threshold``, which falls back to the recomputed old log-probs without them).
The ratio of the loss itself is recomputed from the model. TRL's own transformers generation path
returns ``None`` for them, and so does this rollout with the live transformers policy (sampling is
on-policy there); with vLLM each sampled token's processed log-probability is returned (0.0 on
environment tokens, which the mask excludes anyway). Those are what the wrapped ``LLM``'s
``logprobs_mode`` gives: TRL builds its colocated LLM with ``processed_logprobs`` (temperature
applied), matching its own temperature-scaled recomputation.

``env_mask`` (TRL's ``tool_mask``) is 1 on tokens the policy sampled and 0 on environment tokens:
real ``<search_result>`` blocks, the ``\\n<search_result>\\n`` opener of a simulated block, the
refusal notice, the forced-answer prompt; with ``mask_simulated_observations`` (default) also the
policy-written body of simulated results, so RL-1 trains when and what to search, not the world model.

Pure CoT in RL (the paper's section 3.1 mixes CoT data into RL as into SFT): TRL hands ``rollout_func``
only the prompt strings, so :func:`make_rollout_func` takes ``prompt_modes`` (prompt text -> ``"cot"`` or
``"coa"``, built from the dataset rows, whose CoT and CoA templates never render the same text). A CoT
prompt is rolled out with the tool off and ``cut_actions`` (an action it opens ends its reasoning and the
answer is forced), in no environment at all; CoA prompts in the batch's environment. The two sets run one
after the other on the same engine and come back in TRL's order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace

from agent.engine_api import Engine, GenRequest, GenResult
from agent.rollout import Rollout, RolloutConfig, Trajectory
from agent.transformers_engine import TransformersEngine
from training.rewards import think_left_open

SearchFn = Callable[[list[str]], list[tuple[str, list[str]]]]
EngineFactory = Callable[[object], AbstractContextManager]


@dataclass(frozen=True)
class SimulationSchedule:
    """Which optimizer steps roll out in the simulated environment: steps ``< simulated_steps``.

    The paper's run: 96 steps, the first 80 simulated (RL-1), the last 16 real (RL-2).
    """

    simulated_steps: int

    def __call__(self, step: int) -> bool:
        return step < self.simulated_steps

    @classmethod
    def from_fraction(cls, fraction: float, max_steps: int) -> SimulationSchedule:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"simulated_fraction must be within [0, 1], got {fraction}")
        steps = round(fraction * max_steps)
        if 0.0 < fraction < 1.0 and max_steps >= 2:  # a two-phase run keeps both phases at any step count
            steps = min(max(steps, 1), max_steps - 1)
        return cls(steps)


PAPER_SIMULATED_FRACTION = 80 / 96


@dataclass
class StepCost:
    """What one generation batch cost (``step`` is the optimizer step it was generated at)."""

    step: int
    mode: str  # "simulated" | "real"
    trajectories: int
    cot_trajectories: int  # rolled out with the tool off (pure CoT prompts); the rest are CoA
    distinct_prompts: int
    search_calls: int  # real search-engine queries
    simulated_observations: int  # result blocks the policy wrote itself
    refused_actions: int
    generated_tokens: int  # sampled by the policy
    environment_tokens: int  # appended by the environment (observations, notices, forced prompts)
    trained_tokens: int  # env_mask == 1
    answered: int
    wall_seconds: float


@dataclass
class CostLedger:
    records: list[StepCost] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def totals(self) -> dict:
        sums = {
            k: sum(getattr(r, k) for r in self.records)
            for k in (
                "trajectories",
                "cot_trajectories",
                "search_calls",
                "simulated_observations",
                "refused_actions",
                "generated_tokens",
                "environment_tokens",
                "trained_tokens",
                "answered",
                "wall_seconds",
            )
        }
        return {
            "batches": len(self.records),
            "simulated_batches": sum(r.mode == "simulated" for r in self.records),
            "real_batches": sum(r.mode == "real" for r in self.records),
            **sums,
        }


class LogprobRecorder:
    """Engine wrapper that remembers each generation's per-token log-probs (``GenResult.meta["logprobs"]``,
    e.g. :meth:`agent.vllm_engine.VLLMEngine.from_llm`) so they can be laid over a finished trajectory
    without touching the rollout loop. ``complete`` turns False when any result came without them."""

    def __init__(self, engine: Engine):
        self.engine, self.tokenizer, self.name = engine, engine.tokenizer, getattr(engine, "name", "engine")
        self.complete = True
        self._seen: dict[tuple[int, int], list[tuple[tuple[int, ...], list[float]]]] = {}
        if hasattr(engine, "agenerate"):  # the rollout streams to engines that have it: keep that
            self.agenerate = self._agenerate
        if hasattr(engine, "aclose"):
            self.aclose = engine.aclose

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        results = self.engine.generate(requests)
        for req, res in zip(requests, results):
            self._note(req, res)
        return results

    async def _agenerate(self, request: GenRequest) -> GenResult:
        res = await self.engine.agenerate(request)
        self._note(request, res)
        return res

    def _note(self, req: GenRequest, res: GenResult) -> None:
        lp = (res.meta or {}).get("logprobs")
        if lp is None or len(lp) != len(res.token_ids):
            self.complete = False
        elif res.token_ids:
            key = (len(req.prompt_ids), hash(tuple(req.prompt_ids)))
            self._seen.setdefault(key, []).append((tuple(res.token_ids), [float(x) for x in lp]))

    def logprobs(self, traj: Trajectory) -> list[float]:
        """Per completion token: the sampled log-prob on policy tokens, 0.0 on environment tokens.

        Samples of one prompt share prefixes, so a generation is found by its prefix *and* its tokens;
        a log-prob depends only on the prefix and the token, so any matching record is right, and the
        search backtracks only to find a segmentation of the trajectory into recorded generations.
        """
        ids, mask = traj.token_ids, traj.policy_mask

        def walk(i: int) -> list[float] | None:  # recursion depth: one level per generation
            start = i
            while i < len(ids) and not mask[i]:
                i += 1
            zeros = [0.0] * (i - start)
            if i == len(ids):
                return zeros
            found = self._seen.get((i, hash(tuple(ids[:i]))), [])
            for gen, lp in sorted(found, key=lambda c: -len(c[0])):
                if tuple(ids[i : i + len(gen)]) == gen and all(mask[i : i + len(gen)]):
                    rest = walk(i + len(gen))
                    if rest is not None:
                        return zeros + lp + rest
            return None

        out = walk(traj.prompt_len)
        if out is None:
            raise RuntimeError(f"{traj.task_id}: the policy tokens do not match the recorded generations")
        return out


def check_groups(prompts: Sequence, num_generations: int) -> int:
    """Assert TRL's layout (runs of ``num_generations`` identical prompts); returns the number of groups."""
    n = len(prompts)
    if num_generations < 1 or n % num_generations:
        raise RuntimeError(f"rollout_func got {n} prompts, not a multiple of num_generations={num_generations}")
    for start in range(0, n, num_generations):
        if any(p != prompts[start] for p in prompts[start : start + num_generations]):
            raise RuntimeError(
                "rollout_func expects TRL's RepeatSampler layout (each prompt repeated "
                f"num_generations={num_generations} times in a row); the prompts at "
                f"{start}..{start + num_generations - 1} differ: has TRL's contract changed?"
            )
    return n // num_generations


@contextmanager
def policy_engine(trainer, *, max_batch: int = 64) -> Iterator[Engine]:
    """The engine that samples from the policy being trained, right now.

    Without vLLM: the trainer's own model object (unwrapped as TRL does for generation, gradient
    checkpointing off, eval mode during the rollout, its previous mode restored after). With TRL's
    colocated vLLM (``use_vllm``, ``vllm_mode="colocate"``): ``trainer.vllm_generation.llm``, whose
    weights TRL syncs from the policy before calling ``rollout_func``, wrapped with log-probs on.
    """
    tokenizer = trainer.processing_class
    if getattr(trainer, "use_vllm", False):
        gen = trainer.vllm_generation
        if gen.mode != "colocate":
            raise ValueError(
                "use_vllm with vllm_mode='server' is not supported by the AutoCoA rollout: it needs "
                "an in-process LLM (TRL's server exposes no stop-string, token-id continuation API)"
            )
        if gen.enable_sleep_mode:
            raise ValueError(
                "vllm_enable_sleep_mode must be False: the multi-turn rollout keeps the KV cache "
                "awake across turns and TRL only wakes it inside its own generate()"
            )
        from agent.vllm_engine import VLLMEngine

        cache = trainer.__dict__.setdefault("_autocoa_engines", {})  # one stepping thread per LLM
        if id(gen.llm) not in cache:
            cache[id(gen.llm)] = VLLMEngine.from_llm(gen.llm, tokenizer, logprobs=True)
        yield cache[id(gen.llm)]
        return
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
    ) as model:
        was_training = model.training
        model.eval()
        try:
            yield TransformersEngine.from_model(model, tokenizer, max_batch=max_batch)
        finally:
            model.train(was_training)


def _num_generations(trainer) -> int:
    model = getattr(trainer, "model", None)
    if model is not None and not model.training and getattr(trainer, "num_generations_eval", None):
        return trainer.num_generations_eval
    return trainer.num_generations


def rollout_outputs(
    trajs: Sequence[Trajectory],
    prompts: Sequence[str],
    recorder: LogprobRecorder | None,
    mask_simulated_observations: bool = True,
) -> dict:
    """TRL's rollout dict: ids straight from the trajectories, ``env_mask``, log-probs, reward fields."""
    out: dict[str, list] = {
        k: []
        for k in (
            "prompt_ids",
            "completion_ids",
            "env_mask",
            "completion_text",
            "think_open",
            "n_actions",
            "refused_actions",
            "search_calls",
            "simulated_observations",
            "generated_tokens",
            "finish_reason",
        )
    }
    logprobs: list[list[float]] | None = [] if recorder is not None and recorder.complete else None
    for t, prompt in zip(trajs, prompts, strict=True):
        p = t.prompt_len
        completion, mask = t.token_ids[p:], list(t.policy_mask[p:])
        sims = [s for s in t.spans if s.kind == "observation" and s.simulated]
        if mask_simulated_observations:
            for s in sims:
                mask[s.start - p : s.end - p] = [0] * (s.end - s.start)
        if logprobs is not None:
            logprobs.append(recorder.logprobs(t))
        if len(mask) != len(completion) or (logprobs is not None and len(logprobs[-1]) != len(completion)):
            raise RuntimeError(f"{t.task_id}: completion ids, env_mask and logprobs are not aligned")
        out["prompt_ids"].append(t.token_ids[:p])
        out["completion_ids"].append(completion)
        out["env_mask"].append(mask)
        out["completion_text"].append(t.completion)
        out["think_open"].append(think_left_open(prompt))
        out["n_actions"].append(t.n_actions)
        out["refused_actions"].append(sum(1 for s in t.spans if s.kind == "action" and s.refused))
        out["search_calls"].append(t.search_calls)
        out["simulated_observations"].append(len(sims))
        out["generated_tokens"].append(t.generated_tokens)
        out["finish_reason"].append(t.finish_reason)
    return {**out, "logprobs": logprobs}


MODES = ("cot", "coa")


def cot_config(config: RolloutConfig, max_completion_tokens: int | None = None) -> RolloutConfig:
    """The rollout config of a pure-CoT prompt: tool off, an opened action cut, in no environment; the whole
    response is one turn (``max_completion_tokens`` when given)."""
    turn = max_completion_tokens if max_completion_tokens is not None else config.max_turn_tokens
    return replace(config, tools=False, cut_actions=True, simulated=False, max_turn_tokens=turn)


def make_rollout_func(
    *,
    search: SearchFn | None = None,
    schedule: Callable[[int], bool] | None = None,
    rollout_config: RolloutConfig = RolloutConfig(),
    ledger: CostLedger | None = None,
    engine_factory: EngineFactory | None = None,
    mask_simulated_observations: bool = True,
    max_batch: int = 64,
    prompt_modes: Mapping[str, str] | None = None,
    cot_rollout_config: RolloutConfig | None = None,
) -> Callable[[list, object], dict]:
    """A TRL ``rollout_func(prompts, trainer)`` running :class:`agent.rollout.Rollout` with the live policy.

    ``prompts`` are the rendered prompt strings of the dataset (``training.grpo`` renders the CoA or CoT
    template; the prefilled ``<think>`` included) and are encoded exactly as
    ``PromptTemplate.prompt_ids`` does. ``schedule(trainer.state.global_step)`` says simulated (True)
    or real (False) for each generation batch (default: always simulated); a real batch needs
    ``search``. ``prompt_modes`` maps each prompt to ``"cot"`` or ``"coa"`` (None: every prompt is CoA);
    CoT prompts roll out with ``cot_rollout_config`` (default :func:`cot_config` of ``rollout_config``).
    ``engine_factory(trainer)`` is a context manager yielding the engine (default :func:`policy_engine`).
    Each batch's cost is appended to ``ledger``.
    """
    factory = engine_factory or (lambda trainer: policy_engine(trainer, max_batch=max_batch))
    if prompt_modes is not None and set(prompt_modes.values()) - set(MODES):
        raise ValueError(f"prompt_modes values must be in {MODES}, got {sorted(set(prompt_modes.values()))}")
    cot_rollout = cot_rollout_config or cot_config(rollout_config)
    if cot_rollout.tools:
        raise ValueError("cot_rollout_config must have tools=False: a pure-CoT prompt never searches")

    def mode_of(prompt: str) -> str:
        if prompt_modes is None:
            return "coa"
        if prompt not in prompt_modes:
            raise KeyError(f"rollout_func got a prompt that prompt_modes does not know: {prompt[-120:]!r}")
        return prompt_modes[prompt]

    def rollout_func(prompts: list, trainer) -> dict:
        step = int(trainer.state.global_step)
        simulated = True if schedule is None else bool(schedule(step))
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(
                "rollout_func expects rendered prompt strings in the dataset's `prompt` column, "
                f"got {type(prompts[0]).__name__}"
            )
        modes = [mode_of(p) for p in prompts]
        if not simulated and search is None and "coa" in modes:
            raise ValueError(
                f"step {step} is scheduled in the real environment but no `search` function was given "
                "(pass search=..., or simulated_fraction=1.0 for a simulated-only run)"
            )
        groups = check_groups(prompts, _num_generations(trainer))
        tokenizer = trainer.processing_class
        encoded = {p: tokenizer.encode(p, add_special_tokens=False) for p in dict.fromkeys(prompts)}
        size = len(prompts) // groups
        tasks = [(f"s{step}/q{i // size}/g{i % size}", list(encoded[p])) for i, p in enumerate(prompts)]
        coa_config = replace(rollout_config, simulated=simulated)
        trajs: list[Trajectory | None] = [None] * len(prompts)
        start = time.perf_counter()
        with factory(trainer) as engine:
            recorder = LogprobRecorder(engine)
            for mode, config, env in (("coa", coa_config, None if simulated else search), ("cot", cot_rollout, None)):
                idx = [i for i, m in enumerate(modes) if m == mode]
                if idx:
                    done = Rollout(recorder, env, config, max_batch=max_batch).run([tasks[i] for i in idx])
                    for i, t in zip(idx, done, strict=True):
                        trajs[i] = t
        wall = time.perf_counter() - start
        out = rollout_outputs(trajs, prompts, recorder, mask_simulated_observations)
        if (
            out["logprobs"] is None
            and getattr(trainer, "use_vllm", False)
            and getattr(trainer, "vllm_importance_sampling_correction", False)
        ):
            raise RuntimeError(
                "vllm_importance_sampling_correction needs the sampled tokens' log-probs, but the "
                "engine returned none (use VLLMEngine.from_llm(..., logprobs=True))"
            )
        if ledger is not None:
            completion_tokens = sum(len(c) for c in out["completion_ids"])
            ledger.records.append(
                StepCost(
                    step=step,
                    mode="simulated" if simulated else "real",
                    trajectories=len(trajs),
                    cot_trajectories=modes.count("cot"),
                    distinct_prompts=len(encoded),
                    search_calls=sum(out["search_calls"]),
                    simulated_observations=sum(out["simulated_observations"]),
                    refused_actions=sum(out["refused_actions"]),
                    generated_tokens=sum(out["generated_tokens"]),
                    environment_tokens=completion_tokens - sum(sum(t.policy_mask[t.prompt_len :]) for t in trajs),
                    trained_tokens=sum(sum(m) for m in out["env_mask"]),
                    answered=sum(t.answer is not None for t in trajs),
                    wall_seconds=round(wall, 3),
                )
            )
        out["simulated"] = [simulated] * len(trajs)
        out["mode"] = modes
        return out

    return rollout_func
