"""Tests of rayssl.nn.queue: queues start empty, unfilled entries are never negatives, the batch stands in
while a queue is empty, fill counts survive a checkpoint (and old checkpoints still load)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayssl.methods.drasclr import DrasCLR, DrasCLRConfig, neighbor_info_nce
from rayssl.methods.mlsscl import MLSSCL, MLSSCLConfig
from rayssl.nn.contrastive import info_nce
from rayssl.nn.queue import KeyedMemoryQueues, MemoryQueue, NamedQueues


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


class TestMemoryQueue:
    def test_an_empty_queue_contributes_no_negatives(self):
        queue = MemoryQueue(8, 4)
        assert queue.filled == queue.valid_negatives() == 0 and queue.negatives().shape == (0, 4)
        q, k = _unit(3, 4, 0).requires_grad_(), _unit(3, 4, 1)
        loss = info_nce(q, k, queue.negatives(), 0.2)
        assert loss.item() == 0.0  # chance ln(1 + 0): no negatives, nothing to contrast
        loss.backward()
        assert q.grad.abs().sum() == 0

    def test_a_partly_filled_queue_gives_only_its_filled_entries(self):
        queue = MemoryQueue(8, 4)
        keys = _unit(3, 4, 2)
        queue.enqueue(keys)
        assert queue.filled == queue.valid_negatives() == 3
        torch.testing.assert_close(queue.negatives(), keys)
        torch.testing.assert_close(queue.ordered(), keys)
        q, k = _unit(2, 4, 0), _unit(2, 4, 1)
        # By hand: L = -log(e^{q·k/τ} / (e^{q·k/τ} + Σ_{n filled} e^{q·n/τ})), τ = 1.
        pos = (q * k).sum(1)
        neg = torch.exp(q @ keys.t()).sum(1)
        expected = -(pos - torch.log(torch.exp(pos) + neg)).mean()
        assert info_nce(q, k, queue.negatives(), 1.0).item() == pytest.approx(expected.item(), rel=1e-6)
        # The 5 unfilled (zero) slots would have added 5 x e^0 to the sum.
        assert info_nce(q, k, queue.buffer, 1.0).item() != pytest.approx(expected.item(), rel=1e-3)

    def test_fill_count_saturates_on_wrap_and_order_is_fifo(self):
        queue = MemoryQueue(4, 2)
        keys = _unit(6, 2, 3)
        queue.enqueue(keys[:3])
        queue.enqueue(keys[3:])
        assert queue.filled == 4 and queue.pointer == 2
        torch.testing.assert_close(queue.ordered(), keys[2:])
        assert queue.negatives().shape == (4, 2)

    def test_state_round_trip_and_a_checkpoint_without_fill_count(self):
        queue = MemoryQueue(8, 4)
        queue.enqueue(_unit(3, 4, 4))
        restored = MemoryQueue(8, 4)
        restored.load_state_dict(queue.state_dict())
        assert (restored.filled, restored.pointer) == (3, 3)
        torch.testing.assert_close(restored.negatives(), queue.negatives())
        legacy = {k: v for k, v in queue.state_dict().items() if k != "filled"}
        old = MemoryQueue(8, 4)
        old.load_state_dict(legacy)  # queues that started random: every entry was a negative then
        assert old.filled == 8
        with pytest.raises(ValueError, match="queue length"):
            MemoryQueue(9, 4).load_state_dict(queue.state_dict())


class TestKeyedMemoryQueues:
    def test_empty_and_partly_filled_queues_mask_unfilled_entries(self):
        bank = KeyedMemoryQueues(3, 4, 2)
        ids = torch.tensor([0, 1, 2])
        assert not bank.valid_mask(ids).any()
        bank.enqueue(_unit(3, 2, 5), torch.tensor([0, 0, 1]))
        assert bank.filled.tolist() == [2, 1, 0]
        assert bank.valid_mask(ids).tolist() == [[True, True, False, False], [True, False, False, False], [False] * 4]
        q, k = _unit(3, 2, 6), _unit(3, 2, 7)
        masked = info_nce(q, k, bank.negatives(ids), 0.5, reduction="none", negative_mask=bank.valid_mask(ids))
        # Row by row with only the filled entries.
        for i, n in enumerate(bank.filled.tolist()):
            alone = info_nce(q[i:i + 1], k[i:i + 1], bank.buffer[i, :n][None], 0.5, reduction="none")
            assert masked[i].item() == pytest.approx(alone.item(), rel=1e-6)
        assert masked[2].item() == 0.0  # an empty queue: no negatives

    def test_batch_stands_in_while_a_queue_is_empty(self):
        bank = KeyedMemoryQueues(2, 4, 2)
        bank.enqueue(_unit(4, 2, 8), torch.tensor([1, 1, 1, 1]))  # queue 1 full, queue 0 empty
        ids = torch.tensor([0, 0, 1])
        keys = _unit(3, 2, 9)
        negatives, mask = bank.negatives_with_batch_fallback(ids, keys)
        assert negatives.shape == (3, 4 + 3, 2)
        # Rows 0, 1 (empty queue 0): the batch's other keys; row 2 (full queue 1): its queue only.
        assert mask.tolist() == [[False] * 4 + [False, True, True], [False] * 4 + [True, False, True],
                                 [True] * 4 + [False] * 3]
        assert bank.valid_negatives(ids).tolist() == mask.sum(1).tolist() == [2, 2, 4]
        q = _unit(3, 2, 10)
        loss = info_nce(q, keys, negatives, 1.0, reduction="none", negative_mask=mask)
        pos = (q[0] * keys[0]).sum()
        expected = -(pos - torch.log(torch.exp(pos) + torch.exp(q[0] @ keys[1]) + torch.exp(q[0] @ keys[2])))
        assert loss[0].item() == pytest.approx(expected.item(), rel=1e-6)
        # Neighbour loss with the same mask: finite, and row 2 uses its queue.
        neighbor = neighbor_info_nce(torch.stack([q, q], 1), keys, negatives, 1.0, negative_mask=mask)
        assert torch.isfinite(neighbor)

    def test_state_round_trip_and_a_checkpoint_without_fill_counts(self):
        bank = KeyedMemoryQueues(3, 4, 2, dtype=torch.float16)
        bank.enqueue(_unit(5, 2, 11), torch.tensor([0, 2, 2, 2, 2]))
        restored = KeyedMemoryQueues(3, 4, 2, dtype=torch.float16)
        restored.load_state_dict(bank.state_dict())
        assert restored.filled.tolist() == [1, 0, 4] and restored.buffer.dtype == torch.float16
        torch.testing.assert_close(restored.buffer, bank.buffer)
        old = KeyedMemoryQueues(3, 4, 2)
        old.load_state_dict({k: v for k, v in bank.state_dict().items() if k != "filled"})
        assert old.filled.tolist() == [4, 4, 4]


class TestNamedQueues:
    def test_queues_of_both_kinds_round_trip_by_name_and_leave_other_keys(self):
        queues = NamedQueues({"axial": MemoryQueue(4, 3), "bank": KeyedMemoryQueues(2, 3, 3)})
        queues["axial"].enqueue(_unit(5, 3, 1))
        queues["bank"].enqueue(_unit(2, 3, 2), torch.tensor([1, 1]))
        state = {**queues.state_dict(), "enqueued": torch.tensor([0, 2])}
        assert {"queue_axial_buffer", "queue_axial_pointer", "queue_axial_filled", "queue_bank_pointers"} <= set(state)
        assert set(queues.saved_fields(state, "bank")) == {"buffer", "pointers", "filled"}
        restored = NamedQueues({"axial": MemoryQueue(4, 3), "bank": KeyedMemoryQueues(2, 3, 3)})
        restored.load_state_dict(state)  # "enqueued" is the method's own: ignored
        torch.testing.assert_close(restored["axial"].ordered(), queues["axial"].ordered())
        assert (restored["axial"].pointer, restored["axial"].filled) == (queues["axial"].pointer, 4)
        torch.testing.assert_close(restored["bank"].buffer, queues["bank"].buffer)
        assert restored["bank"].filled.tolist() == [0, 2]


class TestMethods:
    TINY = dict(clip_length=4, long_stride=3, short_stride=2, plane_size=12, image_size=12,
                resnet_widen_factor=0.125, proj_dim=16, queue_length=8, intensity="none")

    def test_mlsscl_first_step_uses_in_batch_negatives_then_the_filled_queue(self):
        torch.manual_seed(0)
        method = MLSSCL(MLSSCLConfig(**self.TINY, temperature=1.0))
        model = method.build_model().train()
        method.setup(model, torch.device("cpu"))
        batch = {v: torch.randn(2, 1, 4, 12, 12) for v in ("axial", "coronal", "sagittal", "short")}
        outputs = model(batch)
        assert method.valid_negatives(batch_size=2) == {"axial": 1, "coronal": 1, "sagittal": 1}
        losses = method.loss(outputs, batch)
        in_batch = info_nce(outputs["online_short"], outputs["target_axial"], None, 1.0)
        assert losses["long_short"].item() == pytest.approx(in_batch.item(), rel=1e-6)
        method.after_step(model, outputs, 1, 10)
        assert method.valid_negatives(batch_size=2) == {"axial": 2, "coronal": 2, "sagittal": 2}
        queue = method._queues["axial"].negatives()
        assert queue.shape == (2, 16)
        with_queue = info_nce(outputs["online_short"], outputs["target_axial"], queue, 1.0)
        assert method.loss(outputs, batch)["long_short"].item() == pytest.approx(with_queue.item(), rel=1e-6)
        # Chance with the queue's K = 2 is ln 3 per term; an untrained model sits near it.
        assert abs(with_queue.item() - math.log(3)) < 1.0

    def test_mlsscl_checkpoint_keeps_fill_counts_and_old_checkpoints_load(self):
        method = MLSSCL(MLSSCLConfig(**self.TINY))
        method.after_step(method.build_model(), {f"target_{v}": torch.randn(2, 16) for v in ("axial", "coronal", "sagittal")}, 1, 10)
        state = method.state_dict()
        assert int(state["queue_axial_filled"]) == 2
        restored = MLSSCL(MLSSCLConfig(**self.TINY))
        restored.load_state_dict(state)
        assert restored.valid_negatives(2)["axial"] == 2
        legacy = MLSSCL(MLSSCLConfig(**self.TINY))
        legacy.load_state_dict({k: v for k, v in state.items() if not k.endswith("_filled")})
        assert legacy.valid_negatives(2)["axial"] == 8

    def test_drasclr_old_checkpoint_takes_fill_counts_from_keys_received(self):
        method = DrasCLR(DrasCLRConfig(queue_size=4, proj_dim=8, queue_dtype="float32"))
        bank = method._ensure_bank(3)
        method._enqueued.add_(torch.tensor([5, 1, 0]))
        bank.enqueue(_unit(6, 8, 12), torch.tensor([0, 0, 0, 0, 0, 1]))
        # A checkpoint from before fill counts and before NamedQueues: the bank's fields nested under "bank".
        state = {"bank": {k: v for k, v in bank.state_dict().items() if k != "filled"},
                 "enqueued": method.state_dict()["enqueued"]}
        restored = DrasCLR(DrasCLRConfig(queue_size=4, proj_dim=8, queue_dtype="float32"))
        restored.load_state_dict(state)
        assert restored._bank.filled.tolist() == [4, 1, 0]
        assert restored.valid_negatives(torch.tensor([0, 2])).tolist() == [4, 1]
