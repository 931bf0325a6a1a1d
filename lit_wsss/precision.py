"""Mixed precision (issue 18): what stays float32 under ``--trainer.precision bf16-mixed``.

Lightning's ``bf16-mixed`` runs every training, validation and predict step under ``torch.autocast``:
convolutions and matrix products in bfloat16 (8 significant bits). That suits the networks, not the maths
that follows them, which :func:`float32` keeps in float32 with autocast off:

* losses (``lit_wsss.losses``): IRN's ``-log(1 + 1e-5 - a)`` has ``1 + 1e-5 == 1`` in bfloat16, so an
  affinity of 1 gives ``log(0)`` and a nan loss (the synthetic IRNet fit stopped at step 1); sums of many
  small terms lose their low bits;
* the random walk (:func:`lit_wsss.refine.random_walk.random_walk`): autocast sends the 256 sparse products
  to a bfloat16 kernel that does not exist on the CPU ("addmm_out_sparse_csr_impl_mkl not implemented for
  'BFloat16'") and the dense walk's 8 squarings would compound bfloat16 roundings.

Network outputs become float32 where they leave the network: CAMs in :func:`lit_wsss.cams.sum_over_scales`,
IRNet's edge logits in ``IRN.boundary``, segmentation logits in ``DeepLab.segment``; the writers cast any
floating array to float32 before numpy (``Tensor.numpy()`` refuses bfloat16). SLAMs-R's losses keep their own
float32 islands (slams.md §8 P11).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

#: The device types whose autocast Lightning's precision plugins switch on.
_AUTOCAST_DEVICES = ("cuda", "cpu")
_HALF = (torch.float16, torch.bfloat16)


@contextmanager
def autocast_off() -> Iterator[None]:
    """Leave every active autocast region (a no-op outside one, so nothing warns on a CPU-only build)."""
    with ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def to_float32(value: Any) -> Any:
    """Half-precision tensors (also inside lists, tuples and dicts) as float32; everything else unchanged
    (float64 stays float64, integer and bool masks keep their dtype)."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in _HALF else value
    if isinstance(value, dict):
        return {key: to_float32(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_float32(item) for item in value]
    if isinstance(value, tuple):
        items = [to_float32(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def float32(fn: F) -> F:
    """Decorator: ``fn`` runs with autocast off and its half-precision tensor arguments cast to float32
    (differentiable casts: gradients flow back into the bfloat16 network)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_off():
            return fn(*to_float32(args), **to_float32(kwargs))

    return wrapper  # type: ignore[return-value]


__all__ = ["autocast_off", "float32", "to_float32"]
