"""The rollout loop (the paper's Algorithm 1), token-level and concurrent.

Each trajectory is a coroutine: it asks the generation batcher to continue its exact token ids
until ``</end_search>`` or the end, then either asks the search batcher for results and appends the
rendered ``<search_result>`` block as observation tokens (real environment), or lets the policy
write that block itself (simulated environment), and goes on. Budgets: at most ``max_actions``
actions and ``max_context`` tokens; when either is exhausted an answer is forced by appending
``</think>`` and a ``\\boxed{`` prompt (Algorithm 1, lines 29-31).

Rules that keep the method exact (each is a statement in ``tests/test_method_fidelity.py``):

- **A sequence never exceeds ``max_context`` tokens.** Room for the forced answer (its prompt and
  ``answer_tokens``) is reserved from the start; an observation that does not fit is cut at a token
  boundary and closed with :data:`TRUNCATED` (visible to the policy, masked); when not even a cut
  block fits, the search is refused and the answer forced.
- **The T-th action ends the loop** (``after_last_action="force"``, Algorithm 1): right after the T-th
  observation the answer is forced. ``"refuse"`` keeps the older rule: the policy reasons on and a
  (T+1)-th action is refused with :data:`SEARCH_LIMIT`.
- **A simulated observation the policy ends with EOS or at the length limit** is closed by the
  environment (``\n</search_result>\n`` appended, masked; the EOS ids dropped) and the rollout goes on;
  the span records ``closed_by``. The same rule serves GRPO (RL-1) and the fidelity probes
  (:func:`close_simulated_block`).
- **The forced answer closes ``\\boxed{`` by brace balance**, not at the first ``}``.
- **One trajectory's failure never fails the others**: it becomes a trajectory with
  ``finish_reason="error"`` and the message in ``error``.

The trajectory is never decoded and re-encoded: ``token_ids`` are the prompt, the ids the engine
produced and the ids of each appended observation; ``policy_mask`` is 1 exactly on the ids the
policy generated; ``spans`` locate every action and observation in token space.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.batching import AsyncBatcher
from agent.engine_api import Engine, GenRequest, GenResult
from agent.protocol import ACTION_CLOSE, ACTION_OPEN, OBS_CLOSE, OBS_OPEN, THINK_CLOSE
from qadata.answers import extract_boxed

log = logging.getLogger(__name__)

FORCE_BOX = "\n\nThe final answer is \\boxed{"
FORCE_ANSWER = f"\n{THINK_CLOSE}{FORCE_BOX}"
SEARCH_LIMIT = "The search limit is reached; answer with what you know."
TRUNCATED = "\n[result truncated: context budget reached]"
OBS_OPEN_TEXT = f"\n{OBS_OPEN}\n"  # how the environment opens a result block
OBS_CLOSE_TEXT = f"\n{OBS_CLOSE}\n"  # how the environment closes one
AFTER_LAST_ACTION = ("force", "refuse")


@dataclass(frozen=True)
class RolloutConfig:
    """Settings of one rollout (Algorithm 1). The single source of truth: the Dagster stages expose these fields
    (with this help) through :func:`assets.settings.rollout_settings`, each with its own defaults."""

    max_actions: int = field(default=5, metadata={"help": "T: searches allowed per trajectory."})
    max_context: int = field(default=2048, metadata={"help": "N: tokens per trajectory, prompt included."})
    max_turn_tokens: int = field(
        default=512, metadata={"help": "Tokens the policy may write before its next action (one turn)."}
    )
    answer_tokens: int = field(default=24, metadata={"help": "Tokens allowed for a forced answer."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature of the policy (0 = greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling."})
    search_k: int = field(default=3, metadata={"help": "Passages per search result."})
    simulated: bool = field(
        default=False, metadata={"help": "The policy writes its own search results (RL-1's simulated environment)."}
    )
    tools: bool = field(
        default=True,
        metadata={"help": "False: CoT (no tool); the policy generates to the end, an action is not executed."},
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed."})
    force_answer: bool = field(
        default=False,
        metadata={
            "help": "A trajectory that ends (EOS) without \\boxed{} has the EOS dropped and is prompted for the "
            "answer, as at the budget (Algorithm 1's forced answer); finish_reason 'forced' marks it."
        },
    )
    cut_actions: bool = field(
        default=False,
        metadata={
            "help": "Tools off: an action the policy opens ends its reasoning there (the opened tag is cut) and "
            "the answer is forced, so a no-tool trajectory never contains an action (finish_reason 'action_cut')."
        },
    )
    after_last_action: str = field(
        default="force",
        metadata={
            "help": "After the T-th observation: 'force' the answer at once (Algorithm 1), or 'refuse': let the "
            "policy reason on and refuse a (T+1)-th action with SEARCH_LIMIT."
        },
    )

    def __post_init__(self) -> None:
        if self.after_last_action not in AFTER_LAST_ACTION:
            raise ValueError(f"after_last_action must be one of {AFTER_LAST_ACTION}, got {self.after_last_action!r}")
        if self.max_context < 1 or self.answer_tokens < 1:
            raise ValueError("max_context and answer_tokens must be >= 1")


@dataclass
class Span:
    kind: str  # action | observation | forced
    start: int  # token offsets into Trajectory.token_ids, [start, end)
    end: int
    simulated: bool = False
    text: str = ""
    passage_ids: list[str] = field(default_factory=list)
    refused: bool = False  # an action over the budget T (or with no room left): not executed
    truncated: bool = False  # observation cut at a token boundary to fit max_context (ends with TRUNCATED)
    closed_by: str = (
        ""  # simulated observation: "policy" (it wrote the closing tag), "eos" or "length" (the environment closed it)
    )


@dataclass
class Trajectory:
    task_id: str
    prompt_len: int
    token_ids: list[int]
    policy_mask: list[int]
    spans: list[Span] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    finish_reason: str = ""
    answer: str | None = None
    completion: str = ""
    wall_seconds: float = 0.0
    generated_tokens: int = 0
    search_calls: int = 0
    error: str = ""  # finish_reason "error": what failed (the other trajectories of the batch are unaffected)

    @property
    def n_actions(self) -> int:
        """Actions executed (an action over the budget is refused and not counted)."""
        return sum(1 for s in self.spans if s.kind == "action" and not s.refused)


def _query_of(turn_text: str) -> str:
    start = turn_text.rfind(ACTION_OPEN)
    body = turn_text[start + len(ACTION_OPEN) :] if start >= 0 else turn_text
    return body.replace(ACTION_CLOSE, "").strip()


def render_observation(rendered_results: str) -> str:
    return f"\n{OBS_OPEN}\n{rendered_results}\n{OBS_CLOSE}\n"


def close_simulated_block(res: GenResult, eos_ids: set[int]) -> tuple[list[int], bool, str]:
    """How a simulated ``<search_result>`` block the policy was writing ends (rollouts, GRPO, probes alike).

    Returns ``(kept policy ids, whether the environment must append OBS_CLOSE_TEXT, closed_by)``: a block the
    policy closed itself is kept whole; after EOS the EOS ids are dropped and the environment closes the block;
    at the length limit the environment closes it too. Reasoning the policy wrote after an EOS never exists:
    generation stops there.
    """
    ids = list(res.token_ids)
    if res.finish_reason == "stop":
        return ids, False, "policy"
    if res.finish_reason == "eos":
        while ids and ids[-1] in eos_ids:
            ids.pop()
        return ids, True, "eos"
    return ids, True, "length"


def search_tool(engine, k: int) -> Callable[[list[str]], list[tuple[str, list[str]]]]:
    """Adapt a ``retrieval`` search engine to the rollout: each query -> (rendered results, passage ids)."""
    from retrieval.render import render_results

    def run(queries: list[str]) -> list[tuple[str, list[str]]]:
        return [(render_results(hits), [p.id for p in hits]) for hits in engine.search(queries, k)]

    return run


class Rollout:
    """Runs many trajectories concurrently over one engine and one search function
    (``queries -> [(rendered results, passage ids)]``, see :func:`search_tool`)."""

    def __init__(
        self,
        engine: Engine,
        search: Callable[[list[str]], list[tuple[str, list[str]]]] | None,
        config: RolloutConfig = RolloutConfig(),
        *,
        max_batch: int = 64,
        search_batch: int = 256,
        on_done: Callable[[Trajectory], None] | None = None,
    ):
        if search is None and config.tools and not config.simulated:
            raise ValueError("a real-environment rollout needs a search function")
        self.engine, self.config = engine, config
        self.tokenizer = engine.tokenizer
        # engines with their own scheduler (vLLM's stepping thread, an HTTP server) take requests one
        # by one; batch-only engines (transformers) get a dynamic batcher in front
        self._streaming = hasattr(engine, "agenerate")
        self.generate = None if self._streaming else AsyncBatcher(engine.generate, max_batch, name="generate")
        self.search = AsyncBatcher(search, search_batch, name="search") if search else None
        self.on_done = on_done  # called as each trajectory finishes (progress bars, logs)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def run(self, tasks: Sequence[tuple[str, list[int]]]) -> list[Trajectory]:
        """Roll out ``(task_id, prompt_ids)`` pairs; returns trajectories in task order."""
        return asyncio.run(self._run_all(tasks))

    async def _run_all(self, tasks):
        try:
            return await asyncio.gather(*(self._guarded(tid, ids) for tid, ids in tasks))
        finally:
            if self.generate is not None:
                await self.generate.close()
            if hasattr(self.engine, "aclose"):
                await self.engine.aclose()
            if self.search:
                await self.search.close()

    async def _guarded(self, task_id: str, prompt_ids: list[int]) -> Trajectory:
        """:meth:`one`, with a failure turned into an ``error`` trajectory instead of failing the batch."""
        t0 = time.perf_counter()
        try:
            return await self.one(task_id, prompt_ids)
        except Exception as exc:  # noqa: BLE001 - recorded on the row, counted by the caller
            log.warning("trajectory %s failed: %s: %s", task_id, type(exc).__name__, exc)
            traj = Trajectory(
                task_id,
                len(prompt_ids),
                list(prompt_ids),
                [0] * len(prompt_ids),
                finish_reason="error",
                error=f"{type(exc).__name__}: {exc}"[:2000],
                wall_seconds=time.perf_counter() - t0,
            )
            if self.on_done is not None:
                self.on_done(traj)
            return traj

    async def _gen(self, traj: Trajectory, max_new: int, stop: tuple[str, ...]):
        cfg = self.config
        req = GenRequest(
            list(traj.token_ids),
            max_new,
            stop,
            cfg.temperature,
            cfg.top_p,
            self._seed(traj.task_id, len(traj.token_ids)),
        )
        res = await (self.engine.agenerate(req) if self._streaming else self.generate.submit(req))
        traj.token_ids += res.token_ids
        traj.policy_mask += [1] * len(res.token_ids)
        traj.generated_tokens += len(res.token_ids)
        return res

    def _seed(self, task_id: str, position: int) -> int | None:
        """A distinct, reproducible seed per trajectory and turn (samples of one question must differ)."""
        if self.config.seed is None:
            return None
        digest = hashlib.blake2b(f"{self.config.seed}/{task_id}/{position}".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little") & 0x7FFFFFFF

    def _append_env(self, traj: Trajectory, ids: list[int]) -> tuple[int, int]:
        start = len(traj.token_ids)
        traj.token_ids += ids
        traj.policy_mask += [0] * len(ids)
        return start, len(traj.token_ids)

    def _drop_trailing_eos(self, traj: Trajectory) -> None:
        """Remove the end-of-sequence ids the policy just wrote, so the forced answer continues its text."""
        eos = set(getattr(self.engine, "eos_ids", ())) | set(self.tokenizer.all_special_ids)
        while len(traj.token_ids) > traj.prompt_len and traj.policy_mask[-1] and traj.token_ids[-1] in eos:
            traj.token_ids.pop()
            traj.policy_mask.pop()
            traj.generated_tokens -= 1

    def _token_at_char(self, ids: list[int], char_pos: int) -> int:
        """Index of the token whose decoded text covers ``char_pos`` (prefix decodes grow monotonically)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(ids[: mid + 1])) > char_pos:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _reserve(self) -> int:
        """Tokens kept free for the forced answer: its prompt and ``answer_tokens``."""
        if not hasattr(self, "_reserved"):
            self._reserved = len(self.encode(FORCE_ANSWER)) + self.config.answer_tokens
        return self._reserved

    def _room(self, traj: Trajectory) -> int:
        """Tokens still free for reasoning and observations (the forced answer's room excluded)."""
        return self.config.max_context - len(traj.token_ids) - self._reserve()

    def _fit_observation(self, ids: list[int], room: int) -> tuple[list[int], bool] | None:
        """The observation ids cut to ``room`` at a token boundary (with the truncation notice and the
        closing tag, all environment tokens); None when not even a cut block fits."""
        if len(ids) <= room:
            return ids, False
        tail = self.encode(TRUNCATED) + self.encode(OBS_CLOSE_TEXT)
        keep = room - len(tail)
        if keep < len(self.encode(OBS_OPEN_TEXT)) + 8:
            return None
        return ids[:keep] + tail, True

    async def one(self, task_id: str, prompt_ids: list[int]) -> Trajectory:
        cfg, t0 = self.config, time.perf_counter()
        traj = Trajectory(task_id, len(prompt_ids), list(prompt_ids), [0] * len(prompt_ids))
        if self._room(traj) < 0:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room for the forced answer "
                f"({self._reserve()} tokens) within max_context={cfg.max_context}"
            )
        eos = set(getattr(self.engine, "eos_ids", ())) | set(self.tokenizer.all_special_ids)
        forced = cut_action = False
        while True:
            room = self._room(traj)
            if room <= 8:
                forced = True
                break
            turn_start = len(traj.token_ids)
            stop = (ACTION_CLOSE,) if cfg.tools else (ACTION_OPEN,) if cfg.cut_actions else ()
            res = await self._gen(traj, min(cfg.max_turn_tokens, room), stop)
            if not cfg.tools and res.finish_reason == "stop":
                # cut_actions: drop the opened action (from the token where its tag starts) and answer
                turn_ids = traj.token_ids[turn_start:]
                cut = turn_start + self._token_at_char(turn_ids, self.decode(turn_ids).rfind(ACTION_OPEN))
                del traj.token_ids[cut:], traj.policy_mask[cut:]
                traj.generated_tokens -= len(turn_ids) - (cut - turn_start)
                forced, cut_action = True, True
                break
            if res.finish_reason != "stop":
                traj.finish_reason = res.finish_reason
                unanswered = extract_boxed(self.decode(traj.token_ids[traj.prompt_len :])) is None
                forced = unanswered and (res.finish_reason == "length" or cfg.force_answer)
                if forced and res.finish_reason == "eos":
                    self._drop_trailing_eos(traj)
                break
            query = _query_of(res.text)
            turn_ids = traj.token_ids[turn_start:]
            action_at = self.decode(turn_ids).rfind(ACTION_OPEN)
            start = turn_start + (self._token_at_char(turn_ids, action_at) if action_at >= 0 else 0)
            traj.spans.append(Span("action", start, len(traj.token_ids), text=query))
            traj.queries.append(query)
            if sum(1 for s in traj.spans if s.kind == "action") > cfg.max_actions:
                # "refuse" mode, over the action budget: the environment says so instead of searching (when
                # the notice fits), then an answer is forced
                traj.spans[-1].refused = True
                notice = self._fit_observation(self.encode(render_observation(SEARCH_LIMIT)), self._room(traj))
                if notice is not None:
                    start, end = self._append_env(traj, notice[0])
                    traj.spans.append(Span("observation", start, end, text=SEARCH_LIMIT, truncated=notice[1]))
                forced = True
                break
            if cfg.simulated:
                if not await self._simulate(traj, eos):
                    traj.spans[-1].refused = True  # no room left for a result block
                    forced = True
                    break
            else:
                room = self._room(traj)
                if room < len(self.encode(OBS_OPEN_TEXT)) + len(self.encode(TRUNCATED + OBS_CLOSE_TEXT)) + 8:
                    traj.spans[-1].refused = True  # no room left for any result: not executed, answer forced
                    forced = True
                    break
                rendered, passage_ids = await self.search.submit(query)
                traj.search_calls += 1
                fitted = self._fit_observation(self.encode(render_observation(rendered)), self._room(traj))
                if fitted is None:  # cannot happen after the room check above; kept as a guard
                    raise RuntimeError("observation does not fit after the room check")
                start, end = self._append_env(traj, fitted[0])
                traj.spans.append(
                    Span("observation", start, end, text=rendered, passage_ids=list(passage_ids), truncated=fitted[1])
                )
            if cfg.after_last_action == "force" and traj.n_actions >= cfg.max_actions:
                forced = True  # Algorithm 1: the loop ends when t reaches T, then the answer is forced
                break
        if forced:
            await self._force_answer(traj)
            traj.finish_reason = "action_cut" if cut_action else "forced"
        traj.completion = self.decode(traj.token_ids[traj.prompt_len :])
        traj.answer = extract_boxed(traj.completion)
        traj.wall_seconds = time.perf_counter() - t0
        if len(traj.token_ids) > cfg.max_context:  # the invariant every rule above keeps
            raise AssertionError(
                f"trajectory {task_id} has {len(traj.token_ids)} tokens > max_context {cfg.max_context}"
            )
        if self.on_done is not None:
            self.on_done(traj)
        return traj

    async def _simulate(self, traj: Trajectory, eos: set[int]) -> bool:
        """The policy writes the result block itself (the internal world model); False when it cannot fit."""
        cfg = self.config
        open_ids, close_ids = self.encode(OBS_OPEN_TEXT), self.encode(OBS_CLOSE_TEXT)
        room = self._room(traj) - len(open_ids) - len(close_ids)
        if room < 8:
            return False
        start, _ = self._append_env(traj, open_ids)
        body_start = len(traj.token_ids)
        res = await self._gen(traj, min(cfg.max_turn_tokens, room), (OBS_CLOSE,))
        kept, env_close, closed_by = close_simulated_block(res, eos)
        dropped = len(res.token_ids) - len(kept)
        if dropped:
            del traj.token_ids[body_start + len(kept) :], traj.policy_mask[body_start + len(kept) :]
            traj.generated_tokens -= dropped
        if env_close:
            self._append_env(traj, close_ids)
        text = self.decode(kept).replace(OBS_CLOSE, "").strip()
        traj.spans.append(
            Span("observation", start, len(traj.token_ids), simulated=True, text=text, closed_by=closed_by)
        )
        return True

    async def _force_answer(self, traj: Trajectory) -> None:
        """Algorithm 1, lines 29-31: close the reasoning (unless the policy already did) and prompt the box;
        the answer ends when its braces balance (an answer may contain ``{}``), or at ``answer_tokens``."""
        cfg = self.config
        closed = THINK_CLOSE in self.decode(traj.token_ids[traj.prompt_len :])
        start, _ = self._append_env(traj, self.encode(FORCE_BOX if closed else FORCE_ANSWER))
        left = cfg.answer_tokens
        while left > 0:
            res = await self._gen(traj, left, ("}",))
            left -= len(res.token_ids)
            if res.finish_reason != "stop" or extract_boxed(self.decode(traj.token_ids[start:])) is not None:
                break
        traj.spans.append(Span("forced", start, len(traj.token_ids)))
