"""One job per volume for data preparation: the runner contract, and the in-process runner.

A method's `prepare` (and the datasets_zarr steps it calls: lung masks, atlas registration, resized
regions) hands its per-volume jobs to a `JobRunner` it is given. rayssl.train gives one that runs
each job as a Ray task (rayssl.train.jobs); anyone else (tests, notebooks, the default) runs them
here, in this process. So preparation code never starts Ray itself.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence


class JobRunner(Protocol):
    """Runs `function(*job)` for every job and returns the results in job order, showing a progress
    bar titled `desc` when `progress`. A failing job raises its own exception after the other jobs
    finished, so finished work is stored (and skipped by the next, resumed, run)."""

    def __call__(self, function: Callable[..., Any], jobs: Sequence[tuple], *, desc: str,
                 progress: bool = True) -> list[Any]: ...


def run_in_process(function: Callable[..., Any], jobs: Sequence[tuple], *, desc: str,
                   progress: bool = True) -> list[Any]:
    """The `JobRunner` that runs every job here, one after the other."""
    from tqdm.auto import tqdm

    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    with tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs) as bar:
        for i, job in enumerate(jobs):
            try:
                results[i] = function(*job)
            except Exception as err:  # noqa: BLE001 - reported after the other jobs finish
                errors.append(err)
            bar.update(1)
    if errors:
        raise errors[0]
    return results
