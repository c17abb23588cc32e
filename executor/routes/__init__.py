"""The executor's HTTP routes, one `APIRouter` per concern; `veil.executor.app` includes them in order."""
