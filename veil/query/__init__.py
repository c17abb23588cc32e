"""The shared query core: planning, OpenDP calibration, intervals and pricing on public metadata.

No module here opens a dataset, a ledger or an audit log: the site runs a prepared query on its rows
(`executor/queries.py`), the researcher's mock mode on mock rows (`kernel/mock.py`)."""
