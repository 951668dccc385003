"""Which device runs the model, and how kernels are launched on it.

`cuda()` imports numba.cuda on first use only: the CPU path never imports it.
A missing numba-cuda, driver or GPU is a `CudaUnavailableError` (a LocalMoEError),
never a traceback from the driver.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from localmoe.errors import LocalMoEError

DEVICES = ("cpu", "cuda", "auto")


class CudaUnavailableError(LocalMoEError):
    """A CUDA device was asked for and none can be used."""


def simulated() -> bool:
    """True when numba-cuda's simulator stands in for the GPU (NUMBA_ENABLE_CUDASIM=1, as numba
    read it: numba.core.config, which the tests reload)."""
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def _import_cuda():
    try:
        from numba import cuda
    except ImportError as e:  # numba-cuda not installed
        raise CudaUnavailableError("the CUDA device needs numba-cuda: pip install 'localmoe[cuda]' "
                                   f"({e})") from None
    return cuda


def cuda_available() -> bool:
    """Whether a CUDA device (or the simulator) can run kernels; never raises."""
    try:
        cuda = _import_cuda()
        return bool(cuda.is_available())
    except Exception:
        return False


def cuda():
    """The numba.cuda module, after checking a device can be used."""
    mod = _import_cuda()
    try:
        ok = mod.is_available()
    except Exception as e:  # driver errors surface here on some set-ups
        raise CudaUnavailableError(f"no usable CUDA device: {e}") from None
    if not ok:
        raise CudaUnavailableError("no usable CUDA device: numba-cuda found no NVIDIA driver or GPU "
                                   "(check nvidia-smi; use --device cpu)")
    return mod


def resolve_device(device: str | None, gpu_budget=None) -> str:
    """'cpu' or 'cuda' for a load() request. None: 'cuda' when a GPU budget is given, else 'cpu'."""
    if device is None:
        device = "cpu" if gpu_budget is None else "cuda"
    if device not in DEVICES:
        raise LocalMoEError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu" and gpu_budget is not None:
        raise LocalMoEError("a GPU budget needs the CUDA device: --device cuda (or auto), not cpu")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        cuda()  # fail now, with a clear message, not at the first kernel
    return device


@dataclass(frozen=True)
class Launch:
    """Threads per row (a block-stride loop and a shared-memory tree sum) and rows per block.
    The simulator runs every thread as a Python thread, so it gets few of them; the kernel
    source is the same."""

    tpr: int
    rpb: int


def _launch() -> Launch:
    """LOCALMOE_CUDA_LAUNCH="tpr,rpb" (powers of two) overrides, e.g. to run the hardware shapes
    on the simulator (tests/test_cuda_kernels.py does)."""
    env = os.environ.get("LOCALMOE_CUDA_LAUNCH")
    if not env:
        return Launch(tpr=2, rpb=8) if simulated() else Launch(tpr=32, rpb=4)
    try:
        tpr, rpb = (int(v) for v in env.split(","))
    except ValueError:
        tpr = rpb = 0
    if not all(v > 0 and v & (v - 1) == 0 for v in (tpr, rpb)):
        raise LocalMoEError(f"LOCALMOE_CUDA_LAUNCH={env!r}: give two powers of two, 'tpr,rpb'")
    return Launch(tpr, rpb)


LAUNCH = _launch()
