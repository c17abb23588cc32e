"""Models, shared by both roles: what a model is (`spec`: ModelSpec, TrainSpec; no torch needed), the
columns of its input (`layout`), building it and moving its weights (`build`), and a custom model's
checked graph (`graph`). `build` and `graph` need torch (`veil[train]`): import them where used.
"""
