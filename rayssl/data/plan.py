"""Deterministic sample plans: which volume and which boxes sample i reads, from (seed, epoch, volume)."""

from __future__ import annotations

import zlib
from typing import Protocol, Sequence

import numpy as np

from rayssl.data.types import ReadRequest, StepInfo, VolumeInfo

ARRAY_CODES = {"image": 0, "label": 1, "mask": 2}
ARRAY_NAMES = {v: k for k, v in ARRAY_CODES.items()}


class PlanFn(Protocol):
    """`Method.plan`: the boxes of one sample, from the volumes, the primary volume's row, the sample's
    RNG and (step-shared plans only) its optimizer step."""

    def __call__(self, volumes: Sequence[VolumeInfo], index: int, rng: np.random.Generator,
                 step: StepInfo | None = None) -> list[ReadRequest]: ...


def volume_key(volume_id: str) -> int:
    """A stable integer for a volume id (Python's hash() is salted per process)."""
    return zlib.crc32(volume_id.encode("utf-8"))


def epoch_order(n_volumes: int, samples_per_volume: int, seed: int, epoch: int,
                repeats: np.ndarray | None = None) -> np.ndarray:
    """Primary volume of each sample position in an epoch: each volume `samples_per_volume` times
    (or `repeats[v]` times, for per-store sampling weights), shuffled."""
    order = np.repeat(np.arange(n_volumes), samples_per_volume if repeats is None else repeats)
    np.random.default_rng([seed, epoch, 0x5EED]).shuffle(order)
    return order


def sample_rng(seed: int, epoch: int, volume_id: str, position: int) -> np.random.Generator:
    """RNG of one sample, a function of (run seed, epoch, volume id, position in the epoch) only."""
    return np.random.default_rng([seed, epoch, volume_key(volume_id), position])


def encode_requests(requests: Sequence[ReadRequest]) -> np.ndarray:
    """[R, 8] int64 rows: volume, start xyz, size xyz, array code (a plan as one comparable array)."""
    rows = np.empty((len(requests), 8), dtype=np.int64)
    for i, r in enumerate(requests):
        if r.array not in ARRAY_CODES:
            raise ValueError(f"unknown array {r.array!r}; choose from {sorted(ARRAY_CODES)}")
        rows[i] = (r.volume, *r.start, *r.size, ARRAY_CODES[r.array])
    return rows


def decode_requests(rows: np.ndarray) -> list[ReadRequest]:
    return [
        ReadRequest(volume=int(r[0]), start=(int(r[1]), int(r[2]), int(r[3])),
                    size=(int(r[4]), int(r[5]), int(r[6])), array=ARRAY_NAMES[int(r[7])])
        for r in rows
    ]


class Planner:
    """Turns global sample indices into plans; pure and cheap, runs inside the data actors.

    Sample i belongs to epoch i // samples_per_epoch; its primary volume comes from that epoch's
    shuffled order; the method's `plan` picks its boxes with an RNG seeded by (seed, epoch, volume
    id, position). With `samples_per_step` G, the plan also gets the sample's optimizer step
    (index // G), so a step-shared choice (DrasCLR's landmark) is one per step. The same (seed,
    volumes) always gives the same plans, so a resumed run that starts at sample s sees exactly the
    samples an uninterrupted run would.
    """

    def __init__(self, volumes: Sequence[VolumeInfo], plan_fn: PlanFn, seed: int, samples_per_volume: int = 1,
                 repeats: np.ndarray | None = None, samples_per_step: int | None = None) -> None:
        if not volumes:
            raise ValueError("no volumes to sample from: the manifest (or the chosen split) is empty")
        self.volumes = list(volumes)
        self.plan_fn = plan_fn
        self.seed = int(seed)
        self.samples_per_volume = int(samples_per_volume)
        self.repeats = None if repeats is None else np.asarray(repeats, dtype=np.int64)
        self.samples_per_epoch = (len(self.volumes) * self.samples_per_volume if self.repeats is None
                                  else int(self.repeats.sum()))
        if samples_per_step is not None and samples_per_step < 1:
            raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}")
        self.samples_per_step = samples_per_step
        self._orders: dict[int, np.ndarray] = {}

    def step_info(self, sample: int) -> StepInfo | None:
        """The optimizer step of global sample `sample` (samples [k*G, (k+1)*G) make step k, G =
        samples_per_step), or None when plans are not step-shared."""
        if self.samples_per_step is None:
            return None
        return StepInfo(step=int(sample) // self.samples_per_step, samples_per_step=self.samples_per_step,
                        seed=self.seed)

    def call_plan(self, volume: int, rng: np.random.Generator, step: StepInfo | None) -> list[ReadRequest]:
        """The method's plan for one sample; `step=` only for step-shared plans (a plain function of
        (volumes, index, rng) serves every other planner)."""
        if step is None:
            return list(self.plan_fn(self.volumes, volume, rng))
        return list(self.plan_fn(self.volumes, volume, rng, step=step))

    def plan(self, sample: int) -> tuple[int, int, np.ndarray, int]:
        """(epoch, primary volume, encoded requests, views seed) of global sample index `sample`:
        `plan_requests` with the boxes as one comparable int64 array."""
        epoch, volume, requests, views_seed = self.plan_requests(sample)
        return epoch, volume, encode_requests(requests), views_seed

    def plan_requests(self, sample: int) -> tuple[int, int, list[ReadRequest], int]:
        """(epoch, primary volume, read requests, views seed) of global sample index `sample`."""
        epoch, position = divmod(int(sample), self.samples_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.volumes), self.samples_per_volume, self.seed, epoch,
                                               self.repeats)}
        volume = int(self._orders[epoch][position])
        rng = sample_rng(self.seed, epoch, self.volumes[volume].id, position)
        requests = self.call_plan(volume, rng, self.step_info(sample))
        views_seed = int(rng.integers(0, 2**62))
        return epoch, volume, requests, views_seed
