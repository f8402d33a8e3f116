"""One rollout configuration: the stages' nested Dagster configs are generated from agent.rollout.RolloutConfig
(names, types, help), differ only in their defaults, and convert back to the dataclass in one place."""

import dataclasses

import dagster as dg
import pytest

from agent.rollout import RolloutConfig
from assets.settings import STAGE_FIXED, dataclass_config, rollout_settings


def test_every_stage_exposes_the_dataclass_fields_with_their_help():
    from assets.evaluation import EvalRollout
    from assets.fidelity import FidelityRollout
    from assets.pairs import PairsRollout
    from assets.trajectories import TrajectoryRollout

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(RolloutConfig)}
    for cls in (TrajectoryRollout, PairsRollout, EvalRollout, FidelityRollout):
        assert set(cls.model_fields) == set(helps) - set(STAGE_FIXED)
        for name, info in cls.model_fields.items():
            assert info.description == helps[name] and info.description
    # the stages differ only in their values
    assert EvalRollout().temperature == 0.0 and TrajectoryRollout().temperature == 0.6
    assert FidelityRollout().max_context == 1536 and PairsRollout().max_turn_tokens == 128


def test_a_partial_yaml_block_keeps_the_stage_defaults():
    Stage = rollout_settings("StageRolloutForTest", "doc", temperature=0.0, max_turn_tokens=96)

    class C(dg.Config):
        rollout: Stage = Stage()
        seed: int = 3

    @dg.asset
    def a(config: C):
        return config.rollout.build(seed=config.seed, tools=False)

    out = dg.materialize([a], run_config={"ops": {"a": {"config": {"rollout": {"max_actions": 3}}}}}).output_for_node(
        "a"
    )
    assert out == RolloutConfig(max_actions=3, temperature=0.0, max_turn_tokens=96, seed=3, tools=False)


def test_build_refuses_a_field_both_configured_and_fixed_and_unknown_defaults():
    Both = dataclass_config(RolloutConfig, "BothForTest", "doc", exclude=())
    with pytest.raises(ValueError, match="cannot also fix"):
        Both().build(seed=1)
    with pytest.raises(ValueError, match="not fields of RolloutConfig"):
        rollout_settings("BadForTest", "doc", max_action=3)
    with pytest.raises(ValueError, match="not fields of RolloutConfig"):
        rollout_settings("BadForTest2", "doc", seed=3)  # a stage-fixed field is not configurable


def test_no_asset_builds_a_rollout_config_by_hand():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "assets"
    hits = [p.name for p in root.glob("*.py") if re.search(r"\bRolloutConfig\(", p.read_text())]
    assert hits == [], hits
