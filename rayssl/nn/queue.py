"""FIFO memory queues of past momentum embeddings (MoCo-style), one or one per key (landmark)."""

from __future__ import annotations

import torch


class MemoryQueue:
    """A FIFO queue of `length` embeddings of dimension `dim`, used as negatives.

    Starts empty (MoCo starts with random unit vectors; those are easy negatives that make a young
    run's InfoNCE look better than chance, issue 24): only the `filled` entries written so far are
    negatives (`negatives()`), so the InfoNCE chance level is ln(1 + filled) and an empty queue
    gives a loss term of exactly 0 with no gradient. Plain tensors, not an nn.Module: the queue is
    method state (checkpointed by the method), never a DDP buffer, so DDP does not broadcast it
    every step. `enqueue` is called with keys already gathered from all ranks, so every rank holds
    the same queue.
    """

    def __init__(self, length: int, dim: int, device: torch.device | str = "cpu") -> None:
        if length < 1 or dim < 1:
            raise ValueError(f"queue length and dim must be >= 1, got length={length}, dim={dim}")
        self.buffer = torch.zeros(length, dim, device=device)
        self.pointer = 0  # index of the oldest entry (next to be overwritten)
        self.filled = 0  # entries written so far, at most `length`: buffer[:filled] are valid

    @property
    def length(self) -> int:
        return self.buffer.shape[0]

    def to(self, device: torch.device | str) -> "MemoryQueue":
        self.buffer = self.buffer.to(device)
        return self

    def valid_negatives(self) -> int:
        """How many negatives `negatives()` returns now (the K of the chance level ln(1 + K))."""
        return self.filled

    def negatives(self) -> torch.Tensor:
        """[filled, dim]: the entries written so far (all `length` once the queue has wrapped).

        The queue fills from index 0, so until it wraps the valid entries are the first `filled`.
        """
        return self.buffer[: self.filled]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Insert `keys` [N, dim], overwriting the oldest entries (FIFO, wraps around)."""
        keys = keys.detach().to(self.buffer.dtype)
        n = keys.shape[0]
        if n >= self.length:
            keys = keys[-self.length :]
            n = self.length
        idx = (self.pointer + torch.arange(n, device=self.buffer.device)) % self.length
        self.buffer[idx] = keys
        self.pointer = int((self.pointer + n) % self.length)
        self.filled = min(self.length, self.filled + n)

    def ordered(self) -> torch.Tensor:
        """Valid entries from oldest to newest."""
        if self.filled < self.length:
            return self.buffer[: self.filled]
        return torch.roll(self.buffer, shifts=-self.pointer, dims=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.detach().cpu().clone(), "pointer": torch.tensor(self.pointer),
                "filled": torch.tensor(self.filled)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores buffer, pointer and fill count. A checkpoint from before the fill count (queues
        that started as random unit vectors) counts every entry as valid, as it was trained."""
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(
                f"queue shape in checkpoint {tuple(state['buffer'].shape)} != configured "
                f"{tuple(self.buffer.shape)}: resume with the same queue length and embedding dim"
            )
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype).clone()
        self.pointer = int(state["pointer"])
        self.filled = int(state["filled"]) if "filled" in state else self.length


class KeyedMemoryQueues:
    """One FIFO queue per key (e.g. per anatomical landmark), stored as one [n_keys, length, dim] tensor.

    `enqueue(keys, ids)` sends each embedding only to the queue of its own id, in batch order, so a
    queue only ever holds embeddings of its own landmark (DrasCLR's conditional memory bank). Every
    queue starts empty; `filled[i]` counts the entries of queue i written so far, and
    `valid_mask(ids)` marks them, so unfilled entries are never negatives (see MemoryQueue).
    """

    def __init__(self, n_keys: int, length: int, dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if n_keys < 1 or length < 1 or dim < 1:
            raise ValueError(f"n_keys, length and dim must be >= 1, got {n_keys}, {length}, {dim}")
        self.buffer = torch.zeros(n_keys, length, dim, device=device, dtype=dtype)
        self.pointers = torch.zeros(n_keys, dtype=torch.long, device=device)
        self.filled = torch.zeros(n_keys, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    def to(self, device: torch.device | str) -> "KeyedMemoryQueues":
        self.buffer = self.buffer.to(device)
        self.pointers = self.pointers.to(device)
        self.filled = self.filled.to(device)
        return self

    def negatives(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, length, dim]: the queue of each query's id (only `valid_mask(ids)` entries are real)."""
        return self.buffer[ids.to(self.buffer.device)]

    def valid_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, length] bool: True where the queue of each query's id holds a written entry.

        Each queue fills from index 0, so its first `filled[id]` entries are the valid ones."""
        counts = self.filled[ids.to(self.filled.device).long()]
        return torch.arange(self.length, device=counts.device)[None, :] < counts[:, None]

    def negatives_with_batch_fallback(self, ids: torch.Tensor, batch_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives [B, length + B, dim] and their mask [B, length + B] for queries with ids `ids` [B]
        whose own keys are `batch_keys` [B, dim]: the filled entries of each query's queue, and for a
        query whose queue is still empty, the other keys of the batch instead (so a key's first step
        still contrasts, as in-batch InfoNCE does; a batch of one then has no negatives)."""
        ids = ids.to(self.buffer.device).long()
        queue = self.buffer[ids].to(batch_keys.dtype)
        others = ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
        empty = self.filled[ids] == 0
        batch = batch_keys.detach().to(queue.device)[None].expand(len(ids), -1, -1)
        return torch.cat([queue, batch], dim=1), torch.cat([self.valid_mask(ids), others & empty[:, None]], dim=1)

    def valid_negatives(self, ids: torch.Tensor) -> torch.Tensor:
        """[B] long: negatives each query of a batch with ids `ids` has now, as
        `negatives_with_batch_fallback` gives them: K of its chance level ln(1 + K)."""
        filled = self.filled[ids.to(self.filled.device).long()]
        return torch.where(filled > 0, filled, torch.full_like(filled, len(ids) - 1))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        keys = keys.detach().to(self.buffer.dtype)
        ids = ids.to(self.buffer.device).long()
        # Sequential over the batch keeps FIFO order exact when one id appears several times;
        # batches are small (tens of keys), so this is cheap next to the network.
        for key, i in zip(keys, ids.tolist()):
            p = int(self.pointers[i])
            self.buffer[i, p] = key
            self.pointers[i] = (p + 1) % self.length
            self.filled[i] = min(self.length, int(self.filled[i]) + 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.detach().cpu().clone(), "pointers": self.pointers.detach().cpu().clone(),
                "filled": self.filled.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores buffer, pointers and fill counts; a checkpoint without fill counts (queues that
        started random) counts every entry as valid, as it was trained."""
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(
                f"memory bank shape in checkpoint {tuple(state['buffer'].shape)} != configured "
                f"{tuple(self.buffer.shape)}: resume with the same landmarks, queue size and dim"
            )
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype).clone()
        self.pointers = state["pointers"].to(self.pointers.device).clone()
        if "filled" in state:
            self.filled = state["filled"].to(self.pointers.device).long().clone()
        else:
            self.filled = torch.full_like(self.pointers, self.length)


class NamedQueues:
    """A method's memory queues by name (MLSSCL: one per target view; DrasCLR: its landmark bank),
    moved, saved and restored together. Method state, like the queues themselves (never DDP buffers).

    `state_dict()` is flat, `<prefix><name>_<field>` (e.g. "queue_axial_buffer"); `load_state_dict`
    restores every queue it holds from those keys (each queue accepts a checkpoint from before its
    fill counts) and ignores other keys, so a method may keep its own counters beside them.
    """

    def __init__(self, queues: dict[str, MemoryQueue | KeyedMemoryQueues] | None = None,
                 prefix: str = "queue_") -> None:
        self.queues: dict[str, MemoryQueue | KeyedMemoryQueues] = dict(queues or {})
        self.prefix = prefix

    def __getitem__(self, name: str) -> MemoryQueue | KeyedMemoryQueues:
        return self.queues[name]

    def __setitem__(self, name: str, queue: MemoryQueue | KeyedMemoryQueues) -> None:
        self.queues[name] = queue

    def __contains__(self, name: str) -> bool:
        return name in self.queues

    def items(self):
        return self.queues.items()

    def values(self):
        return self.queues.values()

    def to(self, device: torch.device | str) -> "NamedQueues":
        for queue in self.queues.values():
            queue.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}{name}_{field}": value for name, queue in self.queues.items()
                for field, value in queue.state_dict().items()}

    def saved_fields(self, state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """The fields of queue `name` in `state` (a `state_dict()`), e.g. to size the queue before loading."""
        head = f"{self.prefix}{name}_"
        return {key[len(head):]: value for key, value in state.items() if key.startswith(head)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, queue in self.queues.items():
            queue.load_state_dict(self.saved_fields(state, name))
