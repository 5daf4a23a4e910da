"""Dask side of `rask bench local`: time one workload on one Dask local scheduler.

Usage:
    python benches/dask_local.py WORKLOAD N SCHEDULER

WORKLOAD (graphs are raw Dask graph dicts of task tuples):
    merge N        N leaves ("leaf", i): (one,) plus "merge": (sum, [leaf keys]).
                   Computes "merge"; N+1 tasks; result == N.
    tree N         N is the depth D: 2**D leaves (one,), then pairwise
                   (operator.add, left, right) levels up to a single root.
                   2**(D+1)-1 tasks; result == 2**D.
    chain N        ("c", 0): (one,), ("c", i): (operator.add, ("c", i-1), 1).
                   Computes ("c", N-1); N tasks; result == N.
    independent N  N tasks ("t", i): (none,); computes the list of all N keys.
                   N tasks; result is N Nones.

SCHEDULER:
    threaded       dask.threaded.get with num_workers=os.cpu_count()
    sync           dask.local.get_sync

The graph is built untimed. The peak-RSS counter is reset (via
/proc/self/clear_refs, best effort), baseline RSS (VmRSS) is read right before
the compute, the single compute is timed with time.perf_counter, and peak RSS
(VmHWM) is read after it. Exactly one JSON line goes to stdout:

    {"workload", "scheduler", "n", "tasks", "secs", "baseline_rss_bytes",
     "peak_rss_bytes", "dask_version"}

Errors go to stderr and the exit status is non-zero.
"""

import json
import operator
import os
import sys
import time

import dask
from dask.local import get_sync
from dask.threaded import get as get_threaded


def one():
    return 1


def none():
    return None


def merge(n):
    leaves = [("leaf", i) for i in range(n)]
    graph = {key: (one,) for key in leaves}
    graph["merge"] = (sum, leaves)
    return graph, "merge", n


def tree(depth):
    width = 2**depth
    graph = {("tree", depth, i): (one,) for i in range(width)}
    for level in range(depth - 1, -1, -1):
        width //= 2
        for i in range(width):
            left, right = ("tree", level + 1, 2 * i), ("tree", level + 1, 2 * i + 1)
            graph[("tree", level, i)] = (operator.add, left, right)
    return graph, ("tree", 0, 0), 2**depth


def chain(n):
    graph = {("c", 0): (one,)}
    for i in range(1, n):
        graph[("c", i)] = (operator.add, ("c", i - 1), 1)
    return graph, ("c", n - 1), n


def independent(n):
    keys = [("t", i) for i in range(n)]
    return {key: (none,) for key in keys}, keys, [None] * n


WORKLOADS = {"merge": merge, "tree": tree, "chain": chain, "independent": independent}


def threaded(graph, keys):
    return get_threaded(graph, keys, num_workers=os.cpu_count())


SCHEDULERS = {"threaded": threaded, "sync": get_sync}


def proc_status_bytes(field):
    """Read a kB field such as VmRSS or VmHWM from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss():
    """Reset VmHWM to the current RSS so graph building does not count (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # best effort: VmHWM then also covers graph construction


def main(argv):
    if len(argv) != 4 or argv[1] not in WORKLOADS or argv[3] not in SCHEDULERS:
        raise SystemExit(
            f"usage: {argv[0]} {{{'|'.join(WORKLOADS)}}} N {{{'|'.join(SCHEDULERS)}}}"
        )
    workload, n, scheduler = argv[1], argv[2], argv[3]
    if not n.isdigit() or int(n) < 1:
        raise SystemExit(f"N must be a positive integer, got {n!r}")
    n = int(n)
    if workload == "chain":
        # Headroom in case Dask walks the dependency chain recursively.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 2 * n + 1000))

    graph, keys, expected = WORKLOADS[workload](n)
    get = SCHEDULERS[scheduler]

    reset_peak_rss()
    baseline = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    result = get(graph, keys)
    secs = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")

    if isinstance(result, tuple):  # a list of keys comes back as a tuple
        result = list(result)
    if result != expected:
        raise SystemExit(f"wrong result for {workload} {n}: {str(result)[:200]}")

    print(json.dumps({
        "workload": workload,
        "scheduler": scheduler,
        "n": n,
        "tasks": len(graph),
        "secs": secs,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "dask_version": dask.__version__,
    }))


if __name__ == "__main__":
    main(sys.argv)
