"""Limits every request meets before any work is done: sizes, depths and privacy-loss ranges.

Both sides import them: the wire models refuse what lies outside (a clear `malformed_request`), the SQL
parser refuses deep or long text before building anything, and the executor's numeric helpers never
see a value that could make them loop. Each limit is far beyond what an honest query needs.
"""

from __future__ import annotations

MAX_SQL_CHARS = 16_000
"""Longest SQL text of one query."""
MAX_SQL_NESTING = 32
"""Deepest nesting of parentheses in SQL text (checked before the text is parsed)."""
MAX_CONDITION_DEPTH = 24
"""Deepest nesting of AND / OR / NOT in a query's filter."""
MAX_CONDITION_NODES = 256
"""Most comparisons and AND / OR / NOT nodes in a query's filter."""
MAX_IN_VALUES = 1_000
"""Most values in one `IN (...)` list; the executor plans it as a balanced tree, so it stays cheap."""
MAX_FILTER_VALUES = 2_000
"""Most literal values in a query's whole filter."""
MAX_TEXT_VALUE = 256
"""Longest text literal in a filter."""
INT64 = (-(2**63), 2**63 - 1)
"""Integers in filters lie in this range (Polars' integers)."""
MAX_ID = 2**31 - 1
"""Ids in paths (jobs, applications, grants, audit sequence numbers): the state database's integers."""

MIN_EPSILON = 0.01
"""Smallest epsilon anyone may ask for (a release, a grant, a cap, a model): below it a release is noise,
and OpenDP's accuracy summary takes seconds (its time grows as the noise scale does)."""
MAX_RELEASE_EPSILON = 10.0
"""Largest epsilon of one release (levels usually allow far less)."""
MAX_BUDGET_EPSILON = 1_000.0
"""Largest grant, lifetime cap or application budget, in epsilon."""
MIN_RHO, MAX_RHO = 1e-6, 10.0
"""The zCDP range of one release (rho 1e-6 is about epsilon 0.007 at delta 1e-6)."""
MAX_ACCURACY = 1e12
"""Largest half-width a release may be asked to reach (`QueryRequest.accuracy`); a looser one costs MIN_RHO."""
MIN_DELTA = 1e-12
"""Smallest delta of a thresholded release or a grant (a positive delta below it is refused)."""
MIN_CONFIDENCE, MAX_CONFIDENCE = 0.5, 1 - 1e-9
"""Interval levels a release may be asked for (multi-center releases ask each site at 1 - alpha/m)."""
MAX_PARAMETERS = 20_000_000
"""Largest model a site trains (declarative or custom), in parameters."""
