import pytest

from assets.resources import SearchEngineResource
from qadata.io import atomic_directory, atomic_write_jsonl, atomic_write_text
from retrieval.bm25 import BM25Index
from retrieval.engine import HttpSearchEngine, LocalSearchEngine


def test_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def rows():
        yield {"x": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(path, rows())
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "index"
    with atomic_directory(target) as d:
        (d / "v1").write_text("1")
    with pytest.raises(ValueError), atomic_directory(target) as d:
        (d / "v2").write_text("2")
        raise ValueError("build failed")
    assert [p.name for p in target.iterdir()] == ["v1"]
    with atomic_directory(target) as d:
        (d / "v3").write_text("3")
    assert [p.name for p in target.iterdir()] == ["v3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_search_engine_resource_modes(tmp_path):
    index = BM25Index.build(
        [{"id": "0", "contents": "Alpha\nAlpha is a poet."}, {"id": "1", "contents": "Beta\nBeta is a city."}],
        show_progress=False,
    )
    index.save(tmp_path / "artifacts" / "search_index")
    local = SearchEngineResource(home=str(tmp_path)).get_engine()
    assert isinstance(local, LocalSearchEngine)
    assert local.search(["poet"], 1)[0][0].title == "Alpha"
    remote = SearchEngineResource(mode="http", url="http://127.0.0.1:1").get_engine()
    assert isinstance(remote, HttpSearchEngine) and remote.url == "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="'local' or 'http'"):
        SearchEngineResource(mode="grpc").get_engine()
    with pytest.raises(FileNotFoundError, match="not a bm25s index"):
        SearchEngineResource(home=str(tmp_path / "nothing")).get_engine().search(["x"], 1)
