"""``autocoa``: run the pipeline, query its tables, check its data, serve search, open the UI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qadata.paths import REPO_ROOT, default_home

LIBRARY_LOGGERS = ["qadata", "retrieval", "agent", "training", "evals"]
DAGSTER_YAML = """# written by autocoa: library logs go to Dagster's run log
python_logs:
  managed_python_loggers: [{loggers}]
  python_log_level: INFO
telemetry:
  enabled: false
"""


# Dagster's console logger at INFO: step starts/ends and our logs, without the DEBUG event stream
CONSOLE_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def ensure_dagster_home(home: Path) -> Path:
    """Use ``$DAGSTER_HOME`` if set, else ``<home>/dagster_home`` with a dagster.yaml that captures library logs."""
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
    dh = home / "dagster_home"
    dh.mkdir(parents=True, exist_ok=True)
    cfg = dh / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML.format(loggers=", ".join(LIBRARY_LOGGERS)))
    os.environ["DAGSTER_HOME"] = str(dh)
    return dh


def _instance(home: Path):
    import dagster as dg

    ensure_dagster_home(home)
    return dg.DagsterInstance.get()


SKIPPED = "skipped (not materialised)"


def _check_rows(result) -> list[dict]:
    """One row per check evaluation of a run; ``status``: passed, skipped (its data is absent), warn or failed."""
    partition = result.dagster_run.tags.get("dagster/partition", "")
    rows = []
    for ev in result.get_asset_check_evaluations():
        skipped = ev.passed and "skipped" in ev.metadata
        status = "skipped" if skipped else "passed" if ev.passed else ev.severity.value.lower()
        rows.append(
            {
                "asset": ev.asset_key.to_user_string(),
                "partition": partition,
                "check": ev.check_name,
                "result": SKIPPED if skipped else "passed" if ev.passed else f"FAILED ({ev.severity.value})",
                "severity": ev.severity.value,
                "passed": ev.passed,
                "status": "failed" if status == "error" else status,
            }
        )
    return rows


def _skipped_rows(check_keys) -> list[dict]:
    """Rows for checks not run because their asset has never been materialised in this home."""
    return [
        {
            "asset": k.asset_key.to_user_string(),
            "partition": "",
            "check": k.name,
            "result": SKIPPED,
            "severity": "",
            "passed": True,
            "status": "skipped",
        }
        for k in check_keys
    ]


def check_counts(rows: list[dict]) -> dict[str, int]:
    """How many checks passed, were skipped (data absent: never counted as passed), warned and failed."""
    return {s: sum(1 for r in rows if r["status"] == s) for s in ("passed", "skipped", "warn", "failed")}


def _print_checks(rows: list[dict]) -> None:
    from tabulate import tabulate

    print(
        tabulate(
            [[r["asset"], r["partition"], r["check"], r["result"]] for r in rows],
            headers=["asset", "partition", "check", "result"],
        )
    )


def _failed_steps(result) -> list[str]:
    out = []
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.event_specific_data.error
            msg = err.message.strip() if err else ev.message
            while err is not None and err.cause is not None:  # Dagster wraps the user error: show the root
                err = err.cause
                msg = err.message.strip()
            out.append(f"{ev.step_key}: {msg}")
    return out


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _run_config(profile: str, ops: set[str], extra: dict) -> dict:
    from pipelines.definitions import profile_config

    cfg = profile_config(profile, ops)
    if extra:
        extra = {**extra, "ops": {k: v for k, v in extra.get("ops", {}).items() if k in ops}}
        cfg = _deep_merge(cfg, extra)
    return _deep_merge(cfg, CONSOLE_INFO)


def run_synthesis(instance, defs, home: Path, *, profile: str, round_key: str, extra: dict, force: bool) -> list:
    """One run per shard of ``round_key``; shards already materialised (and on disk) are skipped, so a
    killed run resumes where it stopped. Returns ``[(shard, status, result or None)]``."""
    import dagster as dg

    from pipelines.definitions import SYNTHESIS_JOB, SYNTHESIS_OPS
    from qadata.paths import table_path

    job = defs.resolve_job_def(SYNTHESIS_JOB)
    if not instance.has_dynamic_partition("synthesis_rounds", round_key):
        instance.add_dynamic_partitions("synthesis_rounds", [round_key])
    run_config = _run_config(profile, SYNTHESIS_OPS, extra)
    done = {op: instance.get_materialized_partitions(dg.AssetKey(op)) for op in SYNTHESIS_OPS}
    shards = job.partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys()
    outcomes = []
    for i, shard in enumerate(shards):
        key = dg.MultiPartitionKey({"round": round_key, "shard": shard})
        on_disk = all(table_path(home, [op], str(key)).is_file() for op in SYNTHESIS_OPS)
        if not force and on_disk and all(str(key) in done[op] for op in SYNTHESIS_OPS):
            print(f"synthesis {key}: already materialised, skipped ({i + 1}/{len(shards)})", flush=True)
            outcomes.append((shard, "skipped", None))
            continue
        print(f"synthesis {key}: running ({i + 1}/{len(shards)}) ...", flush=True)
        result = job.execute_in_process(
            instance=instance, partition_key=str(key), run_config=run_config, raise_on_error=False
        )
        outcomes.append((shard, "ok" if result.success else "FAILED", result))
    return outcomes


def run_evaluation(
    instance, defs, *, profile: str, extra: dict, methods: list[str] | None = None, benchmarks: list[str] | None = None
) -> list:
    """Evaluation in one process: the questions of each benchmark, then every (method, benchmark)
    prediction partition grouped by method (each policy loads once), then the reports. Methods whose
    checkpoint is not materialised are left out (their evaluation is simply not in the table)."""
    from assets import evaluation
    from pipelines.definitions import EVAL_PREDICTIONS_JOB, EVAL_QUESTIONS_JOB, EVAL_REPORTS_JOB
    from qadata.paths import table_path

    home = Path(defs.resources["storage"].home)
    benchmarks = benchmarks or list(evaluation.BENCHMARKS)
    if methods is None:
        methods = [
            m
            for m in evaluation.METHODS
            if m in evaluation.BASELINES or table_path(home, [f"{m}_checkpoint"]).is_file()
        ]
    results = []

    def run(job_name: str, ops: set[str], partition: str | None, label: str):
        job = defs.resolve_job_def(job_name)
        print(f"evaluation {label} ...", flush=True)
        res = job.execute_in_process(
            instance=instance,
            partition_key=partition,
            run_config=_run_config(profile, ops, extra),
            raise_on_error=False,
        )
        results.append(res)
        return res

    for b in benchmarks:
        run(EVAL_QUESTIONS_JOB, {"eval_questions"}, b, f"questions {b}")
    for key in evaluation.prediction_partitions_by_method(methods, benchmarks):
        run(EVAL_PREDICTIONS_JOB, {"eval_predictions"}, str(key), f"predictions {key}")
    run(EVAL_REPORTS_JOB, {"eval_table", "action_analysis", "world_model_fidelity"}, None, "reports")
    return results


def step_seconds(instance, results) -> dict[str, float]:
    """Wall seconds per asset step over the given runs (a partitioned step summed over its partitions), read from
    the runs' event logs: step start to step success or failure."""
    import collections

    totals: dict[str, float] = collections.defaultdict(float)
    for res in results:
        if res is None:
            continue
        started: dict[str, float] = {}
        for entry in instance.all_logs(res.run_id):
            ev = entry.dagster_event
            if ev is None or not entry.step_key:
                continue
            if ev.event_type_value == "STEP_START":
                started[entry.step_key] = entry.timestamp
            elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and entry.step_key in started:
                totals[entry.step_key] += entry.timestamp - started.pop(entry.step_key)
    return dict(totals)


STAGES = {  # asset step -> stage of the summary
    "synthesis": ("cot_trajectories", "coa_trajectories"),
    "pairs": ("contrastive_pairs",),
    "sft": ("sft_stage1_checkpoint", "sft_stage2_checkpoint", "sft_stage3_checkpoint", "sft_stage2_only_checkpoint"),
    "rl": ("rl_stage2_only_checkpoint", "sft123_rl1_checkpoint", "sft123_rl12_checkpoint", "sft12_rl2_checkpoint"),
    "evaluation": (
        "eval_questions",
        "eval_predictions",
        "eval_table",
        "eval_comparisons",
        "action_analysis",
        "world_model_fidelity",
    ),
}


def run_summary(home: Path, seconds: dict[str, float], wall: float) -> str:
    """The end-of-run summary: the headline comparison (best agent model vs ReAct on the reasoning model, with its
    interval and paired p-value), searches per question per method, and the wall time of each stage."""
    from tabulate import tabulate

    from qadata.sql import connect

    lines = []
    try:
        con, tables = connect(home)
    except Exception as exc:  # noqa: BLE001 - a summary never fails the run
        return f"(no summary: {exc})"
    if {"eval_predictions", "embedded_world"} <= set(tables):
        rows = con.execute("""
            select p.method, count(*) as n, 100 * avg(p.em) as em, avg(p.n_actions) as searches,
                   avg(case when w.type <> 'comparison' then p.n_actions end) as searches_non_comparison,
                   100 * avg(case when p.finish_reason = 'error' then 1 else 0 end) as errors
            from eval_predictions p join embedded_world w on p.question_id = w.id
            where p.benchmark = 'embedded' group by p.method order by p.method""").fetchall()
        lines.append("embedded held-out questions (greedy, the same questions for every method):")
        lines.append(
            tabulate(
                [
                    [m, n, f"{em:.1f}", f"{s:.2f}", f"{snc:.2f}" if snc is not None else "-", f"{e:.1f}"]
                    for m, n, em, s, snc, e in rows
                ],
                headers=["method", "n", "EM %", "searches/q", "searches/q (non-comparison)", "errors %"],
            )
        )
    if "eval_comparisons" in tables:
        cmp = con.execute("""
            select method, n, score, ci_low, ci_high, reference, reference_score, reference_diff,
                   reference_diff_low, reference_diff_high, reference_p
            from eval_comparisons where benchmark = 'embedded' and metric = 'em'
              and method not in ('base_cot', 'react_base', 'react_reasoning')
            order by score desc, method limit 1""").fetchall()
        if cmp:
            m, n, sc, lo, hi, ref, rsc, d, dlo, dhi, p = cmp[0]
            lines.append("")
            lines.append(
                f"headline: best agent model {m}: EM {sc:.1f}% [{lo:.1f}, {hi:.1f}] (n={n}) vs {ref}: "
                + (
                    f"{rsc:.1f}%; difference {d:+.1f} points [{dlo:+.1f}, {dhi:+.1f}], exact McNemar p={p:.2g}"
                    if ref
                    else "no reference predictions"
                )
            )
    stage_rows = [[stage, f"{sum(seconds.get(s, 0.0) for s in steps) / 60:.1f}"] for stage, steps in STAGES.items()]
    other = wall - sum(sum(seconds.get(s, 0.0) for s in steps) for steps in STAGES.values())
    stage_rows.append(["everything else (data, index, checks, loading)", f"{max(other, 0.0) / 60:.1f}"])
    stage_rows.append(["total wall time", f"{wall / 60:.1f}"])
    lines.append("")
    lines.append(tabulate(stage_rows, headers=["stage", "minutes"]))
    return "\n".join(lines)


def cmd_run(args) -> int:
    import time

    from tabulate import tabulate

    from pipelines.definitions import BEFORE_JOB, build_definitions
    from qadata.paths import discover_tables

    run_started = time.perf_counter()
    home = Path(args.home)
    instance = _instance(home)
    defs = build_definitions(home, profile=args.profile)
    extra = {}
    if args.config:
        import yaml

        extra = yaml.safe_load(Path(args.config).read_text()) or {}
    job = defs.resolve_job_def(BEFORE_JOB)
    base_ops = {n.name for n in job.graph.node_defs}
    run_config = _run_config(args.profile, base_ops, extra)
    print(f"materialising the unpartitioned assets ({args.profile} profile) into {home} ...", flush=True)
    result = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
    results = [result]
    synthesis = []
    if result.success and not args.skip_synthesis:
        print(f"\nsynthesising trajectories, round {args.round} ...", flush=True)
        synthesis = run_synthesis(
            instance, defs, home, profile=args.profile, round_key=args.round, extra=extra, force=args.force
        )
        results += [r for _, _, r in synthesis if r is not None]
        if all(st != "FAILED" for _, st, _ in synthesis):
            from pipelines.definitions import AFTER_JOB

            after = defs.resolve_job_def(AFTER_JOB)
            after_ops = {n.name for n in after.graph.node_defs}
            after_config = _run_config(args.profile, after_ops, extra)
            # the stages that read a round read the one just synthesised
            for op in ("contrastive_pairs", "sft_stage23_data"):
                if op in after_ops:
                    after_config = _deep_merge({"ops": {op: {"config": {"round": args.round}}}}, after_config)
            selection = None
            if args.no_train:  # --no-train: the data stages only (checkpoints take minutes of CPU each)
                selection = [
                    k for k in after.asset_layer.executable_asset_keys if not k.to_user_string().endswith("_checkpoint")
                ]
                after_config = {
                    **after_config,
                    "ops": {k: v for k, v in after_config.get("ops", {}).items() if not k.endswith("_checkpoint")},
                }
            print(
                f"\nmaterialising what follows synthesis (round {args.round}"
                f"{', checkpoints excluded' if args.no_train else ', checkpoints included'}) ...",
                flush=True,
            )
            after_result = after.execute_in_process(
                instance=instance, run_config=after_config, raise_on_error=False, asset_selection=selection
            )
            results.append(after_result)
            if not args.no_eval:
                print("\nevaluating (Table 1, Figure 3, world-model fidelity) ...", flush=True)
                results += run_evaluation(
                    instance,
                    defs,
                    profile=args.profile,
                    extra=extra,
                    benchmarks=args.eval_benchmarks.split(",") if args.eval_benchmarks else None,
                )
    tables = discover_tables(home)
    import glob as globlib

    import pyarrow.parquet as pq

    listing = []
    for name, (pattern, _) in tables.items():
        n = sum(pq.ParquetFile(f).metadata.num_rows for f in globlib.glob(pattern))
        listing.append([name, n, str(Path(pattern).parent)])
    print("\ntables:")
    print(tabulate(listing, headers=["asset", "rows", "where"]))
    print(f"\nartifacts (index, corpus jsonl, checkpoints): {home / 'artifacts'}")
    if synthesis:
        print("\nsynthesis shards:")
        print(tabulate([[args.round, sh, st] for sh, st, _ in synthesis], headers=["round", "shard", "status"]))
    rows = [row for r in results for row in _check_rows(r)]
    print("\nchecks:")
    _print_checks(rows)
    print(f"""
next:
  query   : autocoa sql "select pool, count(*) from question_sample group by pool"
  checks  : autocoa check
  UI      : autocoa ui        (= DAGSTER_HOME={os.environ["DAGSTER_HOME"]} dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000)
            then open http://127.0.0.1:3000
  search  : autocoa serve-search   (HTTP batch search on 127.0.0.1:8099)""")
    print("\nsummary:")
    try:
        print(run_summary(home, step_seconds(instance, results), time.perf_counter() - run_started))
    except Exception as exc:  # noqa: BLE001 - the summary reports; it never fails a finished run
        print(f"(summary unavailable: {type(exc).__name__}: {exc})")
    failures = [f for r in results for f in _failed_steps(r)]
    if failures:
        print("\nFAILED steps:\n  " + "\n  ".join(failures), file=sys.stderr)
    return 0 if all(r.success for r in results) and not failures else 1


def cmd_check(args) -> int:

    from pipelines.definitions import build_definitions

    home = Path(args.home)
    instance = _instance(home)
    defs = build_definitions(home)
    job = defs.resolve_job_def("data_checks")
    # a check runs only where its asset has been materialised in this home; the others are reported as skipped
    all_checks = set(defs.resolve_asset_graph().asset_check_keys)
    assets = {k.asset_key for k in all_checks}
    materialised = {a for a in assets if instance.get_latest_materialization_event(a) is not None}
    runnable = {k for k in all_checks if k.asset_key in materialised}
    rows = _skipped_rows(sorted(all_checks - runnable, key=lambda k: (k.asset_key.to_user_string(), k.name)))
    failures: list[str] = []
    if runnable:
        result = job.get_subset(asset_check_selection=runnable).execute_in_process(
            instance=instance, run_config=CONSOLE_INFO, raise_on_error=False
        )
        rows += _check_rows(result)
        failures = _failed_steps(result)
    rows.sort(key=lambda r: (r["asset"], r["check"]))
    _print_checks(rows)
    counts = check_counts(rows)
    errors = [r for r in rows if r["status"] == "failed" or (args.strict and r["status"] == "warn")]
    for f in failures:
        print(f"check could not run: {f}", file=sys.stderr)
    print(
        f"\n{len(rows)} checks: {counts['passed']} passed, {counts['skipped']} skipped (data not materialised), "
        f"{counts['failed']} failed, {counts['warn']} warnings"
        + (f", {len(failures)} could not run" if failures else "")
    )
    if not runnable:
        print("nothing is materialised in this home: no check could run (autocoa run materialises the graph)")
    return 1 if errors or failures or not rows or not runnable else 0


def cmd_sql(args) -> int:
    import duckdb

    from qadata.sql import ReadOnlyViolation, run_query

    try:
        rel = run_query(args.home, args.query)
    except (ReadOnlyViolation, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except duckdb.PermissionException as exc:
        print(
            f"error: autocoa sql reads only the tables under {Path(args.home) / 'tables'} "
            f"(one view per asset: autocoa tables): {exc}",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # noqa: BLE001 - DuckDB's message names the table or column at fault
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if rel is None:
        return 0
    if args.csv or args.parquet:  # written here, not by DuckDB: the session may not touch files outside the home
        import pyarrow.parquet as pq

        table = rel.fetch_arrow_table()
        target = args.csv or args.parquet
        if args.csv:  # pandas quotes only where needed, as DuckDB's COPY did
            table.to_pandas().to_csv(target, index=False)
        else:
            pq.write_table(table, target)
        print(f"wrote {target} ({table.num_rows} rows)")
    else:
        rel.show(max_rows=args.max_rows, max_width=args.max_width)
    return 0


def cmd_tables(args) -> int:
    from qadata.paths import discover_tables

    tables = discover_tables(args.home)
    if not tables:
        print(f"no materialised tables under {args.home}; run `autocoa run` first")
        return 1
    for name, (glob, partitioned) in tables.items():
        print(f"{name:32s} {'partitioned ' if partitioned else ''}{glob}")
    return 0


def cmd_report(args) -> int:
    import pyarrow.parquet as pq

    from evals import report
    from qadata.paths import table_path
    from qadata.sql import run_query

    home = Path(args.home)
    path = table_path(home, ["eval_table"])
    if not path.is_file():
        print(
            f"error: {path} not found; materialise the evaluation first (`autocoa run`, or the evaluation_reports job)",
            file=sys.stderr,
        )
        return 1
    try:
        paper = report.paper_table1(("em", "judge"), args.paper_table1)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    optional = {}
    for name in ("eval_comparisons", "action_analysis", "world_model_fidelity"):
        p = table_path(home, [name])
        optional[name] = pq.read_table(p).to_pandas() if p.is_file() else None
    judges = [
        r[0]
        for r in run_query(
            home, "select distinct judge_model from eval_predictions where judge_model is not null order by 1"
        ).fetchall()
    ]
    text = report.evaluation_report(
        report.unflatten_table1(pq.read_table(path)),
        paper,
        analysis=optional["action_analysis"],
        fidelity=optional["world_model_fidelity"],
        power=optional["eval_comparisons"],
        judge_note=f"LLM = judged by {', '.join(judges)}." if judges else "",
    )
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def cmd_serve_search(args) -> int:
    from retrieval.server import ServerLimits, serve

    index_dir = args.index_dir or str(Path(args.home) / "artifacts" / "search_index")
    if not (Path(index_dir) / "params.index.json").is_file():
        print(f"error: no search index at {index_dir}; materialise `search_index` first (autocoa run)", file=sys.stderr)
        return 1
    serve(
        index_dir,
        host=args.host,
        port=args.port,
        limits=ServerLimits(max_batch=args.max_batch, max_query_chars=args.max_query_chars, max_k=args.max_k),
    )
    return 0


def cmd_ui(args) -> int:
    ensure_dagster_home(Path(args.home))
    os.environ["AUTOCOA_HOME"] = str(args.home)
    dagster = Path(sys.executable).with_name("dagster")
    if args.profile == "embedded":  # workspace.yaml: the embedded code location
        location = ["-w", str(REPO_ROOT / "workspace.yaml")]
    else:  # the profile's code location (pipelines.definitions builds defs_<profile> from configs/<profile>.yaml)
        from pipelines.definitions import profile_names

        if args.profile not in profile_names():
            raise SystemExit(f"unknown profile {args.profile!r} (profiles: {', '.join(profile_names())})")
        location = ["-m", "pipelines.definitions", "-a", f"defs_{args.profile}"]
    cmd = [str(dagster), "dev", *location, "-h", args.host, "-p", str(args.port)]
    print("starting:", " ".join(cmd), flush=True)
    os.chdir(REPO_ROOT)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autocoa", description=__doc__)
    p.add_argument(
        "--home",
        type=Path,
        default=default_home(),
        help="data root with tables/ and artifacts/ (default: $AUTOCOA_HOME or <repo>/var)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="materialise every asset and print where the outputs are")
    r.add_argument(
        "--profile",
        default="embedded",
        help="embedded (default, CPU), or configs/<name>.yaml: shared (../shared/data), paper (GPU box), ci",
    )
    r.add_argument(
        "--config", help="YAML run config merged over the profile (e.g. ops: {coa_trajectories: {config: ...}})"
    )
    r.add_argument(
        "--round", default="r000", help="synthesis round to fill (default r000); a new name = a new partition"
    )
    r.add_argument("--force", action="store_true", help="re-synthesise shards that are already materialised")
    r.add_argument("--skip-synthesis", action="store_true", help="only the unpartitioned assets")
    r.add_argument("--no-train", action="store_true", help="skip the checkpoint assets (training) after synthesis")
    r.add_argument("--no-eval", action="store_true", help="skip the evaluation (Table 1, Figure 3, fidelity)")
    r.add_argument(
        "--eval-benchmarks",
        help="comma-separated benchmarks to evaluate (default: all: embedded + the "
        "six shared ones, empty when ../shared/data is absent)",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="run every data-quality check on the materialised data; non-zero exit on failure")
    c.add_argument("--strict", action="store_true", help="treat WARN-severity failures as failures too")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("sql", help="read-only DuckDB SQL over the materialised tables (one view per asset)")
    s.add_argument("query")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--csv", help="write the result to this CSV file")
    out.add_argument("--parquet", help="write the result to this Parquet file")
    s.add_argument("--max-rows", type=int, default=40)
    s.add_argument("--max-width", type=int, default=160)
    s.set_defaults(func=cmd_sql)

    t = sub.add_parser("tables", help="list the views `autocoa sql` offers")
    t.set_defaults(func=cmd_tables)

    e = sub.add_parser(
        "report",
        help="the evaluation as Markdown: Table 1 with intervals and paired tests, "
        "beside the paper's, Figure 3, fidelity",
    )
    e.add_argument("--paper-table1", help="CSV of the paper's Table 1 (default: configs/paper_table1.csv)")
    e.add_argument("--out", help="write the report to this file instead of printing it")
    e.set_defaults(func=cmd_report)

    v = sub.add_parser("serve-search", help="HTTP batch search server over the BM25 index")
    v.add_argument("--index-dir", help="default: <home>/artifacts/search_index")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8099)
    v.add_argument("--max-batch", type=int, default=512, help="most queries in one request")
    v.add_argument("--max-query-chars", type=int, default=2048)
    v.add_argument("--max-k", type=int, default=50)
    v.set_defaults(func=cmd_serve_search)

    u = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on 127.0.0.1")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=3000)
    u.add_argument("--profile", default="embedded", help="the code location's profile (configs/<name>.yaml)")
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "check"):
        # run/check print library logs through Dagster's console logger (managed_python_loggers);
        # a root handler too would print every line twice
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    args.home = Path(args.home).resolve()
    os.environ.setdefault("AUTOCOA_HOME", str(args.home))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
