"""SQL text to query spec and back: what is accepted, and how each refusal names its construct."""

from __future__ import annotations

import pytest

from veil.errors import QueryError
from veil.sql import canonical_sql, parse_sql
from veil.wire import Aggregate, And, Comparison, QuerySpec


def test_grouped_query_becomes_a_spec() -> None:
    spec = parse_sql(
        "SELECT department, COUNT(*) AS n, AVG(crp_mg_l) AS crp, MEDIAN(age), QUANTILE_CONT(age, 0.9) AS q90 "
        "FROM encounters WHERE age >= 3 AND department IN ('icu', 'emergency') GROUP BY department"
    )
    assert spec.dataset == "encounters"
    assert spec.group_by == ["department"]
    assert [(a.fn, a.column, a.name) for a in spec.aggregates] == [
        ("count", None, "n"), ("mean", "crp_mg_l", "crp"), ("median", "age", "median_age"),
        ("quantile", "age", "q90"),
    ]
    assert spec.aggregates[3].q == 0.9
    assert spec.where == And(all=[
        Comparison(column="age", op=">=", value=3),
        Comparison(column="department", op="in", value=["icu", "emergency"]),
    ])


def test_conditions_cover_null_between_not_or_and_flipped_comparisons() -> None:
    spec = parse_sql(
        "SELECT COUNT(*) FROM t WHERE (crp IS NULL OR NOT wbc IS NULL) AND NOT (x BETWEEN 1 AND 2) "
        "AND 5 < age AND d >= DATE '2020-01-01' AND y = -1.5"
    )
    assert isinstance(spec.where, And)
    text = canonical_sql(spec)
    assert "(crp IS NULL) OR (NOT (wbc IS NULL))" not in text  # IS NOT NULL is one comparison
    assert "(crp IS NULL) OR (wbc IS NOT NULL)" in text
    assert "NOT ((x >= 1) AND (x <= 2))" in text
    assert "age > 5" in text and "d >= '2020-01-01'" in text and "y = -1.5" in text


def test_canonical_text_is_the_same_for_sql_and_json_spec() -> None:
    sql = "select sex, count(*) as n from patients where age < 5 group by sex"
    spec = QuerySpec(dataset="patients", where=Comparison(column="age", op="<", value=5), group_by=["sex"],
                     aggregates=[Aggregate(fn="count", alias="n")])
    assert canonical_sql(parse_sql(sql)) == canonical_sql(spec)
    assert canonical_sql(parse_sql(canonical_sql(spec))) == canonical_sql(spec)


def test_string_literals_are_escaped_in_canonical_text() -> None:
    spec = parse_sql("SELECT COUNT(*) FROM patients WHERE region = 'o''brien'")
    assert canonical_sql(spec).endswith("WHERE region = 'o''brien'")
    assert canonical_sql(parse_sql(canonical_sql(spec))) == canonical_sql(spec)


@pytest.mark.parametrize(("sql", "code", "named"), [
    ("SELECT * FROM patients", "row_level_output", "SELECT *"),
    ("SELECT age FROM patients", "row_level_output", "'age'"),
    ("SELECT age, COUNT(*) FROM patients", "row_level_output", "GROUP BY"),
    ("SELECT COUNT(*) FROM a JOIN b ON a.x = b.x", "unsupported_query", "JOIN"),
    ("SELECT MIN(age) FROM patients", "unsupported_query", "MIN"),
    ("SELECT MAX(age) FROM patients", "unsupported_query", "MAX"),
    ("SELECT STDDEV(age) FROM patients", "unsupported_query", "STDDEV"),
    ("SELECT COUNT(*) FROM patients ORDER BY 1", "unsupported_query", "ORDER BY"),
    ("SELECT COUNT(*) FROM patients LIMIT 3", "unsupported_query", "LIMIT"),
    ("SELECT COUNT(DISTINCT age) FROM patients", "unsupported_query", "COUNT(DISTINCT"),
    ("SELECT sex, COUNT(*) FROM patients GROUP BY sex HAVING COUNT(*) > 3", "unsupported_query", "HAVING"),
    ("SELECT COUNT(*) FROM (SELECT * FROM patients)", "unsupported_query", "subquery"),
    ("SELECT COUNT(*) FROM patients WHERE age IN (SELECT age FROM x)", "unsupported_query", "IN (subquery)"),
    ("SELECT COUNT(*) FROM patients WHERE age > weight", "unsupported_query", "comparison"),
    ("SELECT COUNT(*) FROM patients; DROP TABLE patients", "malformed_sql", "one SQL statement"),
    ("DELETE FROM patients", "unsupported_query", "DELETE"),
    ("SELEC COUNT(*) FROM patients", "malformed_sql", ""),
    ("SELECT COUNT(*) FROM ../../etc/passwd", "malformed_sql", "parsed"),
    ("SELECT COUNT(*)", "malformed_sql", "FROM"),
    ("SELECT QUANTILE_CONT(age, 1.5) FROM patients", "malformed_sql", "between 0 and 1"),
    ("SELECT UPPER(sex) FROM patients", "unsupported_query", "UPPER"),
])
def test_refusals_name_the_construct_and_say_what_to_do(sql: str, code: str, named: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_sql(sql)
    assert info.value.code == code
    assert named.lower() in info.value.message.lower()
    assert info.value.hint or code == "malformed_sql"
