"""Map a function over independent pieces of work (files, shards) for the data stages.

`parallel_map(fn, items, runner)` returns results in input order, whatever the backend:
    local   a process pool of `runner.workers` processes (1 = inline, in this process)
    dask    Prefect task mapping on a Dask cluster (`prefect-dask`): `runner.dask_address` of an existing
            scheduler, or, when empty, a local cluster of `runner.workers` processes on 127.0.0.1 (one per
            process, reused by every map of the stage)
`fn` and `items` must be picklable (top-level functions or functools.partial of them, plain data); results come
back to the caller. With `desc`, a progress bar (tasks/common/console.py) ticks as each result arrives, in input
order, and shows `postfix(results so far)` beside it.

On Dask every item is one Prefect task run of a `data-shards` flow run, visible on the Prefect server in
PREFECT_API_URL. Without one, a single temporary Prefect server is started for the whole map and handed to the
Dask workers through Prefect's settings context (otherwise each worker process would start its own). Workers of
an existing cluster must be able to import this project (same checkout and venv) and must see the paths in
`items` (a shared filesystem mounted at the same path): docs/SCALE.md, "Data stages on Dask".
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tasks.common.config import RunnerConfig
from tasks.common.console import progress

T = TypeVar("T")
R = TypeVar("R")

EPHEMERAL_STARTUP_SECONDS = 120
"""The least time given a temporary Prefect server to come up (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
raises it further)."""


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    runner: RunnerConfig,
    desc: str = "",
    unit: str = "shard",
    postfix: Callable[[list[R]], dict[str, Any]] | None = None,
) -> list[R]:
    """`[fn(x) for x in items]` on the configured runner; with `desc`, a progress bar of one tick per item."""
    results: list[R] = []
    bar = progress(None, total=len(items), desc=desc, unit=unit) if desc else None

    def collect(result: R) -> None:
        results.append(result)
        if bar is not None:
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(postfix(results), refresh=False)

    try:
        if runner.runner == "dask":
            _dask_map(fn, list(items), runner, collect)
        else:
            for result in _local_results(fn, items, runner):
                collect(result)
    finally:
        if bar is not None:
            bar.close()
    return results


def _local_results(fn: Callable[[T], R], items: Sequence[T], runner: RunnerConfig) -> Iterator[R]:
    if runner.workers == 1 or len(items) <= 1:
        yield from map(fn, items)
    else:
        with ProcessPoolExecutor(max_workers=min(runner.workers, len(items))) as pool:
            yield from pool.map(fn, items)


# ------------------------------------------------------------------------------------------------ dask


def _dask_map(fn: Callable[[T], R], items: list[T], runner: RunnerConfig, collect: Callable[[R], None]) -> None:
    """Prefect task mapping under a DaskTaskRunner: each item becomes one Prefect task run on the cluster."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    name = work_name(fn)
    # DVC is the only cache: Prefect must neither cache nor persist these results
    unit = task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)

    def shard_flow() -> None:
        futures = unit.map(items)  # all submitted at once; the cluster decides the order they run in
        for future in futures:  # ... and results are taken back in input order
            collect(future.result())

    if not items:
        return
    with shared_prefect_api():  # first: a local cluster must stop before a temporary server does
        flow(
            shard_flow,
            name="data-shards",
            flow_run_name=f"{name} x{len(items)}",
            task_runner=dask_task_runner(runner),
            log_prints=False,
            persist_result=False,
        )()


def work_name(fn: Callable) -> str:
    """`ingest_unit` for ingest_unit and for functools.partial(ingest_unit, ...)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", "work")


def dask_task_runner(runner: RunnerConfig):
    """The DaskTaskRunner for `runner`: the scheduler at `dask_address`, or this process's local cluster."""
    from prefect_dask import DaskTaskRunner

    # after distributed's import (which sets its own levels): the scheduler's INFO lines would bury the stage's
    # output in the flow logs
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return DaskTaskRunner(address=runner.dask_address or local_cluster(runner.workers).scheduler_address)


_LOCAL_CLUSTERS: dict[int, Any] = {}


def local_cluster(workers: int):
    """A LocalCluster of `workers` single-threaded processes on 127.0.0.1, started once per process and reused by
    every later map (a stage that maps twice pays the start-up once) and closed at exit."""
    cluster = _LOCAL_CLUSTERS.get(workers)
    if cluster is None or cluster.status.name != "running":
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            # no dashboard, and the scheduler's HTTP endpoint on a free loopback port instead of a fixed :8787,
            # so two stages (or two test runs) never collide
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            worker_dashboard_address=None,
        )
        _LOCAL_CLUSTERS[workers] = cluster
        # at exit, before the temporary Prefect server (registered earlier) goes: workers report to it
        atexit.register(cluster.close)
    return cluster


@contextlib.contextmanager
def shared_prefect_api() -> Iterator[str]:
    """Make sure this process and the Dask workers talk to one Prefect API; yield its URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    server = SubprocessASGIServer()  # the same instance Prefect's own client would start on demand
    # a first start migrates a fresh database: on a busy machine that outlasts Prefect's 20 s default
    server.start(
        timeout=max(get_current_settings().server.ephemeral.startup_timeout_seconds, EPHEMERAL_STARTUP_SECONDS)
    )
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url
