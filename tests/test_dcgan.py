"""dcgan.py: networks, losses and tricks on known inputs; training runs through main() and the command line."""

import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import dcgan
import conftest
from conftest import ROOT, assert_same, metrics_lines, real_idx_dir, training_lines, write_truncated_mnist

TINY = dict(image_size=16, batch_size=16, g_width=8, d_width=8, z_dim=8, num_samples=64, log_every=2,
            sample_every=2, checkpoint_every=2, max_steps=4, device="cpu")


def tiny_args(data_dir, out, **overrides) -> dcgan.Args:
    return dcgan.Args(**{"dataset": "mnist", "data_dir": str(data_dir), "out": str(out), **TINY, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_networks_work_at_every_power_of_two_size_and_channel_count(size, channels):
    G = dcgan.Generator(z_dim=10, channels=channels, image_size=size, width=4)
    D = dcgan.Discriminator(channels=channels, image_size=size, width=4)
    images = G(torch.rand(3, 10) * 2 - 1)
    assert images.shape == (3, channels, size, size) and images.abs().max() <= 1
    assert D(images).shape == (3,)


@pytest.mark.parametrize("size", [8, 24, 48, 256])
def test_other_image_sizes_are_refused(size):
    with pytest.raises(ValueError, match="power of two from 16 to 128"):
        dcgan.Args(image_size=size)


def test_weights_follow_the_dcgan_initialisation():
    torch.manual_seed(0)
    G = dcgan.Generator(100, 3, 64, 64)
    conv = G.convs[1].weight
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    assert abs(G.norms[1].bn.weight.mean().item() - 1) < 0.01


def test_auto_d_norm_follows_each_papers_choice():
    """--d-norm auto: batch norm (Radford §3), none under spectral norm (Miyato et al. 2018 use no batch norm in
    D), layer norm under WGAN-GP (Gulrajani et al. §4); and the D built from it has those layers."""
    assert dcgan.Args().discriminator_norm() == "batch"
    assert dcgan.Args(spectral_norm=True).discriminator_norm() == "none"
    assert dcgan.Args(loss="wgan-gp").discriminator_norm() == "layer"
    assert dcgan.Args(spectral_norm=True, d_norm="batch").discriminator_norm() == "batch"
    gan = dcgan.build_gan(dcgan.Args(spectral_norm=True, image_size=16, d_width=4, g_width=4, device="cpu"), 1, 0,
                          torch.device("cpu"))
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in gan.discriminator.modules())


def test_spectral_norm_bounds_the_top_singular_value():
    torch.manual_seed(0)
    D = dcgan.Discriminator(3, 32, 16, norm="none")
    for conv in D.convs:
        nn.init.normal_(conv.weight, 0, 1.0)  # large weights: sigma >> 1 before normalisation
    dcgan.apply_spectral_norm(D)
    x = torch.randn(8, 3, 32, 32)
    for _ in range(30):  # power iteration advances once per training-mode forward pass
        D(x)
    D.eval()
    for layer in list(D.convs) + [D.score]:
        sigma = torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2)
        assert sigma <= 1.01 and sigma > 0.95
    # G's transposed convs (--spectral-norm-g): the weight is (in, out, k, k), so the matrix whose top singular
    # value is bounded has one row per output channel
    G = dcgan.Generator(8, 1, 16, 8)
    for conv in G.convs:
        nn.init.normal_(conv.weight, 0, 1.0)
    dcgan.apply_spectral_norm(G)
    for _ in range(30):
        G(torch.randn(8, 8))
    for layer in list(G.convs) + [G.to_image]:
        sigma = torch.linalg.matrix_norm(layer.weight.transpose(0, 1).flatten(1), ord=2)
        assert sigma <= 1.01 and sigma > 0.95


def test_conditional_batchnorm_starts_as_plain_batchnorm_and_scales_by_one_plus_the_gain():
    """BigGAN §3: BN(h) (1 + W_g e) + W_b e, so zero projections leave plain BatchNorm, not a zeroed layer."""
    torch.manual_seed(0)
    norm, plain = dcgan.ConditionalBatchNorm(3, embed_dim=2), nn.BatchNorm2d(3, affine=False)
    h, e = torch.randn(4, 3, 2, 2), torch.randn(4, 2)
    nn.init.zeros_(norm.gain.weight), nn.init.zeros_(norm.bias.weight)
    assert torch.allclose(norm(h, e), plain(h), atol=1e-6)
    nn.init.normal_(norm.gain.weight), nn.init.normal_(norm.bias.weight)
    expected = plain(h) * (1 + e @ norm.gain.weight.T)[:, :, None, None] + (e @ norm.bias.weight.T)[:, :, None, None]
    assert torch.allclose(norm(h, e), expected, atol=1e-5)


def test_projection_discriminator_adds_the_class_embedding_dotted_with_the_summed_features():
    """Miyato & Koyama 2018 eq. 3: f(x, y) = psi(phi(x)) + e(y)^T phi(x), phi(x) the last features summed over
    space; so two labels' scores for one image differ by (e(y1) - e(y2))^T phi(x)."""
    torch.manual_seed(0)
    D = dcgan.Discriminator(1, 16, 8, norm="none", num_classes=10)
    nn.init.normal_(D.embedding.weight, 0, 1)
    features = []
    D.score.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    x = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1)
    with torch.no_grad():
        scores = D(x, torch.tensor([3, 7]))
    phi = features[0][0].sum(dim=(1, 2))  # (channels,)
    expected = (D.embedding.weight[3] - D.embedding.weight[7]) @ phi
    assert (scores[0] - scores[1]).item() == pytest.approx(expected.item(), rel=1e-4)


def test_conditional_networks_depend_on_the_label():
    torch.manual_seed(0)
    G = dcgan.Generator(8, 1, 16, 8, num_classes=10, embed_dim=4).eval()
    D = dcgan.Discriminator(1, 16, 8, num_classes=10)
    for module in (G.norms[0].gain, D.embedding):
        nn.init.normal_(module.weight, 0, 1)
    z = torch.randn(1, 8).repeat(2, 1)
    images = G(z, torch.tensor([3, 7]))
    assert not torch.allclose(images[0], images[1])
    scores = D(images[:1].repeat(2, 1, 1, 1), torch.tensor([3, 7]))
    assert not torch.allclose(scores[0], scores[1])


# ---------------------------------------------------------------------------------------------------------------
# Losses and tricks on known inputs
# ---------------------------------------------------------------------------------------------------------------

def test_loss_values_on_known_scores():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-1.0, 0.0])
    ones, zeros = torch.ones(2), torch.zeros(2)
    softplus = lambda v: math.log1p(math.exp(v))
    ns_d, _ = dcgan.discriminator_loss("ns", real, fake, ones, zeros)
    expected = (softplus(-2) + softplus(-0.5)) / 2 + (softplus(-1) + softplus(0)) / 2  # -log s(r) - log(1 - s(f))
    assert ns_d.item() == pytest.approx(expected, rel=1e-6)
    hinge_d, _ = dcgan.discriminator_loss("hinge", real, fake, ones, zeros)
    assert hinge_d.item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)  # max(0, 1 - r) + max(0, 1 + f)
    ls_d, _ = dcgan.discriminator_loss("lsgan", real, fake, ones, zeros)
    assert ls_d.item() == pytest.approx(0.5 * (1 + 0.25) / 2 + 0.5 * (1 + 0) / 2)
    w_d, _ = dcgan.discriminator_loss("wgan-gp", real, fake, ones, zeros)
    assert w_d.item() == pytest.approx(-0.5 - 1.25)
    assert dcgan.generator_loss("ns", fake)[0].item() == pytest.approx((softplus(1) + softplus(0)) / 2)
    assert dcgan.generator_loss("hinge", fake)[0].item() == pytest.approx(0.5)
    assert dcgan.generator_loss("lsgan", fake)[0].item() == pytest.approx(0.5 * (4 + 1) / 2)


def test_label_smoothing_changes_only_the_real_target():
    real, fake = torch.tensor([3.0]), torch.tensor([-3.0])
    args = dcgan.Args(label_smoothing=0.1)
    real_target, fake_target = dcgan.discriminator_targets(args, 1, torch.device("cpu"))
    assert real_target.tolist() == pytest.approx([0.9]) and fake_target.tolist() == [0.0]
    smooth, _ = dcgan.discriminator_loss("ns", real, fake, real_target, fake_target)
    plain, _ = dcgan.discriminator_loss("ns", real, fake, torch.ones(1), torch.zeros(1))
    assert smooth > plain  # a confident D is now penalised


def test_noisy_and_flipped_labels():
    torch.manual_seed(0)
    real, fake = dcgan.discriminator_targets(dcgan.Args(noisy_labels=True), 10_000, torch.device("cpu"))
    assert 0.7 <= real.min() and real.max() <= 1.2 and 0 <= fake.min() and fake.max() <= 0.3
    # uniform over the whole of each range (ganhacks #6): mean at the centre, the ends reached
    assert real.mean().item() == pytest.approx(0.95, abs=0.01) and real.max() > 1.19
    assert fake.mean().item() == pytest.approx(0.15, abs=0.01) and fake.max() > 0.29
    real, fake = dcgan.discriminator_targets(dcgan.Args(label_flip=0.2), 10_000, torch.device("cpu"))
    assert (real == 0).float().mean().item() == pytest.approx(0.2, abs=0.02)
    assert (fake == 1).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_gradient_penalties_on_a_linear_critic():
    weight = torch.full((1, 1, 2, 2), 0.5)  # ||grad|| = ||w|| = 1 everywhere
    critic = lambda x, labels=None: (x * weight).flatten(1).sum(1)
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    assert dcgan.gradient_penalty(critic, real, fake, None).item() == pytest.approx(0, abs=1e-10)
    double = lambda x, labels=None: 2 * critic(x)
    assert dcgan.gradient_penalty(double, real, fake, None).item() == pytest.approx(1.0)  # (2 - 1)^2
    x = real.clone().requires_grad_(True)
    assert dcgan.r1_penalty(double(x), x).item() == pytest.approx(4.0)  # ||2w||^2
    uneven = torch.tensor([3.0, 0.0, 4.0, 0.0]).view(1, 1, 2, 2)  # ||w||^2 = 25, ||w||_1 = 7, ||w|| = 5
    x = real.clone().requires_grad_(True)
    assert dcgan.r1_penalty((x * uneven).flatten(1).sum(1), x).item() == pytest.approx(25.0)
    critic = lambda v, labels=None: (v * uneven).flatten(1).sum(1)  # noqa: E731
    assert dcgan.gradient_penalty(critic, real, fake, None).item() == pytest.approx(16.0)  # (5 - 1)^2


def test_a_pack_is_one_input_of_its_images_concatenated_along_the_channels():
    """PacGAN (Lin et al. 2018): D with pack 2 scores each pair of consecutive images as one 2-channel input; the
    same weights in a 2-channel D, fed the concatenated pairs by hand, give the same scores."""
    torch.manual_seed(0)
    packed = dcgan.Discriminator(1, 16, width=8, norm="none", pack=2)
    plain = dcgan.Discriminator(2, 16, width=8, norm="none")
    plain.load_state_dict(packed.state_dict())
    x = torch.randn(6, 1, 16, 16)
    scores = packed(x)
    assert scores.shape == (3,)
    by_hand = plain(torch.cat([x[0::2], x[1::2]], dim=1))
    assert torch.allclose(scores, by_hand, atol=1e-6)
    changed = x.clone()
    changed[3] += 1  # the second image of the second pack: only that pack's score moves
    moved = packed(changed) != scores
    assert moved.tolist() == [False, True, False]


def test_penalties_take_one_norm_per_pack():
    """With pack 2, D's input is a pair: a linear critic with weight 0.5 on each of the pair's 8 pixels has
    ||w|| = sqrt(2) per input; one norm per image would see 1 and give a WGAN-GP penalty of 0."""
    class PackedLinearCritic(nn.Module):
        pack = 2

        def forward(self, x, labels=None):
            return 0.5 * x.reshape(len(x) // 2, -1).sum(1)

    critic = PackedLinearCritic()
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    assert dcgan.gradient_penalty(critic, real, fake, None).item() == pytest.approx((math.sqrt(2) - 1) ** 2)
    x = real.clone().requires_grad_(True)
    assert dcgan.r1_penalty(critic(x), x).item() == pytest.approx(2.0)  # ||w||^2 over the pack


def test_wgan_gp_draws_one_interpolation_point_per_sample():
    """Gulrajani eq. 3 takes x_hat = eps x + (1 - eps) G(z) with its own eps ~ U[0, 1] for every sample. With the
    critic D(x) = ||x||^2 / 2, grad D(x_hat) = x_hat; from fakes at 0, ||x_hat|| = eps_i ||x_i||, so the penalty is
    the mean of (eps_i ||x_i|| - 1)^2, computed here with the same draws."""
    critic = lambda x, labels=None: x.pow(2).flatten(1).sum(1) / 2  # noqa: E731
    real = torch.arange(1.0, 7.0).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()  # norms 2, 4, ..., 12
    torch.manual_seed(3)
    penalty = dcgan.gradient_penalty(critic, real, torch.zeros_like(real), None)
    torch.manual_seed(3)
    eps = torch.rand(6)
    assert eps.std() > 0.1  # six different draws, so one eps for the whole batch would give another value
    assert penalty.item() == pytest.approx(((eps * real.flatten(1).norm(dim=1) - 1) ** 2).mean().item(), rel=1e-5)


def test_wgan_gp_draws_one_interpolation_point_per_pack():
    """With pack 2 a D input is a pair, so the pair shares one eps: its x_hat lies on the segment between a real
    pair and a fake pair. Critic ||pack||^2 / 2 from fakes at 0: the penalty is the mean of (eps_p ||pair_p|| - 1)^2,
    with eps drawn once per pack; an eps per image would mix two points in one input."""
    class PackedSquareCritic(nn.Module):
        pack = 2

        def forward(self, x, labels=None):
            return x.reshape(len(x) // 2, -1).pow(2).sum(1) / 2

    real = torch.arange(1.0, 7.0).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    torch.manual_seed(3)
    penalty = dcgan.gradient_penalty(PackedSquareCritic(), real, torch.zeros_like(real), None)
    torch.manual_seed(3)
    eps = torch.rand(3)
    pair_norms = real.reshape(3, -1).norm(dim=1)  # pairs (1, 2), (3, 4), (5, 6)
    assert penalty.item() == pytest.approx(((eps * pair_norms - 1) ** 2).mean().item(), rel=1e-5)


def test_the_d_step_descends_the_loss_plus_half_gamma_r1():
    """Mescheder et al. 2018 eq. 9: D minimises its loss + gamma / 2 E||grad_x D(x)||^2 on real data. The gradient
    D's optimiser steps on, recomputed by hand from a copy of D taken before the step, on the same batches."""
    torch.manual_seed(0)
    gamma = 5.0
    args = dcgan.Args(image_size=16, batch_size=8, g_width=4, d_width=4, z_dim=8, r1=gamma, d_norm="none",
                      device="cpu")
    gan = dcgan.build_gan(args, 1, 0, torch.device("cpu"))
    D_before = copy.deepcopy(gan.discriminator)
    fakes, stepped = [], []
    gan.generator.register_forward_hook(lambda module, inputs, output: fakes.append(output.detach()))
    gan.opt_d.register_step_pre_hook(
        lambda opt, *_: stepped.append([p.grad.clone() for p in gan.discriminator.parameters()]))
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    dcgan.train_step(gan, args, lambda: (images, None), 0, 10, torch.device("cpu"))
    real = (images.float() / 127.5 - 1).requires_grad_(True)
    real_scores, fake_scores = D_before(real), D_before(fakes[0])
    (grad_x,) = torch.autograd.grad(real_scores.sum(), real, create_graph=True)
    r1 = grad_x.pow(2).flatten(1).sum(1).mean()
    loss = F.binary_cross_entropy_with_logits(real_scores, torch.ones(8)) + \
        F.binary_cross_entropy_with_logits(fake_scores, torch.zeros(8)) + gamma / 2 * r1
    expected = torch.autograd.grad(loss, list(D_before.parameters()))
    for got, want in zip(stepped[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_instance_noise_reaches_real_and_fake_inputs_and_anneals_linearly():
    """Sønderby et al. 2017: the same Gaussian noise on both of D's inputs, in D's step and in G's, with a std
    that falls linearly from --instance-noise at step 0 to 0 at the end of the planned steps."""
    torch.manual_seed(0)
    args = dcgan.Args(image_size=16, batch_size=32, g_width=8, d_width=8, z_dim=8, instance_noise=0.4, device="cpu")
    gan = dcgan.build_gan(args, 1, 0, torch.device("cpu"))
    fakes, d_inputs = [], []
    gan.generator.register_forward_hook(lambda module, inputs, output: fakes.append(output.detach()))
    gan.discriminator.register_forward_pre_hook(lambda module, inputs: d_inputs.append(inputs[0].detach()))
    images = torch.zeros(32, 1, 16, 16, dtype=torch.uint8)  # real = -1 everywhere
    for step, planned, sigma in [(0, 100, 0.4), (50, 100, 0.2), (75, 100, 0.1)]:
        fakes.clear(), d_inputs.clear()
        dcgan.train_step(gan, args, lambda: (images, None), step, planned, torch.device("cpu"))
        real_in, fake_in, g_in = d_inputs
        for noise in (real_in + 1, fake_in - fakes[0], g_in - fakes[0]):
            assert noise.std().item() == pytest.approx(sigma, rel=0.05) and noise.mean().abs() < 0.02


@pytest.mark.parametrize("loss", ["ns", "hinge", "lsgan", "wgan-gp"])
def test_training_steps_teach_d_to_score_real_above_fake(loss):
    """The game's first half through train_step: real images are bright squares and G starts as noise, so after a
    few steps with G nearly frozen D must score the real batch above G's. Real and fake targets or scores swapped
    anywhere in the step would make it score them the other way."""
    torch.manual_seed(0)
    args = dcgan.Args(image_size=16, batch_size=32, g_width=8, d_width=8, z_dim=8, loss=loss, lr_g=1e-8, lr_d=1e-3,
                      device="cpu")
    gan = dcgan.build_gan(args, 1, 0, torch.device("cpu"))
    images = torch.zeros(32, 1, 16, 16, dtype=torch.uint8)
    images[:, :, 4:12, 4:12] = 255
    for step in range(30):
        metrics = dcgan.train_step(gan, args, lambda: (images, None), step, 100, torch.device("cpu"))
    assert metrics["d/real"] > metrics["d/fake"] + (0.5 if loss == "ns" else 0.2), metrics


@pytest.mark.parametrize("loss", ["ns", "hinge", "lsgan", "wgan-gp"])
def test_g_steps_raise_d_s_score_of_g_s_samples(loss):
    """The other half: with D fixed, minimising generator_loss moves G towards what D calls real."""
    torch.manual_seed(0)
    G, D = dcgan.Generator(8, 1, 16, 8), dcgan.Discriminator(1, 16, 8, norm="none")
    for layer in [*D.convs, D.score]:  # a D whose scores vary by more than DCGAN's small initialisation gives
        torch.nn.init.normal_(layer.weight, 0, 0.2)
    optimiser = torch.optim.Adam(G.parameters(), lr=1e-3)
    z = torch.rand(64, 8) * 2 - 1
    before = D(G(z)).mean().item()
    for _ in range(20):
        loss_g, _ = dcgan.generator_loss(loss, D(G(z)))
        optimiser.zero_grad()
        loss_g.backward()
        optimiser.step()
    assert D(G(z)).mean().item() > before + 0.1


def test_each_d_step_takes_a_fresh_batch_and_g_moves_in_the_same_step():
    torch.manual_seed(0)
    args = dcgan.Args(image_size=16, batch_size=8, g_width=4, d_width=4, z_dim=8, d_steps=3, device="cpu")
    gan = dcgan.build_gan(args, 1, 0, torch.device("cpu"))
    fetched = []
    batch = lambda: fetched.append(1) or (torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), None)  # noqa
    weights = [p.detach().clone() for p in (*gan.generator.parameters(), *gan.discriminator.parameters())]
    dcgan.train_step(gan, args, batch, 0, 10, torch.device("cpu"))
    after = [p.detach() for p in (*gan.generator.parameters(), *gan.discriminator.parameters())]
    assert len(fetched) == 3
    moved = [not torch.equal(a, b) for a, b in zip(weights, after)]
    assert any(moved[:len(list(gan.generator.parameters()))]) and any(moved[len(list(gan.generator.parameters())):])


def test_samples_come_from_g_in_eval_mode():
    """generate() uses BatchNorm's running statistics, so a sample does not depend on which others share its batch."""
    torch.manual_seed(0)
    G = dcgan.Generator(8, 1, 16, 8)
    G(torch.rand(64, 8) * 2 - 1)  # one training-mode pass: running statistics that differ from any one batch's
    z = torch.rand(10, 8) * 2 - 1
    assert torch.equal(dcgan.generate(G, z, None)[:3], dcgan.generate(G, z[:3], None)) and G.training


def test_wgan_gp_outside_its_setting_prints_a_note(tiny_data_dir, tmp_path, capsys):
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "a", loss="wgan-gp", max_steps=1))
    assert "--d-steps 5 --lr-g 0.0001 --lr-d 0.0001 --beta1 0 --beta2 0.9" in capsys.readouterr().out
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "b", loss="wgan-gp", max_steps=1, **dcgan.WGAN_GP_SETTING))
    assert "Gulrajani" not in capsys.readouterr().out


def test_main_leaves_the_process_as_it_found_it(tiny_data_dir, tmp_path):
    """import dcgan; dcgan.main(args) with --deterministic and a seed changes the kernels and every global RNG while
    it runs; afterwards they are as before, so a caller's own code is not affected."""
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(2)
    torch.manual_seed(123)
    np.random.seed(123)
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "run", deterministic=True, max_steps=2, seed=7))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])


def test_orthogonal_regularisation_is_zero_only_for_orthogonal_filters():
    conv = nn.Conv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4)[:3].view(3, 4, 1, 1) * 5)  # orthogonal filters, any norm
    assert dcgan.orthogonal_regularisation(conv).item() == 0
    with torch.no_grad():
        conv.weight[1, 0] = 1.0  # filters 0 and 1 now overlap: <w0, w1> = 5
    assert dcgan.orthogonal_regularisation(conv).item() == pytest.approx(2 * 25)
    # a transposed conv's weight is (in, out, k, k): its filters are the columns, orthogonal here while the rows are
    # not, so the penalty is 0 only if it reads the filters the right way round
    deconv = nn.ConvTranspose2d(4, 2, 1, bias=False)
    with torch.no_grad():
        deconv.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 0.0], [0.0, 0.0]]).view(4, 2, 1, 1))
    assert dcgan.orthogonal_regularisation(deconv).item() == 0


def test_standing_statistics_are_the_plain_average_over_the_fixed_noise_batches():
    """BigGAN Appendix C: the running statistics are measured afresh as an average over the batches, each batch
    weighing the same; an exponential average from the reset would weigh the last batches most and start from 0."""
    torch.manual_seed(0)
    args = dcgan.Args(image_size=16, batch_size=8, g_width=8, z_dim=8, device="cpu")
    G = dcgan.Generator(8, 1, 16, 8)
    first = G.norms[0].bn
    inputs = []
    first.register_forward_pre_hook(lambda module, x: inputs.append(x[0].detach()))
    dcgan.recompute_batchnorm_statistics(G, args, 0, torch.device("cpu"), batches=5)
    assert len(inputs) == 5
    batch_means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs])
    assert torch.allclose(first.running_mean, batch_means.mean(0), atol=1e-6)
    assert not G.training


def test_ema_update_follows_the_formula():
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    dcgan.update_ema(ema, model, decay=0.999, step=0)  # ramp: d = min(0.999, 1 / 10)
    assert ema.weight[0, 0].item() == pytest.approx(0.9)
    dcgan.update_ema(ema, model, decay=0.5, step=10_000)
    assert ema.weight[0, 0].item() == pytest.approx(0.95)


def test_truncated_and_uniform_noise():
    torch.manual_seed(0)
    args = dcgan.Args(z_dist="normal", truncation=0.5)
    assert dcgan.sample_z(args, 20_000, torch.device("cpu")).abs().max() > 3  # training draws the full prior
    z = dcgan.sample_z(args, 20_000, torch.device("cpu"), truncation=args.truncation)
    assert z.abs().max() <= 0.5 and z.std().item() == pytest.approx(0.2863, abs=0.01)  # std of N(0,1) | |z| < 0.5
    u = dcgan.sample_z(dcgan.Args(), 20_000, torch.device("cpu"))
    assert u.min() >= -1 and u.max() <= 1 and u.mean().abs() < 0.01


def test_slerp_keeps_the_ends_and_the_radius():
    z0, z1 = torch.randn(100), torch.randn(100)
    z1 = z1 / z1.norm() * z0.norm()
    path = dcgan.slerp(z0[None], z1[None], torch.linspace(0, 1, 5)[:, None])
    assert torch.allclose(path[0], z0, atol=1e-5) and torch.allclose(path[-1], z1, atol=1e-5)
    assert torch.allclose(path.norm(dim=1), z0.norm().expand(5), rtol=1e-4)


def test_replay_buffer_mixes_old_fakes_and_fills_up():
    torch.manual_seed(0)
    buffer = dcgan.ReplayBuffer(capacity=6, fraction=0.5)
    first = torch.zeros(4, 1, 2, 2)
    assert torch.equal(buffer.mix(first), first) and len(buffer.images) == 4  # nothing stored yet to mix in
    mixed = buffer.mix(torch.ones(4, 1, 2, 2))
    assert mixed[:2].sum() == 0 and mixed[2:].min() == 1 and len(buffer.images) == 6
    buffer.mix(torch.full((4, 1, 2, 2), 2.0))
    assert len(buffer.images) == 6 and (buffer.images == 2).flatten(1).all(1).sum() == 2


def test_health_warnings_catch_a_winning_discriminator_and_exploding_gradients():
    args = dcgan.Args()
    assert dcgan.health_warnings({"loss/d": 1.2, "d/fake": 0.3, "grad/d": 3, "grad/g": 5}, args) == []
    assert "D wins" in dcgan.health_warnings({"loss/d": 0.01, "d/fake": 0.001}, args)[0]
    assert "grad/g" in dcgan.health_warnings({"loss/d": 1.0, "d/fake": 0.4, "grad/g": 500}, args)[0]


@pytest.mark.parametrize("loss, pack", [("ns", 1), ("wgan-gp", 2)])
def test_evaluation_reports_d_on_training_test_and_fake_images(loss, pack):
    """eval/d_train against eval/d_test is the overfitting check of ADA §2: each must be D's mean score on its own
    split (a probability under the non-saturating loss, the raw critic value otherwise), over whole packs, and
    d_fake D's score on G's samples."""
    torch.manual_seed(0)
    args = dcgan.Args(image_size=16, g_width=4, d_width=4, z_dim=8, loss=loss, pack=pack, batch_size=16,
                      device="cpu")
    gan = dcgan.build_gan(args, 1, 0, torch.device("cpu"))
    split = lambda seed: common.ImageData(  # noqa: E731
        torch.randint(0, 256, (40, 1, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8),
        None, 0, "noise")
    train, test = split(1), split(2)
    test.images[:, :, :8] = 0  # a test split D scores differently from the training split
    metrics = dcgan.evaluate(gan, gan.generator, args, train.images, train, test, torch.device("cpu"), count=33)

    def reference(images):  # 33 images: 33 packs of 1, or 16 packs of 2
        with torch.no_grad():
            scores = gan.discriminator(images[:33 // pack * pack].float() / 127.5 - 1, None)
        return (torch.sigmoid(scores) if loss == "ns" else scores).mean().item()

    assert metrics["eval/d_train"] == pytest.approx(reference(train.images), abs=1e-6)
    assert metrics["eval/d_test"] == pytest.approx(reference(test.images), abs=1e-6)
    assert abs(metrics["eval/d_train"] - metrics["eval/d_test"]) > 1e-3
    z = dcgan.sample_z(args, 33, torch.device("cpu"), torch.Generator().manual_seed(args.seed + 11))
    assert metrics["eval/d_fake"] == pytest.approx(reference(dcgan.generate(gan.generator, z, None)), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Training through main()
# ---------------------------------------------------------------------------------------------------------------

def test_a_run_writes_every_output(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    dcgan.main(tiny_args(tiny_data_dir, out, max_steps=0, epochs=1))  # one epoch: 512 // 16 = 32 steps
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "samples_32.png", "samples.npz", "loss.png",
            "interpolations.png", "real_samples.png"} <= names
    lines = metrics_lines(out)
    assert lines[-1]["final"] and lines[-1]["step"] == 32 and "eval/nn_test_to_fake" in lines[-1]
    assert [r["step"] for r in lines[:-1]] == list(range(2, 33, 2))
    samples = np.load(out / "samples.npz")["images"]
    assert samples.shape == (64, 1, 16, 16) and samples.dtype == np.uint8
    assert Image.open(out / "interpolations.png").size == (10 * 18 + 2, 8 * 18 + 2)
    assert json.loads((out / "config.json").read_text())["args"]["image_size"] == 16


TRICKS = {
    "label-smoothing": dict(label_smoothing=0.1), "noisy-labels": dict(noisy_labels=True),
    "label-flip": dict(label_flip=0.1), "instance-noise": dict(instance_noise=0.2), "d-steps": dict(d_steps=2),
    "replay": dict(replay_size=32), "spectral-norm": dict(spectral_norm=True),
    "spectral-norm-g": dict(spectral_norm_g=True), "ema": dict(ema_decay=0.99), "ortho-reg": dict(ortho_reg=1e-4),
    "truncation": dict(z_dist="normal", truncation=0.5), "conditional": dict(conditional=True),
    "hinge": dict(loss="hinge"), "lsgan": dict(loss="lsgan", label_smoothing=0.1), "wgan-gp": dict(loss="wgan-gp"),
    "r1": dict(r1=10.0), "pack": dict(pack=2), "pack-wgan-gp-r1": dict(pack=4, loss="wgan-gp", r1=1.0),
    "d-norm-layer": dict(d_norm="layer"), "ttur-beta1-0": dict(lr_d=4e-4, beta1=0.0),
    "biggan-recipe": dict(loss="hinge", spectral_norm=True, spectral_norm_g=True, ema_decay=0.999, ortho_reg=1e-4,
                          conditional=True, z_dist="normal", truncation=1.0, d_steps=2, lr_g=5e-5, lr_d=2e-4,
                          beta1=0.0),
}


@pytest.mark.parametrize("name", list(TRICKS))
def test_every_trick_trains(name, tiny_data_dir, tmp_path):
    out = tmp_path / name
    dcgan.main(tiny_args(tiny_data_dir, out, **TRICKS[name]))
    lines = metrics_lines(out)
    assert all(math.isfinite(v) for r in lines for k, v in r.items() if isinstance(v, float))
    assert lines[-1]["final"] and lines[-2]["step"] == 4
    checkpoint = common.load_checkpoint(out)
    assert checkpoint["step"] == 4 and checkpoint["args"] == dataclasses.asdict(tiny_args(tiny_data_dir, out,
                                                                                          **TRICKS[name]))
    if name == "wgan-gp":
        assert "penalty/gp" in lines[0]
    if name == "conditional":
        assert np.load(out / "samples.npz")["labels"].shape == (64,)


def test_rgb_folder_with_class_subfolders_trains_conditionally(tmp_path):
    rng = np.random.default_rng(0)
    for name, colour in (("red", 0), ("blue", 2)):
        (tmp_path / "pictures" / name).mkdir(parents=True)
        for i in range(24):
            pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
            pixels[..., colour] = 255
            Image.fromarray(pixels).save(tmp_path / "pictures" / name / f"{i}.png")
    out = tmp_path / "run"
    dcgan.main(tiny_args(tmp_path / "data", out, dataset=f"folder:{tmp_path / 'pictures'}", conditional=True,
                         batch_size=8))
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (64, 3, 16, 16) and set(samples["labels"]) <= {0, 1}
    assert Image.open(out / "samples_4.png").mode == "RGB"


def test_stacked_mnist_trains(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    dcgan.main(tiny_args(tiny_data_dir, out, dataset="stacked-mnist", max_steps=2, log_every=1))
    assert np.load(out / "samples.npz")["images"].shape == (64, 3, 16, 16)


def test_same_seed_gives_identical_losses(tiny_data_dir, tmp_path):
    for name in ("a", "b"):
        dcgan.main(tiny_args(tiny_data_dir, tmp_path / name, deterministic=True))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(metrics_lines(tmp_path / "a")) == strip(metrics_lines(tmp_path / "b"))
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "c", deterministic=True, seed=1))
    assert strip(metrics_lines(tmp_path / "a")) != strip(metrics_lines(tmp_path / "c"))


STATEFUL = dict(replay_size=24, ema_decay=0.9, instance_noise=0.1, label_flip=0.1, conditional=True,
                spectral_norm=True, d_norm="batch")


@pytest.mark.parametrize("flags", [{}, STATEFUL], ids=["defaults", "stateful-tricks"])
def test_resume_equals_an_uninterrupted_run(flags, tiny_data_dir, tmp_path):
    """N steps, then resume for N more, is bit for bit the 2N-step run: weights, optimisers, EMA, replay buffer,
    data order and every RNG continue exactly. 40 steps cross an epoch boundary (32 steps per epoch)."""
    common_flags = dict(deterministic=True, epochs=2, checkpoint_every=0, sample_every=0, log_every=4, **flags)
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "whole", max_steps=40, **common_flags))
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=20, **common_flags))
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=40, resume=str(tmp_path / "split"),
                         **common_flags))
    whole, split = common.load_checkpoint(tmp_path / "whole"), common.load_checkpoint(tmp_path / "split")
    assert whole["step"] == split["step"] == 40 and whole["batches"] == split["batches"] == {"epoch": 1, "index": 8}

    assert_same(whole["gan"], split["gan"], "gan")
    assert_same(whole["rng"][0]["torch"], split["rng"][0]["torch"], "rng")
    # the training lines match; the split run also keeps the evaluation its first half ended with, at step 20
    whole_lines, split_lines = metrics_lines(tmp_path / "whole"), metrics_lines(tmp_path / "split")
    assert training_lines(whole_lines) == training_lines(split_lines) and len(training_lines(whole_lines)) == 10
    assert [r["step"] for r in split_lines if r.get("final")] == [20, 40]
    assert whole_lines[-1] == split_lines[-1]


def test_compiled_run_trains_and_its_checkpoint_resumes_eagerly(tiny_data_dir, tmp_path, monkeypatch):
    """--compile compiles in place, so a compiled run's checkpoint has the eager model's keys. Compiled with the
    aot_eager backend: dynamo's tracing and AOT autograd as --compile runs them, without inductor's C++ code
    generation, which took a minute of this test on 2 cores from a cold cache (and --compile is meant for CUDA)."""
    compile_in_place, compiled = torch.nn.Module.compile, []

    def compile_cheaply(module, **options):
        compiled.append(type(module).__name__)
        compile_in_place(module, **{**options, "backend": "aot_eager"})
    monkeypatch.setattr(torch.nn.Module, "compile", compile_cheaply)
    out = tmp_path / "compiled"
    dcgan.main(tiny_args(tiny_data_dir, out, max_steps=2, compile=True, sample_every=0, num_samples=16))
    assert compiled == ["Generator", "Discriminator"]
    dcgan.main(tiny_args(tiny_data_dir, out, max_steps=3, resume=str(out), sample_every=0, num_samples=16))
    assert compiled == ["Generator", "Discriminator"]  # the resumed run is eager
    assert common.load_checkpoint(out)["step"] == 3


def test_benchmark_prints_rates_and_writes_nothing(tiny_data_dir, tmp_path, capsys):
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "bench", benchmark=True, benchmark_steps=2))
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert ("bf16 (--amp):" in out) == common.bf16_supported(torch.device("cpu")) and "float32:" in out
    assert "GFLOP per step" in out and "matmul" in out
    assert last.startswith("benchmark |") and "real data:" in last and "synthetic:" in last
    assert "steps/s" in last and "images/s" in last and "% of step time" in last
    assert not (tmp_path / "bench").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

def run_cli(flags, capsys):
    return conftest.run_cli(dcgan.main, dcgan.Args, flags, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "48"], "power of two"),
    (["--loss", "hinge", "--label-smoothing", "0.1"], "does not have"),
    (["--truncation", "0.5"], "--z-dist normal"),
    (["--loss", "wgan-gp", "--d-norm", "batch"], "couples"),
    (["--dataset", "imagenet"], "is not one of"),
    (["--label-flip", "1.5"], "must be in [0, 1)"),
    (["--pack", "3"], "does not split into packs"),
    (["--pack", "2", "--conditional"], "cannot go with --conditional"),
    (["--lr-d", "-1"], "must be positive"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = run_cli(flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_data_errors_are_one_line(tiny_data_dir, tmp_path, capsys):
    base = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--max-steps", "1",
            "--device", "cpu"]
    write_truncated_mnist(tiny_data_dir, tmp_path / "data")
    cases = [
        (["--dataset", "mnist"], "unreadable"),
        (["--dataset", f"folder:{tmp_path / 'missing'}"], "no such directory"),
        (["--dataset", f"folder:{tiny_data_dir / 'mnist'}"], "no readable images"),
        (["--resume", str(tmp_path / "nothing")], "no checkpoint at"),
    ]
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(40):
        Image.new("L", (8, 8), i).save(grey / f"{i}.png")
    cases.append((["--dataset", f"folder:{grey}", "--conditional", "--batch-size", "8"], "needs class labels"))
    for flags, message in cases:
        code, err = run_cli(base + flags, capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code in (1, 2) and len(errors) == 1 and message in errors[0], (flags, err)
        assert "Traceback" not in err


def test_resuming_into_a_different_architecture_is_a_user_error(tiny_data_dir, tmp_path, capsys):
    dcgan.main(tiny_args(tiny_data_dir, tmp_path / "run", max_steps=1))
    code, err = run_cli(["--resume", str(tmp_path / "run"), "--g-width", "16"], capsys)
    assert code == 1 and "does not fit this model" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# Command line, Ctrl-C, torchrun
# ---------------------------------------------------------------------------------------------------------------

def cli(*args):
    return [sys.executable, str(ROOT / "dcgan.py"), *args]


def tiny_flags(data_dir, out, **overrides):
    flags = {**TINY, "dataset": "mnist", "data_dir": data_dir, "out": out, **overrides}
    return [part for key, value in flags.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def test_command_line_help_explains_every_trick():
    result = subprocess.run(cli("--help"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Radford" in result.stdout and "--instance-noise" in result.stdout
    helps = {option: action.help for action in common.build_parser(dcgan.Args)._actions
             for option in action.option_strings}
    for flag, source in [("--label-smoothing", "Salimans"), ("--instance-noise", "Sønderby"),
                         ("--replay-size", "ganhacks #8"), ("--spectral-norm", "Miyato"),
                         ("--ema-decay", "BigGAN"), ("--ortho-reg", "eq. 3"), ("--truncation", "BigGAN"),
                         ("--conditional", "projection"), ("--r1", "Mescheder"), ("--d-steps", "Alg. 1"),
                         ("--noisy-labels", "ganhacks #6"), ("--z-dist", "ganhacks #3"), ("--z-dist", "slerp"),
                         ("--lr-d", "2 D steps per G step"), ("--pack", "PacGAN")]:
        assert source in helps[flag], (flag, helps[flag])
        assert " ".join(helps[flag].split()) in " ".join(result.stdout.split())


def test_command_line_run_and_ctrl_c_then_resume(tiny_data_dir, tmp_path):
    out = tmp_path / "cli"
    flags = tiny_flags(tiny_data_dir, out, max_steps=100_000, epochs=10_000, log_every=1, sample_every=0,
                       checkpoint_every=0)
    process = subprocess.Popen(cli(*flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = process.stdout.readline()
        if line.startswith("step 3/"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "checkpoint in" in stdout and "--resume" in stdout
    step = common.load_checkpoint(out)["step"]
    assert step >= 3
    result = subprocess.run(cli("--resume", str(out), "--max-steps", str(step + 2)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert common.load_checkpoint(out)["step"] == step + 2 and (out / "samples.npz").is_file()
    assert [r["step"] for r in metrics_lines(out) if not r.get("final")][-3:] == [step, step + 1, step + 2]


def test_torchrun_two_cpu_processes(tiny_data_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "dcgan.py"),
         *tiny_flags(tiny_data_dir, out, max_steps=3, batch_size=8)], capture_output=True, text=True, timeout=240,
        env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert result.stdout.count("step 3/3") == 1  # only rank 0 prints
    checkpoint = common.load_checkpoint(out)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])  # seed + rank


# ---------------------------------------------------------------------------------------------------------------
# Real data (skipped when absent)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_real_data_smoke_run(dataset, tmp_path):
    data_dir = real_idx_dir(dataset)
    if data_dir is None:
        pytest.skip(f"{dataset} not found: set MINIGEN_DATA (or install Debian's dataset-fashion-mnist)")
    out = tmp_path / dataset
    dcgan.main(dcgan.Args(dataset=dataset, data_dir=str(data_dir), out=str(out), max_steps=5, batch_size=32,
                          g_width=16, d_width=16, num_samples=256, log_every=5, device="cpu"))
    final = metrics_lines(out)[-1]
    assert final["final"] and math.isfinite(final["eval/nn_test_to_fake"])
    real = np.asarray(Image.open(out / "real_samples.png"))
    assert real.std() > 30  # real digits or garments, not a blank grid
