"""Custom model source: traced in the real sandbox (a child process without data), checked against the
allow-lists and rebuilt from fresh layers; everything else is refused with a clear `bad_model_source`."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from veil.errors import QueryError
from veil.executor import custom_model
from veil.executor.custom_model import build_custom, source_digest, traced_graph
from veil.models import build, graph
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

INPUTS, OUTPUTS = 8, 3

GOOD = """
class Net(nn.Module):
    def __init__(self, inputs, outputs):
        super().__init__()
        self.inp = nn.Linear(inputs, 16)
        self.body = nn.Sequential(nn.ReLU(), nn.LayerNorm(16), nn.Dropout(0.1), nn.Linear(16, 16))
        self.side = nn.Linear(5, 4)
        self.head = nn.Linear(20, outputs)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.body(h)                       # residual
        s = torch.relu(self.side(x[:, :5]))        # a column slice
        return self.head(torch.cat([h, s], dim=1))
"""


def net(forward: str, init: str = "", before: str = "") -> str:
    """Source of a Net with one Linear layer `lin` (inputs -> outputs), extra `init` lines and `forward`."""
    return f"""{before}
class Net(nn.Module):
    def __init__(self, inputs, outputs):
        super().__init__()
        self.lin = nn.Linear(inputs, outputs)
        {init}

    def forward(self, x):
        {forward}
"""


def refusal(source: str, timeout: float = 60.0) -> QueryError:
    """The `bad_model_source` refusal that building `source` raises."""
    with pytest.raises(QueryError) as info:
        build_custom(source, INPUTS, OUTPUTS, timeout=timeout)
    assert info.value.code == "bad_model_source"
    assert info.value.hint
    return info.value


# ---------------------------------------------------------------- a good model


def test_good_model_builds_and_trains_with_ghost_clipping() -> None:
    module = build_custom(GOOD, INPUTS, OUTPUTS)
    assert not isinstance(module, nn.BatchNorm1d)
    assert module(torch.randn(5, INPUTS)).shape == (5, OUTPUTS)
    names = {name for name, _ in module.named_parameters()}
    assert {"inp.weight", "body.1.weight", "body.3.weight", "side.weight", "head.bias"} <= names
    assert not list(module.buffers())

    # DP-SGD as the engine runs it: ghost clipping, Poisson-sized batches, noise, a few steps.
    model = prepare_module(module, grad_sample_mode="ghost", batch_first=True, loss_reduction="mean",
                           max_grad_norm=1.0)
    optimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=16, loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(model, optimizer, nn.CrossEntropyLoss(), "mean")
    before = module.head.weight.detach().clone()
    for size in (16, 9, 21):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(torch.randn(size, INPUTS)), torch.randint(0, OUTPUTS, (size,)))
        loss.backward()
        optimizer.step()
    assert not torch.equal(before, module.head.weight)


def test_fresh_parameters_and_cached_trace() -> None:
    source = GOOD + f"\n# {uuid.uuid4()}\n"  # a source no other test traced
    assert source_digest(source) == source_digest(source) != source_digest(GOOD)
    started = time.perf_counter()
    first = build_custom(source, INPUTS, OUTPUTS)
    cold = time.perf_counter() - started
    hits = custom_model._traced.cache_info().hits
    started = time.perf_counter()
    second = build_custom(source, INPUTS, OUTPUTS)
    warm = time.perf_counter() - started
    assert custom_model._traced.cache_info().hits == hits + 1  # no second sandbox run
    assert warm < cold / 2
    assert first is not second
    assert not torch.equal(first.inp.weight, second.inp.weight)
    assert first.state_dict().keys() == second.state_dict().keys()


def test_embedding_one_hot_and_functional_dropout() -> None:
    source = net(
        "codes = x[:, 0].long()\n"
        "        parts = [x[:, 2:], self.emb(codes), F.one_hot(codes, num_classes=3).float()]\n"
        "        h = F.dropout(torch.cat(parts, dim=1), 0.5, training=self.training)\n"
        "        return self.out(F.gelu(h)) * 0.5 - 1",
        init="self.emb = nn.Embedding(3, 2)\n        self.out = nn.Linear(inputs - 2 + 2 + 3, outputs)",
    )
    module = build_custom(source, INPUTS, OUTPUTS)
    x = torch.rand(6, INPUTS)
    module.eval()
    assert torch.equal(module(x), module(x))  # F.dropout became a layer that follows eval()
    module.train()
    assert module(x).shape == (6, OUTPUTS)


# ---------------------------------------------------------------- refusals of the source


def test_syntax_error() -> None:
    error = refusal("class Net(nn.Module:\n    pass\n")
    assert "syntax error" in error.message and "line 1" in error.message


def test_no_net_class() -> None:
    assert "class Net(nn.Module)" in refusal("class Model(nn.Module):\n    pass\n").message


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        ("return self.lin(x) - self.lin(x).mean(0)", "node 'mean': the tensor method .mean() is not allowed: "
                                                     "reductions"),
        ("return self.lin(x) - torch.mean(self.lin(x), dim=0)", "torch.mean is not allowed: reductions"),
        ("return self.lin(x) + self.lin(x)[0]", "index [0] is not allowed: indexing must keep the batch"),
        ("return self.lin(x[:1])", "index [:1] is not allowed"),
        ("return torch.cat([self.lin(x), self.lin(x)], dim=0)", "torch.cat may not use dim=0"),
        ("return self.lin(x).add_(1)", ".add_() is not allowed: in-place operations"),
        ("return torch.cat([self.lin(x), self.lin(x)], dim=1)", "must return (batch, 3)"),
    ],
    ids=["x.mean(0)", "torch.mean", "x[0]", "x[:1]", "cat-dim-0", "in-place", "wrong-shape"],
)
def test_graph_refusals(forward: str, expected: str) -> None:
    assert expected in refusal(net(forward)).message


def test_batch_norm_layer() -> None:
    error = refusal(net("return self.bn(self.lin(x))", init="self.bn = nn.BatchNorm1d(outputs)"))
    assert "BatchNorm1d, which is not allowed" in error.message and "LayerNorm" in error.message


def test_buffer_use() -> None:
    error = refusal(net("return self.lin(x) + self.shift",
                        init="self.register_buffer('shift', torch.zeros(outputs))"))
    assert "self.shift" in error.message and "buffer" in error.message


# ---------------------------------------------------------------- the sandbox


def test_socket_at_import_time() -> None:
    error = refusal(net("return self.lin(x)", before="import socket\nsocket.create_connection(('10.1.2.3', 80))"))
    assert "sandbox refused" in error.message and "socket." in error.message


def test_caught_refusal_still_refuses() -> None:
    before = "import subprocess\ntry:\n    subprocess.run(['id'])\nexcept Exception:\n    pass"
    assert "subprocess.Popen" in refusal(net("return self.lin(x)", before=before)).message


def test_file_write(tmp_path: Path) -> None:
    target = tmp_path / "written.txt"
    error = refusal(net("return self.lin(x)", before=f"open({str(target)!r}, 'w').write('x')"))
    assert "files cannot be written" in error.message
    assert not target.exists()


def test_file_read_outside_python() -> None:
    error = refusal(net("return self.lin(x)", before="open('/etc/hostname').read()"))
    assert "only the Python installation can be read" in error.message


def test_endless_loop_times_out() -> None:
    started = time.perf_counter()
    error = refusal(net("return self.lin(x)", before="while True:\n    pass"), timeout=5)
    assert "did not finish within 5 s" in error.message
    assert time.perf_counter() - started < 15


def sandbox_children() -> list[int]:
    """Process ids of this process's running sandbox children (python -m veil.executor.sandbox); another
    test process's sandboxes (pytest-xdist runs tests side by side) are not ours to kill."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                sandbox = b"veil.executor.sandbox" in f.read()
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if sandbox and parent == os.getpid():
            found.append(int(entry))
    return found


def test_a_sandbox_killed_from_outside_is_a_refusal() -> None:
    """The OOM killer or an operator may kill the child mid-trace: that is a refusal, never a crash."""
    def kill_when_started() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for pid in sandbox_children():
                os.kill(pid, signal.SIGTERM)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    error = refusal(net("return self.lin(x)", before=f"# {uuid.uuid4()}\nwhile True:\n    pass"), timeout=40)
    killer.join()
    assert "the sandbox gave no answer: it was stopped by signal SIGTERM" in error.message


def test_the_researcher_rebuilds_a_custom_model_from_its_checked_graph() -> None:
    """Weights carry the graph the site checked; rebuilding runs no source and gives the same function."""
    layout = FeatureLayout.numeric_only(INPUTS, outputs=OUTPUTS)
    spec = ModelSpec.custom(GOOD)
    trained = build_custom(GOOD, INPUTS, OUTPUTS)
    weights = build.weights_to_bytes(trained, {"model_spec": spec.model_dump(mode="json"),
                                               "layout": {"numeric": layout.numeric, "categorical": [],
                                                          "outputs": OUTPUTS},
                                               "graph": traced_graph(GOOD, INPUTS, OUTPUTS)})
    rebuilt = build.trained_module(weights)
    x = torch.rand(5, INPUTS)
    assert torch.equal(rebuilt(x), trained.eval()(x))
    with pytest.raises(QueryError) as info:  # weights without the graph: refused, the source is not run
        build.build_model(spec, layout)
    assert "checked graph" in info.value.message


def test_huge_allocation_hits_the_memory_limit() -> None:
    error = refusal(net("return self.lin(x)", before="big = torch.zeros(10**10)"))
    assert "allocate" in error.message and "3 GiB" in error.hint


# ---------------------------------------------------------------- the trusted side trusts nothing it is told


def node(op: str, name: str, target: str, args: list | None = None, kwargs: dict | None = None) -> dict:
    return {"op": op, "name": name, "target": target, "args": args or [], "kwargs": kwargs or {}}


X = node("placeholder", "x", "x")


@pytest.mark.parametrize(
    ("nodes", "modules", "expected"),
    [
        ([X, node("call_function", "e", "builtins.eval", [{"node": "x"}])], {}, "builtins.eval is not allowed"),
        ([X, node("call_function", "x; import os", "torch.relu", [{"node": "x"}])], {}, "invalid or repeated"),
        ([X, node("call_function", "r", "torch.relu", [{"node": "nowhere"}])], {}, "not an earlier node"),
        ([X, node("get_attr", "w", "lin.weight")], {}, "reads the attribute self.lin.weight"),
        ([X, node("call_module", "m", "forward", [{"node": "x"}])], {"forward": {"type": "Linear", "config": {}}},
         "layer path 'forward' is not allowed"),
        ([X, node("call_module", "m", "lin", [{"node": "x"}])],
         {"lin": {"type": "Linear", "config": {"in_features": 10**5, "out_features": 10**5, "bias": True}}},
         "parameters; at most"),
        ([X, node("call_function", "r", "torch.relu", [{"node": "x"}], {"inplace": True})], {},
         "unexpected argument(s) inplace"),
        ([X, node("call_function", "g", "operator.getitem", [{"node": "x"}, {"tuple": [
            {"slice": [None, None, None]}, {"node": "x"}]}])], {}, "may not index with a tensor"),
    ],
    ids=["eval", "name", "dangling", "get_attr", "reserved-path", "too-large", "in-place-kwarg", "tensor-index"],
)
def test_forged_descriptions_are_refused(nodes: list, modules: dict, expected: str) -> None:
    answer = {"nodes": [*nodes, node("output", "output", "output", [{"node": nodes[-1]["name"]}])],
              "modules": modules}
    with pytest.raises(QueryError) as info:
        graph.rebuild(answer, INPUTS, OUTPUTS)
    assert info.value.code == "bad_model_source"
    assert expected in info.value.message


def test_rows_mixing_module_fails_the_independence_check() -> None:
    class Mixing(nn.Module):  # what the graph checks already refuse; the last check must catch it too
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(INPUTS, OUTPUTS)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) - self.lin(x).mean(0)

    with pytest.raises(QueryError) as info:
        graph._check_module(torch.fx.symbolic_trace(Mixing()), INPUTS, OUTPUTS)
    assert "mixes patients" in info.value.message
