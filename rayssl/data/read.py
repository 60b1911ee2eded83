"""Read 3D boxes from Zarr v3 volume stores, decoding only the chunks each box touches.

The fast path reads the chunk objects of `bytes + blosc` arrays (our stores' default) and decodes
them with c-blosc directly, skipping the zarr API's per-chunk overhead (about half of a crop's time
in our measurements), and decodes only the blosc blocks (slabs along the first axis) that a box
needs. Sharded arrays (`sharding_indexed` of `bytes + blosc` inner chunks, the object-store layout)
take the same path: each shard's index is read once per reader (one suffix-range request, crc32c
checked, kept in a byte-bounded LRU) and only the inner chunks a box touches are fetched, with
ranged reads that merge neighbouring chunks of a shard into one request (on object stores also
across gaps of up to 256 KiB; on local files only adjacent chunks, one pread each). Local bytes go
straight into one reused buffer, so a sharded crop costs no more CPU than an unsharded one. Any
other layout (other codecs) goes through `zarr` itself. Both paths return identical arrays (tested).

Integrity: arrays written by `datasets_zarr.store.write_volume` carry a chunk record (which chunks
were written; zarr leaves all-fill chunks out), read once with the array's zarr.json. A chunk the
record says was written but whose object (or shard entry) is missing raises `ChunkReadError`
instead of reading as fill value; arrays without a record (older stores) keep the Zarr rule. On
open, an array's dtype and shape are checked against the store's manifest row.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import posixpath
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import fsspec
import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr


def decode_single_threaded() -> None:
    """Make blosc decode in the calling thread only. numcodecs' switch is process-wide, so only a
    process of its own sets it: a Ray data actor (rayssl.data.pipeline), which Ray gives one core
    that blosc's internal threads would oversubscribe. Importing this module changes nothing."""
    numcodecs.blosc.use_threads = False


def _load_blosc_getitem():
    """c-blosc's `blosc_getitem` from the library numcodecs bundles, or None where it is absent.

    It decodes only the blosc blocks that hold the requested items. A 64^3 int16 chunk is four
    128 KiB blocks of 16 slices along the first axis, and a 96^3 crop needs on average 111 of the
    159 first-axis slices of the chunks it touches: about 30 % less decoding per crop.
    numcodecs does not wrap this function, so it is reached through ctypes.
    """
    try:
        function = ctypes.CDLL(numcodecs.blosc.__file__).blosc_getitem
    except (OSError, AttributeError):
        return None
    # Source as c_void_p: an address into the reader's fetch buffer (bytes objects work too).
    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_blosc_getitem = _load_blosc_getitem()


class ChunkReadError(RuntimeError):
    """A chunk (or array) of a volume could not be read or decoded."""


# Key of the chunk record in an array's `attributes["rayssl"]` (docs/store_format.md).
CHUNK_RECORD_KEY = "chunks_written"


def encode_chunk_record(written: np.ndarray) -> dict:
    """The chunk record of an array: its chunk grid, how many chunks were written and a bitmap of
    which (C order over the grid, 1 = written, numpy `packbits`, base64): 40 bytes for 320 chunks."""
    written = np.asarray(written, dtype=bool)
    return {"grid": [int(n) for n in written.shape], "count": int(written.sum()),
            "bitmap": base64.b64encode(np.packbits(written.ravel()).tobytes()).decode("ascii")}


def decode_chunk_record(record: dict, grid: Sequence[int], where: str = "") -> np.ndarray:
    """The written-chunk bitmap (bool, shape `grid`) of a chunk record; ChunkReadError when the
    record does not fit the array (its zarr.json or the record was edited)."""
    try:
        recorded = tuple(int(n) for n in record["grid"])
        bits = np.frombuffer(base64.b64decode(record["bitmap"], validate=True), dtype=np.uint8)
        count = int(record["count"])
    except (KeyError, TypeError, ValueError) as err:
        raise ChunkReadError(f"{where}: the chunk record in zarr.json is malformed ({err}); "
                             f"the store was edited or corrupted: re-convert the volume") from None
    total = int(np.prod(recorded))
    written = np.unpackbits(bits, count=total).astype(bool) if len(bits) * 8 >= total else None
    if recorded != tuple(grid) or written is None or int(written.sum()) != count:
        raise ChunkReadError(
            f"{where}: the chunk record in zarr.json ({recorded} chunks, {count} written) does not fit the "
            f"array's chunk grid {tuple(grid)}: the store was edited or corrupted; re-convert the volume")
    return written.reshape(recorded)


@dataclass
class _ArrayInfo:
    path: str  # path of the array inside the store (fs path)
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: float
    separator: str
    fast: bool  # bytes+blosc chunks (inner chunks of shards included): decode them directly
    shards: tuple[int, ...] | None = None  # shard shape when sharded (`chunks` is then the inner chunk)
    index_at_end: bool = True  # where the shard index sits (Zarr sharding `index_location`)
    # Which chunks (inner chunks when sharded) were written, from the chunk record; None = no record.
    written: np.ndarray | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """Chunks (inner chunks when sharded) along each axis."""
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks))

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shards, self.chunks)) if self.shards else ()

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard index: (offset, nbytes) uint64 per inner chunk + a crc32c."""
        return 16 * int(np.prod(self.chunks_per_shard)) + 4

    def object_path(self, key: Sequence[int]) -> str:
        """Path of the chunk (or shard) object with grid coordinates `key`."""
        if self.separator == "/":
            return posixpath.join(self.path, "c", *map(str, key))
        return posixpath.join(self.path, "c" + self.separator + self.separator.join(map(str, key)))


@dataclass
class ReadStats:
    """Counters for read amplification: bytes decoded vs bytes returned."""

    boxes: int = 0
    chunks_decoded: int = 0
    bytes_decoded: int = 0
    bytes_returned: int = 0
    bytes_fetched: int = 0
    requests: int = 0  # objects or byte ranges fetched (shard indexes included)

    @property
    def amplification(self) -> float:
        return self.bytes_decoded / max(self.bytes_returned, 1)


def _little_endian_blosc(codecs: list[dict]) -> bool:
    """True for the codec chain `bytes (little-endian) + blosc`, which the fast path decodes."""
    names = [c["name"] for c in codecs]
    endian = next((c.get("configuration", {}).get("endian", "little") for c in codecs if c["name"] == "bytes"), "little")
    return names == ["bytes", "blosc"] and endian == "little"


def _parse_array_meta(path: str, meta: dict, where: str = "") -> _ArrayInfo:
    if meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        raise ChunkReadError(f"{path}: not a Zarr v3 array (zarr.json says {meta.get('node_type')!r})")
    codecs = meta.get("codecs", [])
    key_encoding = meta.get("chunk_key_encoding", {})
    separator = key_encoding.get("configuration", {}).get("separator", "/")
    grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    chunks, shards, index_at_end = grid, None, True
    if [c["name"] for c in codecs] == ["sharding_indexed"]:
        sharding = codecs[0].get("configuration", {})
        chunks, shards = tuple(sharding["chunk_shape"]), grid
        index_at_end = sharding.get("index_location", "end") == "end"
        index_codecs = sharding.get("index_codecs", [])
        fast = (_little_endian_blosc(sharding.get("codecs", []))
                and [c["name"] for c in index_codecs] == ["bytes", "crc32c"]
                and index_codecs[0].get("configuration", {}).get("endian", "little") == "little")
    else:
        fast = _little_endian_blosc(codecs)
    fast = fast and key_encoding.get("name") == "default"
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    info = _ArrayInfo(
        path=path,
        shape=tuple(meta["shape"]),
        chunks=chunks,
        dtype=dtype,
        fill_value=meta.get("fill_value") or 0,
        separator=separator,
        fast=fast,
        shards=shards,
        index_at_end=index_at_end,
    )
    record = (meta.get("attributes") or {}).get("rayssl", {})
    if isinstance(record, dict) and CHUNK_RECORD_KEY in record:
        info.written = decode_chunk_record(record[CHUNK_RECORD_KEY], info.grid, where=where or path)
    return info


# A shard index entry of a never-written inner chunk (Zarr sharding spec: offset = nbytes = 2^64-1).
_EMPTY_ENTRY = 2**64 - 1
# Inner chunks of one shard separated by at most this many bytes are fetched in one ranged request:
# on object stores a request costs ~10-50 ms of latency, far more than reading 256 KiB extra.
COALESCE_GAP_BYTES = 256 * 1024
# On a local file a read costs a system call (~2 us), about as much as copying 16 KiB from the page
# cache: only (nearly) adjacent inner chunks are merged, the gaps between others are not read.
LOCAL_COALESCE_GAP_BYTES = 16 * 1024
# The fetch buffer (compressed chunks of one read_boxes call) is kept for the next call up to this size.
_KEEP_FETCH_BUFFER_BYTES = 64 * 1024**2


def _pread_into(fd: int, view: np.ndarray, offset: int) -> int:
    """Read len(view) bytes of file `fd` at `offset` into `view`; returns the bytes read (fewer at EOF)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [view])


class StoreReader:
    """Reads boxes from the volume groups of one store (local path or fsspec URI).

    Open once per actor: array metadata and shard indexes are cached (the indexes in an LRU of at
    most `index_cache_bytes`), chunk objects and byte ranges are fetched (concurrently on object
    stores, via `fs.cat` / `fs.cat_ranges`) and decoded once per `read_boxes` call even when
    several boxes share them. `storage_options` go to fsspec (e.g. `endpoint_url`, `key`, `secret`
    for s3://); without them fsspec reads the standard environment (AWS_ENDPOINT_URL, ...).

    Local chunks are read straight into one reused fetch buffer and decoded into one reused chunk
    buffer (fresh pages cost more than the decode on VMs that hand freed memory back to the host),
    so a reader is for one thread (a data actor has its own).
    """

    def __init__(self, uri: str, storage_options: dict | None = None,
                 index_cache_bytes: int = 64 * 1024**2) -> None:
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self._local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self._arrays: dict[tuple[str, str], _ArrayInfo] = {}
        self._indexes: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._index_cache_bytes = int(index_cache_bytes)
        self._indexes_nbytes = 0
        self._coalesce_gap = LOCAL_COALESCE_GAP_BYTES if self._local else COALESCE_GAP_BYTES
        self._fetch_buffer: np.ndarray | None = None  # compressed chunks of the current call
        self._fetch_address = 0
        self._fetch_cursor = 0
        self._chunk_buffer: np.ndarray | None = None  # one decoded chunk
        self._manifest: dict[str, tuple[tuple[int, ...] | None, str]] | None = None  # group -> (shape, dtype)
        self.stats = ReadStats()

    def array_info(self, group: str, array: str = "image") -> _ArrayInfo:
        key = (group, array)
        if key not in self._arrays:
            path = posixpath.join(self.root, group, array)
            try:
                meta = json.loads(self.fs.cat_file(posixpath.join(path, "zarr.json")))
            except FileNotFoundError:
                raise ChunkReadError(
                    f"volume {group!r} in store {self.uri}: array {array!r} not found; "
                    f"check the manifest matches the store (re-run `rayssl convert`)"
                ) from None
            except (ValueError, OSError) as err:
                raise ChunkReadError(f"volume {group!r} in store {self.uri}: cannot read {array}/zarr.json: {err}") from err
            try:
                info = _parse_array_meta(path, meta, where=f"volume {group!r} in store {self.uri}: {array}")
            except (KeyError, TypeError, ValueError) as err:
                raise ChunkReadError(f"volume {group!r} in store {self.uri}: {array}/zarr.json is not valid array "
                                     f"metadata ({type(err).__name__}: {err}); re-convert this volume") from err
            self._check_against_manifest(group, array, info)
            self._arrays[key] = info
        return self._arrays[key]

    def _check_against_manifest(self, group: str, array: str, info: _ArrayInfo) -> None:
        """Refuse an array whose zarr.json disagrees with the manifest row on shape (any array) or dtype
        (`image`): an edited zarr.json would otherwise reinterpret every voxel (int16 -1024 read as
        uint16 64512)."""
        shape, dtype = self.manifest_facts().get(group, (None, ""))
        said, expected = [], []
        if shape is not None and tuple(shape) != tuple(info.shape):
            said.append(f"shape {list(info.shape)}")
            expected.append(f"shape {list(shape)}")
        if array == "image" and dtype:
            try:
                same = np.dtype(dtype).newbyteorder("<") == info.dtype
            except TypeError:
                same = False
            if not same:
                said.append(info.dtype.name)
                expected.append(dtype)
        if said:
            raise ChunkReadError(
                f"volume {group!r} in store {self.uri}: {array}/zarr.json says {', '.join(said)}, the manifest "
                f"says {', '.join(expected)}: the store was edited or corrupted; re-convert the volume "
                f"(`rayssl verify {self.uri} --fix`, or `rayssl convert` with its original options) or stream "
                f"with `--set data.on_error=skip` to leave it out")

    def manifest_facts(self) -> dict[str, tuple[tuple[int, ...] | None, str]]:
        """(shape, dtype) per volume group from the store's manifest.parquet, read once per reader;
        empty when the store has no manifest (a bare Zarr store)."""
        if self._manifest is None:
            import pyarrow.parquet as pq

            path = posixpath.join(self.root, "manifest.parquet")
            facts: dict[str, tuple[tuple[int, ...] | None, str]] = {}
            try:
                with self.fs.open(path, "rb") as f:
                    parquet = pq.ParquetFile(f)
                    columns = [c for c in ("group", "shape", "dtype") if c in parquet.schema_arrow.names]
                    rows = parquet.read(columns=columns).to_pylist() if "group" in columns else []
            except FileNotFoundError:
                rows = []
            except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
                raise ChunkReadError(f"store {self.uri}: manifest.parquet is unreadable ({type(err).__name__}: "
                                     f"{err}); rewrite it (re-run `rayssl convert` into this store)") from err
            for row in rows:
                shape = row.get("shape")
                facts[str(row["group"])] = (tuple(int(v) for v in shape) if shape else None, str(row.get("dtype") or ""))
            self._manifest = facts
        return self._manifest

    def written_chunks(self, group: str, array: str = "image") -> np.ndarray | None:
        """Which chunks (inner chunks when sharded) of an array exist now, as a bool array over its
        chunk grid: chunk objects are listed, shard indexes read (and crc32c checked). None for a
        layout this reader cannot index (sharded with other index codecs or chunk key encodings)."""
        info = self.array_info(group, array)
        if info.shards and not info.fast:
            return None
        key_grid = tuple(-(-n // s) for n, s in zip(info.shape, info.shards)) if info.shards else info.grid
        prefix = info.path.rstrip("/") + "/c" + info.separator
        objects: list[tuple[tuple[int, ...], str]] = []
        for path in self.fs.find(info.path):
            path = self.fs._strip_protocol(path) if not path.startswith(prefix) else path
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split(info.separator)
            if len(parts) != len(info.shape) or not all(p.isdigit() for p in parts):
                continue
            key = tuple(int(p) for p in parts)
            if all(k < n for k, n in zip(key, key_grid)):
                objects.append((key, path))
        written = np.zeros(info.grid, dtype=bool)
        if not info.shards:
            for key, _ in objects:
                written[key] = True
            return written
        per_shard = info.chunks_per_shard
        indexes = self._shard_indexes(group, info, [p for _, p in objects])
        for shard, path in objects:
            index = indexes[path]
            if index is None:
                continue
            for flat in np.flatnonzero(~((index[:, 0] == _EMPTY_ENTRY) & (index[:, 1] == _EMPTY_ENTRY))):
                inner = np.unravel_index(int(flat), per_shard)
                key = tuple(s * n + i for s, n, i in zip(shard, per_shard, inner))
                if all(k < g for k, g in zip(key, info.grid)):
                    written[key] = True
        return written

    def read(self, group: str, start: Sequence[int], size: Sequence[int], array: str = "image",
             pad_value: float = 0.0, dtype: np.dtype | type | str | None = np.float32) -> np.ndarray:
        """One box [start, start+size); voxels outside the array are `pad_value`; dtype None = the array's."""
        return self.read_boxes(group, [(start, size)], array=array, pad_value=pad_value, dtype=dtype)[0]

    def read_boxes(self, group: str, boxes: Iterable[tuple[Sequence[int], Sequence[int]]], array: str = "image",
                   pad_value: float = 0.0, dtype: np.dtype | type | str | None = np.float32) -> list[np.ndarray]:
        """Several boxes of one array; every chunk they touch is fetched and decoded once."""
        info = self.array_info(group, array)
        dtype = info.dtype if dtype is None else np.dtype(dtype)
        boxes = [(tuple(int(v) for v in s), tuple(int(v) for v in z)) for s, z in boxes]
        for start, size in boxes:
            if len(start) != len(info.shape) or len(size) != len(info.shape) or min(size) <= 0:
                raise ValueError(f"volume {group!r}: bad box start={start} size={size} for array of shape {info.shape}")
        # Boxes inside the array are overwritten completely by the chunks they touch: skip the fill.
        outputs = [np.empty(size, dtype=dtype) if _inside(start, size, info.shape)
                   else np.full(size, pad_value, dtype=dtype)
                   for start, size in boxes]
        self.stats.boxes += len(boxes)
        self.stats.bytes_returned += sum(o.size * info.dtype.itemsize for o in outputs)
        if info.fast:
            self._read_fast(group, info, boxes, outputs)
        else:
            self._read_zarr(group, info, boxes, outputs)
        return outputs

    # -- fast path: chunk objects decoded with c-blosc -------------------------------------------
    def _read_fast(self, group: str, info: _ArrayInfo, boxes, outputs) -> None:
        # Every chunk the boxes touch, with the first-axis rows [first, stop) they need from it.
        needed: dict[tuple[int, ...], tuple[int, int]] = {}
        for start, size in boxes:
            lo, hi = _clip(start, size, info.shape)
            if lo is None:
                continue
            ranges = [range(l // c, (h - 1) // c + 1) for l, h, c in zip(lo, hi, info.chunks)]
            for idx in np.ndindex(*[len(r) for r in ranges]):
                key = tuple(r[i] for r, i in zip(ranges, idx))
                origin = key[0] * info.chunks[0]
                first = max(lo[0] - origin, 0)
                stop = min(hi[0] - origin, info.chunks[0])
                if key in needed:
                    first, stop = min(first, needed[key][0]), max(stop, needed[key][1])
                needed[key] = (first, stop)
        if not needed:
            return
        keys = list(needed)
        self._fetch_cursor = 0
        try:
            if info.shards:
                blobs = self._fetch_inner_chunks(group, info, keys)
            else:
                blobs = self._fetch_objects([info.object_path(k) for k in keys])
            self._decode_and_paste(group, info, keys, needed, blobs, boxes, outputs)
        finally:
            if self._fetch_buffer is not None and len(self._fetch_buffer) > _KEEP_FETCH_BUFFER_BYTES:
                self._fetch_buffer = None  # an unusually large call: do not keep its buffer

    def _decode_and_paste(self, group: str, info: _ArrayInfo, keys: list[tuple[int, ...]],
                          needed: dict[tuple[int, ...], tuple[int, int]],
                          blobs: list[tuple[np.ndarray, int] | None], boxes, outputs) -> None:
        """Decode the rows each chunk's boxes need (blobs: (bytes, address) per key, None = never
        written) and paste them into `outputs`."""
        chunk_nbytes = int(np.prod(info.chunks)) * info.dtype.itemsize
        row_items = int(np.prod(info.chunks[1:]))
        buffer = self._chunk_buffer
        if buffer is None or len(buffer) != chunk_nbytes:
            buffer = self._chunk_buffer = np.empty(chunk_nbytes, dtype=np.uint8)
        chunk = buffer.view(info.dtype).reshape(info.chunks)
        for key, blob in zip(keys, blobs):
            if blob is None:  # never-written chunk: all fill value, unless the chunk record says otherwise
                if info.written is not None and info.written[key]:
                    raise self._missing(group, info, key)
                filled = np.full(info.chunks, info.fill_value, dtype=info.dtype)
            else:
                data, address = blob
                # blosc header: item size at byte 3, uncompressed size at bytes 4-7, block size
                # 8-11, compressed size 12-15. Checked before decoding, as blosc_cbuffer_validate
                # does: c-blosc reads block offsets from the header and trusts it.
                if len(data) < 16:
                    raise self._corrupt(group, self._chunk_name(info, key),
                                        f"{len(data)} bytes, shorter than a blosc header")
                header = bytes(data[:16])
                nbytes = int.from_bytes(header[4:8], "little")
                if nbytes != chunk_nbytes:
                    raise self._corrupt(group, self._chunk_name(info, key),
                                        f"decodes to {nbytes} bytes, expected {chunk_nbytes}")
                cbytes = int.from_bytes(header[12:16], "little")
                if cbytes != len(data):
                    raise self._corrupt(group, self._chunk_name(info, key),
                                        f"header says {cbytes} compressed bytes, the object has {len(data)}")
                first, stop = needed[key]
                self.stats.bytes_decoded += self._decode(group, info, key, data, address, header, buffer,
                                                         first * row_items, (stop - first) * row_items)
                self.stats.chunks_decoded += 1
                filled = chunk
            origin = tuple(k * c for k, c in zip(key, info.chunks))
            for (start, size), out in zip(boxes, outputs):
                _paste(filled, origin, start, size, info.shape, out)

    def _decode(self, group: str, info: _ArrayInfo, key: tuple[int, ...], data: np.ndarray | bytes, address: int,
                header: bytes, buffer: np.ndarray, first_item: int, n_items: int) -> int:
        """Decode items [first_item, first_item + n_items) of a chunk (at `address`) into their
        place in `buffer` (the whole chunk when partial decoding does not apply); return the bytes
        blosc decoded."""
        itemsize = info.dtype.itemsize
        blocksize = int.from_bytes(header[8:12], "little")
        partial = (_blosc_getitem is not None and header[3] == itemsize and blocksize > 0
                   and n_items * itemsize < len(buffer))
        try:
            if not partial:
                numcodecs.blosc.decompress(data, buffer)
                return len(buffer)
            written = _blosc_getitem(address, int(first_item), int(n_items),
                                     buffer.ctypes.data + int(first_item) * itemsize)
            if written != n_items * itemsize:
                raise RuntimeError(f"blosc_getitem returned {written}")
        except Exception as err:  # blosc reports corrupt input as an error code
            raise self._corrupt(group, self._chunk_name(info, key), f"blosc decode failed: {err}") from err
        first_block = first_item * itemsize // blocksize
        last_block = ((first_item + n_items) * itemsize - 1) // blocksize
        return min((last_block - first_block + 1) * blocksize, len(buffer))

    def _chunk_name(self, info: _ArrayInfo, key: tuple[int, ...]) -> str:
        """The chunk object (unsharded) or shard + inner chunk (sharded) of chunk `key`, for errors."""
        if not info.shards:
            return info.object_path(key)
        per_shard = info.chunks_per_shard
        shard = tuple(c // n for c, n in zip(key, per_shard))
        inner = ",".join(str(c % n) for c, n in zip(key, per_shard))
        return f"{info.object_path(shard)}[inner chunk {inner}]"

    def _take(self, nbytes: int) -> tuple[np.ndarray, int]:
        """`nbytes` of the fetch buffer (a view, valid for this call) and its address."""
        buffer = self._fetch_buffer
        if buffer is None or self._fetch_cursor + nbytes > len(buffer):
            # Views handed out earlier in this call keep the old buffer alive until the call ends.
            size = max(nbytes, 4 * 1024**2, 2 * len(buffer) if buffer is not None else 0)
            buffer = self._fetch_buffer = np.empty(size, dtype=np.uint8)
            self._fetch_address = buffer.ctypes.data
            self._fetch_cursor = 0
        at = self._fetch_cursor
        self._fetch_cursor = at + nbytes
        return buffer[at:at + nbytes], self._fetch_address + at

    def _corrupt(self, group: str, path: str, what: str) -> ChunkReadError:
        return ChunkReadError(
            f"volume {group!r} in store {self.uri}: chunk {posixpath.relpath(path, self.root)} is corrupt ({what}); "
            f"re-convert this volume (`rayssl convert ...`) or stream with `--set data.on_error=skip` to leave it out"
        )

    def _missing(self, group: str, info: _ArrayInfo, key: tuple[int, ...]) -> ChunkReadError:
        return ChunkReadError(
            f"volume {group!r} in store {self.uri}: chunk {posixpath.relpath(self._chunk_name(info, key), self.root)} "
            f"is missing, but the array's chunk record says it was written (a deleted or lost object would "
            f"read as fill value {info.fill_value}); re-convert this volume (`rayssl verify {self.uri} --fix` "
            f"or `rayssl convert ...`) or stream with `--set data.on_error=skip` to leave it out"
        )

    # -- sharded arrays: cached shard indexes + coalesced ranged reads ----------------------------
    def _fetch_inner_chunks(self, group: str, info: _ArrayInfo, keys: list[tuple[int, ...]]
                            ) -> list[tuple[np.ndarray, int] | None]:
        """Fetch inner chunks `keys` of a sharded array: (bytes, address) per key, None for a chunk
        never written. Neighbouring inner chunks of a shard are fetched in one range."""
        per_shard = info.chunks_per_shard
        shard_paths: dict[tuple[int, ...], str] = {}
        located = []  # per key: (shard path, flat inner index)
        for key in keys:
            shard = tuple(c // n for c, n in zip(key, per_shard))
            path = shard_paths.get(shard)
            if path is None:
                path = shard_paths[shard] = info.object_path(shard)
            flat = 0
            for c, n in zip(key, per_shard):
                flat = flat * n + c % n
            located.append((path, flat))
        indexes = self._shard_indexes(group, info, list(shard_paths.values()))
        wanted: dict[str, list[tuple[int, int, int]]] = {}  # shard path -> [(offset, nbytes, key position)]
        for position, (path, flat) in enumerate(located):
            index = indexes[path]
            if index is None:  # shard never written: every inner chunk is fill value
                continue
            offset, nbytes = index.item(flat, 0), index.item(flat, 1)
            if offset == _EMPTY_ENTRY and nbytes == _EMPTY_ENTRY:
                continue
            wanted.setdefault(path, []).append((offset, nbytes, position))
        # Merge neighbouring inner chunks of a shard into one range.
        ranges: list[tuple[str, int, int, list[tuple[int, int, int]]]] = []
        for path, items in wanted.items():
            items.sort()
            for item in items:
                offset, nbytes, _ = item
                if ranges and ranges[-1][0] == path and offset - ranges[-1][2] <= self._coalesce_gap:
                    last = ranges[-1]
                    ranges[-1] = (path, last[1], max(last[2], offset + nbytes), last[3] + [item])
                else:
                    ranges.append((path, offset, offset + nbytes, [item]))
        blobs: list[tuple[np.ndarray, int] | None] = [None] * len(keys)
        if self._local:
            fetched = self._read_local_ranges(group, info, keys, ranges)
        else:
            fetched = []
            for data in self._fetch_ranges(group, [(p, a, b) for p, a, b, _ in ranges]):
                view = np.frombuffer(data, dtype=np.uint8)
                fetched.append((view, view.ctypes.data))
        for (path, start, end, members), (data, address) in zip(ranges, fetched):
            if len(data) != end - start:
                raise self._corrupt(group, self._chunk_name(info, keys[members[0][2]]),
                                    f"shard {posixpath.relpath(path, self.root)} is truncated: "
                                    f"asked bytes {start}-{end}, got {len(data)}")
            for offset, nbytes, position in members:
                at = offset - start
                blobs[position] = (data[at:at + nbytes], address + at)
        return blobs

    def _read_local_ranges(self, group: str, info: _ArrayInfo, keys: list[tuple[int, ...]],
                           ranges: list[tuple[str, int, int, list[tuple[int, int, int]]]]
                           ) -> list[tuple[np.ndarray, int]]:
        """Bytes [start, end) of local shard files into the fetch buffer, one read per range and
        one open per shard."""
        out = []
        fd, open_path, size = -1, None, 0
        try:
            for path, start, end, members in ranges:
                if path != open_path:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        raise ChunkReadError(
                            f"volume {group!r} in store {self.uri}: shard {posixpath.relpath(path, self.root)} "
                            f"disappeared while reading; re-convert this volume or stream with on_error=skip") from None
                    open_path = path
                    size = os.fstat(fd).st_size
                if end > size:  # checked before the buffer is sized: a corrupt index may say anything
                    raise self._corrupt(group, self._chunk_name(info, keys[members[0][2]]),
                                        f"shard {posixpath.relpath(path, self.root)} is truncated: "
                                        f"asked bytes {start}-{end}, the file has {size}")
                view, address = self._take(end - start)
                try:
                    got = _pread_into(fd, view, start)
                except OSError as err:
                    raise ChunkReadError(f"volume {group!r} in store {self.uri}: cannot read "
                                         f"{self._chunk_name(info, keys[members[0][2]])}: {err}") from err
                out.append((view[:got], address))
                self.stats.requests += 1
                self.stats.bytes_fetched += got
        finally:
            if fd >= 0:
                os.close(fd)
        return out

    def _shard_indexes(self, group: str, info: _ArrayInfo, shard_paths: list[str]) -> dict[str, np.ndarray | None]:
        """(offset, nbytes) per inner chunk of each shard (None = the shard does not exist), from
        the LRU cache or fetched (one suffix / prefix range per shard) and checked."""
        found: dict[str, np.ndarray | None] = {}
        missing = []
        for path in shard_paths:
            if path in self._indexes:
                self._indexes.move_to_end(path)
                found[path] = self._indexes[path]
            else:
                missing.append(path)
        if not missing:
            return found
        n = info.index_nbytes
        raw = self._fetch_ranges(group, [(p, -n, None) if info.index_at_end else (p, 0, n) for p in missing],
                                 missing_ok=True)
        for path, data in zip(missing, raw):
            index = None if data is None else self._parse_index(group, path, data, info)
            found[path] = index
            self._indexes[path] = index
            self._indexes_nbytes += n
        while self._indexes_nbytes > self._index_cache_bytes and len(self._indexes) > 1:
            self._indexes.popitem(last=False)
            self._indexes_nbytes -= n
        return found

    def _parse_index(self, group: str, path: str, data: bytes, info: _ArrayInfo) -> np.ndarray:
        where = f"volume {group!r} in store {self.uri}: shard {posixpath.relpath(path, self.root)}"
        if len(data) != info.index_nbytes:
            raise ChunkReadError(f"{where} is truncated or corrupt: its index should be {info.index_nbytes} bytes, "
                                 f"the object holds {len(data)}; re-convert this volume or stream with on_error=skip")
        body, checksum = data[:-4], int.from_bytes(data[-4:], "little")
        if google_crc32c.value(body) != checksum:
            raise ChunkReadError(f"{where} is truncated or corrupt: the shard index fails its crc32c check; "
                                 f"re-convert this volume or stream with on_error=skip to leave it out")
        return np.frombuffer(body, dtype="<u8").reshape(-1, 2)

    def _fetch_ranges(self, group: str, ranges: list[tuple[str, int, int | None]],
                      missing_ok: bool = False) -> list[bytes | None]:
        """Bytes [start, end) of each (path, start, end); a negative start counts from the end.
        A missing object gives None when `missing_ok`, else an error naming it."""
        if not ranges:
            return []
        self.stats.requests += len(ranges)
        results: list[bytes | None | BaseException] = []
        if self._local:
            for path, start, end in ranges:
                try:
                    with open(path, "rb") as f:
                        if start < 0:
                            f.seek(max(start, -os.fstat(f.fileno()).st_size), os.SEEK_END)
                        else:
                            f.seek(start)
                        results.append(f.read() if end is None else f.read(end - max(start, 0)))
                except FileNotFoundError as err:
                    results.append(err)
        else:
            results = self.fs.cat_ranges([p for p, _, _ in ranges], [a for _, a, _ in ranges],
                                         [b for _, _, b in ranges], on_error="return")
        out: list[bytes | None] = []
        for (path, _, _), value in zip(ranges, results):
            if isinstance(value, FileNotFoundError):
                if not missing_ok:
                    raise ChunkReadError(
                        f"volume {group!r} in store {self.uri}: shard {posixpath.relpath(path, self.root)} disappeared "
                        f"while reading; re-convert this volume or stream with on_error=skip")
                out.append(None)
            elif isinstance(value, BaseException):
                raise ChunkReadError(f"volume {group!r} in store {self.uri}: cannot fetch "
                                     f"{posixpath.relpath(path, self.root)}: {value}") from value
            else:
                self.stats.bytes_fetched += len(value)
                out.append(value)
        return out

    def _fetch_objects(self, paths: list[str]) -> list[tuple[np.ndarray, int] | None]:
        """Whole chunk objects: (bytes, address) per path, None for a chunk never written."""
        out: list[tuple[np.ndarray, int] | None] = []
        if self._local:
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    out.append(None)
                    continue
                try:
                    view, address = self._take(os.fstat(fd).st_size)
                    got = _pread_into(fd, view, 0)
                finally:
                    os.close(fd)
                out.append((view[:got], address))
                self.stats.bytes_fetched += got
            self.stats.requests += len(paths)
            return out
        fetched = self.fs.cat(paths, on_error="return")
        blobs = {}
        for path, value in fetched.items():
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, Exception):
                raise ChunkReadError(f"store {self.uri}: cannot fetch {path}: {value}") from value
            blobs[self.fs._strip_protocol(path) if path not in paths else path] = value
        for path in paths:
            data = blobs.get(path)
            if data is None:
                out.append(None)
            else:
                view = np.frombuffer(data, dtype=np.uint8)
                out.append((view, view.ctypes.data))
                self.stats.bytes_fetched += len(data)
        self.stats.requests += len(paths)
        return out

    # -- general path: the zarr API (sharded or other codecs) -------------------------------------
    def _read_zarr(self, group: str, info: _ArrayInfo, boxes, outputs) -> None:
        try:
            arr = zarr.open_array(store=self.uri.rstrip("/") + "/" + group + "/" + posixpath.basename(info.path), mode="r")
        except Exception as err:
            raise ChunkReadError(f"volume {group!r} in store {self.uri}: cannot open {posixpath.basename(info.path)}: {err}") from err
        for (start, size), out in zip(boxes, outputs):
            lo, hi = _clip(start, size, info.shape)
            if lo is None:
                continue
            try:
                data = arr[tuple(slice(l, h) for l, h in zip(lo, hi))]
            except Exception as err:
                raise ChunkReadError(
                    f"volume {group!r} in store {self.uri}: reading box {start}+{size} failed ({err}); "
                    f"a chunk is probably corrupt: re-convert this volume or stream with `--set data.on_error=skip`"
                ) from err
            self.stats.bytes_decoded += data.nbytes
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = data


def read_box(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float,
             dtype: np.dtype | type | None = None) -> np.ndarray:
    """Box [start, start + size) of an in-memory 3D array, voxels outside it `fill`: what
    `StoreReader.read` returns for a store, for arrays already in memory. dtype None = the array's."""
    out = np.full(tuple(int(s) for s in size), fill, dtype=array.dtype if dtype is None else dtype)
    src = tuple(slice(max(int(s), 0), min(int(s) + int(z), n)) for s, z, n in zip(start, size, array.shape))
    if any(sl.start >= sl.stop for sl in src):
        return out
    dst = tuple(slice(sl.start - int(s), sl.stop - int(s)) for sl, s in zip(src, start))
    out[dst] = array[src]
    return out


def _inside(start, size, shape) -> bool:
    return all(s >= 0 and s + z <= n for s, z, n in zip(start, size, shape))


def _clip(start, size, shape):
    lo = tuple(max(s, 0) for s in start)
    hi = tuple(min(s + z, n) for s, z, n in zip(start, size, shape))
    if any(h <= l for l, h in zip(lo, hi)):
        return None, None
    return lo, hi


def _paste(chunk: np.ndarray, origin, start, size, shape, out: np.ndarray) -> None:
    """Copy the part of `chunk` (placed at `origin`) that falls inside box (start, size) into `out`."""
    src, dst = [], []
    for o, c, s, z, n in zip(origin, chunk.shape, start, size, shape):
        lo = max(o, s, 0)
        hi = min(o + c, s + z, n)
        if hi <= lo:
            return
        src.append(slice(lo - o, hi - o))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = chunk[tuple(src)]
