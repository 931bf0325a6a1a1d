"""CPU inference speed: a frozen graph of the backbone and an allocator that keeps freed memory (issue 18).

Measured in ``benchmarks/speed_vs_official.py`` (docs/benchmarks.md, "CAM export"): IRN's multi-scale CAM
export (../shared/methods/protocol.md §4) spends its time in the backbone, at four scales of the image and its
flip. Two things make that forward faster on a CPU without changing what is computed:

* :func:`frozen_forward`: the backbone traced, frozen and passed through ``torch.jit.optimize_for_inference``
  (BatchNorm folded into the convolutions, weights prepacked for oneDNN, ReLU and residual additions fused).
  Folding reorders floating-point operations, so the maps differ from eager ones by rounding only (relative
  ~1e-6); the graph is checked against the eager backbone on probe images of other sizes before it is used.
* :func:`keep_freed_memory`: glibc returns freed blocks above its mmap threshold to the kernel, so every scale's
  activations are page-faulted in again (a fifth of the CPU time of the forward, most of it in the kernel). The
  same settings as ``lit-wsss benchmark``'s ``MALLOC_*`` variables (docs/benchmarks.md, "CPU memory allocator"),
  set from inside the process with ``mallopt``; the cost is that the peak memory is never given back.

Only torch is imported, and only by :func:`frozen_forward`.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

#: glibc's mallopt parameters (malloc.h) and the values of lit_wsss.benchmark.MALLOC_ENV.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOPT_VALUES = ((_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 2**30))
#: Probe batches the frozen graph is compared on: odd and even sizes, other than the tracing size, so a graph that
#: baked a size into itself (a pad computed from the input shape) is caught. Each probe is ``(batch, h, w)``; the graph is traced on ``TRACE_SHAPE`` (an image and its flip, as exported).
PROBE_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 97, 131), (3, 160, 122))
TRACE_SHAPE = (2, 128, 96)
#: Largest difference to the eager backbone allowed, relative to the largest eager activation of the level.
PROBE_TOLERANCE = 1e-4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no mmap for large blocks, no trimming).

    Returns False, changing nothing, where the C library is not glibc (macOS, musl) or lacks ``mallopt``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in _MALLOPT_VALUES)


def frozen_forward(backbone: Any, channels: int = 3) -> tuple[Callable[..., Any] | None, str]:
    """An optimised-for-inference copy of ``backbone``'s forward (a list of level features), or ``None``.

    ``backbone`` is deep-copied (the training module is untouched), traced on a ``TRACE_SHAPE`` batch, frozen and
    optimised; the result is then run on every ``PROBE_SHAPES`` batch beside the eager backbone, and used only if
    every level has the same shape and agrees within ``PROBE_TOLERANCE``. CPU only: on a GPU the eager forward
    (cuDNN) is already what the device is built for.

    Returns:
        ``(forward, how)``: the frozen forward and a one-line description for the protocol, or ``None`` and
        the reason it is not used (the caller keeps the eager forward).
    """
    import torch

    parameter = next(iter(backbone.parameters()), None)
    if parameter is None or parameter.device.type != "cpu":
        return None, "eager (a frozen graph is used on the CPU only)"
    if parameter.dtype != torch.float32:
        return None, f"eager (the backbone is {parameter.dtype}, a frozen graph is built for float32)"
    eager = copy.deepcopy(backbone).eval()
    generator = torch.Generator().manual_seed(0)

    def probe(shape: Sequence[int]) -> Any:
        return torch.randn(shape[0], channels, *shape[1:], generator=generator)

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings are about what the probes check below
            traced = torch.jit.trace(eager, probe(TRACE_SHAPE), strict=False, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            for shape in PROBE_SHAPES:
                image = probe(shape)
                expected, got = list(eager(image)), list(frozen(image))
                if len(expected) != len(got):
                    return None, f"eager (the frozen graph returned {len(got)} levels, not {len(expected)})"
                for level, (want, have) in enumerate(zip(expected, got, strict=True)):
                    if want.shape != have.shape:
                        return None, (f"eager (the frozen graph gave level {level} the shape {tuple(have.shape)}, "
                                      f"not {tuple(want.shape)}, on a {shape} probe)")
                    error = float((want - have).abs().max() / want.abs().max().clamp_min(1e-12))
                    if error > PROBE_TOLERANCE:
                        return None, (f"eager (the frozen graph differs by {error:.1e} of the largest activation "
                                      f"at level {level} on a {shape} probe)")
    except (RuntimeError, torch.jit.Error) as error:  # an untraceable backbone keeps its eager forward
        return None, f"eager (tracing failed: {str(error).splitlines()[0][:160]})"

    def forward(image: Any) -> list[Any]:
        return list(frozen(image.contiguous()))

    return forward, "frozen graph (torch.jit.trace + freeze + optimize_for_inference, checked on probes)"


def use_frozen_backbone(module: Any) -> str:
    """Run ``module.backbone`` through :func:`frozen_forward` until :func:`use_eager_backbone`; returns how the
    backbone runs now (for the manifest). The module's parameters and state dict are not touched."""
    forward, how = frozen_forward(module.backbone)
    if forward is not None:
        # an instance attribute shadows the class's forward for nn.Module.__call__
        module.backbone.__dict__["forward"] = forward
    return how


def use_eager_backbone(module: Any) -> None:
    """Undo :func:`use_frozen_backbone` (a no-op when it is not in use)."""
    backbone = getattr(module, "backbone", None)
    if backbone is not None:
        backbone.__dict__.pop("forward", None)
