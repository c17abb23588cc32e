"""SQL text to a JSON query spec, and a spec back to canonical SQL.

SQL is parsed by sqlglot into a syntax tree; we accept one shape only: a SELECT of aggregates
(optionally beside GROUP BY keys) from one dataset, with a WHERE of comparisons. Anything else is
refused with a message that names the construct and says how to write the query instead.
The executor never runs the SQL text itself: the spec is what it turns into a Polars plan.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

import sqlglot
from pydantic import ValidationError
from sqlglot import exp

from veil import limits
from veil.errors import QueryError, validation_problems
from veil.wire import Aggregate, And, Comparison, Condition, Not, Or, QuerySpec

_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "==",
    exp.NEQ: "!=",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
}
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_REFUSED_CLAUSES = {
    "joins": ("JOIN", "query one dataset at a time; combine released aggregates in your notebook"),
    "having": ("HAVING", "filter the released table in your notebook instead (post-processing is free)"),
    "order": ("ORDER BY", "sort the released table in your notebook instead"),
    "limit": ("LIMIT", "every group is released; select rows in your notebook instead"),
    "offset": ("OFFSET", "select rows of the released table in your notebook instead"),
    "distinct": ("SELECT DISTINCT", "use GROUP BY with COUNT(*) to release the distinct values with counts"),
    "windows": ("WINDOW", "window functions return rows; use aggregates with GROUP BY"),
    "with": ("WITH (common table expression)", "write a single SELECT over the dataset"),
}


def _refuse(construct: str, hint: str) -> QueryError:
    return QueryError("unsupported_query", f"{construct} is not supported in a DP query", hint=hint)


def _too_large(what: str, hint: str) -> QueryError:
    return QueryError("query_too_large", f"the query {what}", hint=hint)


def nesting_depth(sql: str) -> int:
    """The deepest nesting of parentheses outside quoted text (measured before any parser sees the text)."""
    depth = deepest = 0
    quote: str | None = None
    for ch in sql:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def check_sql_size(sql: str) -> None:
    """Refuse SQL text longer or more deeply nested than the limits, before it is parsed."""
    if len(sql) > limits.MAX_SQL_CHARS:
        raise _too_large(f"is {len(sql)} characters long, more than {limits.MAX_SQL_CHARS}",
                         "shorten it: use IN lists or BETWEEN instead of many comparisons")
    if nesting_depth(sql) > limits.MAX_SQL_NESTING:
        raise _too_large(f"nests parentheses deeper than {limits.MAX_SQL_NESTING} levels",
                         "write the filter flatter; the meaning of AND / OR does not need deep nesting")


@lru_cache(maxsize=4096)
def parse_sql(sql: str) -> QuerySpec:
    """Turn `SELECT ... FROM dataset [WHERE ...] [GROUP BY ...]` into a QuerySpec, or refuse."""
    check_sql_size(sql)
    try:
        return _parse(sql)
    except RecursionError:  # e.g. thousands of chained NOTs: the text is small but the tree is deep
        raise _too_large(f"nests expressions deeper than {limits.MAX_CONDITION_DEPTH} levels",
                         "write the filter flatter") from None


def _parse(sql: str) -> QuerySpec:
    try:
        statements = [s for s in sqlglot.parse(sql) if s is not None]
    except sqlglot.errors.ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = f" (line {first.get('line')}, column {first.get('col')})" if first else ""
        raise QueryError("malformed_sql", f"the SQL could not be parsed: {first.get('description', exc)}{where}",
                         hint="check the syntax at the position shown") from None
    except sqlglot.errors.SqlglotError as exc:
        raise QueryError("malformed_sql", f"the SQL could not be parsed: {exc}", hint="check the syntax") from None
    if len(statements) != 1:
        raise QueryError("malformed_sql", f"expected one SQL statement, got {len(statements)}",
                         hint="send one SELECT per query, without ';'-separated statements")
    select = statements[0]
    if not isinstance(select, exp.Select):
        raise _refuse(f"a {select.key.upper()} statement", "send a SELECT of aggregates such as COUNT(*), AVG(col)")
    for clause, (construct, hint) in _REFUSED_CLAUSES.items():
        if select.args.get(clause) or select.args.get(f"{clause}_"):  # sqlglot 30 names some keys "with_"
            raise _refuse(construct, hint)
    try:
        return _spec(select)
    except ValidationError as exc:  # a quoted name outside the allowed pattern, a filter too large, ...
        raise QueryError("malformed_sql", f"the query is not one Veil accepts: {validation_problems(exc.errors(), 1)}",
                         hint="names are letters, digits and _ (no quotes needed); filters stay within the "
                              "limits the message names") from None


def _spec(select: exp.Select) -> QuerySpec:
    dataset = _dataset_name(select)
    group_by = [_column_name(g, "GROUP BY") for g in (select.args.get("group").expressions if select.args.get("group") else [])]
    aggregates = []
    for projection in select.expressions:
        agg = _aggregate(projection, group_by)
        if agg is not None:
            aggregates.append(agg)
    if not aggregates:
        raise QueryError(
            "row_level_output",
            "the query selects no aggregate, so it would return rows of the dataset",
            hint="select aggregates such as COUNT(*), SUM(col), AVG(col), MEDIAN(col), QUANTILE_CONT(col, 0.9)",
        )
    where = select.args.get("where")
    return QuerySpec(
        dataset=dataset,
        where=_condition(where.this) if where is not None else None,
        group_by=group_by,
        aggregates=aggregates,
    )


def _dataset_name(select: exp.Select) -> str:
    source = select.args.get("from") or select.args.get("from_")
    if source is None:
        raise QueryError("malformed_sql", "the query has no FROM clause", hint="write SELECT ... FROM <dataset>")
    table = source.this
    if not isinstance(table, exp.Table) or table.args.get("db") or table.args.get("catalog"):
        raise _refuse("FROM anything but a dataset name (subquery, function or qualified name)",
                      "write FROM <dataset>, a dataset listed by GET /datasets")
    return table.name


def _column_name(node: exp.Expression, where: str) -> str:
    if not isinstance(node, exp.Column) or node.table:
        raise _refuse(f"{node.sql()} in {where}", "use plain column names of the dataset")
    return node.name


def _aggregate(node: exp.Expression, group_by: list[str]) -> Aggregate | None:
    alias = None
    if isinstance(node, exp.Alias):
        alias, node = node.alias, node.this
    if isinstance(node, exp.Star):
        raise QueryError("row_level_output", "SELECT * would return rows of the dataset",
                         hint="select aggregates such as COUNT(*) or AVG(col) instead")
    if isinstance(node, exp.Column):
        if node.name in group_by and alias in (None, node.name):
            return None
        raise QueryError(
            "row_level_output",
            f"column '{node.name}' is selected without an aggregate and is not a GROUP BY key",
            hint=f"aggregate it (e.g. AVG({node.name})) or add it to GROUP BY",
        )
    if isinstance(node, exp.Count):
        inner = node.this
        if isinstance(inner, exp.Distinct):
            raise _refuse("COUNT(DISTINCT ...)", "count distinct values with GROUP BY col and COUNT(*)")
        column = None if isinstance(inner, exp.Star) else _column_name(inner, "COUNT")
        return Aggregate(fn="count", column=column, alias=alias)
    simple = {exp.Sum: "sum", exp.Avg: "mean", exp.Median: "median"}
    for kind, fn in simple.items():
        if isinstance(node, kind):
            return Aggregate(fn=fn, column=_column_name(node.this, fn.upper()), alias=alias)
    if isinstance(node, exp.Anonymous) and node.name.upper() in ("QUANTILE_CONT", "QUANTILE_DISC", "QUANTILE"):
        args = node.expressions
        if len(args) != 2 or not isinstance(args[1], exp.Literal) or args[1].is_string:
            raise QueryError("malformed_sql", f"{node.name} takes (column, q) with q a number in (0, 1)")
        q = float(args[1].this)
        if not 0 < q < 1:
            raise QueryError("malformed_sql", f"quantile q must lie strictly between 0 and 1, got {q}")
        return Aggregate(fn="quantile", column=_column_name(args[0], node.name), q=q, alias=alias)
    if isinstance(node, (exp.Min, exp.Max)):
        raise _refuse(f"{node.key.upper()}()", "extremes cannot be released privately; use QUANTILE_CONT(col, 0.95)")
    if isinstance(node, (exp.Stddev, exp.StddevPop, exp.StddevSamp, exp.Variance, exp.VariancePop)):
        raise _refuse(f"{node.key.upper()}()", "release AVG(col) and AVG of a squared column declared by the steward")
    raise _refuse(
        f"the expression {node.sql()}",
        "select COUNT(*), COUNT(col), SUM(col), AVG(col), MEDIAN(col) or QUANTILE_CONT(col, q)",
    )


def _literal(node: exp.Expression) -> Any:
    if isinstance(node, exp.Neg):
        value = _literal(node.this)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = node.this
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text) if len(text) <= 20 else None
        except ValueError:
            value = None
        if value is None or not limits.INT64[0] <= value <= limits.INT64[1] and isinstance(value, int) \
                or isinstance(value, float) and not math.isfinite(value):
            raise QueryError("bad_value", f"the number {text[:40]} is out of range",
                             hint="compare with numbers within the column's range (64-bit integers, finite decimals)")
        return value
    if isinstance(node, exp.Boolean):
        return node.this
    if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal) and node.this.is_string:
        return node.this.this  # DATE '2020-01-01' and CAST('2020-01-01' AS DATE)
    raise _refuse(f"the value {node.sql()}", "compare columns with literal values (numbers, 'text', DATE 'YYYY-MM-DD')")


def _operands(node: exp.Expression, kind: type[exp.Expression]) -> list[exp.Expression]:
    """The operands of a chain `a AND b AND c ...` (parsed left-deep), flattened without recursion."""
    out, stack = [], [node]
    while stack:
        current = stack.pop()
        while isinstance(current, exp.Paren):
            current = current.this
        if isinstance(current, kind):
            stack += [current.expression, current.this]
        else:
            out.append(current)
    if len(out) > limits.MAX_CONDITION_NODES:
        raise _too_large(f"chains {len(out)} conditions, more than {limits.MAX_CONDITION_NODES}",
                         "use IN lists or ranges (BETWEEN) instead of many comparisons")
    return out


def _condition(node: exp.Expression) -> Condition:
    if isinstance(node, exp.Paren):
        return _condition(node.this)
    if isinstance(node, exp.And):
        return And(all=[_condition(c) for c in _operands(node, exp.And)])
    if isinstance(node, exp.Or):
        return Or(any=[_condition(c) for c in _operands(node, exp.Or)])
    if isinstance(node, exp.Not):
        inner = node.this
        if isinstance(inner, exp.Is):
            return Comparison(column=_column_name(inner.this, "WHERE"), op="is_not_null")
        return Not(negate=_condition(inner))
    if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
        return Comparison(column=_column_name(node.this, "WHERE"), op="is_null")
    if isinstance(node, exp.In):
        if node.args.get("query"):
            raise _refuse("IN (subquery)", "list the values: col IN ('a', 'b')")
        if len(node.expressions) > limits.MAX_IN_VALUES:
            raise _too_large(f"lists {len(node.expressions)} values in IN (...), more than {limits.MAX_IN_VALUES}",
                             "split it into several queries, or GROUP BY the column and select groups afterwards")
        return Comparison(column=_column_name(node.this, "WHERE"), op="in",
                          value=[_literal(v) for v in node.expressions])
    if isinstance(node, exp.Between):
        column = _column_name(node.this, "WHERE")
        return And(all=[
            Comparison(column=column, op=">=", value=_literal(node.args["low"])),
            Comparison(column=column, op="<=", value=_literal(node.args["high"])),
        ])
    for kind, op in _COMPARISONS.items():
        if isinstance(node, kind):
            left, right = node.this, node.expression
            if isinstance(left, exp.Column) and isinstance(right, exp.Column):
                raise _refuse(f"the comparison of two columns {node.sql()}",
                              "compare a column with a literal value; row-wise expressions are not supported")
            if isinstance(left, exp.Column):
                return Comparison(column=_column_name(left, "WHERE"), op=op, value=_literal(right))
            if isinstance(right, exp.Column):
                return Comparison(column=_column_name(right, "WHERE"), op=_FLIPPED[op], value=_literal(left))
            raise _refuse(f"the comparison {node.sql()}", "compare a column with a literal value")
    raise _refuse(f"the condition {node.sql()}", "use comparisons, IN, BETWEEN, IS [NOT] NULL, AND, OR, NOT")


# ---------------------------------------------------------------- canonical text


def _sql_value(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return json.dumps(value)


def _sql_condition(cond: Condition) -> str:
    if isinstance(cond, And):
        return " AND ".join(f"({_sql_condition(c)})" for c in cond.all)
    if isinstance(cond, Or):
        return " OR ".join(f"({_sql_condition(c)})" for c in cond.any)
    if isinstance(cond, Not):
        return f"NOT ({_sql_condition(cond.negate)})"
    if cond.op == "is_null":
        return f"{cond.column} IS NULL"
    if cond.op == "is_not_null":
        return f"{cond.column} IS NOT NULL"
    if cond.op == "in":
        return f"{cond.column} IN ({', '.join(_sql_value(v) for v in cond.value)})"
    op = "=" if cond.op == "==" else cond.op
    return f"{cond.column} {op} {_sql_value(cond.value)}"


def _sql_aggregate(agg: Aggregate) -> str:
    if agg.fn == "count":
        call = f"COUNT({agg.column or '*'})"
    elif agg.fn == "quantile":
        call = f"QUANTILE_CONT({agg.column}, {agg.q!r})"
    else:
        call = f"{ {'sum': 'SUM', 'mean': 'AVG', 'median': 'MEDIAN'}[agg.fn] }({agg.column})"
    return f"{call} AS {agg.name}"


def canonical_sql(spec: QuerySpec) -> str:
    """The one text the audit log records for a query, whether it came as SQL or as a JSON spec."""
    parts = ["SELECT " + ", ".join([*spec.group_by, *(_sql_aggregate(a) for a in spec.aggregates)])]
    parts.append(f"FROM {spec.dataset}")
    if spec.where is not None:
        parts.append(f"WHERE {_sql_condition(spec.where)}")
    if spec.group_by:
        parts.append("GROUP BY " + ", ".join(spec.group_by))
    return " ".join(parts)
