"""Every call of a named statement passes exactly the statement's :parameters — what
River gets from sqlc, checked here by reading the code: a parameter renamed in a .sql
file, or a keyword misspelt at a call, fails this test instead of a request."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from bloom.sql import _COMMENT_LINE, _PARAMETER, parse_named_queries

BLOOM = Path(__file__).resolve().parent.parent / "bloom"
CALLS = {"one", "all", "one_or_none", "execute", "script"}  # bloom/db.py's ways to run a named statement
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*'")


def _parameters_by_statement() -> dict[str, set[str]]:
    files = sorted(BLOOM.rglob("*.sql"))
    queries = parse_named_queries(*(path.read_text(encoding="utf-8") for path in files))
    return {name: set(_PARAMETER.findall(_STRING_LITERAL.sub("''", _COMMENT_LINE.sub("", query.sql))))
            for name, query in queries.items()}


def _named_calls():
    """(where, statement name, keywords, has **kwargs) for each call of a named statement."""
    statements = _parameters_by_statement()
    for path in sorted(BLOOM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            where = f"{path.relative_to(BLOOM.parent)}:{node.lineno}"
            first = node.args[0]
            if (isinstance(node.func, ast.Attribute) and node.func.attr in CALLS
                    and isinstance(first, ast.Constant) and first.value in statements):
                keywords = {keyword.arg for keyword in node.keywords if keyword.arg is not None}
                spread = any(keyword.arg is None for keyword in node.keywords)
                yield where, first.value, keywords, spread
            elif (isinstance(first, ast.Subscript) and isinstance(first.value, ast.Name) and first.value.id == "QUERIES"
                  and isinstance(first.slice, ast.Constant)):
                # A cursor of its own: cursor.execute(QUERIES["name"], {"param": value, ...})
                arguments = node.args[1] if len(node.args) > 1 else None
                if isinstance(arguments, ast.Dict) and all(isinstance(key, ast.Constant) for key in arguments.keys):
                    yield where, first.slice.value, {key.value for key in arguments.keys}, False  # type: ignore[union-attr]
                else:
                    yield where, first.slice.value, set(), True


def test_each_named_statement_call_passes_exactly_its_parameters():
    statements = _parameters_by_statement()
    mismatches = []
    calls = list(_named_calls())
    for where, name, keywords, spread in calls:
        wanted = statements[name]
        missing = set() if spread else wanted - keywords
        unknown = keywords - wanted
        if missing or unknown:
            mismatches.append(f"{where} {name}: missing {sorted(missing)}, not in the statement {sorted(unknown)}")
    assert not mismatches, "\n".join(mismatches)
    assert len(calls) > 60  # the walk finds the calls (76 when this was written)


def test_every_named_statement_is_called_somewhere():
    called = {name for _, name, _, _ in _named_calls()}
    uncalled = set(_parameters_by_statement()) - called - {"begin", "commit", "rollback"}
    assert not uncalled, f"named statements no code calls: {sorted(uncalled)}"
