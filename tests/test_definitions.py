import subprocess
import sys

import pytest

from pipelines.definitions import build_definitions, load_profile

EXPECTED_ASSETS = {
    "embedded_world",
    "hotpotqa_raw",
    "hotpotqa_raw_rejected",
    "question_sample",
    "corpus",
    "corpus_rejected",
    "search_index",
    "contrastive_pairs",
    "sft_stage1_data",
    "sft_stage23_data",
    "sft_stage1_checkpoint",
    "sft_stage2_checkpoint",
    "sft_stage3_checkpoint",
    "sft_stage2_only_checkpoint",
    "rl_stage2_only_checkpoint",
    "sft123_rl1_checkpoint",
    "sft123_rl12_checkpoint",
    "sft12_rl2_checkpoint",
}


def test_definitions_name_the_expected_assets(tmp_path):
    defs = build_definitions(tmp_path)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert EXPECTED_ASSETS <= keys
    checked = {k.asset_key.to_user_string() for k in graph.asset_check_keys}
    # every table that is not a quarantine table has checks beside it
    assert EXPECTED_ASSETS - {"hotpotqa_raw_rejected", "corpus_rejected"} <= checked
    for job in ("autocoa_before_synthesis", "autocoa_after_synthesis", "trajectory_synthesis", "data_checks"):
        assert defs.resolve_job_def(job) is not None


def test_every_asset_has_a_one_sentence_description(tmp_path):
    graph = build_definitions(tmp_path).resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        desc = graph.get(key).description or ""
        assert desc.strip(), f"{key.to_user_string()} has no description"
        assert desc.strip().count(". ") == 0 and desc.strip().endswith("."), f"{key.to_user_string()}: {desc!r}"


def test_profiles_parse_against_the_job_config():
    from dagster._core.system_config.objects import ResolvedRunConfig

    from pipelines.definitions import profile_config

    defs = build_definitions("/tmp/unused-autocoa-home")
    for job_name in ("autocoa_before_synthesis", "trajectory_synthesis", "autocoa_after_synthesis"):
        job = defs.resolve_job_def(job_name)
        ops = {n.name for n in job.graph.node_defs}
        for profile in ("shared", "paper", "ci"):
            # raises DagsterInvalidConfigError when a profile names a field the assets do not have
            ResolvedRunConfig.build(job, profile_config(profile, ops))
    assert load_profile("paper")["ops"]["question_sample"]["config"]["total"] == 20000
    teacher = load_profile("paper")["ops"]["coa_trajectories"]["config"]
    assert (
        teacher["engine"]["model"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
        and teacher["rollout"]["temperature"] == 0.6
    )
    rl = load_profile("paper")["ops"]["sft123_rl12_checkpoint"]["config"]
    assert (rl["questions_per_step"], rl["num_generations"], rl["learning_rate"], rl["max_steps"]) == (48, 5, 7e-7, 96)
    assert round(rl["simulated_fraction"] * rl["max_steps"]) == 80  # 80 simulated steps, then 16 real


def test_every_job_and_its_baked_config_resolve():
    # what `dagster dev` does when it loads a profile's code location: a bad baked profile config fails here
    from pipelines.definitions import profile_names

    assert {"embedded", "shared", "paper", "ci"} <= set(profile_names())
    for profile in profile_names():
        defs = build_definitions("/tmp/unused-autocoa-home", profile=profile)
        jobs = defs.get_repository_def().get_all_jobs()
        names = {j.name for j in jobs}
        # one job per stage in every profile: no per-profile copies
        assert {"autocoa_before_synthesis", "trajectory_synthesis", "autocoa_after_synthesis", "data_checks"} <= names
        assert not any(n.endswith("_paper") for n in names), names
    paper = build_definitions("/tmp/unused-autocoa-home", profile="paper")
    job = paper.get_repository_def().get_job("autocoa_before_synthesis")
    assert job.tags["autocoa/profile"] == "paper"
    assert job.run_config["ops"]["question_sample"]["config"]["total"] == 20000  # the profile baked into the job
    schedules = {s.name: s for s in paper.get_repository_def().schedule_defs}
    assert schedules["weekly_resynthesis"].default_status.value == "RUNNING"  # from paper.yaml's definitions
    embedded = build_definitions("/tmp/unused-autocoa-home").get_repository_def()
    assert {s.name: s for s in embedded.schedule_defs}["weekly_resynthesis"].default_status.value == "STOPPED"


def test_a_profiles_code_location_is_an_attribute_of_the_definitions_module():
    import pipelines.definitions as d

    assert d.defs_paper is d.defs_paper  # built once
    assert d.defs_paper.get_repository_def().get_job("autocoa_before_synthesis").tags["autocoa/profile"] == "paper"
    with pytest.raises(AttributeError, match="profiles: embedded"):
        d.defs_nosuchprofile  # noqa: B018


def test_libraries_import_no_dagster():
    code = (
        "import sys; import qadata.loaders, qadata.world, qadata.sampling, qadata.corpus, retrieval.bm25, "
        "retrieval.engine, retrieval.server, retrieval.metrics, agent, agent.synthesis, agent.validate, "
        "agent.vllm_engine, agent.http_engine, agent.engines, training, training.pairs, training.sft, "
        "training.sft_data, training.launch, training.grpo, training.rewards, evals, evals.datasets, "
        "evals.judge, evals.report, evals.fidelity, evals.react; "
        "print('dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_incoming_sensor_requests_a_run_once_per_change(tmp_path, hotpot_row):
    import json as _json

    import dagster as dg

    defs = build_definitions(tmp_path)
    sensor = defs.resolve_sensor_def("incoming_sources_sensor")
    ctx = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), definitions=defs)
    assert isinstance(sensor(ctx), dg.SkipReason)
    (tmp_path / "incoming").mkdir()
    src = tmp_path / "incoming" / "more_train.jsonl"
    src.write_text(_json.dumps(hotpot_row) + "\n")
    request = sensor(ctx)
    assert isinstance(request, dg.RunRequest)
    assert request.run_config["ops"]["hotpotqa_raw"]["config"]["files"] == [str(src)]
    ctx = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=ctx.cursor, definitions=defs)
    assert isinstance(sensor(ctx), dg.SkipReason)
