"""fastunet.Unet inside upstream's own callers: GaussianDiffusion, ElucidatedDiffusion, EMA copies, checkpoints."""

import copy

import pytest
import torch

import fastunet
from tolerances import assert_close
from upstream import upstream_2


@pytest.fixture(autouse=True)
def reference_backend():
    with fastunet.use_backend("reference"):
        yield


@pytest.mark.parametrize("block_norm", ["group", "rms"])
@pytest.mark.parametrize("self_condition", [False, True])
def test_gaussian_diffusion_trains_and_samples(block_norm, self_condition):
    upstream = upstream_2()
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), self_condition=self_condition, block_norm=block_norm, resnet_block_groups=4)
    diffusion = upstream.GaussianDiffusion(model, image_size=8, timesteps=10, sampling_timesteps=10)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-3)
    images = torch.rand(4, 3, 8, 8)
    losses = []
    for _ in range(8):
        loss = diffusion(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert min(losses[-3:]) < losses[0], f"training on one batch did not reduce the loss: {losses}"
    samples = diffusion.sample(batch_size=2)
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()
    assert 0 <= samples.min() and samples.max() <= 1


def test_ddim_sampling_with_self_condition():
    upstream = upstream_2()
    model = fastunet.Unet(8, dim_mults=(1, 2), self_condition=True, resnet_block_groups=4)
    diffusion = upstream.GaussianDiffusion(model, image_size=8, timesteps=20, sampling_timesteps=5)
    assert diffusion.is_ddim_sampling
    samples = diffusion.sample(batch_size=2)
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()


def test_elucidated_diffusion_with_learned_fourier_features():
    upstream = upstream_2()
    torch.manual_seed(0)
    model = fastunet.Unet(8, dim_mults=(1, 2), learned_sinusoidal_cond=True, block_norm="rms")
    diffusion = upstream.ElucidatedDiffusion(model, image_size=8, num_sample_steps=4)
    loss = diffusion(torch.rand(2, 3, 8, 8))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.time_mlp[0].weights.grad is not None, "learned Fourier weights got no gradient"
    samples = diffusion.sample(batch_size=2)
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()


@pytest.mark.parametrize("block_norm", ["group", "rms"])
def test_deepcopy_and_state_dict_round_trip(block_norm, tmp_path):
    model = fastunet.Unet(8, dim_mults=(1, 2), block_norm=block_norm, resnet_block_groups=4)
    x, time = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    expected = model(x, time)

    ema = copy.deepcopy(model)  # what ema_pytorch and upstream's Trainer do
    assert_close(ema(x, time), expected, what="deepcopy output")
    for p in ema.parameters():
        p.data.mul_(0.5)
    assert_close(model(x, time), expected, what="original after mutating its copy")

    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    restored = fastunet.Unet(8, dim_mults=(1, 2), block_norm=block_norm, resnet_block_groups=4)
    restored.load_state_dict(torch.load(path), strict=True)
    assert_close(restored(x, time), expected, what="restored checkpoint output")


def test_upstream_ema_wrapper():
    from ema_pytorch import EMA

    model = fastunet.Unet(8, dim_mults=(1, 2), resnet_block_groups=4)
    ema = EMA(model, beta=0.9, update_every=1, update_after_step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update()
    ema.update()
    x, time = torch.randn(1, 3, 8, 8), torch.tensor([5])
    assert ema.ema_model(x, time).shape == (1, 3, 8, 8)


def test_upstream_trainer_trains_samples_saves_and_loads(tmp_path):
    from PIL import Image

    upstream = upstream_2()
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(100):  # the Trainer asserts at least 100 images
        pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{index}.png")

    model = fastunet.Unet(8, dim_mults=(1, 2), resnet_block_groups=4)
    diffusion = upstream.GaussianDiffusion(model, image_size=8, timesteps=10)
    trainer = upstream.Trainer(
        diffusion, str(images), train_batch_size=4, gradient_accumulate_every=4, train_num_steps=2,
        save_and_sample_every=2, num_samples=4, results_folder=str(tmp_path / "results"), calculate_fid=False,
    )
    trainer.train()  # steps, EMA updates (a deepcopy of the model), samples with the EMA model, saves milestone 1
    assert (tmp_path / "results" / "model-1.pt").exists()
    assert (tmp_path / "results" / "sample-1.png").exists()
    trainer.load(1)
    assert trainer.step == 2
