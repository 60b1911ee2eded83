"""Rank-aware data shards: one stream per DDP rank, so step k gets samples [kG, (k+1)G) on every rank, exactly.

Ray Train's default split (`streaming_split(W, equal=True)`) deals each output block to whichever
rank has received the fewest rows; which block a rank gets depends on timing and block sizes, so a
step-shared plan (DrasCLR's landmark per batch) could see two steps' samples in one step. Here each
rank streams only its own sample indices, in order: rank r's m-th micro-batch is global block
m*W + r of `micro_batch` samples. The plans are unchanged (samples are planned by global index).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import ray.train

RANK_DATASET = "train_{rank}"


def rank_dataset_name(rank: int) -> str:
    """The Train dataset a rank reads when every rank has its own stream."""
    return RANK_DATASET.format(rank=rank)


def rank_sample_ids(start_sample: int, num_samples: int, micro_batch: int, world: int, rank: int) -> np.ndarray:
    """Global sample indices rank `rank` of `world` streams, in order: blocks m*world + rank of
    `micro_batch` samples of [start_sample, start_sample + num_samples)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    block = micro_batch * world
    if micro_batch < 1 or start_sample % block or num_samples % block:
        raise ValueError(f"per-rank streams need start_sample ({start_sample}) and num_samples ({num_samples}) "
                         f"in whole rounds of micro_batch x world = {micro_batch} x {world} samples")
    rounds = np.arange(start_sample, start_sample + num_samples, block, dtype=np.int64)
    return (rounds[:, None] + rank * micro_batch + np.arange(micro_batch, dtype=np.int64)).reshape(-1)


def rank_pool(actors: tuple[int, int], actor_cpus: float, world: int) -> tuple[tuple[int, int], float]:
    """((min, max) actors, CPUs per actor) of one rank's pool, so the `world` pools together reserve
    what one shared pool of `actors` x `actor_cpus` would: ceil(max / world) actors per rank, each
    with its share of the CPUs (0.5 CPU actors stay 0.5 when world divides max)."""
    low, high = actors
    per_rank = math.ceil(high / world)
    cpus = actor_cpus * high / (world * per_rank)
    return (min(per_rank, math.ceil(low / world)), per_rank), cpus


def rank_datasets(build: Callable[..., Any], *, start_sample: int, num_samples: int, micro_batch: int, world: int,
                  actors: tuple[int, int], actor_cpus: float) -> dict[str, Any]:
    """{rank_dataset_name(r): build(sample_ids=..., actors=..., actor_cpus=...)} for every rank.

    `build` is `rayssl.data.pipeline.build_dataset` with everything else bound. Each rank's dataset
    runs its own executor and actor pool inside that rank's Train worker; an in-run restart
    (node loss) builds its iterator again from the start, and the loop skips what the checkpoint
    covered, as with the shared split.
    """
    pool, cpus = rank_pool(actors, actor_cpus, world)
    return {rank_dataset_name(r): build(sample_ids=rank_sample_ids(start_sample, num_samples, micro_batch, world, r),
                                        actors=pool, actor_cpus=cpus)
            for r in range(world)}


def rank_data_config(execution_options: Any) -> ray.train.DataConfig:
    """Train's DataConfig for per-rank datasets: none is split (each rank reads its own whole)."""
    return ray.train.DataConfig(datasets_to_split=[], execution_options=execution_options)
