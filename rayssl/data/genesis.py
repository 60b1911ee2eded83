"""Models Genesis appearance corruptions of a 3D volume in [0, 1] (numpy, deterministic given an rng).

Zhou et al., "Models Genesis", MedIA 2021, Sec. 2: local pixel shuffling, non-linear intensity
transformation (a monotone Bezier curve), in-painting and out-painting with uniform noise, applied
as a chain (`genesis_chain`, what GVSL's official code does) or one per image (`genesis_one_of`,
what GVSL's paper describes). The functions take any 3D float array with values in [0, 1] and a
`np.random.Generator`; they return a new float32 array of the same shape (the input is never modified) whose values stay in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_volume(x: np.ndarray) -> np.ndarray:
    if x.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {x.shape}")
    return np.array(x, dtype=np.float32, copy=True)


def local_pixel_shuffling(x: np.ndarray, rng: np.random.Generator, num_blocks: int = 5000,
                          block_size: Sequence[int] | None = None) -> np.ndarray:
    """Shuffle the voxels inside `num_blocks` random small blocks (Models Genesis, Sec. 2.1).

    Blocks are read from the original volume and written back in order, so where blocks overlap
    the later one wins (as in the reference implementations). Each block gets its own random
    permutation, as Models Genesis describes.

    Args:
        x: 3D volume.
        rng: random generator (the result is a function of it).
        num_blocks: number of blocks (5000 in Models Genesis and GVSL).
        block_size: block edge per axis; default `max(1, n // 20)` per axis as the reference code.
    """
    out = _as_volume(x)
    shape = np.array(out.shape)
    block = np.array([max(1, n // 20) for n in shape] if block_size is None else list(block_size), dtype=np.int64)
    if block.shape != (3,) or (block < 1).any() or (block > shape).any():
        raise ValueError(f"block_size {tuple(block)} must have 3 entries in [1, volume shape {tuple(shape)}]")
    if num_blocks <= 0 or int(np.prod(block)) == 1:
        return out
    starts = np.stack([rng.integers(0, n - b + 1, size=num_blocks) for n, b in zip(shape, block)], axis=1)
    # Flat indices of every voxel of every block: [num_blocks, block voxels].
    offsets = np.stack(np.meshgrid(*[np.arange(b) for b in block], indexing="ij"), axis=-1).reshape(-1, 3)
    coords = starts[:, None, :] + offsets[None, :, :]
    flat = np.ravel_multi_index((coords[..., 0], coords[..., 1], coords[..., 2]), out.shape)
    values = out.ravel()[flat]
    values = rng.permuted(values, axis=1)
    result = out.ravel().copy()
    # Sequential writes so that, for overlapping blocks, the last block wins deterministically.
    for i in range(num_blocks):
        result[flat[i]] = values[i]
    return result.reshape(out.shape)


def bezier_intensity_curve(rng: np.random.Generator, n_points: int = 100_000,
                           invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of a random monotone cubic Bezier mapping [0, 1] -> [0, 1] (Models Genesis, Sec. 2.2).

    End points (0, 0) and (1, 1), two control points uniform in [0, 1]^2; the sampled x and y
    values are each sorted, which makes the mapping monotone. `invert` flips it (1 - y), the
    Models Genesis variant used with probability 0.5 there (never in GVSL's code).
    """
    controls = np.array([[0.0, 0.0], rng.random(2), rng.random(2), [1.0, 1.0]])
    t = np.linspace(0.0, 1.0, n_points)
    basis = np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3])  # Bernstein, degree 3
    xs = np.sort(controls[:, 0] @ basis)
    ys = np.sort(controls[:, 1] @ basis)
    if invert:
        ys = ys[::-1].copy()
    return xs, ys


def nonlinear_intensity(x: np.ndarray, rng: np.random.Generator, invert_prob: float = 0.0,
                        n_points: int = 100_000) -> np.ndarray:
    """Map intensities through a random monotone Bezier curve (Models Genesis, Sec. 2.2)."""
    out = _as_volume(x)
    invert = bool(rng.random() < invert_prob)
    xs, ys = bezier_intensity_curve(rng, n_points=n_points, invert=invert)
    return np.interp(out, xs, ys).astype(np.float32)


def _random_block(shape: Sequence[int], rng: np.random.Generator, size_low: Sequence[int],
                  size_high: Sequence[int], margin: int) -> tuple[slice, slice, slice]:
    """A random box with edge in [low, high) per axis, kept `margin` voxels from the borders when possible."""
    slices = []
    for n, lo, hi in zip(shape, size_low, size_high):
        lo = max(1, min(int(lo), n))
        hi = max(lo + 1, min(int(hi), n + 1))
        size = int(rng.integers(lo, hi))
        first, last = margin, n - size - margin  # start in [first, last)
        if last <= first:
            first, last = 0, n - size + 1
        start = int(rng.integers(first, max(first + 1, last)))
        slices.append(slice(start, start + size))
    return tuple(slices)  # type: ignore[return-value]


def in_painting(x: np.ndarray, rng: np.random.Generator, max_blocks: int = 30, continue_prob: float = 0.95,
                margin: int = 3) -> np.ndarray:
    """Replace up to `max_blocks` random boxes by uniform noise in [0, 1) (Models Genesis, Sec. 2.3).

    The first box is drawn with probability `continue_prob` and every further one with the same
    probability; box edges are in [n/10, n/5) per axis, starts `margin` voxels from the border.
    """
    out = _as_volume(x)
    shape = out.shape
    low = [n // 10 for n in shape]
    high = [n // 5 for n in shape]
    count = max_blocks
    while count > 0 and rng.random() < continue_prob:
        box = _random_block(shape, rng, low, high, margin)
        out[box] = rng.random(tuple(s.stop - s.start for s in box), dtype=np.float32)
        count -= 1
    return out


def out_painting(x: np.ndarray, rng: np.random.Generator, max_extra_blocks: int = 4, continue_prob: float = 0.95,
                 margin: int = 3) -> np.ndarray:
    """Keep a few large random boxes of the volume and fill the rest with uniform noise (Sec. 2.3).

    One box is always kept, then up to `max_extra_blocks` more, each with probability
    `continue_prob`; box edges are n - [3n/7, 4n/7) per axis as in Models Genesis.
    """
    original = _as_volume(x)
    shape = original.shape
    out = rng.random(shape, dtype=np.float32)
    low = [n - 4 * n // 7 + 1 for n in shape]
    high = [n - 3 * n // 7 + 1 for n in shape]
    count = max_extra_blocks + 1
    first = True
    while count > 0 and (first or rng.random() < continue_prob):
        box = _random_block(shape, rng, low, high, margin)
        out[box] = original[box]
        count -= 1
        first = False
    return out


# The transformation set GVSL samples from (He et al., CVPR 2023, Sec. 3.1.1 and Appendix C).
CORRUPTIONS: tuple[str, ...] = ("in_painting", "local_shuffling", "nonlinear")


def genesis_chain(x: np.ndarray, rng: np.random.Generator, shuffle_prob: float = 0.8, nonlinear_prob: float = 0.9,
                  paint_prob: float = 1.0, inpaint_prob: float = 1.0, shuffle_blocks: int = 5000,
                  shuffle_block_size: Sequence[int] | None = None,
                  invert_prob: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """Models Genesis corruption chain: shuffle -> non-linear -> (in- or out-)painting.

    Each step happens with its probability; painting happens with `paint_prob`, and is in-painting
    with probability `inpaint_prob`, out-painting otherwise. The defaults are the ones GVSL's
    official code actually applies (`AppearanceTransform.rand_aug`: local 0.8, non-linear 0.9,
    in-painting always, no out-painting; its `paint_rate=0.9, inpaint_rate=0.2` arguments are
    stored but never read).

    Returns:
        The corrupted volume and the names of the steps applied, in order ("local_shuffling",
        "nonlinear", "in_painting" or "out_painting").
    """
    out = _as_volume(x)
    applied: list[str] = []
    if rng.random() < shuffle_prob:
        out = local_pixel_shuffling(out, rng, num_blocks=shuffle_blocks, block_size=shuffle_block_size)
        applied.append("local_shuffling")
    if rng.random() < nonlinear_prob:
        out = nonlinear_intensity(out, rng, invert_prob=invert_prob)
        applied.append("nonlinear")
    if rng.random() < paint_prob:
        if rng.random() < inpaint_prob:
            out, name = in_painting(out, rng), "in_painting"
        else:
            out, name = out_painting(out, rng), "out_painting"
        applied.append(name)
    return out, applied


def genesis_corrupt(x: np.ndarray, rng: np.random.Generator, shuffle_prob: float = 0.8, nonlinear_prob: float = 0.9,
                    paint_prob: float = 1.0, inpaint_prob: float = 1.0, shuffle_blocks: int = 5000,
                    shuffle_block_size: Sequence[int] | None = None, invert_prob: float = 0.0) -> np.ndarray:
    """The corrupted volume of `genesis_chain` (same arguments, same random draws)."""
    return genesis_chain(x, rng, shuffle_prob=shuffle_prob, nonlinear_prob=nonlinear_prob, paint_prob=paint_prob,
                         inpaint_prob=inpaint_prob, shuffle_blocks=shuffle_blocks,
                         shuffle_block_size=shuffle_block_size, invert_prob=invert_prob)[0]


def genesis_one_of(x: np.ndarray, rng: np.random.Generator, shuffle_blocks: int = 5000,
                   shuffle_block_size: Sequence[int] | None = None,
                   invert_prob: float = 0.0) -> tuple[np.ndarray, str]:
    """Exactly one of in-painting, local shuffling and non-linear intensity, drawn uniformly.

    GVSL's paper samples "one transformation operation" per image from this set (Sec. 3.1.1,
    Appendix C); uniform sampling is our reading (the paper names no weights). The chosen
    corruption is always applied (in-painting itself may draw no box, with probability 0.05).

    Returns:
        The corrupted volume and the name of the corruption (an entry of `CORRUPTIONS`).
    """
    kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    if kind == "in_painting":
        return in_painting(x, rng), kind
    if kind == "local_shuffling":
        return local_pixel_shuffling(x, rng, num_blocks=shuffle_blocks, block_size=shuffle_block_size), kind
    return nonlinear_intensity(x, rng, invert_prob=invert_prob), kind
