"""The synthesis assets through Dagster: one shard for real, the checks, the weekly schedule, and a
killed ``autocoa run`` that resumes without redoing finished shards."""

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.definitions import build_definitions
from qadata.paths import REPO_ROOT, table_path
from qadata.sql import run_query

ROLLOUT = {
    "rollout": {"max_turn_tokens": 40, "max_context": 900, "max_actions": 2, "answer_tokens": 12},
    "cot_max_tokens": 48,
    "engine": {"kind": "transformers"},
}
BASE = {
    "embedded_world": {"config": {"people": 300, "works": 300, "orgs": 60, "places": 80, "questions": 200}},
    "question_sample": {"config": {"total": 12, "cot_fraction": 0.5}},
}  # both pools in every shard
SYNTH = {"cot_trajectories": {"config": ROLLOUT}, "coa_trajectories": {"config": ROLLOUT}}


@pytest.fixture(scope="module")
def home(tmp_path_factory, embedded_checkpoint):
    home = tmp_path_factory.mktemp("home")
    # reuse the session's converted checkpoint instead of converting again
    models = home / "artifacts" / "models"
    models.mkdir(parents=True)
    (models / embedded_checkpoint.name).symlink_to(embedded_checkpoint)
    return home


@pytest.fixture(scope="module")
def materialised(home):
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(home, shards=2)
    base = defs.resolve_job_def("autocoa_before_synthesis").execute_in_process(
        instance=instance, run_config={"ops": BASE}
    )
    assert base.success
    instance.add_dynamic_partitions("synthesis_rounds", ["r000"])
    result = defs.resolve_job_def("trajectory_synthesis").execute_in_process(
        instance=instance, partition_key="r000|s00", run_config={"ops": SYNTH}, raise_on_error=False
    )
    return instance, defs, result


PAIRS = {
    "contrastive_pairs": {
        "config": {
            "engine": {"kind": "transformers"},
            "attempts": 1,
            "max_per_kind": 2,
            "rollout": {"max_turn_tokens": 40, "max_context": 900, "max_actions": 2},
        }
    }
}


def test_pairs_mined_from_the_shard_reconcile(materialised, home):
    instance, defs, _ = materialised
    # pairs and SFT data; the checkpoints train in the full embedded run (CI) and in tests/test_sft_training.py
    selection = [
        dg.AssetKey(k)
        for k in ("contrastive_pairs", "contrastive_pairs_discarded", "sft_stage1_data", "sft_stage23_data")
    ]
    result = defs.resolve_job_def("autocoa_after_synthesis").execute_in_process(
        instance=instance, run_config={"ops": PAIRS}, raise_on_error=False, asset_selection=selection
    )
    assert result.success
    pairs = pq.read_table(table_path(home, ["contrastive_pairs"]))
    discarded = pq.read_table(table_path(home, ["contrastive_pairs_discarded"]))
    wrong = sum(
        pq.read_table(table_path(home, [f"{p}_trajectories"], "r000|s00")).column("em").to_pylist().count(0.0)
        for p in ("cot", "coa")
    )
    assert pairs.num_rows + discarded.num_rows == wrong > 0
    known = ("empty completion", "wrong CoA took no action", "not mined: over max_per_kind", "no correct")
    assert all(r.startswith(known) for r in discarded.column("reason").to_pylist())  # every discard says why
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert len(checks) == 9  # contrastive pairs, stage-1 data, stage-2/3 data
    for name, ev in checks.items():
        if ev.severity == dg.AssetCheckSeverity.ERROR:
            assert ev.passed, (name, ev.metadata)
    mat = result.asset_materializations_for_node("contrastive_pairs")
    assert {"pairs", "discarded", "wrong_trajectories", "yield_plot"} <= set(mat[0].metadata)
    # SFT data: stage 1 = the pairs; stage 2/3 = the correct trajectories, exported for LLaMA-Factory and HF datasets
    assert pq.read_table(table_path(home, ["sft_stage1_data"])).num_rows == pairs.num_rows
    stage23 = pq.read_table(table_path(home, ["sft_stage23_data"]))
    correct = sum(
        pq.read_table(table_path(home, [f"{p}_trajectories"], "r000|s00")).column("em").to_pylist().count(1.0)
        for p in ("cot", "coa")
    )
    assert stage23.num_rows == correct
    exports = home / "artifacts" / "sft_stage23_data"
    import json

    assert len(json.loads((exports / "autocoa_sft.json").read_text())) == correct
    assert "autocoa_sft" in json.loads((exports / "dataset_info.json").read_text())
    assert pq.read_table(exports / "hf" / "train.parquet").num_rows == correct


def test_one_shard_materialises_with_metadata_and_checks(materialised, home):
    instance, _, result = materialised
    assert result.success
    for pool in ("cot", "coa"):
        table = pq.read_table(table_path(home, [f"{pool}_trajectories"], "r000|s00"))
        assert table.num_rows > 0
        assert set(table.column("pool").to_pylist()) == {pool} and set(table.column("shard").to_pylist()) == {"s00"}
        assert set(table.column("engine").to_pylist()) == {"transformers"}
        mat = result.asset_materializations_for_node(f"{pool}_trajectories")[0]
        assert {
            "accuracy_em",
            "mean_actions",
            "tokens_per_second",
            "preview",
            "answer_rate",
            "dagster/row_count",
            "finish_reasons",
        } <= set(mat.metadata)
        assert mat.metadata["trajectories"].value == table.num_rows
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(checks) == 12
    for (asset, name), ev in checks.items():
        if ev.severity == dg.AssetCheckSeverity.ERROR:
            assert ev.passed, (asset, name, ev.metadata)
    assert checks[("coa_trajectories", "mask_aligned")].metadata["scope"].value.startswith("partition r000|s00")


def test_sql_over_trajectories(materialised, home):
    rel = run_query(
        home,
        "select pool, n_actions, count(*) n, avg(em) acc from "
        "(select * from cot_trajectories union all by name select * from coa_trajectories) "
        "group by all order by all",
    )
    rows = rel.fetchall()
    assert {r[0] for r in rows} == {"cot", "coa"}
    assert all(r[1] == 0 for r in rows if r[0] == "cot")


def test_checks_only_job_covers_every_partition(materialised, home):
    instance, defs, _ = materialised
    result = defs.resolve_job_def("data_checks").execute_in_process(instance=instance, raise_on_error=False)
    evs = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    scope = evs[("coa_trajectories", "mask_aligned")].metadata["scope"].value
    assert scope.startswith("all partitions (1 files)") and evs[("coa_trajectories", "mask_aligned")].passed


def test_weekly_schedule_adds_a_round_and_requests_every_shard(home):
    defs = build_definitions(home, shards=3)
    schedule = defs.resolve_schedule_def("weekly_resynthesis")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # off in the embedded profile
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=dt.datetime(2026, 11, 23, 4),
            repository_def=defs.get_repository_def(),
        )
        data = schedule.evaluate_tick(ctx)
        assert instance.get_dynamic_partitions("synthesis_rounds") == ["w2026-48"]
        assert sorted(r.partition_key for r in data.run_requests) == ["w2026-48|s00", "w2026-48|s01", "w2026-48|s02"]
        # a second tick in the same week adds nothing new
        schedule.evaluate_tick(ctx)
        assert instance.get_dynamic_partitions("synthesis_rounds") == ["w2026-48"]


def _cli(home: Path, config: Path, env: dict) -> subprocess.Popen:
    # synthesis and its resume are under test: no training, no evaluation after it
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "--home",
            str(home),
            "run",
            "--config",
            str(config),
            "--no-train",
            "--no-eval",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_run_resumes_without_redoing_finished_shards(tmp_path, embedded_checkpoint):
    home = tmp_path / "home"
    (home / "artifacts" / "models").mkdir(parents=True)
    (home / "artifacts" / "models" / embedded_checkpoint.name).symlink_to(embedded_checkpoint)
    config = tmp_path / "tiny.yaml"
    quick = {
        **ROLLOUT,
        "rollout": {**ROLLOUT["rollout"], "max_turn_tokens": 16, "max_actions": 1, "answer_tokens": 6},
        "cot_max_tokens": 16,
    }
    config.write_text(
        yaml.safe_dump(
            {
                "ops": {
                    **BASE,
                    "question_sample": {"config": {"total": 6}},
                    "cot_trajectories": {"config": quick},
                    "coa_trajectories": {"config": quick},
                }
            }
        )
    )
    env = {**os.environ, "AUTOCOA_SHARDS": "3", "AUTOCOA_HOME": str(home), "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    first = [table_path(home, [f"{pool}_trajectories"], "r000|s00") for pool in ("cot", "coa")]
    second = [table_path(home, [f"{pool}_trajectories"], "r000|s01") for pool in ("cot", "coa")]
    proc = _cli(home, config, env)
    deadline = time.time() + 400
    # shard s00's run is over once anything of s01 appears; kill then (mid-s01 at the latest)
    while not any(p.is_file() for p in second) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert all(p.is_file() for p in first), "the first shard never landed"
    proc.send_signal(signal.SIGKILL)  # a crash: no cleanup
    proc.wait()
    stamps = [p.stat().st_mtime_ns for p in first]
    rerun = _cli(home, config, env)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert [p.stat().st_mtime_ns for p in first] == stamps  # the finished shard was not redone
    assert "r000|s00: already materialised, skipped" in out
    for shard in ("s00", "s01", "s02"):
        for pool in ("cot", "coa"):
            assert table_path(home, [f"{pool}_trajectories"], f"r000|{shard}").is_file()
