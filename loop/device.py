"""The compute device's settings that do not belong to a model: mixed precision, and CPU threads."""

from __future__ import annotations

import os
from typing import Any


def resolve_precision(configured: str, cuda: bool) -> str:
    """training.mixed_precision with `auto` resolved: fp16 on a GPU, no (fp32) on a CPU."""
    if configured != "auto":
        return configured
    return "fp16" if cuda else "no"


def threads_from_launcher() -> bool:
    """Whether OMP_NUM_THREADS was set by `accelerate launch`'s default rather than by the user.

    With no accelerate config, the launcher exports OMP_NUM_THREADS=1 to its workers, so a CPU run through the
    README's command would use one core. The launcher's own environment (as it was started) tells the two apart.
    """
    if "OMP_NUM_THREADS" not in os.environ or "ACCELERATE_DYNAMO_BACKEND" not in os.environ:
        return False  # not set, or not started by accelerate launch
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            parent = f.read().split(b"\0")
    except OSError:  # not Linux, or not readable: leave the setting alone
        return False
    return not any(item.startswith(b"OMP_NUM_THREADS=") for item in parent)


def use_all_cores(accelerator: Any) -> str | None:
    """On a CPU, give each process its share of the physical cores unless the user chose a thread count; the
    note to print when the count was changed."""
    import psutil
    import torch

    if accelerator.device.type != "cpu" or not threads_from_launcher():
        return None
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)), 1)
    cores = min(psutil.cpu_count(logical=False) or 1, len(os.sched_getaffinity(0)))
    threads = max(cores // local, 1)
    if threads <= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return (f"note: using {threads} CPU threads per process (accelerate launch set OMP_NUM_THREADS=1; set "
            "OMP_NUM_THREADS yourself to choose)")
