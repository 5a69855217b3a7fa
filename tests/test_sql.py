"""The loader of the named SQL files: sections, shared fragments, and the prepared form of hot queries."""
from __future__ import annotations

import pytest

from bloom.sql import NamedQuery, parse_named_queries, prepared_form

SOURCE = """
-- name: plain
SELECT * FROM llm_tasks WHERE id = :task_id;

-- name: hot (prepared)
-- A comment; with a semicolon, and a :not_a_parameter.
SELECT set_config('x', :worker_id, true);
UPDATE leases SET detail = '{}'::jsonb, expires_at = :now + :ttl_seconds * 1000
 WHERE worker_id = :worker_id AND id = :lease_id;
"""


def test_sections_are_named_and_flagged():
    queries = parse_named_queries(SOURCE)
    assert set(queries) == {"plain", "hot"}
    assert not queries["plain"].prepared and queries["hot"].prepared
    assert queries["plain"].sql == "SELECT * FROM llm_tasks WHERE id = :task_id;"


def test_a_prepared_query_numbers_its_parameters_per_statement_and_types_them():
    prepares, calls = prepared_form(parse_named_queries(SOURCE)["hot"])
    assert prepares == [
        "PREPARE bloom_hot_0 (text) AS SELECT set_config('x', $1, true)",
        "PREPARE bloom_hot_1 (bigint, integer, text, text) AS UPDATE leases SET detail = '{}'::jsonb, "
        "expires_at = $1 + $2 * 1000\n WHERE worker_id = $3 AND id = $4",
    ]
    assert calls == ("EXECUTE bloom_hot_0 (:worker_id);\n"
                     "EXECUTE bloom_hot_1 (:now, :ttl_seconds, :worker_id, :lease_id)")


def test_a_name_used_twice_is_refused():
    with pytest.raises(ValueError, match="defined twice"):
        parse_named_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    assert isinstance(parse_named_queries("-- name: a\nSELECT 1;")["a"], NamedQuery)


def test_the_driver_form_names_parameters_for_psycopg2_and_doubles_percent_signs():
    from bloom.sql import driver_form

    sql = "SELECT CAST(:b AS int), '100%' AS pct, created_at::text WHERE x LIKE 'a%' AND y = :a"
    assert driver_form(sql) == (
        "SELECT CAST(%(b)s AS int), '100%%' AS pct, created_at::text WHERE x LIKE 'a%%' AND y = %(a)s"
    )
    # As in SQLAlchemy's text(): a name followed by a :: cast is no parameter (write CAST).
    assert driver_form("SELECT :a::text") == "SELECT :a::text"


def test_a_fragment_is_written_once_and_included_where_a_statement_says():
    source_a = """
-- fragment: touch
-- Why it is shared.
UPDATE workers SET seen = :now WHERE id IN (SELECT id FROM who)

-- name: one
WITH who AS (SELECT :id AS id), touched AS (
    -- include: touch
)
SELECT 1;
"""
    source_b = """
-- name: two
WITH who AS (SELECT :other AS id), touched AS (
    -- include: touch
)
SELECT 2;
"""
    queries = parse_named_queries(source_a, source_b)
    assert set(queries) == {"one", "two"}  # a fragment is not a statement
    for name in ("one", "two"):
        assert "    UPDATE workers SET seen = :now WHERE id IN (SELECT id FROM who)" in queries[name].sql
        assert "include:" not in queries[name].sql
    with pytest.raises(ValueError, match="not defined"):
        parse_named_queries("-- name: x\nWITH a AS (\n  -- include: nowhere\n) SELECT 1;")
    with pytest.raises(ValueError, match="defined twice"):
        parse_named_queries(source_a, source_a)


def test_a_fragment_may_include_another_and_never_itself():
    source = """
-- fragment: inner
count(*)

-- fragment: outer
SELECT
  -- include: inner
  AS n FROM t

-- name: q
WITH c AS (
  -- include: outer
)
SELECT n FROM c;
"""
    assert "count(*)" in parse_named_queries(source)["q"].sql
    assert "include:" not in parse_named_queries(source)["q"].sql
    looping = "-- fragment: a\nSELECT\n-- include: b\n\n-- fragment: b\n-- include: a\n\n-- name: q\n-- include: a\n;"
    with pytest.raises(ValueError, match="includes itself"):
        parse_named_queries(looping)
