"""GVSL registration sanity check: after a short pretraining on phantoms, warped x_B matches x_A better than x_B.

A plain torch loop (no Ray) over GVSL's own plan/views on CT phantoms (datasets_zarr.demo.make_phantom;
smooth random blobs if that is unavailable). Afterwards, on pairs of held-out phantoms, it reports the
local NCC (the loss's similarity, 1 = identical) between the clean x_A and
  - x_B unwarped,
  - x_B warped by the untrained model (near the identity at initialisation),
  - x_B warped by the trained model.
Run: python benchmarks/gvsl_registration.py [--steps 150 --size 32]; takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import numpy as np
import torch

from rayssl.data.read import read_box
from rayssl.methods.base import VolumeInfo
from rayssl.methods.gvsl import GVSL, GVSLConfig, elastic_settings
from rayssl.nn.spatial import local_ncc


def make_volumes(seeds: range, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """CT phantoms in HU, or HU-like smooth blobs when the demo generator is not importable."""
    try:
        from datasets_zarr.demo import make_phantom
    except ImportError:
        make_phantom = None
    volumes = []
    for seed in seeds:
        if make_phantom is not None:
            volumes.append(make_phantom(seed, shape=shape, spacing=(6.0, 6.0, 20.0 / 3.0))[0].astype(np.float32))
        else:
            from scipy.ndimage import gaussian_filter

            noise = gaussian_filter(np.random.default_rng(seed).random(shape), 4.0)
            volumes.append(np.where(noise > np.median(noise), 2000.0 * (noise - noise.mean()), -1024.0)
                           .astype(np.float32))
    return volumes


def volume_infos(volumes: list[np.ndarray]) -> list[VolumeInfo]:
    infos = []
    for i, v in enumerate(volumes):
        fg = np.argwhere(v > -500)
        bbox = (*fg.min(axis=0), *(fg.max(axis=0) + 1))
        infos.append(VolumeInfo(index=i, id=f"phantom{i}", shape=v.shape, spacing=(1.0, 1.0, 1.0),
                                bbox=tuple(int(b) for b in bbox), background=-1024.0, modality="CT"))
    return infos


def sampler(method: GVSL, volumes: list[np.ndarray],
            rng: np.random.Generator) -> Callable[[int], dict[str, torch.Tensor]]:
    """A function returning a batch of `size` GVSL views of random pairs of `volumes`."""
    infos = volume_infos(volumes)

    def batch(size: int) -> dict[str, torch.Tensor]:
        samples = []
        for _ in range(size):
            index = int(rng.integers(len(infos)))
            requests = method.plan(infos, index, rng)
            crops = [read_box(volumes[r.volume], r.start, r.size, infos[r.volume].background, np.float32) for r in requests]
            samples.append(method.views(crops, requests, rng))
        return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}

    return batch


@torch.no_grad()
def evaluate(method: GVSL, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    window = method.config.ncc_window
    unwarped, warped = [], []
    for batch in batches:
        outputs = model(batch)
        unwarped.append(local_ncc(batch["image_b"], batch["image_a"], window=window).item())
        warped.append(local_ncc(outputs["warped"], batch["image_a"], window=window).item())
    return {"ncc_unwarped": float(np.mean(unwarped)), "ncc_warped": float(np.mean(warped))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--size", type=int, default=32, help="input edge (multiple of 16)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--train-volumes", type=int, default=8)
    parser.add_argument("--eval-volumes", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3, help="higher than the paper's 1e-4 for a short run")
    parser.add_argument("--warmup-restoration-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cpu = GVSL.profile_config("cpu").model_dump()  # the method fields; the optimizer is this script's own
    cpu.update(input_size=(args.size,) * 3, warmup_restoration_steps=args.warmup_restoration_steps,
               **elastic_settings(args.size))
    method = GVSL(GVSLConfig(**cpu))
    model = method.build_model()

    shape = (64, 64, 48)
    t0 = time.perf_counter()
    train = make_volumes(range(args.train_volumes), shape)
    held_out = make_volumes(range(1000, 1000 + args.eval_volumes), shape)
    print(f"{len(train)} training and {len(held_out)} held-out phantoms {shape} in {time.perf_counter() - t0:.1f} s")

    eval_sampler = sampler(method, held_out, np.random.default_rng(args.seed + 1))
    eval_batches = [eval_sampler(args.batch) for _ in range(args.eval_batches)]
    before = evaluate(method, model, eval_batches)
    print(f"untrained: NCC(x_B, x_A) = {before['ncc_unwarped']:.4f}, NCC(warp(x_B), x_A) = {before['ncc_warped']:.4f}")

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_sampler = sampler(method, train, np.random.default_rng(args.seed))
    t_views = t_steps = 0.0
    for step in range(args.steps):
        t = time.perf_counter()
        batch = train_sampler(args.batch)
        t_views += time.perf_counter() - t
        t = time.perf_counter()
        outputs = model(batch)
        losses = method.loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        method.after_step(model, outputs, step + 1, args.steps)  # steps completed, as rayssl.train passes
        t_steps += time.perf_counter() - t
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d} " + " ".join(f"{k} {v.item():.4f}" for k, v in losses.items()), flush=True)

    after = evaluate(method, model, eval_batches)
    results = {
        "steps": args.steps, "size": args.size, "batch": args.batch, "lr": args.lr,
        "ncc_unwarped": after["ncc_unwarped"], "ncc_warped_untrained": before["ncc_warped"],
        "ncc_warped_trained": after["ncc_warped"],
        "seconds_per_step": t_steps / max(args.steps, 1), "seconds_views_per_batch": t_views / max(args.steps, 1),
    }
    print(f"held-out pairs: NCC(x_B, x_A) = {results['ncc_unwarped']:.4f}   "
          f"NCC(warp_untrained(x_B), x_A) = {results['ncc_warped_untrained']:.4f}   "
          f"NCC(warp_trained(x_B), x_A) = {results['ncc_warped_trained']:.4f}")
    print(f"model step {results['seconds_per_step']:.2f} s, views {results['seconds_views_per_batch']:.2f} s per batch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
