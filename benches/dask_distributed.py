"""Dask side of `rask bench distributed`: time one workload on a local Dask cluster.

Usage:
    python benches/dask_distributed.py WORKLOAD N

Every run starts, untimed, a
    distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                             dashboard_address=None)
plus a Client, waits for both workers, and does one untimed warm-up
`client.submit(one).result()`. Only the workload's measured part is timed,
with time.perf_counter.

WORKLOAD:
    merge N      Raw graph: N leaves ("leaf", i): (one,) plus
                 "merge": (sum, [leaf keys]); client.get(graph, "merge").
                 N+1 tasks; result == N.
    tree N       N is the depth D: 2**D leaves (one,), then pairwise
                 (operator.add, left, right) levels up to a single root;
                 client.get on the root. 2**(D+1)-1 tasks; result == 2**D.
    mapgather N  client.map(inc, range(N), pure=False) then client.gather.
                 N tasks; sum of results == N*(N+1)/2.
    chain N      Raw graph ("c", 0): (one,), ("c", i): (operator.add, ("c", i-1), 1);
                 client.get on ("c", N-1). N tasks; result == N. Measures the
                 latency of one dependent hop.
    workerloss N N tasks sleeping 20 ms (returning i) and their sum, run twice on
                 fresh keys: undisturbed, then with one worker process SIGKILLed
                 halfway (its nanny restarts it; lost results are recomputed).
                 "secs" is the disturbed run, "base_secs" the undisturbed one.
    transfer N   N is the total MiB to move, in 64 MiB pieces (N must be a
                 multiple of 64). Untimed: N/64 random 64 MiB `bytes` pieces are
                 made on worker A (submit(make_piece, i, workers=[A], pure=False))
                 and waited for. Timed: for each piece
                 submit(len, piece, workers=[B], allow_other_workers=False),
                 then gather the lengths, so every piece crosses A -> B.
                 N/64 tasks; "bytes" is the total moved.
    spill N      N MiB in 64 MiB pieces through ONE worker with memory_limit N/4 MiB
                 (the cluster is LocalCluster(n_workers=1, memory_limit=...)), so
                 most pieces go to its spill files. Timed: submit the N/64 pieces
                 (each the byte pattern 0..255 repeated, as rask's "bytes" op
                 makes), wait, then gather them one at a time (one gather of
                 all of them unspills everything at once, which gets the worker
                 killed for memory at this limit). "bytes" is the total gathered;
                 "spill" reports the worker's disk-write/disk-read bytes and
                 seconds from its metric digests, and "restarts": how often the
                 nanny restarted the worker for exceeding 95% of its limit
                 (counted from the nanny's log records, in this process).

Exactly one JSON line goes to stdout:

    {"workload", "n", "tasks", "secs", "bytes", "base_secs", "spill",
     "dask_version", "distributed_version"}

("bytes" is 0 except for transfer and spill, "base_secs" except for
workerloss, "spill" is null except for spill.) To keep stdout clean, file descriptor 1 is
pointed at stderr for the whole run (the cluster, its worker processes and any
library output inherit that), and the JSON line is written to a saved copy of
the original stdout. Errors go to stderr and the exit status is non-zero.
The cluster and client are context managers, and SIGTERM is turned into
SystemExit, so the worker processes are shut down however the script exits
(short of SIGKILL).
"""

import json
import logging
import operator
import os
import signal
import sys
import time

MIB = 2**20
PIECE_MIB = 64
PIECE_BYTES = PIECE_MIB * MIB


# Task functions. They live in __main__, so cloudpickle ships them by value.

def one():
    return 1


def inc(x):
    return x + 1


def slow(i):
    time.sleep(0.02)
    return i


def pattern_piece(i, size):
    """`size` bytes of the pattern seed, seed+1, ... repeating every 256 bytes."""
    period = bytes((i + j) % 256 for j in range(256))
    return period * (size // 256) + period[: size % 256]


def make_piece(i, size):
    """A `bytes` piece of random (incompressible) data, made on the worker."""
    return os.urandom(size)


# Workloads. Each is run(client, n) -> (tasks, secs, bytes_moved); each builds
# its inputs untimed, times only the measured part and checks the result.

def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def check(ok, what):
    if not ok:
        raise RuntimeError(f"wrong result: {what}")


def run_merge(client, n):
    leaves = [("leaf", i) for i in range(n)]
    graph = {key: (one,) for key in leaves}
    graph["merge"] = (sum, leaves)
    result, secs = timed(lambda: client.get(graph, "merge"))
    check(result == n, f"merge {n} returned {result!r}")
    return len(graph), secs, 0


def run_tree(client, depth):
    width = 2**depth
    graph = {("tree", depth, i): (one,) for i in range(width)}
    for level in range(depth - 1, -1, -1):
        width //= 2
        for i in range(width):
            left, right = ("tree", level + 1, 2 * i), ("tree", level + 1, 2 * i + 1)
            graph[("tree", level, i)] = (operator.add, left, right)
    check(len(graph) == 2 ** (depth + 1) - 1, "tree graph size")
    result, secs = timed(lambda: client.get(graph, ("tree", 0, 0)))
    check(result == 2**depth, f"tree {depth} returned {result!r}")
    return len(graph), secs, 0


def run_mapgather(client, n):
    def measured():
        futures = client.map(inc, range(n), pure=False)
        return client.gather(futures)

    results, secs = timed(measured)
    total = sum(results)
    check(len(results) == n and total == n * (n + 1) // 2,
          f"mapgather {n}: {len(results)} results summing to {total}")
    return n, secs, 0


def run_chain(client, n):
    graph = {("c", 0): (one,)}
    for i in range(1, n):
        graph[("c", i)] = (operator.add, ("c", i - 1), 1)
    result, secs = timed(lambda: client.get(graph, ("c", n - 1)))
    check(result == n, f"chain {n} returned {result!r}")
    return len(graph), secs, 0


def run_transfer(client, mib):
    from distributed import wait

    if mib % PIECE_MIB:
        raise SystemExit(f"transfer N is MiB and must be a multiple of {PIECE_MIB}, got {mib}")
    count = mib // PIECE_MIB
    workers = sorted(client.scheduler_info()["workers"])
    if len(workers) != 2:
        raise RuntimeError(f"expected 2 workers, got {workers}")
    a, b = workers

    # Untimed: make every piece on worker A and make sure it is held there.
    pieces = [client.submit(make_piece, i, PIECE_BYTES, workers=[a], pure=False)
              for i in range(count)]
    wait(pieces)
    for piece in pieces:
        if piece.status != "finished":
            piece.result()  # raises the task's error
    who_has = client.who_has(pieces)
    check(all(tuple(who_has[p.key]) == (a,) for p in pieces),
          f"pieces not (only) on worker A: {dict(who_has)}")

    def measured():
        lengths = [client.submit(len, piece, workers=[b], allow_other_workers=False,
                                 pure=False)
                   for piece in pieces]
        return lengths, client.gather(lengths)

    (futures, lengths), secs = timed(measured)
    moved = sum(lengths)
    check(lengths == [PIECE_BYTES] * count, f"transfer lengths {lengths}")
    ran_on = client.who_has(futures)
    check(all(tuple(ran_on[f.key]) == (b,) for f in futures),
          f"len tasks did not all run on worker B: {dict(ran_on)}")
    return count, secs, moved


def run_workerloss(client, n):
    import threading

    def batch(tag):
        futures = client.map(slow, range(n), key=[f"{tag}-{i}" for i in range(n)])
        return client.submit(sum, futures, key=f"{tag}-total").result()

    result, base = timed(lambda: batch("calm"))
    check(result == n * (n - 1) // 2, f"workerloss undisturbed returned {result!r}")
    pids = client.run(os.getpid)  # worker address -> worker process id
    victim = pids[sorted(pids)[0]]
    killer = threading.Timer(base / 2, lambda: os.kill(victim, signal.SIGKILL))
    killer.start()
    result, secs = timed(lambda: batch("storm"))
    killer.join()
    check(result == n * (n - 1) // 2, f"workerloss disturbed returned {result!r}")
    return n + 1, secs, 0, base


def spill_io(dask_worker):
    """The worker's cumulative spill traffic, from its metric digests (keys are
    tuples ending in ("disk-write" | "disk-read", "bytes" | "seconds"))."""
    out = {"write_bytes": 0.0, "write_secs": 0.0, "read_bytes": 0.0, "read_secs": 0.0}
    for key, value in dask_worker.digests_total.items():
        if not isinstance(key, tuple) or len(key) < 2:
            continue
        for activity, side in (("disk-write", "write"), ("disk-read", "read")):
            if key[-2] == activity and key[-1] in ("bytes", "seconds"):
                out[f"{side}_{'bytes' if key[-1] == 'bytes' else 'secs'}"] += value
    return out


class RestartCounter(logging.Handler):
    """Counts the nanny's "exceeded 95% memory budget. Restarting" records."""

    def __init__(self):
        super().__init__()
        self.restarts = 0

    def emit(self, record):
        if "memory budget" in record.getMessage():
            self.restarts += 1


RESTARTS = RestartCounter()


def run_spill(client, mib):
    from distributed import wait

    if mib % PIECE_MIB:
        raise SystemExit(f"spill N is MiB and must be a multiple of {PIECE_MIB}, got {mib}")
    count = mib // PIECE_MIB

    def measured():
        pieces = [client.submit(pattern_piece, i, PIECE_BYTES, pure=False) for i in range(count)]
        wait(pieces, timeout=300)
        return [len(client.gather(p)) for p in pieces]

    got, secs = timed(measured)
    moved = sum(got)
    check(moved == count * PIECE_BYTES, f"spill gathered {moved} bytes")
    (io,) = client.run(spill_io).values()
    io["restarts"] = RESTARTS.restarts
    return count, secs, moved, 0.0, io


WORKLOADS = {
    "spill": run_spill,
    "workerloss": run_workerloss,
    "merge": run_merge,
    "tree": run_tree,
    "mapgather": run_mapgather,
    "chain": run_chain,
    "transfer": run_transfer,
}


def on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv):
    if len(argv) != 3 or argv[1] not in WORKLOADS:
        raise SystemExit(f"usage: {argv[0]} {{{'|'.join(WORKLOADS)}}} N")
    workload, n = argv[1], argv[2]
    if not n.isdigit() or int(n) < 1:
        raise SystemExit(f"N must be a positive integer, got {n!r}")
    n = int(n)
    if workload == "tree" and n > 30:
        raise SystemExit(f"tree depth {n} is too large")
    if workload == "chain":
        # Headroom in case graph handling walks the dependency chain recursively.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 2 * n + 1000))

    # Keep stdout for the JSON line only: save it, then point fd 1 at stderr so
    # the cluster, its spawned worker processes and any stray print go there.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    signal.signal(signal.SIGTERM, on_sigterm)

    import dask
    import distributed
    from distributed import Client, LocalCluster

    workers, limit = (1, f"{n // 4}MiB") if workload == "spill" else (2, "auto")
    logging.getLogger("distributed.nanny.memory").addHandler(RESTARTS)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      memory_limit=limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers)
        check(client.submit(one).result() == 1, "warm-up")
        tasks, secs, moved, *rest = WORKLOADS[workload](client, n)
        base = rest[0] if rest else 0.0
        spill = rest[1] if len(rest) > 1 else None

    json_out.write(json.dumps({
        "workload": workload,
        "n": n,
        "tasks": tasks,
        "secs": secs,
        "bytes": moved,
        "base_secs": base,
        "spill": spill,
        "dask_version": dask.__version__,
        "distributed_version": distributed.__version__,
    }) + "\n")
    json_out.flush()


if __name__ == "__main__":
    main(sys.argv)
