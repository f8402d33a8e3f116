"""World-model fidelity of the SFT-3 and RL checkpoints (``world_model_fidelity``): the Dagster side of
:func:`evals.fidelity.fidelity_run` (which checkpoints are materialised, engines, search, metadata)."""

import dataclasses
from collections.abc import Collection

import dagster as dg
import pyarrow as pa
from pydantic import Field

from agent.engines import load_engine, release_engines
from agent.rollout import search_tool
from assets.eval_common import GROUP, check_result, checkpoint_of
from assets.metadata import bar_plot, markdown_table, table_metadata, timed
from assets.resources import SearchEngineResource
from assets.settings import rollout_settings
from assets.storage import NOT_MATERIALISED, StorageResource, read_table
from assets.trajectories import EngineConfig
from evals import validate
from evals.datasets import questions_from_table
from evals.fidelity import FIDELITY_METHODS, FIDELITY_SCHEMA, aggregate_fidelity, fidelity_run
from evals.questions import EMBEDDED

PREVIEW = ["method", "source", "question_id", "query", "simulated", "real", "token_f1", "hallucination"]
PLOTTED = {"token F1": "token_f1", "ROUGE-L": "rouge_l", "hallucination rate": "hallucination"}

FidelityRollout = rollout_settings(
    "FidelityRollout",
    "Rollout settings of the fidelity run (simulated environment: the policy writes its own search results).",
    temperature=0.0,
    max_actions=2,
    max_context=1536,
    max_turn_tokens=128,  # per turn, and per simulated search result
    force_answer=True,
    search_k=2,  # passages the real search returns per query (embedded 2, paper 3)
)


class FidelityConfig(dg.Config):
    n: int | None = Field(
        4, description="Held-out questions per checkpoint: the first n of eval_questions 'embedded'; None = all."
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Engine settings; the model is each checkpoint in turn."
    )
    rollout: FidelityRollout = Field(
        default_factory=FidelityRollout, description="Rollout settings: agent.rollout.RolloutConfig."
    )
    seed: int = Field(0, description="Sampling seed.")
    probe: bool = Field(
        True,
        description=(
            "Also probe every checkpoint with the same held-out queries (each question's text as a search the policy "
            "took), so checkpoints compare query by query even when a policy never searches by itself."
        ),
    )


def build(existing: Collection[str]) -> tuple[list, list]:
    """world_model_fidelity, with lineage to the checkpoint assets among ``existing`` (asset keys defined), and its check."""
    deps = [a for a in ("search_index", *(f"{m}_checkpoint" for m in FIDELITY_METHODS)) if a in existing]

    @dg.asset(
        name="world_model_fidelity",
        group_name=GROUP,
        deps=deps,
        kinds={"python", "parquet"},
        ins={"eval_questions": dg.AssetIn(partition_mapping=dg.SpecificPartitionsPartitionMapping([EMBEDDED]))},
        tags={"autocoa/stage": "evaluation"},
    )
    def world_model_fidelity(
        context: dg.AssetExecutionContext,
        config: FidelityConfig,
        eval_questions: pa.Table,
        storage: StorageResource,
        search_engine: SearchEngineResource,
    ) -> dg.Output[pa.Table]:
        """How close each SFT-3 and RL checkpoint's own simulated search results are to the real search engine's results for the same queries, on held-out questions."""
        questions = questions_from_table(eval_questions)
        questions = questions[: config.n] if config.n is not None else questions

        def load_policy(ckpt: str):
            spec = dataclasses.replace(config.engine.spec(config.rollout.max_context), model=ckpt)
            release_engines(keep={spec})
            return load_engine(spec, storage.artifact_dir("models"))

        def on_run(run: dict) -> None:
            context.log.info(
                f"world_model_fidelity {run['method']}: {run['trajectories']} trajectories, "
                f"{run['simulated_searches']} of the policy's own simulated searches and {run['probes']} probes compared"
            )

        md: dict = {}
        with timed(md):
            try:
                res = fidelity_run(
                    {m: checkpoint_of(storage, m) for m in FIDELITY_METHODS},
                    questions,
                    load_policy=load_policy,
                    search=search_tool(search_engine.get_engine(), config.rollout.search_k),
                    config=config.rollout.build(seed=config.seed, simulated=True),
                    probe=config.probe,
                    on_run=on_run,
                )
            except FileNotFoundError as exc:
                raise dg.Failure(f"world_model_fidelity: {exc}") from exc
        table = pa.Table.from_pylist(res.rows, schema=FIDELITY_SCHEMA)
        agg = aggregate_fidelity(res.rows, by=["method", "source"]).round(3)
        md.update(table_metadata(table, preview_columns=PREVIEW))
        md.update(
            {
                "questions": len(questions),
                "checkpoints_evaluated": dg.MetadataValue.json([r["method"] for r in res.runs]),
                "checkpoints_missing": dg.MetadataValue.json(res.missing),
                "runs": dg.MetadataValue.md(markdown_table(res.runs)),
                "fidelity": dg.MetadataValue.md(
                    markdown_table(agg.to_dict("records")) if len(agg) else "_(no simulated search)_"
                ),
            }
        )
        if len(agg):
            md["fidelity_plot"] = bar_plot(
                [f"{r['method']} ({r['source']})" for r in agg.to_dict("records")],
                {label: list(agg[column]) for label, column in PLOTTED.items()},
                "World-model fidelity: simulated vs real search results",
                "share",
            )
        if not res.runs:
            md["status"] = (
                f"no SFT-3 or RL checkpoint is materialised (looked for {', '.join(res.missing)}); table empty"
            )
            context.log.warning(f"world_model_fidelity: {md['status']}")
        return dg.Output(table, metadata=md)

    return [world_model_fidelity], [world_model_fidelity_consistent]


@dg.asset_check(asset="world_model_fidelity", blocking=True)
def world_model_fidelity_consistent(storage: StorageResource) -> dg.AssetCheckResult:
    """Fidelity measures are in [0, 1], every compared query has a real result, and hallucination = unsupported gold or prediction."""
    table = read_table(storage, "world_model_fidelity")
    if table is None:
        return NOT_MATERIALISED
    return check_result(*validate.fidelity_consistent(table.to_pylist()), "whole table")
