"""The PySyft 0.10 bridge beside a Veil site (`veil syft serve`).

It runs in its own virtual environment (.venv-syft, scripts/setup-syft.sh) with PySyft and syft-rds, and
talks to the site's executor over its HTTP API only: it imports neither Veil's executor nor torch. It
publishes the site's datasets as syft datasets (mock part only), and answers syft jobs that declare a Veil
query with the site's DP release and its receipt. It never runs submitted code.
"""
