"""Random 96^3 crops from the same CT stores, unsharded and sharded, by rayssl's reader, tensorstore and zarr-python (+ zarrs), in-process, through Ray, and from a local S3 server.

Side by side in one run, on the same volumes and the same crop positions:

1. Local disk, in-process on one thread: crops/s and CPU ms/crop of `rayssl.data.read.StoreReader`,
   tensorstore (`zarr3` driver, concurrency limited to 1), zarr-python (`zarr.open_array`), and
   zarr-python with the zarrs codec pipeline when `zarrs` imports. Each layout: unsharded (64^3
   chunks, `rayssl convert`'s local default) and sharded (256^3 shards of 64^3 chunks, its
   object-store default). Ratios are against tensorstore on the same layout, measured in the same run.
2. Local disk through Ray: 2 actors (1 CPU each), each reading half of the crops with one reader.
3. A local moto S3 server (the tests' server, benchmarks/../tests/helpers.py): the stores uploaded to
   a bucket; rayssl's reader: requests and bytes fetched per crop, crops/s; zarr-python over
   fsspec: crops/s.

Decode limit (issue #2's definition, computed by crop_throughput.decode_limit): the chunk objects
each crop of the same plan touches, blosc-decoded whole in a tight loop on `--actors` processes at
once, as crops/s; also the block-decode limit (only the blosc blocks each crop needs, as rayssl's
reader decodes). The codec and chunks are the same in both layouts, so one limit serves both; the
Ray rows print their share of each (issue 15's third target: through Ray >= 75 % of the decode limit).

Crops come back in the stored dtype (int16) from every reader, so no reader pays a cast the
others skip. Targets (issue 15): rayssl in-process >= tensorstore on both layouts; sharded within
10 % of unsharded; rayssl through Ray >= 75 % of the decode limit. Run on a quiet machine (timings under load are worthless; the load is recorded):

    python benchmarks/store_readers.py            # CT-sized volumes (512x512x~300), ~5 min
    python benchmarks/store_readers.py --quick    # smoke check on small volumes, < 1 min

Needs the `bench` extra (`pip install -e ".[bench]"`: tensorstore, zarrs, moto[server], s3fs).
Results: benchmarks/_work/store_readers[_quick].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import (CT_SHAPES, QUICK_SHAPES, REPO, WORK, dir_bytes, ensure_volumes, fmt_table,
                     machine_info, wait_for_quiet, write_json)

CROP = 96
SHARD = 256


# ---------------------------------------------------------------------------------------------
# Stores and crop positions
# ---------------------------------------------------------------------------------------------
def ensure_sharded(unsharded: Path, log=print) -> Path:
    """A copy of `unsharded` with the same volumes in 256^3 shards of 64^3 chunks (cached beside it)."""
    from datasets_zarr.manifest import read_manifest, volume_meta, write_manifest
    from datasets_zarr.store import write_volume
    import zarr

    out = unsharded.parent / "sharded.zarr"
    if (out / "manifest.parquet").exists():
        return out
    manifest = read_manifest(unsharded)
    for volume_id in manifest["id"]:
        meta = volume_meta(unsharded, volume_id)
        image = zarr.open_array(str(unsharded / volume_id / "image"), mode="r")[:]
        write_volume(out, volume_id, image, meta.affine, modality=meta.modality, chunks=64, shards=SHARD,
                     source=meta.source)
        log(f"  sharded copy of {volume_id}")
    write_manifest(out, splits=dict(zip(manifest["id"], manifest["split"])))
    return out


def crop_plans(shapes: list[tuple[int, int, int]], n: int, seed: int = 0) -> list[tuple[str, tuple[int, int, int]]]:
    """n random (volume id, start) of 96^3 crops inside the volumes (the same for every reader)."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        i = int(rng.integers(len(shapes)))
        plans.append((f"ct_{i:02d}", tuple(int(rng.integers(0, s - CROP + 1)) for s in shapes[i])))
    return plans


# ---------------------------------------------------------------------------------------------
# Readers: open(store) -> read(volume id, start) -> int16 array
# ---------------------------------------------------------------------------------------------
class RaysslReader:
    name = "rayssl"

    def __init__(self, store: str, storage_options: dict | None = None) -> None:
        from rayssl.data.read import StoreReader

        self.reader = StoreReader(store, storage_options=storage_options)

    def read(self, volume_id: str, start) -> np.ndarray:
        return self.reader.read(volume_id, start, (CROP,) * 3, dtype=None)


class TensorstoreReader:
    name = "tensorstore"

    def __init__(self, store: str, storage_options: dict | None = None) -> None:
        import tensorstore as ts

        self.ts, self.store, self.arrays = ts, store, {}
        # One thread for decoding and I/O, like one rayssl data actor.
        self.context = ts.Context({"data_copy_concurrency": {"limit": 1}, "file_io_concurrency": {"limit": 1}})

    def read(self, volume_id: str, start) -> np.ndarray:
        if volume_id not in self.arrays:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(self.store, volume_id, "image")}}
            self.arrays[volume_id] = self.ts.open(spec, read=True, context=self.context).result()
        box = tuple(slice(s, s + CROP) for s in start)
        return self.arrays[volume_id][box].read().result()


class ZarrReader:
    name = "zarr-python"
    pipeline = None  # zarr's default codec pipeline

    def __init__(self, store: str, storage_options: dict | None = None) -> None:
        import zarr

        if self.pipeline:
            zarr.config.set({"codec_pipeline.path": self.pipeline})
        self.zarr, self.store, self.options, self.arrays = zarr, store, storage_options, {}

    def read(self, volume_id: str, start) -> np.ndarray:
        if volume_id not in self.arrays:
            path = self.store.rstrip("/") + "/" + volume_id + "/image"
            self.arrays[volume_id] = self.zarr.open_array(path, mode="r", storage_options=self.options) \
                if "://" in path else self.zarr.open_array(path, mode="r")
        return self.arrays[volume_id][tuple(slice(s, s + CROP) for s in start)]


class ZarrsReader(ZarrReader):
    name = "zarr-python+zarrs"
    pipeline = "zarrs.ZarrsCodecPipeline"


def available_readers() -> list[type]:
    readers = [RaysslReader]
    for module, cls in (("tensorstore", TensorstoreReader), ("zarr", ZarrReader), ("zarrs", ZarrsReader)):
        try:
            __import__(module)
            readers.append(cls)
        except ImportError:
            print(f"  {cls.name}: not installed (pip install -e '.[bench]'), skipped")
    return readers


def time_reader(cls, store: str, plans, warmup: int = 4, storage_options: dict | None = None) -> dict:
    """Crops/s and CPU ms/crop of one reader over `plans` (after a short warm-up), one thread."""
    reader = cls(store, storage_options)
    for volume_id, start in plans[:warmup]:
        reader.read(volume_id, start)
    if isinstance(reader, RaysslReader):
        reader.reader.stats = type(reader.reader.stats)()
    t0, c0 = time.perf_counter(), time.process_time()
    checksum = 0
    for volume_id, start in plans:
        checksum += int(reader.read(volume_id, start)[::31, ::31, ::31].sum())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"crops_per_s": len(plans) / wall, "cpu_ms_per_crop": 1e3 * cpu / len(plans), "checksum": checksum}
    if isinstance(reader, RaysslReader):
        stats = reader.reader.stats
        out.update(requests_per_crop=stats.requests / len(plans), fetched_MB_per_crop=stats.bytes_fetched / len(plans) / 1e6)
    return out


def _reset_zarr_pipeline() -> None:
    import zarr

    zarr.config.reset()


# ---------------------------------------------------------------------------------------------
# The codec's decode limit (crop_throughput's measurement, on these crops)
# ---------------------------------------------------------------------------------------------
def decode_limits(store: Path, shapes: list[tuple[int, int, int]], plans, processes: int, seconds: float) -> dict:
    """Crops/s of `processes` processes blosc-decoding exactly the chunks each crop touches (whole
    chunks: the decode limit; only the needed blosc blocks: the block-decode limit), read from the
    unsharded store's chunk objects (the same compressed bytes as the sharded store's inner chunks)."""
    from types import SimpleNamespace

    from crop_throughput import CHUNK, chunk_reads_of, decode_limit

    def volume(volume_id: str) -> SimpleNamespace:
        # crop_plans names volume i "ct_<i>", as ensure_volumes wrote it.
        return SimpleNamespace(shape=shapes[int(volume_id.split("_")[1])], extra={"store": str(store), "group": volume_id})

    reads = [chunk_reads_of(volume(v), start, (CROP,) * 3, CHUNK) for v, start in plans]
    out = {}
    for name, blocks_only in (("whole_chunks", False), ("blocks", True)):
        limit = decode_limit(reads, processes, seconds, blocks_only=blocks_only)
        out[name] = {"crops_per_s": limit["crops_per_s_direct"], "cpu_ms_per_crop": limit["cpu_ms_per_crop"],
                     "cpu_share": limit["cpu_share"], "decoded_GB_per_s": limit["decoded_GB_per_s"]}
    out["chunks_per_crop"] = sum(len(r) for r in reads) / len(reads)
    return out


# ---------------------------------------------------------------------------------------------
# Through Ray: 2 actors, one reader each
# ---------------------------------------------------------------------------------------------
def through_ray(cls, store: str, plans, actors: int) -> dict:
    import ray

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, store):
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            _reset_zarr_pipeline()
            self.reader = cls(store)

        def run(self, plans):
            for volume_id, start in plans[:2]:
                self.reader.read(volume_id, start)
            c0 = time.process_time()
            for volume_id, start in plans:
                # The crop goes back through the object store, as a data actor's output would.
                yield self.reader.read(volume_id, start)
            yield time.process_time() - c0

    workers = [Worker.remote(store) for _ in range(actors)]
    ray.get([w.__ray_ready__.remote() for w in workers])
    t0 = time.perf_counter()
    streams = [w.run.remote(plans[i::actors]) for i, w in enumerate(workers)]
    cpu = 0.0
    for stream in streams:
        items = [ray.get(ref) for ref in stream]
        cpu += items[-1]
    wall = time.perf_counter() - t0
    for w in workers:
        ray.kill(w)
    return {"crops_per_s": len(plans) / wall, "cpu_ms_per_crop": 1e3 * cpu / len(plans)}


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small volumes, few crops: a < 1 min smoke check")
    parser.add_argument("--crops", type=int, default=None, help="crops per reader and layout (default 200; quick 16)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--decode-seconds", type=float, default=None, help="decode-limit loop length (default 5; quick 1.5)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many s for load < --max-load")
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    shapes = QUICK_SHAPES if args.quick else CT_SHAPES
    n = args.crops or (16 if args.quick else 200)
    print(f"store_readers: {'quick' if args.quick else 'full'} run; volumes {shapes}, {n} crops of {CROP}^3 per reader")
    vols = ensure_volumes(shapes)
    layouts = {"unsharded": vols.store, "sharded": ensure_sharded(vols.store)}
    for name, path in layouts.items():
        print(f"  {name}: {path} ({dir_bytes(path) / 1e6:.0f} MB)")
    if args.wait_quiet:
        wait_for_quiet(args.max_load, args.wait_quiet)
    plans = crop_plans(vols.shapes, n)
    results: dict = {"mode": "quick" if args.quick else "full", "argv": sys.argv[1:], "machine": machine_info(),
                     "crops": n, "load_at_start": os.getloadavg(), "local": {}, "ray": {}, "s3": {}}
    readers = available_readers()

    print("[1/3] local disk, in-process, one thread")
    for layout, path in layouts.items():
        for cls in readers:
            _reset_zarr_pipeline()
            results["local"][f"{layout}/{cls.name}"] = time_reader(cls, str(path), plans)
    _reset_zarr_pipeline()
    checksums = {r["checksum"] for r in results["local"].values()}
    results["readers_agree"] = len(checksums) == 1

    if not args.skip_ray:
        print(f"[2/3] decode limit ({args.actors} processes), then local disk through Ray, {args.actors} actors")
        results["decode_limit"] = decode_limits(vols.store, vols.shapes, plans, args.actors,
                                                args.decode_seconds or (1.5 if args.quick else 5.0))
        import ray

        ray.init(num_cpus=args.actors, include_dashboard=False, logging_level="WARNING", address="local",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}})
        try:
            for layout, path in layouts.items():
                for cls in readers:
                    results["ray"][f"{layout}/{cls.name}"] = through_ray(cls, str(path), plans, args.actors)
        finally:
            ray.shutdown()

    if not args.skip_s3:
        print("[3/3] local moto S3 server")
        results["s3"] = s3_phase(layouts, plans)

    results["load_at_end"] = os.getloadavg()
    print_tables(results)
    out = args.json or str(WORK / f"store_readers{'_quick' if args.quick else ''}.json")
    write_json(out, results)
    print(f"results: {out}")
    return results


def s3_phase(layouts: dict[str, Path], plans) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import fsspec
    from helpers import MotoServer

    server = MotoServer().start()
    try:
        options = {"endpoint_url": server.url, "key": "testing", "secret": "testing"}
        fs = fsspec.filesystem("s3", **options)
        fs.mkdir("bench")
        out = {}
        for layout, path in layouts.items():
            fs.put(str(path), f"bench/{layout}.zarr", recursive=True)
            url = f"s3://bench/{layout}.zarr"
            for cls in (RaysslReader, ZarrReader):
                _reset_zarr_pipeline()
                out[f"{layout}/{cls.name}"] = time_reader(cls, url, plans, storage_options=options)
        return out
    finally:
        server.stop()


def print_tables(results: dict) -> None:
    limits = results.get("decode_limit")
    if limits:
        whole, blocks = limits["whole_chunks"], limits["blocks"]
        print(f"\ndecode limit ({limits['chunks_per_crop']:.1f} chunks/crop): {whole['crops_per_s']:.1f} crops/s "
              f"({whole['cpu_ms_per_crop']:.1f} CPU ms/crop); block-decode limit {blocks['crops_per_s']:.1f} crops/s "
              f"({blocks['cpu_ms_per_crop']:.1f} CPU ms/crop)")
    for phase in ("local", "ray", "s3"):
        rows = []
        for key, r in results[phase].items():
            layout, name = key.split("/")
            base = results[phase].get(f"{layout}/tensorstore") or results[phase].get(f"{layout}/zarr-python")
            unsharded = results[phase].get(f"unsharded/{name}")
            row = [layout, name, f"{r['crops_per_s']:.1f}", f"{r['cpu_ms_per_crop']:.1f}",
                   f"{r['crops_per_s'] / base['crops_per_s']:.2f}" if base else "-",
                   f"{r['crops_per_s'] / unsharded['crops_per_s']:.2f}" if unsharded else "-",
                   f"{r.get('requests_per_crop', float('nan')):.1f}", f"{r.get('fetched_MB_per_crop', float('nan')):.2f}"]
            if phase == "ray" and limits:
                row += [f"{100 * r['crops_per_s'] / whole['crops_per_s']:.0f} %",
                        f"{100 * r['crops_per_s'] / blocks['crops_per_s']:.0f} %"]
            rows.append(row)
        if rows:
            print(f"\n{phase}:")
            print(fmt_table(rows, ["layout", "reader", "crops/s", "CPU ms/crop", "x baseline", "x unsharded",
                                   "requests/crop", "MB fetched/crop"]
                            + (["of decode limit", "of block-decode limit"] if phase == "ray" and limits else [])))


if __name__ == "__main__":
    main()
