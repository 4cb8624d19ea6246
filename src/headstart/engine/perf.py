"""CPU speed settings applied by default, and the numbers the report shows."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_tuned = False


KEEP_FACTOR = 2.0
"""With the tuning, resident memory reaches about this many times a training run's planned peak: freed
activation buffers stay in the heap (up to 1 GB at its top) and a heap without mmap fragments."""


def tune_allocator(budget=None, planned_peak: int = 0) -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every op.

    PyTorch on CPU allocates and frees the same large activation buffers every step; with
    glibc's defaults each one is a fresh mmap + page faults. Equivalent to starting Python
    with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>, which measured 1.25x faster for
    EfficientNet training here (bench/cpu_settings.py); `mallopt` applies it to the running process.
    No-op off glibc. It trades memory for that speed, so with a memory `budget` (engine/memory.Budget)
    and the run's `planned_peak` bytes it applies only when KEEP_FACTOR x the peak fits the budget.
    Feature extraction leaves it off: at 16 images it saved ~15% of the time for 0.1-0.2 GB more peak.
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux") or os.environ.get("HEADSTART_NO_MALLOC_TUNING"):
        return False
    if budget is not None and KEEP_FACTOR * planned_peak > budget.bytes:
        return False
    _tuned = _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30))
    return _tuned


RELEASE_THRESHOLD = 64 << 10


def release_freed_memory() -> bool:
    """Have glibc hand every block of 64 KB or more straight back to the OS when it is freed (the opposite
    of `tune_allocator`, which it undoes: also MALLOC_MMAP_MAX_=0 set in the environment).

    By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), so the
    activations an LLM step frees and re-allocates end up in a heap it cannot shrink: smollm2-135m LoRA with
    checkpointing, batch 8, peaked at 8.6 GB with glibc's default and 3.2 GB with a fixed 64 KB threshold,
    at 0.55x the speed (page faults). The SFT memory plan (llm/footprint.py) chooses it when the budget is tight.
    """
    global _tuned
    if not sys.platform.startswith("linux") or os.environ.get("HEADSTART_NO_MALLOC_TUNING"):
        return False
    _tuned = False
    return _mallopt((_M_MMAP_MAX, 1 << 16), (_M_MMAP_THRESHOLD, RELEASE_THRESHOLD),
                    (_M_TRIM_THRESHOLD, 2 * RELEASE_THRESHOLD))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt(option, value) for each pair; False off glibc or when one is refused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    from .memory import MB, peak_rss_bytes

    return peak_rss_bytes() / MB
