"""Materialise the data sub-graph for real into tmp_path, through the same jobs the CLI and UI run."""

import json
import shutil

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.storage import ParquetIOManager
from pipelines import cli
from pipelines.definitions import build_definitions
from qadata.paths import table_path
from qadata.sql import run_query
from tests.conftest import write_jsonl

SMALL_WORLD = {
    "ops": {
        "embedded_world": {"config": {"people": 300, "works": 300, "orgs": 60, "places": 80, "questions": 200}},
        "question_sample": {"config": {"total": 40}},
    }
}


def _run(home, run_config=None, job="autocoa_before_synthesis"):
    defs = build_definitions(home)
    return defs.resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), run_config=run_config or {}, raise_on_error=False
    )


def _checks(result) -> dict:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_embedded_graph_materialises_and_every_check_passes(tmp_path):
    result = _run(tmp_path, SMALL_WORLD)
    assert result.success
    checks = _checks(result)
    assert len(checks) >= 13 and all(checks.values()), checks
    sample = pq.read_table(table_path(tmp_path, ["question_sample"]))
    assert sample.num_rows == 40
    # the FlashRAG corpus file and the index directory exist beside the tables
    lines = (tmp_path / "artifacts" / "corpus" / "corpus.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"id", "contents"} and "\n" in first["contents"]
    assert len(lines) == pq.read_table(table_path(tmp_path, ["corpus"])).num_rows
    assert (tmp_path / "artifacts" / "search_index" / "params.index.json").is_file()
    # re-materialising overwrites rather than appends, and leaves no temp files
    again = _run(tmp_path, SMALL_WORLD)
    assert again.success
    assert pq.read_table(table_path(tmp_path, ["question_sample"])).num_rows == 40
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers
    # metadata the UI shows
    mat = result.asset_materializations_for_node("question_sample")[0]
    assert {"dagster/row_count", "preview", "elapsed_seconds", "strata_plot"} <= set(mat.metadata)


def test_bad_rows_are_quarantined_and_counts_reconcile(tmp_path, hotpot_row):
    src = write_jsonl(
        tmp_path / "extra_train.jsonl", [hotpot_row, hotpot_row | {"id": "q2", "answer": ""}, b"\x80\x81\n", b"[1, 2\n"]
    )
    config = json.loads(json.dumps(SMALL_WORLD))
    config["ops"]["hotpotqa_raw"] = {"config": {"files": [f"{src}::train"]}}
    home = tmp_path / "home"
    result = _run(home, config)
    assert result.success
    rejected = pq.read_table(table_path(home, ["hotpotqa_raw_rejected"])).to_pylist()
    assert len(rejected) == 3
    assert {r["source_row"] for r in rejected} == {2, 3, 4}
    assert _checks(result)["hotpotqa_raw_counts_reconcile"]
    raw = pq.read_table(table_path(home, ["hotpotqa_raw"]))
    assert raw.num_rows == 201 and "q1" in raw.column("id").to_pylist()


def test_unreadable_source_fails_the_asset_naming_file_and_line(tmp_path):
    broken = tmp_path / "hotpot_train_v1.1.json"
    broken.write_text('[{"_id": "a", "question": "q"\n')
    config = {"ops": {"hotpotqa_raw": {"config": {"files": [str(broken)]}}}}
    result = _run(tmp_path / "home", config)
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    message = failures[0].event_specific_data.error.to_string()
    assert "hotpot_train_v1.1.json: invalid JSON at line" in message


def test_shared_profile_on_real_hotpotqa(tmp_path, shared_data):
    from pipelines.definitions import profile_config

    job = build_definitions(tmp_path).resolve_job_def("autocoa_before_synthesis")
    result = _run(tmp_path, profile_config("shared", {n.name for n in job.graph.node_defs}))
    assert result.success
    checks = _checks(result)
    assert all(checks.values()), checks
    counts = run_query(tmp_path, "select split, count(*) from hotpotqa_raw group by split order by split").fetchall()
    assert counts == [("dev", 300), ("train", 300)]
    corpus_rows = run_query(tmp_path, "select count(*) from corpus").fetchall()[0][0]
    assert 5000 < corpus_rows < 6000  # ten paragraphs per question, de-duplicated


def test_parquet_io_manager_partitions_and_sql_views(tmp_path):
    parts = dg.StaticPartitionsDefinition(["nq", "hotpotqa"])

    @dg.asset(partitions_def=parts)
    def eval_questions_demo(context: dg.AssetExecutionContext) -> pa.Table:
        """Demo partitioned table."""
        key = context.partition_key
        return pa.table({"id": [f"{key}-1", f"{key}-2"], "benchmark": [key, key]})

    @dg.asset
    def merged(eval_questions_demo: pa.Table) -> pa.Table:
        """All partitions read back."""
        return eval_questions_demo

    io = ParquetIOManager(home=str(tmp_path))
    inst = dg.DagsterInstance.ephemeral()
    for key in ("nq", "hotpotqa"):
        assert dg.materialize(
            [eval_questions_demo], partition_key=key, resources={"io_manager": io}, instance=inst
        ).success
    res = dg.materialize([eval_questions_demo, merged], selection=[merged], resources={"io_manager": io}, instance=inst)
    assert res.success and res.output_for_node("merged").num_rows == 4
    rows = run_query(tmp_path, "select partition, count(*) from eval_questions_demo group by 1 order by 1").fetchall()
    assert rows == [("hotpotqa", 2), ("nq", 2)]


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli_home")
    mp = pytest.MonkeyPatch()
    mp.delenv("DAGSTER_HOME", raising=False)
    mp.setenv("AUTOCOA_HOME", str(home))
    # the unpartitioned stages only: synthesis through the CLI is covered in test_trajectory_assets
    assert cli.main(["--home", str(home), "run", "--skip-synthesis"]) == 0
    yield home
    mp.undo()


def test_cli_run_check_and_sql(cli_home, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(cli_home / "dagster_home"))
    assert (cli_home / "dagster_home" / "dagster.yaml").read_text().count("managed_python_loggers") == 1
    assert cli.main(["--home", str(cli_home), "check"]) == 0
    assert "0 failed" in capsys.readouterr().out
    out_csv = tmp_path / "pools.csv"
    assert (
        cli.main(
            [
                "--home",
                str(cli_home),
                "sql",
                "select pool, count(*) n from question_sample group by 1 order by 1",
                "--csv",
                str(out_csv),
            ]
        )
        == 0
    )
    assert out_csv.read_text().splitlines() == ["pool,n", "coa,600", "cot,120"]  # the embedded defaults
    out_pq = tmp_path / "s.parquet"
    assert cli.main(["--home", str(cli_home), "sql", "select * from search_index", "--parquet", str(out_pq)]) == 0
    assert pq.read_table(out_pq).num_rows == 1


@pytest.mark.parametrize(
    "statement",
    [
        "copy (select 1) to '{target}'",
        "create table t as select 1",
        "attach '{target}' as x",
        "insert into corpus select * from corpus",
        "drop view corpus",
        "select 1; copy corpus to '{target}'",
        "export database '{dir}'",
        "install httpfs",
        "set enable_external_access = true",
    ],
)
def test_sql_cli_cannot_write(cli_home, tmp_path, capsys, statement):
    target = tmp_path / "written.out"
    sql = statement.format(target=target, dir=tmp_path / "exported")
    assert cli.main(["--home", str(cli_home), "sql", sql]) == 2
    assert "read-only" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "exported").exists()
    assert duckdb.connect().sql("select 1").fetchall() == [(1,)]


@pytest.mark.parametrize(
    "query",
    [
        "select * from read_csv('/etc/passwd')",
        "select * from read_text('/etc/hostname')",
        "select * from glob('/etc/*')",
        "select * from read_parquet('{outside}')",
    ],
)
def test_sql_cli_reads_only_the_homes_tables(cli_home, tmp_path, capsys, query):
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [1]}), outside)
    assert cli.main(["--home", str(cli_home), "sql", query.format(outside=outside)]) == 2
    err = capsys.readouterr().err
    assert "reads only the tables under" in err and "disabled by configuration" in err
    # the views over the home keep working in the same kind of session
    assert cli.main(["--home", str(cli_home), "sql", "select count(*) from question_sample"]) == 0


def test_check_fails_on_bad_data(cli_home, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    shutil.copytree(cli_home, home)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    path = table_path(home, ["question_sample"])
    table = pq.read_table(path)
    # put one question in both pools: the disjointness and uniqueness checks must fail
    cot_row = table.filter(pa.compute.equal(table["pool"], "cot")).slice(0, 1)
    dup = cot_row.set_column(table.schema.get_field_index("pool"), "pool", pa.array(["coa"]))
    pq.write_table(pa.concat_tables([table, dup]), path)
    assert cli.main(["--home", str(home), "check"]) == 1
    out = capsys.readouterr().out
    assert "question_sample_pools_disjoint" in out and "FAILED" in out


def test_check_on_an_empty_home_skips_every_check_and_passes_none(tmp_path, monkeypatch, capsys):
    home = tmp_path / "empty"
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # the CLI makes <home>/dagster_home
    assert cli.main(["--home", str(home), "check"]) == 1  # nothing could be verified
    out = capsys.readouterr().out
    n = len(build_definitions(home).resolve_asset_graph().asset_check_keys)
    assert f"{n} checks: 0 passed, {n} skipped (data not materialised), 0 failed" in out
    assert "nothing is materialised" in out


def test_flashrag_corpus_file_with_bad_lines(tmp_path):
    src = write_jsonl(
        tmp_path / "wiki.jsonl",
        [
            {"id": "0", "contents": '"Alpha"\nAlpha is a poet born in Beta.'},
            {"id": "1", "contents": "Beta\nBeta is a city."},
            {"id": "1", "contents": "Dup\nsame id"},
            {"id": "2"},
            b"\xff\n",
            {"id": "3", "contents": "Gamma\nGamma river."},
        ],
    )
    config = json.loads(json.dumps(SMALL_WORLD))
    config["ops"]["corpus"] = {"config": {"flashrag_corpus": str(src)}}
    home = tmp_path / "home"
    result = _run(home, config)
    checks = _checks(result)
    assert checks["corpus_counts_reconcile"] and checks["corpus_rejected_expectations"]
    # the embedded sample's gold titles are not in this tiny corpus: the blocking check says so
    assert checks["corpus_covers_gold_titles"] is False
    rows = run_query(home, "select id, title from corpus order by id").fetchall()
    assert rows == [("0", "Alpha"), ("1", "Beta"), ("3", "Gamma")]
    reasons = [r[0] for r in run_query(home, "select reason from corpus_rejected order by source_row").fetchall()]
    assert reasons[0].startswith("line 3: duplicate id") and "contents" in reasons[1] and "UTF-8" in reasons[2]
