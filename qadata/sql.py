"""Read-only DuckDB SQL over every materialised table (one view per asset, partitions included).

Two fences: statements that would write, attach, install or reconfigure are refused before they run
(:func:`check_read_only`), and the session itself can read only the home's ``tables/`` directory
(DuckDB's ``enable_external_access = false`` with that directory allowed, then the configuration locked), so
``read_csv('/etc/passwd')`` or ``glob('/etc/*')`` fail with a permission error while the views keep working.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from qadata.paths import discover_tables, tables_dir

# Statement types a read-only session may run; everything else (COPY, CREATE, INSERT, ATTACH, SET,
# INSTALL, EXPORT, ...) is refused before execution.
_ALLOWED = {"SELECT", "EXPLAIN", "PRAGMA"}
_ALLOWED_PRAGMAS = ("show_tables", "table_info", "show", "database_size", "version")


class ReadOnlyViolation(PermissionError):
    """The SQL would write, attach, install or reconfigure something."""


def sql_literal(text: str) -> str:
    """``text`` as a single-quoted SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def connect(home: str | Path) -> tuple[duckdb.DuckDBPyConnection, dict[str, tuple[str, bool]]]:
    """An in-memory DuckDB session with one view per asset table, file access confined to the home's tables and
    its configuration locked."""
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    allowed = str(Path(tables_dir(home)).resolve()) + "/"
    con.execute(f"SET allowed_directories = [{sql_literal(allowed)}]")
    con.execute("SET enable_external_access = false")
    tables = discover_tables(home)
    for name, (glob, partitioned) in tables.items():
        # DDL cannot take bound parameters; the path is quoted as a literal and the name as an identifier
        opts = ", hive_partitioning = true, union_by_name = true" if partitioned else ""
        con.execute(f"CREATE VIEW {ident(name)} AS SELECT * FROM read_parquet({sql_literal(glob)}{opts})")
    con.execute("SET lock_configuration = true")
    return con, tables


def check_read_only(sql: str) -> list[str]:
    """Split ``sql`` into statements and refuse any that is not a read."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(f"cannot parse SQL: {exc}") from exc
    if not statements:
        raise ValueError("no SQL statement given")
    out = []
    for st in statements:
        kind = st.type.name
        text = st.query.strip()
        if kind not in _ALLOWED:
            raise ReadOnlyViolation(f"refused {kind} statement: autocoa sql is read-only ({text[:80]!r})")
        if kind == "PRAGMA" and not re.match(rf"(?i)^pragma\s+({'|'.join(_ALLOWED_PRAGMAS)})\b", text):
            raise ReadOnlyViolation(f"refused PRAGMA: only {', '.join(_ALLOWED_PRAGMAS)} are allowed")
        out.append(text)
    return out


def run_query(home: str | Path, sql: str) -> duckdb.DuckDBPyRelation:
    """Run read-only SQL and return the relation of its last statement."""
    statements = check_read_only(sql)
    con, _ = connect(home)
    rel = None
    for st in statements:
        rel = con.sql(st)
    return rel
