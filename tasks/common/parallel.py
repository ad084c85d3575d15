"""Map a function over independent pieces of work (files, shards) for the data stages.

`parallel_map(fn, items, runner)` returns results in input order, whatever the backend:
    local   a process pool of `runner.workers` processes (1 = inline, in this process)
    dask    Prefect task mapping on a Dask cluster (`prefect-dask`): `runner.dask_address` of an existing
            scheduler, or a local cluster of `runner.workers` processes when empty
`fn` and `items` must be picklable (top-level functions, plain data); results come back to the caller.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence, TypeVar

from tasks.common.config import RunnerConfig

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], runner: RunnerConfig,
                 on_result: Callable[[R], Any] | None = None) -> list[R]:
    """`[fn(x) for x in items]` on the configured runner, calling `on_result` as each finishes (in order)."""
    results = []
    for result in _iter_results(fn, items, runner):
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _iter_results(fn: Callable[[T], R], items: Sequence[T], runner: RunnerConfig) -> Iterator[R]:
    if runner.runner == "dask":
        yield from _dask_map(fn, items, runner)
    elif runner.workers == 1 or len(items) <= 1:
        yield from map(fn, items)
    else:
        with ProcessPoolExecutor(max_workers=min(runner.workers, len(items))) as pool:
            yield from pool.map(fn, items)


def _dask_map(fn: Callable[[T], R], items: Sequence[T], runner: RunnerConfig) -> list[R]:
    """Prefect task mapping under a DaskTaskRunner: each item becomes one Prefect task run on the cluster."""
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        task_runner = DaskTaskRunner(address=runner.dask_address)
    else:
        task_runner = DaskTaskRunner(cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": 1,
                                                     "processes": True, "dashboard_address": None})
    unit = task(fn, name=getattr(fn, "__name__", "work"))

    @flow(name="data-shards", task_runner=task_runner, log_prints=False)
    def shard_flow() -> list[R]:
        futures = unit.map(items)
        return [f.result() for f in futures]

    return shard_flow()
