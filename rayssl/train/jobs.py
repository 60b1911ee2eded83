"""The Ray `JobRunner` (rayssl.data.jobs) with which rayssl.train runs a method's data preparation."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import ray

from rayssl.data.jobs import JobRunner
from rayssl.data.storage import use_fsspec_defaults
from rayssl.runtime import start_or_attach


def ray_job_runner(num_cpus: float = 1.0, storage_defaults: dict[str, dict[str, Any]] | None = None) -> JobRunner:
    """A `JobRunner` that runs each job as one Ray task of `num_cpus` CPUs (no retries: a job that
    fails, fails for its data), on the running Ray runtime (or a private local one). Each task first
    installs `storage_defaults` (the driver's `rayssl.data.storage.fsspec_defaults`)."""

    def run(function: Callable[..., Any], jobs: Sequence[tuple], *, desc: str, progress: bool = True) -> list[Any]:
        from tqdm.auto import tqdm

        if not jobs:
            return []
        start_or_attach(None)
        remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_run_job)
        pending = {remote.remote(storage_defaults, function, *job): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        errors: list[BaseException] = []
        with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - reported after the other jobs finish
                        errors.append(_unwrap_ray_error(err))
                    bar.update(1)
        if errors:
            raise errors[0]
        return results

    return run


def _run_job(storage_defaults: dict[str, dict[str, Any]] | None, function: Callable[..., Any], *job: Any) -> Any:
    use_fsspec_defaults(storage_defaults)
    return function(*job)


def _unwrap_ray_error(err: BaseException) -> BaseException:
    """The user exception inside a RayTaskError (so callers see e.g. EmptyMaskError itself)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
