"""Configurable resources: storage locations and the search engine (in-process or HTTP)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from qadata.paths import artifacts_dir, default_home
from retrieval.engine import HttpSearchEngine, LocalSearchEngine, SearchEngine


class SearchEngineResource(dg.ConfigurableResource):
    """The search tool the agent calls: ``local`` loads the saved index, ``http`` calls ``autocoa serve-search``."""

    mode: str = Field("local", description="'local' (in-process bm25s) or 'http' (a running search server).")
    url: str = Field("http://127.0.0.1:8099", description="Search server URL when mode is 'http'.")
    index_dir: str | None = Field(None, description="Index directory for 'local'; default: the search_index asset's.")
    home: str = Field(default_factory=lambda: str(default_home()), description="AUTOCOA home holding artifacts/.")

    def get_engine(self) -> SearchEngine:
        if self.mode == "http":
            return HttpSearchEngine(self.url)
        if self.mode != "local":
            raise ValueError(f"SearchEngineResource.mode must be 'local' or 'http', got {self.mode!r}")
        index_dir = Path(self.index_dir) if self.index_dir else artifacts_dir(self.home) / "search_index"
        return LocalSearchEngine(index_dir)
