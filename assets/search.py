"""Retrieval stage: the FlashRAG passage corpus and its BM25 search index."""

import random

import bm25s
import dagster as dg
import numpy as np
import pyarrow as pa
import Stemmer
from pydantic import Field

from assets.metadata import bar_plot, latest_metadata, table_metadata, timed
from assets.quality import REJECTED_EXPECTATIONS, gx_check
from assets.storage import StorageResource
from qadata.corpus import corpus_from_questions, read_flashrag_corpus
from qadata.io import atomic_write_jsonl
from qadata.loaders import SourceSpec, count_records
from qadata.schema import Rejected, rejected_table
from retrieval.bm25 import BM25Index
from retrieval.metrics import recall_at_k

GROUP = "retrieval"
CORPUS_SCHEMA = pa.schema(
    [("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("contents", pa.string())]
)
INDEX_SCHEMA = pa.schema(
    [
        ("index_dir", pa.string()),
        ("corpus_path", pa.string()),
        ("num_docs", pa.int64()),
        ("vocab_size", pa.int64()),
        ("k1", pa.float64()),
        ("b", pa.float64()),
        ("method", pa.string()),
        ("stemmer", pa.string()),
        ("stopwords", pa.string()),
        ("build_seconds", pa.float64()),
    ]
)


# -- corpus -------------------------------------------------------------------------------------
class CorpusConfig(dg.Config):
    flashrag_corpus: str | None = Field(
        None,
        description=(
            "Path of an existing FlashRAG corpus jsonl (e.g. wiki-18) to use instead of the questions' context paragraphs."
        ),
    )


@dg.multi_asset(
    group_name=GROUP,
    outs={
        "corpus": dg.AssetOut(
            description="Search passages in FlashRAG's corpus format (id, 'Title\\ntext'), de-duplicated from the source.",
            kinds={"parquet"},
        ),
        "corpus_rejected": dg.AssetOut(
            description="Corpus lines that could not be read, each with file, line and reason.", kinds={"parquet"}
        ),
    },
)
def corpus(context: dg.AssetExecutionContext, config: CorpusConfig, storage: StorageResource, hotpotqa_raw: pa.Table):
    md: dict = {}
    rejected: list[Rejected] = []
    with timed(md):
        if config.flashrag_corpus:
            passages = []
            for item in read_flashrag_corpus(config.flashrag_corpus):
                (rejected if isinstance(item, Rejected) else passages).append(item)
            # counted from the file itself, independently of the parser, so the reconcile check means something
            rows_in, source = count_records(SourceSpec(config.flashrag_corpus)), config.flashrag_corpus
            duplicates = 0
        else:
            passages, rows_in = corpus_from_questions(hotpotqa_raw.select(["context"]).to_pylist())
            duplicates, source = rows_in - len(passages), "hotpotqa_raw context paragraphs"
        if not passages:
            raise dg.Failure(f"corpus: no passage in {source}")
        jsonl = storage.artifact_dir("corpus") / "corpus.jsonl"
        atomic_write_jsonl(jsonl, ({"id": p["id"], "contents": p["contents"]} for p in passages))
        table = pa.Table.from_pylist(passages, schema=CORPUS_SCHEMA)
    context.log.info(
        "corpus: %d passages from %s (%d duplicates merged, %d rejected)",
        len(passages),
        source,
        duplicates,
        len(rejected),
    )
    lengths = np.array([len(p["text"].split()) for p in passages])
    counts = {
        "rows_in": rows_in,
        "rows_out": len(passages),
        "duplicates_merged": duplicates,
        "rows_rejected": len(rejected),
    }
    hist, edges = np.histogram(lengths, bins=min(12, max(1, len(set(lengths.tolist())))))
    yield dg.Output(
        table,
        output_name="corpus",
        metadata={
            **md,
            **table_metadata(table, preview_columns=["id", "title", "text"]),
            **counts,
            "source": source,
            "flashrag_jsonl": dg.MetadataValue.path(str(jsonl)),
            "words_per_passage_mean": float(lengths.mean()),
            "length_histogram": bar_plot(
                [f"{int(e)}" for e in edges[:-1]], {"passages": hist.tolist()}, "passage length (words)", "passages"
            ),
        },
    )
    rej = rejected_table(rejected)
    yield dg.Output(
        rej,
        output_name="corpus_rejected",
        metadata={**table_metadata(rej, preview_columns=["source_file", "source_row", "reason"]), **counts},
    )


@dg.asset_check(asset="corpus_rejected", description="Every quarantined corpus line names its file, line and reason.")
def corpus_rejected_expectations(corpus_rejected: pa.Table) -> dg.AssetCheckResult:
    return gx_check(corpus_rejected.to_pandas(), "corpus_rejected", REJECTED_EXPECTATIONS)


@dg.asset_check(
    asset="corpus",
    blocking=True,
    additional_ins={"rejected": dg.AssetIn("corpus_rejected")},
    description="Counts reconcile: paragraphs or lines read = passages kept + duplicates merged + lines quarantined.",
)
def corpus_counts_reconcile(
    context: dg.AssetCheckExecutionContext, corpus: pa.Table, rejected: pa.Table
) -> dg.AssetCheckResult:
    meta = latest_metadata(context.instance, "corpus")
    rows_in = meta.get("rows_in")
    ok = rows_in is not None and rows_in == corpus.num_rows + meta.get("duplicates_merged", 0) + rejected.num_rows
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "rows_in": rows_in if rows_in is not None else -1,
            "passages": corpus.num_rows,
            "duplicates_merged": meta.get("duplicates_merged", 0),
            "rejected": rejected.num_rows,
        },
    )


@dg.asset_check(
    asset="corpus", blocking=True, description="Passage ids unique, contents non-empty and shaped 'Title\\ntext'."
)
def corpus_expectations(corpus: pa.Table) -> dg.AssetCheckResult:
    df = corpus.select(["id", "title", "contents"]).to_pandas()
    return gx_check(
        df,
        "corpus",
        [
            ("ExpectTableRowCountToBeBetween", {"min_value": 1}),
            ("ExpectColumnValuesToBeUnique", {"column": "id"}),
            ("ExpectColumnValuesToNotBeNull", {"column": "contents"}),
            ("ExpectColumnValuesToMatchRegex", {"column": "contents", "regex": r"^[^\n]+\n"}),
        ],
    )


@dg.asset_check(
    asset="corpus",
    blocking=True,
    additional_ins={"question_sample": dg.AssetIn("question_sample")},
    description="Every gold supporting title of the sampled questions is a passage title in the corpus.",
)
def corpus_covers_gold_titles(corpus: pa.Table, question_sample: pa.Table) -> dg.AssetCheckResult:
    titles = set(corpus.column("title").to_pylist())
    gold = {f["title"] for facts in question_sample.column("supporting_facts").to_pylist() for f in facts or []}
    missing = sorted(gold - titles)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"gold_titles": len(gold), "missing": len(missing), "examples": ", ".join(missing[:10])},
    )


# -- search_index -------------------------------------------------------------------------------
class SearchIndexConfig(dg.Config):
    k1: float = Field(0.9, description="BM25 k1 (Pyserini default).")
    b: float = Field(0.4, description="BM25 b (Pyserini default).")
    method: str = Field("lucene", description="bm25s scoring variant: lucene, robertson, atire, bm25l, bm25+.")


@dg.asset(group_name=GROUP, kinds={"bm25s", "parquet"})
def search_index(
    context: dg.AssetExecutionContext, config: SearchIndexConfig, storage: StorageResource, corpus: pa.Table
) -> dg.Output[pa.Table]:
    """BM25 index of the corpus built with bm25s (stemmed), saved as explicit files FlashRAG's bm25s retriever loads."""
    md: dict = {}
    index_dir = storage.artifact_dir("search_index")
    with timed(md):
        rows = corpus.select(["id", "contents"]).to_pylist()
        index = BM25Index.build(rows, k1=config.k1, b=config.b, method=config.method)
        index.save(index_dir)
    p = index.params
    row = {
        "index_dir": str(index_dir),
        "corpus_path": str(index_dir / "corpus.jsonl"),
        "num_docs": p["num_docs"],
        "vocab_size": p["vocab_size"],
        "k1": p["k1"],
        "b": p["b"],
        "method": p["method"],
        "stemmer": p["stemmer"],
        "stopwords": p["stopwords"],
        "build_seconds": p["build_seconds"],
    }
    table = pa.Table.from_pylist([row], schema=INDEX_SCHEMA)
    size = sum(f.stat().st_size for f in index_dir.iterdir() if f.is_file())
    context.log.info(
        "search_index: %d passages, %d terms, %.1f MiB at %s", p["num_docs"], p["vocab_size"], size / 2**20, index_dir
    )
    md.update(
        table_metadata(table),
        index_dir=dg.MetadataValue.path(str(index_dir)),
        num_docs=p["num_docs"],
        vocab_size=p["vocab_size"],
        index_mib=round(size / 2**20, 2),
    )
    return dg.Output(table, metadata=md)


@dg.asset_check(
    asset=search_index,
    blocking=True,
    additional_ins={"corpus": dg.AssetIn("corpus")},
    description="The saved index loads and holds exactly the corpus' passages, in order.",
)
def search_index_matches_corpus(search_index: pa.Table, corpus: pa.Table) -> dg.AssetCheckResult:
    index = BM25Index.load(search_index["index_dir"][0].as_py())
    sample = random.Random(0).sample(range(corpus.num_rows), min(50, corpus.num_rows))
    ids = corpus.column("id").to_pylist()
    # each sampled passage, queried by its own full text, must come back first
    texts = [corpus["contents"][i].as_py() for i in sample]
    top = index.search_ids(texts, 1)[0][:, 0]
    self_hits = sum(1 for i, d in zip(sample, top) if d >= 0 and ids[int(d)] == ids[i])
    ok = index.num_docs == corpus.num_rows and self_hits >= 0.9 * len(sample)
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "index_docs": index.num_docs,
            "corpus_rows": corpus.num_rows,
            "self_retrieval_top1": f"{self_hits}/{len(sample)}",
        },
    )


@dg.asset_check(
    asset=search_index,
    additional_ins={"question_sample": dg.AssetIn("question_sample")},
    description="FlashRAG compatibility: plain bm25s.BM25.load + FlashRAG's query tokenisation scores our top-5 identically.",
)
def search_index_flashrag_compatible(search_index: pa.Table, question_sample: pa.Table) -> dg.AssetCheckResult:
    index_dir = search_index["index_dir"][0].as_py()
    queries = question_sample.column("question").to_pylist()[:32]
    raw = bm25s.BM25.load(index_dir, mmap=True, load_corpus=False)
    ours, our_scores = BM25Index.load(index_dir).search_ids(queries, 5)
    tokens = bm25s.tokenize(queries, stemmer=Stemmer.Stemmer("english"), show_progress=False)
    theirs, their_scores = raw.retrieve(tokens, k=5, show_progress=False)
    their_scores = np.where(theirs >= 0, their_scores, 0)
    # same scores rank by rank; documents may differ only where scores tie (we break ties by row)
    same_scores = np.allclose(np.where(ours >= 0, our_scores, 0), their_scores, atol=1e-4)
    same_docs = int((ours == np.where(their_scores > 0, theirs, -1)).all(axis=1).sum())
    return dg.AssetCheckResult(
        passed=bool(same_scores),
        metadata={"queries": len(queries), "identical_scores": bool(same_scores), "identical_documents": same_docs},
    )


@dg.asset_check(
    asset=search_index,
    additional_ins={"question_sample": dg.AssetIn("question_sample")},
    description="BM25 recall@3/@5 of the gold supporting titles for the sampled questions (WARN below 0.5 @5).",
)
def search_index_gold_recall(search_index: pa.Table, question_sample: pa.Table) -> dg.AssetCheckResult:
    index = BM25Index.load(search_index["index_dir"][0].as_py())
    rows = [r for r in question_sample.select(["question", "supporting_facts"]).to_pylist() if r["supporting_facts"]]
    if not rows:
        return dg.AssetCheckResult(passed=True, metadata={"questions": 0, "note": "no supporting facts in the sample"})
    recall = recall_at_k(index, rows, ks=(3, 5))
    return dg.AssetCheckResult(
        passed=recall[5] >= 0.5,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "questions": len(rows),
            "recall@3": recall[3],
            "recall@5": recall[5],
            "recall_plot": bar_plot(["@3", "@5"], {"recall": [recall[3], recall[5]]}, "gold-title recall", "recall"),
        },
    )
