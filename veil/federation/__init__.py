"""Federated DP-SGD on Flower, the parts that hold no data (shared core, both roles import them).

    veil.federation.codec        what crosses between a site and the coordinator: the study plan, a
                                 site's round reply, Flower RecordDicts as protobuf bytes
    veil.federation.coordinator  the coordinator: FedAvg over any Flower Grid (`coordinate`) and the
                                 ServerApps that run it (simulation, Flower's deployment runtime)

The site's side (a round of Opacus DP-SGD on its data, under its ledger; the ClientApp) is
`veil.executor.federated` and `veil.executor.rounds`; the researcher's (the coordinator over the sites'
HTTP APIs) is `veil.kernel.federation`. Flower and torch come with `veil[train]`: this package imports
neither until one of its modules is imported.
"""

from __future__ import annotations

import os

# Flower reports usage to telemetry.flower.ai unless told not to, read when flwr is first imported; Ray
# has its own usage statistics. Importing any module of this package turns both off first: nothing is
# sent anywhere that Veil did not decide to send (import this package before flwr).
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
