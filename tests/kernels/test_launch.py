"""kernels.launch: the first launch of an argument signature goes through Triton, later ones call the
compiled kernel's launcher directly with every parameter in signature order; any argument Triton
specialises differently (alignment, integer classes, dtype, constexprs) goes back through Triton.

CPU: the dispatch logic against a recording stand-in for a ``triton.jit`` function (the interpreter has
no compiled launcher). GPU: the real kernels, direct launches equal to Triton's own, bit for bit."""
from __future__ import annotations

import pytest
import torch

from pararnn_lm.kernels import launch as launch_mod


def _kernel_fn(X, Y, n, scale, FLAG, BLOCK: int, EXTRA: int = 7):  # the signature a jit kernel would have
    pass


class _Compiled:
    """What ``kernel[grid](...)`` returns: the launcher ``run`` and the handles it needs."""

    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *call):
        self.log.append(("direct", call))


class _Kernel:
    fn = staticmethod(_kernel_fn)

    def __init__(self):
        self.log = []
        self.compiled = _Compiled(self.log)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return self.compiled
        return call


class _Runtime:
    launch_enter_hook = None
    launch_exit_hook = None


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch_mod, "_enabled", True)
    monkeypatch.setattr(launch_mod, "_triton_runtime", (_Driver(), _Runtime()))
    monkeypatch.setattr(launch_mod, "_LAUNCHERS", {})
    return _Kernel()


def _kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_second_launch_is_direct_with_all_parameters_in_order(fast):
    x, y = torch.zeros(8), torch.zeros(8)
    launch_mod.launch(fast, (3, 2), x, y, 32, 0.5, FLAG=True, BLOCK=64, num_warps=4)
    launch_mod.launch(fast, (3, 2), x, y, 48, 0.25, FLAG=True, BLOCK=64, num_warps=4)
    assert _kinds(fast) == ["triton", "direct"]
    call = fast.log[1][1]
    # grid padded to 3-D, the stream, the handles, no launch metadata / hooks, then every parameter:
    # positional ones as given, FLAG and BLOCK from the keywords, EXTRA from its default.
    assert call == (3, 2, 1, 1234, "fn-handle", "meta", None, None, None, x, y, 48, 0.25, True, 64, 7)


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int_one", "int_not_16", "int64", "constexpr",
                                    "option", "arity"])
def test_anything_triton_specialises_on_goes_back_through_triton(fast, change):
    base = torch.zeros(16)
    x, y, n, kw = base[:8], torch.zeros(8), 32, dict(FLAG=True, BLOCK=64, num_warps=4)
    launch_mod.launch(fast, (1,), x, y, n, 0.5, **kw)
    args = [x, y, n, 0.5]
    if change == "misaligned":  # 4 bytes into the buffer: Triton drops its 16-byte alignment assumption
        args[0] = base[1:9]
    elif change == "dtype":
        args[1] = torch.zeros(8, dtype=torch.float64)
    elif change == "int_one":  # Triton makes an int equal to 1 a constant
        args[2] = 1
    elif change == "int_not_16":
        args[2] = 33
    elif change == "int64":
        args[2] = 2 ** 33
    elif change == "constexpr":
        kw = dict(kw, BLOCK=128)
    elif change == "option":
        kw = dict(kw, num_warps=8)
    elif change == "arity":  # EXTRA positionally instead of its default
        args = [x, y, n, 0.5, True, 64, 9]
        kw = dict(num_warps=4)
    launch_mod.launch(fast, (1,), *args, **kw)
    assert _kinds(fast) == ["triton", "triton"]
    launch_mod.launch(fast, (1,), *args, **kw)  # ... and that signature is direct from then on
    assert _kinds(fast) == ["triton", "triton", "direct"]
    assert fast.log[-1][1][9:9 + len(args)] == tuple(args)


def test_same_specialisation_classes_share_the_kernel(fast):
    launch_mod.launch(fast, (1,), torch.zeros(8), torch.zeros(4), 16, 0.5, FLAG=False, BLOCK=8)
    launch_mod.launch(fast, (1,), torch.zeros(3), torch.zeros(5), 2 ** 20, 2.0, FLAG=False, BLOCK=8)
    launch_mod.launch(fast, (1,), torch.zeros(3), torch.zeros(5), 17, 2.0, FLAG=False, BLOCK=8)
    launch_mod.launch(fast, (1,), torch.zeros(3), torch.zeros(5), 3, 2.0, FLAG=False, BLOCK=8)
    assert _kinds(fast) == ["triton", "direct", "triton", "direct"]


def test_hooks_grids_and_unknown_arguments_take_tritons_path(fast, monkeypatch):
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(2):
        launch_mod.launch(fast, lambda meta: (1,), x, y, 16, 0.5, FLAG=True, BLOCK=8)  # callable grid
        launch_mod.launch(fast, (1,), x, y, [16], 0.5, FLAG=True, BLOCK=8)  # a list Triton would reject
    assert _kinds(fast) == ["triton"] * 4

    class Chain:  # newer Triton: a chain of hooks, empty unless a profiler adds one
        calls = []

    runtime = _Runtime()
    runtime.launch_enter_hook = Chain()
    monkeypatch.setattr(launch_mod, "_triton_runtime", (_Driver(), runtime))
    fast.log.clear()
    for _ in range(2):
        launch_mod.launch(fast, (1,), x, y, 16, 0.5, FLAG=True, BLOCK=8)
    assert _kinds(fast) == ["triton", "direct"]
    Chain.calls = [print]
    launch_mod.launch(fast, (1,), x, y, 16, 0.5, FLAG=True, BLOCK=8)
    assert _kinds(fast)[-1] == "triton"


def test_a_launcher_that_rejects_the_call_switches_the_fast_path_off_without_losing_the_launch(fast, caplog):
    def refuse(*call):
        raise TypeError("launcher takes other arguments")

    fast.compiled.run = refuse
    x, y = torch.zeros(8), torch.zeros(8)
    launch_mod.launch(fast, (1,), x, y, 16, 0.5, FLAG=True, BLOCK=8)
    launch_mod.launch(fast, (1,), x, y, 16, 0.5, FLAG=True, BLOCK=8)
    assert _kinds(fast) == ["triton", "triton"]  # the refused direct call was made through Triton
    assert launch_mod._enabled is False and "disabled" in caplog.text
    launch_mod.launch(fast, (1,), x, y, 16, 0.5, FLAG=True, BLOCK=8)
    assert _kinds(fast) == ["triton"] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("lstm", [False, True])
def test_gpu_direct_launches_equal_tritons(lstm, monkeypatch):
    """The shooting forward and backward (multi-segment: 6 launches) with direct launches and with
    Triton's own path, on the same inputs: identical bits."""
    from pararnn_lm.kernels.shooting import shoot_backward, shoot_forward

    B, T, D = 2, 1024, 256
    K = 2 if lstm else 1
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(B, T, 3, D, device="cuda", generator=g).to(torch.bfloat16)
    p = (torch.randn(5 if lstm else 3, D, device="cuda", generator=g) * 0.2).clamp(-0.5, 0.5)
    h0 = torch.randn(B, K, D, device="cuda", generator=g)
    smap = torch.arange(B, dtype=torch.int32, device="cuda")[:, None]
    gh = torch.randn(B, T, K, D, device="cuda", generator=g)

    def run():
        h, iters, res, fail = shoot_forward(lstm, u, p, h0, smap, 2, 1e-5, 1.0)
        return (h, iters, res, fail, *shoot_backward(lstm, u, p, h0, smap, h, gh))

    monkeypatch.setattr(launch_mod, "_enabled", False)
    want = run()
    monkeypatch.setattr(launch_mod, "_enabled", True)
    monkeypatch.setattr(launch_mod, "_LAUNCHERS", {})
    run()  # first signature: through Triton
    got = run()  # direct
    assert sum(len(lau.entries) for lau in launch_mod._LAUNCHERS.values()) >= 3
    for a, b in zip(got, want):
        assert torch.equal(a, b)
