"""fastunet.Unet in multi-process training, as users who outgrow one GPU run it: torch DistributedDataParallel over
2 CPU processes (gloo) around upstream's GaussianDiffusion, and upstream's Trainer under `accelerate launch` with 2
CPU processes. Checkpoints saved there load into a plain, single-process model.

The worker processes run this file as a script (the `__main__` block at the end). They use the reference
backend: the point is the model's behaviour under DDP (parameter registration, gradient all-reduce, unwrapping
for checkpoints), which does not depend on the kernels, and the interpreter would make each step take ~10 s.
"""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

import fastunet
from tolerances import assert_close
from upstream import upstream_2

HERE = pathlib.Path(__file__).resolve()
CONFIG = dict(dim=8, dim_mults=(1, 2), block_norm="rms")
IMAGE_SIZE, TIMESTEPS, BATCH, STEPS, WORLD = 8, 10, 4, 3, 2
TIMEOUT_S = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env():
    env = {**os.environ, "FASTUNET_BACKEND": "reference", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop("TRITON_INTERPRET", None)
    return env


def run_workers(commands, env):
    """Start every command, wait for all (TIMEOUT_S), and fail with their output if any fails."""
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    for command, p, out in zip(commands, processes, outputs):
        assert p.returncode == 0, f"{' '.join(command)} exited with {p.returncode}:\n{out[-4000:]}"
    return outputs


class FixedNoiseLoss(torch.nn.Module):
    """GaussianDiffusion's training loss with given timesteps and noise (its forward draws them at random, which
    would make one process and two halves see different samples)."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, images, times, noise):
        return self.diffusion.p_losses(images * 2 - 1, times, noise=noise)


def build_loss():
    torch.manual_seed(0)
    model = fastunet.Unet(**CONFIG)
    return FixedNoiseLoss(upstream_2().GaussianDiffusion(model, image_size=IMAGE_SIZE, timesteps=TIMESTEPS))


def batches():
    """The same STEPS batches (images, times, noise) in every process."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
               torch.randint(0, TIMESTEPS, (BATCH,), generator=generator),
               torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))


def train(loss_module, rank=0, world=1):
    """SGD (not Adam: its m / sqrt(v) would magnify all-reduce rounding of near-zero gradients into lr-sized steps)."""
    optimizer = torch.optim.SGD(loss_module.parameters(), lr=0.05)
    share = BATCH // world
    for images, times, noise in batches():
        part = slice(rank * share, (rank + 1) * share)
        loss = loss_module(images[part], times[part], noise[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def ddp_worker(rank, port, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    ddp = torch.nn.parallel.DistributedDataParallel(build_loss())
    train(ddp, rank, WORLD)
    # What a DDP user saves: the wrapped module's state (ddp.module), here the Unet inside the diffusion.
    torch.save(ddp.module.diffusion.model.state_dict(), pathlib.Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    port = free_port()
    run_workers([[sys.executable, str(HERE), "ddp", str(rank), str(port), str(tmp_path)] for rank in range(WORLD)],
                worker_env())
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"{key}: the two DDP processes hold different parameters"

    with fastunet.use_backend("reference"):
        single = build_loss()
        train(single)
        # A checkpoint saved from DDP loads strictly into a plain model and gives the single-process outputs.
        plain = fastunet.Unet(**CONFIG)
        plain.load_state_dict(states[0], strict=True)
        x, time = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([1, 8])
        expected = single.diffusion.model(x, time)
        assert_close(plain(x, time), expected, what="DDP-trained checkpoint in a plain model vs one process")
    fresh = build_loss().diffusion.model.state_dict()
    trained = single.diffusion.model.state_dict()
    # Gradients all-reduced (mean of two half-batch means) vs one mean over the batch: fp32 summation order only.
    for key, value in trained.items():
        assert_close(states[0][key], value, what=f"{key} after {STEPS} DDP steps vs one process")
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained), "training did not change the parameters"


def trainer_worker(folder):
    """Upstream's Trainer as its README runs it, launched once per process by accelerate."""
    folder = pathlib.Path(folder)
    upstream = upstream_2()
    torch.manual_seed(0)
    diffusion = upstream.GaussianDiffusion(fastunet.Unet(**CONFIG), image_size=IMAGE_SIZE, timesteps=TIMESTEPS)
    trainer = upstream.Trainer(
        diffusion, str(folder / "images"), train_batch_size=BATCH, gradient_accumulate_every=4, train_num_steps=2,
        save_and_sample_every=2, num_samples=1, results_folder=str(folder / "results"), calculate_fid=False, amp=False,
    )
    trainer.train()
    accelerator = trainer.accelerator
    state = accelerator.unwrap_model(trainer.model).model.state_dict()
    torch.save(dict(world=accelerator.num_processes, distributed=str(accelerator.distributed_type), state=state),
               folder / f"rank{accelerator.process_index}.pt")


def test_upstream_trainer_under_accelerate_launch_with_two_processes(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(100):  # the Trainer asserts at least 100 images
        pixels = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{index}.png")
    # ACCELERATE_USE_CPU turns the torchrun launch of --multi_gpu into CPU processes on gloo (accelerate's --cpu
    # alone would start a single process).
    env = {**worker_env(), "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(HERE), "trainer", str(tmp_path)]
    run_workers([launch], env)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert [r["world"] for r in ranks] == [WORLD, WORLD], [r["world"] for r in ranks]
    assert "MULTI_CPU" in ranks[0]["distributed"], ranks[0]["distributed"]
    milestone = torch.load(tmp_path / "results" / "model-1.pt", weights_only=True)
    assert milestone["step"] == 2
    # The milestone's model is the unwrapped GaussianDiffusion: it loads strictly into a plain one.
    plain = upstream_2().GaussianDiffusion(fastunet.Unet(**CONFIG), image_size=IMAGE_SIZE, timesteps=TIMESTEPS)
    plain.load_state_dict(milestone["model"], strict=True)
    for key, value in plain.model.state_dict().items():
        for rank in ranks:
            assert torch.equal(rank["state"][key], value), f"{key}: a process's parameters differ from the milestone"
    with fastunet.use_backend("reference"):
        out = plain.model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([3]))
    assert torch.isfinite(out).all()


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "ddp":
        ddp_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif role == "trainer":
        trainer_worker(sys.argv[2])
    else:
        raise SystemExit(f"unknown worker role {role!r}")
