"""How many CPU cores this process may use: the one figure that sizes tasks, threads and partitions.

`os.cpu_count()` counts the machine; a container or `taskset` may allow fewer (the CPU affinity mask), and
the JVM under Spark's `local[*]` counts those too. Sizing Python's side from the machine instead would start
more TensorFlow threads than there are cores and oversubscribe them.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1
