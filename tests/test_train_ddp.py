"""Two CPU processes with gloo (as `torchrun --nproc_per_node 2` would start them): the ranks end
with identical weights although they train on different batches, and only rank 0 writes files."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, base: str) -> None:
    """One torchrun-like process: env:// variables, tiny models, a short run, weights saved for the test."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    # spawned processes start with the parent's sys.path, which holds this tests folder (pytest's rootdir import)
    from tiny_models import make_tiny_clip, make_tiny_discriminator, make_tiny_generator

    from clip2gan_cli.train.config import TrainConfig
    from clip2gan_cli.train import TrainModels, run_training

    config = TrainConfig(steps=1, batch_size=2, log_every=1, sample_every=1, checkpoint_every=1, device="cpu",
                         lpips_net="none", identity="off", num_sample_images=2, mapper_hidden_dim=32,
                         num_workers=0, sample_prompts=["a red circle"])
    models = TrainModels(make_tiny_generator(0), make_tiny_clip(0), make_tiny_discriminator(1))
    # Each rank is given its own run directory so the test can see which ranks wrote anything.
    result = run_training(config, Path(base) / f"run-rank{rank}", models=models, progress=False)
    torch.save({"mapper": result.mapper.state_dict(), "ema": result.mapper_ema.state_dict()},
               Path(base) / f"weights-rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_stay_in_sync_and_only_rank_0_writes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "weights-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights-rank1.pt", weights_only=True)
    for key in ("mapper", "ema"):
        for name, tensor in rank0[key].items():
            assert torch.equal(tensor, rank1[key][name]), (key, name)
    # the ranks did train: the raw weights moved ahead of their slow EMA
    assert any(not torch.equal(tensor, rank0["ema"][name]) for name, tensor in rank0["mapper"].items())
    assert (tmp_path / "run-rank0" / "mapper.safetensors").is_file()
    assert (tmp_path / "run-rank0" / "checkpoints" / "step-00000001.pt").is_file()
    assert not (tmp_path / "run-rank1").exists()
