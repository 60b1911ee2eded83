"""StoreReader: the chunk-level fast path equals the zarr API, pads outside, and names corrupt chunks."""

import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from rayssl.data.read import ChunkReadError, StoreReader


def _write(root, name, data, chunks=(16, 16, 16), shards=None):
    group = zarr.open_group(root, mode="a")
    arr = group.create_group(name).create_array(
        "image", shape=data.shape, chunks=chunks, shards=shards, dtype=data.dtype,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
    arr[:] = data
    return arr


def _reference(data, start, size, pad):
    out = np.full(size, pad, dtype=np.float32)
    src, dst = [], []
    for s, z, n in zip(start, size, data.shape):
        lo, hi = max(s, 0), min(s + z, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, max(lo, hi) - s))
    out[tuple(dst)] = data[tuple(src)]
    return out


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    # Smooth-ish CT-like values so compression is realistic, plus noise.
    base = np.cumsum(rng.normal(0, 5, (40, 36, 30)), axis=0).astype(np.int16)
    return base - 500


BOXES = [((0, 0, 0), (8, 8, 8)), ((5, 3, 2), (20, 20, 20)), ((-4, 10, 25), (12, 30, 10)),
         ((30, 30, 20), (16, 16, 16)), ((-50, -50, -50), (4, 4, 4))]


def test_fast_path_matches_zarr_and_pads(tmp_path, volume):
    store = str(tmp_path / "s.zarr")
    arr = _write(store, "v", volume)
    reader = StoreReader(store)
    assert reader.array_info("v").fast
    for start, size in BOXES:
        got = reader.read("v", start, size, pad_value=-1024)
        np.testing.assert_array_equal(got, _reference(volume, start, size, -1024))
    # Inside the volume the fast path is exactly zarr's own read.
    np.testing.assert_array_equal(reader.read("v", (5, 3, 2), (20, 20, 20)), arr[5:25, 3:23, 2:22].astype(np.float32))


def test_only_touched_chunks_are_decoded(tmp_path, volume):
    store = str(tmp_path / "s.zarr")
    _write(store, "v", volume)
    reader = StoreReader(store)
    reader.read("v", (0, 0, 0), (16, 16, 16))  # exactly one 16^3 chunk
    assert reader.stats.chunks_decoded == 1
    reader.read_boxes("v", [((0, 0, 0), (16, 16, 16)), ((4, 4, 4), (8, 8, 8))])  # shared chunk decoded once
    assert reader.stats.chunks_decoded == 2
    reader.read("v", (10, 10, 10), (10, 10, 10))  # straddles 2x2x2 chunks
    assert reader.stats.chunks_decoded == 10


def test_only_needed_blosc_blocks_are_decoded(tmp_path):
    """64^3 int16 chunks hold four 128 KiB blosc blocks of 16 first-axis slices each: a box needing
    slices 40-47 of a chunk decodes one of them, and every box still equals zarr's own read."""
    rng = np.random.default_rng(1)
    data = (np.cumsum(rng.normal(0, 5, (128, 64, 64)), axis=0) - 500).astype(np.int16)
    store = str(tmp_path / "s.zarr")
    arr = _write(store, "v", data, chunks=(64, 64, 64))
    reader = StoreReader(store)
    got = reader.read("v", (40, 0, 0), (8, 64, 64), dtype=None)
    np.testing.assert_array_equal(got, data[40:48])
    assert reader.stats.bytes_decoded == 128 * 1024  # one block, not the 512 KiB chunk
    # Several boxes in one call share a chunk: the decoded rows cover all of them.
    boxes = [((40, 5, 7), (30, 20, 20)), ((3, 0, 0), (10, 64, 64)), ((60, 60, 60), (40, 8, 8)),
             ((-5, -5, -5), (140, 70, 70)), ((100, 10, 10), (12, 12, 12))]
    for start, size in boxes:  # one box per call, then all in one call
        np.testing.assert_array_equal(reader.read("v", start, size, pad_value=-7),
                                      _reference(data, start, size, -7))
    for (start, size), got in zip(boxes, reader.read_boxes("v", boxes, pad_value=-7)):
        np.testing.assert_array_equal(got, _reference(data, start, size, -7))
    np.testing.assert_array_equal(reader.read("v", (0, 0, 0), (128, 64, 64), dtype=None), arr[:])


def test_corrupt_block_offset_fails_a_partial_decode_cleanly(tmp_path):
    """A block offset pointing past the object is reported by blosc_getitem, not read beyond it."""
    data = np.zeros((64, 64, 64), dtype=np.int16) + np.arange(64, dtype=np.int16)[:, None, None]
    store = str(tmp_path / "s.zarr")
    _write(store, "v", data, chunks=(64, 64, 64))
    chunk = os.path.join(store, "v", "image", "c", "0", "0", "0")
    with open(chunk, "r+b") as f:
        f.seek(16 + 4 * 2)  # the third block's start offset in the blosc header
        f.write((2**31 - 1).to_bytes(4, "little"))
    with pytest.raises(ChunkReadError, match="image/c/0/0/0 is corrupt"):
        StoreReader(store).read("v", (36, 0, 0), (8, 64, 64))


def test_sharded_arrays_take_the_fast_path_and_agree(tmp_path, volume):
    store = str(tmp_path / "s.zarr")
    _write(store, "plain", volume)
    arr = _write(store, "sharded", volume, chunks=(8, 8, 8), shards=(16, 16, 16))
    reader = StoreReader(store)
    assert reader.array_info("sharded").fast and reader.array_info("sharded").shards == (16, 16, 16)
    for start, size in BOXES:
        np.testing.assert_array_equal(reader.read("sharded", start, size, pad_value=3),
                                      reader.read("plain", start, size, pad_value=3))
    np.testing.assert_array_equal(reader.read("sharded", (0, 0, 0), volume.shape, dtype=None), arr[:])
    for start, size in BOXES:  # the same boxes through the zarr API agree too
        np.testing.assert_array_equal(reader.read("sharded", start, size, pad_value=3),
                                      _reference(volume, start, size, 3))


def test_shard_index_is_read_once_and_neighbours_coalesce(tmp_path, volume):
    """One shard of 2x2x2 inner chunks: the first box costs the index + one merged range, the
    next box in the same shard only its range; the index cache stays within its byte bound."""
    store = str(tmp_path / "s.zarr")
    _write(store, "v", volume, chunks=(8, 8, 8), shards=(16, 16, 16))
    reader = StoreReader(store)
    reader.read("v", (0, 0, 0), (16, 16, 16))  # all 8 inner chunks of shard (0, 0, 0)
    assert reader.stats.requests == 2 and reader.stats.chunks_decoded == 8
    reader.read("v", (2, 2, 2), (4, 4, 4))
    assert reader.stats.requests == 3
    small = StoreReader(store, index_cache_bytes=1)  # keeps only the newest index
    for start in ((0, 0, 0), (16, 0, 0), (0, 0, 0)):
        small.read("v", start, (4, 4, 4))
    assert small.stats.requests == 6 and len(small._indexes) == 1


def test_local_shards_read_only_the_inner_chunks_a_box_needs(tmp_path):
    """On a local file the gap between two inner chunks of a shard is not read (one read per
    chunk), and the fetch/decode buffers reused across calls never leak into earlier crops."""
    noise = np.random.default_rng(2).integers(-1000, 1000, (64, 64, 64)).astype(np.int16)  # ~64 KiB per chunk
    store = str(tmp_path / "s.zarr")
    _write(store, "v", noise, chunks=(32, 32, 32), shards=(64, 64, 64))
    data = open(os.path.join(store, "v", "image", "c", "0", "0", "0"), "rb").read()
    index = np.frombuffer(data[-(16 * 8 + 4):-4], dtype="<u8").reshape(-1, 2)
    # A neighbour of inner chunk (0,0,0) that is not next to it in the shard file (zarr writes
    # inner chunks in Morton order, so some face neighbours lie other chunks apart).
    axis = next(a for a in range(3) if index[2 ** (2 - a), 0] != index[0].sum())
    neighbour = int(np.ravel_multi_index(tuple(int(a == axis) for a in range(3)), (2, 2, 2)))
    reader = StoreReader(store)
    reader.read("v", (0, 0, 0), (4, 4, 4))  # the index + inner chunk (0, 0, 0)
    assert reader.stats.requests == 2
    before = reader.stats.bytes_fetched
    start, size = [0, 0, 0], [4, 4, 4]
    start[axis], size[axis] = 28, 8  # straddles inner chunks (0,0,0) and the neighbour
    first = reader.read("v", start, size, pad_value=0)
    assert reader.stats.requests == 4  # one read each: the chunks between them are not read
    assert reader.stats.bytes_fetched - before == int(index[0, 1] + index[neighbour, 1])
    kept = first.copy()
    for other in ((40, 40, 40), (0, 30, 30), (60, 0, 10)):  # other chunks through the same buffers
        reader.read("v", other, (8, 8, 8))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(first, _reference(noise, start, size, 0))


def test_truncated_or_corrupt_shard_is_named(tmp_path, volume):
    store = str(tmp_path / "s.zarr")
    _write(store, "v", volume, chunks=(8, 8, 8), shards=(16, 16, 16))
    shard = os.path.join(store, "v", "image", "c", "1", "0", "0")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ChunkReadError, match=r"volume 'v'.*shard v/image/c/1/0/0 is truncated or corrupt"):
        StoreReader(store).read("v", (16, 0, 0), (4, 4, 4))
    # An inner chunk pointing past the end of its shard (index intact, data cut): named too.
    _write(store, "w", volume, chunks=(8, 8, 8), shards=(16, 16, 16))
    shard = os.path.join(store, "w", "image", "c", "0", "0", "0")
    data = open(shard, "rb").read()
    index = np.frombuffer(data[-(16 * 8 + 4):-4], dtype="<u8").reshape(-1, 2).copy()
    index[0, 0] = len(data) * 4  # inner chunk (0,0,0) now starts past the end
    body = index.tobytes()
    import google_crc32c
    with open(shard, "wb") as f:
        f.write(data[:-(16 * 8 + 4)] + body + google_crc32c.value(body).to_bytes(4, "little"))
    with pytest.raises(ChunkReadError, match=r"'w'.*image/c/0/0/0\[inner chunk 0,0,0\]"):
        StoreReader(store).read("w", (0, 0, 0), (4, 4, 4))
    # An index entry claiming an absurd size is refused before any buffer is sized for it.
    index[0] = (0, 2**62)
    body = index.tobytes()
    with open(shard, "wb") as f:
        f.write(data[:-(16 * 8 + 4)] + body + google_crc32c.value(body).to_bytes(4, "little"))
    with pytest.raises(ChunkReadError, match=r"inner chunk 0,0,0\].*truncated"):
        StoreReader(store).read("w", (0, 0, 0), (4, 4, 4))
    # A shard never written (all fill value) reads as fill, like a missing unsharded chunk.
    os.remove(os.path.join(store, "v", "image", "c", "0", "0", "0"))
    assert (StoreReader(store).read("v", (0, 0, 0), (4, 4, 4), pad_value=9) == 0).all()


def test_fsspec_memory_store(volume):
    arr = zarr.open_group("memory://rayssl-test.zarr", mode="w").create_group("v").create_array(
        "image", shape=volume.shape, chunks=(16, 16, 16), dtype=volume.dtype)
    arr[:] = volume
    reader = StoreReader("memory://rayssl-test.zarr")
    for start, size in BOXES:
        np.testing.assert_array_equal(reader.read("v", start, size, pad_value=0), _reference(volume, start, size, 0))


def test_corrupt_chunk_is_named(tmp_path, volume):
    store = str(tmp_path / "s.zarr")
    _write(store, "v", volume)
    chunk = os.path.join(store, "v", "image", "c", "1", "0", "0")
    with open(chunk, "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 40)
    with open(chunk, "ab") as f:
        f.truncate(60)
    reader = StoreReader(store)
    with pytest.raises(ChunkReadError) as err:
        reader.read("v", (16, 0, 0), (4, 4, 4))
    message = str(err.value)
    assert "'v'" in message and "image/c/1/0/0" in message and "re-convert" in message
    # Boxes that avoid the bad chunk still read.
    assert reader.read("v", (0, 0, 0), (4, 4, 4)).shape == (4, 4, 4)


def test_missing_array_is_explained(tmp_path, volume):
    store = str(tmp_path / "s.zarr")
    _write(store, "v", volume)
    with pytest.raises(ChunkReadError, match="array 'mask' not found"):
        StoreReader(store).read("v", (0, 0, 0), (4, 4, 4), array="mask")
