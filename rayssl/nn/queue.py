"""FIFO memory queues of past momentum embeddings (MoCo-style), one or one per key (landmark)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MemoryQueue:
    """A FIFO queue of `length` embeddings of dimension `dim`, used as negatives.

    Starts with random unit vectors, as MoCo does, so it can be used from step 0. Plain tensors, not
    an nn.Module: the queue is method state (checkpointed by the method), never a DDP buffer, so DDP
    does not broadcast it every step. `enqueue` is called with keys already gathered from all ranks,
    so every rank holds the same queue.
    """

    def __init__(self, length: int, dim: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if length < 1 or dim < 1:
            raise ValueError(f"queue length and dim must be >= 1, got length={length}, dim={dim}")
        generator = torch.Generator().manual_seed(seed)
        self.buffer = F.normalize(torch.randn(length, dim, generator=generator), dim=1).to(device)
        self.pointer = 0  # index of the oldest entry (next to be overwritten)

    @property
    def length(self) -> int:
        return self.buffer.shape[0]

    def to(self, device: torch.device | str) -> "MemoryQueue":
        self.buffer = self.buffer.to(device)
        return self

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

    def ordered(self) -> torch.Tensor:
        """Entries from oldest to newest."""
        return torch.roll(self.buffer, shifts=-self.pointer, dims=0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.detach().cpu().clone(), "pointer": torch.tensor(self.pointer)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(
                f"queue shape in checkpoint {tuple(state['buffer'].shape)} != configured "
                f"{tuple(self.buffer.shape)}: resume with the same queue length and embedding dim"
            )
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype).clone()
        self.pointer = int(state["pointer"])


class KeyedMemoryQueues:
    """One FIFO queue per key (e.g. per anatomical landmark), stored as one [n_keys, length, dim] tensor.

    `enqueue(keys, ids)` sends each embedding only to the queue of its own id, in batch order, so a
    queue only ever holds embeddings of its own landmark (DrasCLR's conditional memory bank).
    """

    def __init__(self, n_keys: int, length: int, dim: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if n_keys < 1 or length < 1 or dim < 1:
            raise ValueError(f"n_keys, length and dim must be >= 1, got {n_keys}, {length}, {dim}")
        generator = torch.Generator().manual_seed(seed)
        self.buffer = F.normalize(torch.randn(n_keys, length, dim, generator=generator), dim=2).to(device)
        self.pointers = torch.zeros(n_keys, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.buffer.shape[1]

    def to(self, device: torch.device | str) -> "KeyedMemoryQueues":
        self.buffer = self.buffer.to(device)
        self.pointers = self.pointers.to(device)
        return self

    def negatives(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, length, dim]: the queue of each query's id."""
        return self.buffer[ids.to(self.buffer.device)]

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.detach().cpu().clone(), "pointers": self.pointers.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(
                f"memory bank shape in checkpoint {tuple(state['buffer'].shape)} != configured "
                f"{tuple(self.buffer.shape)}: resume with the same landmarks, queue size and dim"
            )
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype).clone()
        self.pointers = state["pointers"].to(self.pointers.device).clone()
