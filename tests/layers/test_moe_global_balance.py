"""The MoE load-balancing loss over the global batch: expert counts all-reduced over ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from layers.moe import router_losses

N_EXPERTS, TOP_K = 4, 2


def rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank routes differently: rank 0 mostly to experts 0-1, rank 1 to experts 2-3."""
    generator = torch.Generator().manual_seed(rank)
    logits = torch.randn(6 + rank, N_EXPERTS, generator=generator, dtype=torch.float64)
    logits[:, 2 * rank : 2 * rank + 2] += 3.0
    return logits, logits.topk(TOP_K, dim=-1).indices


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    logits, indices = rank_inputs(rank)
    local, _ = router_losses(logits, indices, N_EXPERTS)
    global_, _ = router_losses(logits, indices, N_EXPERTS, global_counts=True)
    torch.save({"local": local, "global": global_}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_global_balance_counts_every_rank(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    all_indices = torch.cat([rank_inputs(rank)[1].flatten() for rank in range(2)])
    fraction = torch.bincount(all_indices, minlength=N_EXPERTS).double() / all_indices.numel()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        logits, indices = rank_inputs(rank)
        probs = logits.softmax(-1).mean(0)  # P_e: this rank's own
        expected_global = N_EXPERTS * torch.sum(fraction * probs)
        own = torch.bincount(indices.flatten(), minlength=N_EXPERTS).double() / indices.numel()
        torch.testing.assert_close(got["global"], expected_global)
        torch.testing.assert_close(got["local"], N_EXPERTS * torch.sum(own * probs))
        # Skewed ranks: each looks unbalanced alone, the global batch much less so.
        assert got["global"] < got["local"]
