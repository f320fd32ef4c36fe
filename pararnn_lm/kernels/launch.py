"""Triton kernel launches without Triton's per-call Python work.

``kernel[grid](*args, **meta)`` binds the arguments, specialises every one of them (dtype, 16-byte
alignment, integer value classes), builds a cache key and looks the compiled kernel up before the
C launcher runs: ~23 us of host time per launch on an H200 host with triton 3.6, of which the launcher
itself is ~7 us. The small eager shapes are host-bound (the ParaGRU module at (8, 2048, 1024) launches
6 Triton kernels per forward + backward), so :func:`launch` does that work once per argument
signature: the first call goes through ``kernel[grid]`` (compiling if needed) and keeps the compiled
kernel it returns; later calls whose arguments specialise the same way call its launcher directly.

The signature is a superset of what Triton specialises on (triton/_C specialize: a tensor's dtype
and ``data_ptr() % 16 == 0``; an int's value 1, ``% 16 == 0`` and its i32 / i64 / u64 range; bool
and float by type; the constexpr and launch-option keywords by value; the device), so two calls that
share a signature share Triton's compiled kernel. Anything else (a callable grid, an argument of
another type, launch hooks such as a profiler's, the CPU interpreter) takes Triton's normal path.
``PARARNN_FAST_LAUNCH=0`` turns it off. If the launcher ever rejects the direct call (a Triton whose
launcher takes other arguments), the fast path switches itself off with one warning: no launch is
lost, the same call then goes through ``kernel[grid]``.
"""
from __future__ import annotations

import inspect
import logging
import os

import torch

log = logging.getLogger(__name__)

_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_enabled = os.environ.get("PARARNN_FAST_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _signature(args) -> tuple | None:
    """What Triton's specialisation can distinguish about the positional arguments (None: an argument of
    a type it is not written for). One loop, no call per argument: this runs on every launch."""
    parts = []
    add = parts.append
    for a in args:
        t = type(a)
        if t is int:
            add((a == 1, a & 15 == 0, _INT32[0] <= a <= _INT32[1], a >= 2 ** 63))
        elif t is float or t is bool:  # specialised by type only (bool is u1)
            add(t)
        elif isinstance(a, torch.Tensor):
            add((a.dtype, a.data_ptr() & 15 == 0))
        elif a is None:
            add(None)
        else:
            return None
    return tuple(parts)


class _Launcher:
    """The compiled kernels of one ``triton.jit`` function, by argument signature."""

    def __init__(self, kernel):
        self.kernel = kernel
        fn = getattr(kernel, "fn", None)
        params = list(inspect.signature(fn).parameters.values()) if callable(fn) else []
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.entries: dict = {}

    def key(self, args, kwargs):
        parts = _signature(args)
        if parts is None:
            return None
        return len(args), tuple(kwargs.items()), parts

    def tail(self, n_args, kwargs):
        """Values of the parameters after the positional ones, in signature order (Triton's launcher
        takes every parameter, constexprs included), or None if one has neither a keyword nor a default."""
        out = []
        for name in self.names[n_args:]:
            if name in kwargs:
                out.append(kwargs[name])
            elif name in self.defaults:
                out.append(self.defaults[name])
            else:
                return None
        return tuple(out)

    def __call__(self, grid, args, kwargs):
        global _enabled
        if not (_enabled and self.names and isinstance(grid, tuple) and 1 <= len(grid) <= 3) or _hooks_set():
            return self.kernel[grid](*args, **kwargs)
        key = self.key(args, kwargs)
        device = _driver().get_current_device()
        try:
            entry = self.entries.get((device, key)) if key is not None else None
        except TypeError:  # an unhashable keyword value
            key = entry = None
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            tail = self.tail(len(args), kwargs)
            if key is not None and compiled is not None and tail is not None and hasattr(compiled, "run"):
                self.entries[(device, key)] = (compiled, tail)
            return compiled
        compiled, tail = entry
        g = (*grid, 1, 1)
        stream = _driver().get_current_stream(device)
        try:
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *args, *tail)
        except TypeError as err:  # this Triton's launcher takes other arguments: stay on the normal path
            _enabled = False
            log.warning("direct Triton launches disabled (%s); using kernel[grid] from now on", err)
            return self.kernel[grid](*args, **kwargs)
        return compiled


_triton_runtime = None  # (driver.active, knobs.runtime), imported on first use


def _runtime():
    global _triton_runtime
    if _triton_runtime is None:
        from triton import knobs
        from triton.runtime.driver import driver

        _triton_runtime = (driver.active, knobs.runtime)
    return _triton_runtime


def _driver():
    """Triton's active driver: the device and stream its own launches use."""
    return _runtime()[0]


def _hooks_set() -> bool:
    """A launch hook (e.g. a profiler's) needs Triton's own launch path, which builds its metadata."""
    runtime = _runtime()[1]
    return _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)


def _active(hook) -> bool:
    """triton 3.6 keeps None until a hook is set; newer ones an (empty) chain of hooks."""
    return hook is not None and getattr(hook, "calls", True) != []


_LAUNCHERS: dict = {}


def launch(kernel, grid: tuple, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, with the per-call specialisation done once per argument
    signature (module docstring). Returns what ``kernel[grid]`` returns (the compiled kernel)."""
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = _Launcher(kernel)
    return launcher(grid, args, kwargs)
