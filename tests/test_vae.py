"""vae.py: the bounds and likelihoods against known values; training runs through main() and the command line."""

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
from PIL import Image

import common
import vae
import conftest
from conftest import ROOT, metrics_lines, real_idx_dir, training_lines, write_truncated_mnist

TINY = dict(batch_size=16, hidden=16, z_dim=4, conv_width=4, num_samples=64, log_every=2, sample_every=2,
            checkpoint_every=2, max_steps=4, eval_k=20, eval_every_k=5, device="cpu")


def tiny_args(data_dir, out, **overrides) -> vae.Args:
    return vae.Args(**{"dataset": "mnist", "data_dir": str(data_dir), "out": str(out), **TINY, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Densities and bounds on known values
# ---------------------------------------------------------------------------------------------------------------

def test_gaussian_terms_match_torch_distributions():
    torch.manual_seed(0)
    mu, logvar, z = torch.randn(6, 5) * 2, torch.randn(6, 5), torch.randn(6, 5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    expected = torch.distributions.kl_divergence(q, prior).sum(-1)
    assert torch.allclose(vae.gaussian_kl(mu, logvar), expected, atol=1e-5)
    assert torch.allclose(vae.diagonal_gaussian_log_prob(z, mu, logvar), q.log_prob(z).sum(-1), atol=1e-5)
    assert torch.allclose(vae.standard_normal_log_prob(z), prior.log_prob(z).sum(-1), atol=1e-5)
    assert vae.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0  # q = p


def test_bernoulli_log_likelihood_matches_torch_and_broadcasts_over_samples():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 1, 4, 4) * 30  # (k, B, C, H, W), with saturated logits
    x = (torch.rand(2, 1, 4, 4) > 0.5).float()
    expected = torch.distributions.Bernoulli(logits=logits.double()).log_prob(x.double()).sum(dim=(-3, -2, -1))
    result = vae.bernoulli_log_likelihood(logits, x)
    assert result.shape == (3, 2) and torch.allclose(result.double(), expected, rtol=1e-5, atol=1e-4)


def test_discretised_logistic_is_a_probability_mass_over_256_values():
    torch.manual_seed(0)
    values = torch.arange(256.0).view(256, 1, 1, 1)  # every 8-bit value, as 256 one-pixel images
    for mean, log_scale in [(0.0, -2.0), (0.3, -6.5), (-0.99, 0.5), (1.5, -4.0), (0.2, -9.0)]:
        log_mass = vae.discretised_logistic_log_likelihood(torch.full_like(values, mean),
                                                           torch.full_like(values, log_scale), values)
        assert torch.isfinite(log_mass).all()
        assert log_mass.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5), (mean, log_scale)
    # an inner bin against the difference of the two CDFs in float64
    mean, s, x = 0.1, math.exp(-3.0), 140
    centre = x / 127.5 - 1
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    expected = math.log(sigmoid((centre + 1 / 255 - mean) / s) - sigmoid((centre - 1 / 255 - mean) / s))
    got = vae.discretised_logistic_log_likelihood(torch.tensor([[[[mean]]]]), torch.tensor([[[[-3.0]]]]),
                                                  torch.tensor([[[[float(x)]]]]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def on_a_latent_grid(model: vae.VAE, x: torch.Tensor) -> tuple:
    """For a 1-d latent, on a fine grid of z: log p(x|z) (grid, B) and log(N(z; 0, 1) dz) (grid, 1), the quadrature
    weights of integrals over the prior."""
    z = torch.linspace(-10, 10, 40_001).view(-1, 1)
    with torch.no_grad():
        log_px_z = model.log_likelihood(model.decode(z).unsqueeze(1), x).double()
    return log_px_z, vae.standard_normal_log_prob(z).double().view(-1, 1) + math.log(z[1, 0] - z[0, 0])


def exact_log_likelihood(model: vae.VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log integral N(z; 0, 1) p(x|z) dz for a 1-d latent, by quadrature."""
    log_px_z, log_prior_weight = on_a_latent_grid(model, x)
    return torch.logsumexp(log_px_z + log_prior_weight, dim=0)


def test_iwae_bound_rises_with_k_and_stays_below_the_exact_log_likelihood():
    """Burda Theorem 1 on a model whose log p(x) is known: a Bernoulli decoder on 4x4 images with a 1-d latent, so
    log p(x) is a 1-d integral. The decoder's weights are scaled up (a sharp posterior) and q(z|x) is set too narrow
    and off-centre, so that the gaps between the bounds are wide."""
    torch.manual_seed(0)
    model = vae.VAE("mlp", "bernoulli", 1, 4, z_dim=1, hidden=8)
    last = model.encoder.net[4]
    with torch.no_grad():
        model.decoder.net[0].weight *= 3
        model.decoder.net[4].weight *= 3
        last.bias.copy_(torch.tensor([1.0, -1.0]))  # mu near 1, sigma^2 near e^-1
    x = (torch.rand(3, 1, 4, 4) > 0.5).float()
    log_px = exact_log_likelihood(model, x)
    generator = torch.Generator().manual_seed(1)
    expected_bounds = []
    with torch.no_grad():
        mu, logvar = model.encode(x)
        for k, repeats in [(1, 20_000), (4, 5_000), (32, 1_000), (512, 100)]:
            log_w = vae.log_importance_weights(model, x, mu, logvar, k * repeats, generator).double()
            bounds = torch.logsumexp(log_w.view(repeats, k, -1), dim=1) - math.log(k)  # L_k, `repeats` times
            expected_bounds.append(bounds.mean(0))
    bounds = torch.stack(expected_bounds)  # (4, B); standard errors 0.004-0.07, steps 0.1-0.7
    assert (bounds[1:] > bounds[:-1] + 0.05).all(), bounds  # L_1 < L_4 < L_32 < L_512
    assert (bounds < log_px).all(), (bounds, log_px)

    # with q(z|x) = p(z), 2,000 samples reach log p(x); the chunked evaluation agrees whether the k samples go in
    # one pass or in passes of 7
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    one_pass, elbo_one_pass, means = vae.importance_weighted_bounds(model, x, 2000, 10_000,
                                                                   torch.Generator().manual_seed(2))
    chunked, elbo_chunked, _ = vae.importance_weighted_bounds(model, x, 2000, 7, torch.Generator().manual_seed(3))
    for estimate in (one_pass, chunked):
        assert torch.allclose(estimate, log_px, atol=0.05), (estimate, log_px)
    assert means.shape == (3, 1)
    # and so does the ELBO of the same draws, here E_p(z)[log p(x|z)] (the KL is 0), by quadrature
    log_px_z, log_prior_weight = on_a_latent_grid(model, x)
    elbo = (log_prior_weight.exp() * log_px_z).sum(0)
    for estimate in (elbo_one_pass, elbo_chunked):
        assert torch.allclose(estimate, elbo, atol=0.1), (estimate, elbo)  # 2,000 draws: off by 0.03 at most


def independent_bounds(model: vae.VAE, x: torch.Tensor, k: int, seed: int):
    """-L_k and the negative ELBO per image, from torch.distributions, with the draws the evaluation makes (one group
    of images, eps ~ N(0, I) of shape (k, B, z_dim) from a generator seeded `seed`): Burda eq. 8 written out again."""
    with torch.no_grad():
        mu, logvar = model.encoder(x.flatten(1) if isinstance(model.encoder, vae.MLPEncoder) else x)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        z = mu + q.scale * torch.randn((k, *mu.shape), generator=torch.Generator().manual_seed(seed))
        logits = model.decoder(z.flatten(0, 1)).view(k, *x.shape)
        log_px_z = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(2).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_w = (log_px_z + log_pz - q.log_prob(z).sum(-1)).double()
    return -(torch.logsumexp(log_w, 0) - math.log(k)), -log_w.mean(0)


def test_the_evaluation_is_burdas_estimator_on_the_fixed_test_bits():
    torch.manual_seed(0)
    model = vae.VAE("mlp", "bernoulli", 1, 6, z_dim=3, hidden=16)
    images = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    x = torch.bernoulli(images.float() / 255, generator=torch.Generator().manual_seed(vae.TEST_BINARISATION_SEED))
    assert torch.equal(vae.prepare_once(images, "bernoulli"), x)
    args = vae.Args(seed=4, device="cpu")
    metrics = vae.evaluate(model, x, 30, args)
    nll, elbo = independent_bounds(model, x, 30, args.seed + 13)
    assert metrics["eval/nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert metrics["eval/elbo"] == pytest.approx(elbo.mean().item(), rel=1e-5)
    assert metrics["eval/stderr_nll"] == pytest.approx((nll.std() / math.sqrt(40)).item(), rel=1e-4)
    assert metrics["eval/bits_per_binary_pixel"] == pytest.approx(nll.mean().item() / (36 * math.log(2)), rel=1e-5)
    assert metrics["eval/elbo"] - metrics["eval/nll"] > 0.1  # the bound is not the ELBO: k samples count


def test_log_importance_weights_have_all_three_terms():
    torch.manual_seed(0)
    model = vae.VAE("conv", "bernoulli", 1, 8, z_dim=2, conv_width=4)
    x = (torch.rand(3, 1, 8, 8) > 0.5).float()
    mu, logvar = model.encode(x)
    log_w = vae.log_importance_weights(model, x, mu, logvar, 4, torch.Generator().manual_seed(1))
    z = mu + torch.exp(0.5 * logvar) * torch.randn((4, 3, 2), generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Bernoulli(logits=model.decode(z.flatten(0, 1)).view(4, 3, 1, 8, 8)).log_prob(
        x).flatten(2).sum(-1) + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - \
        torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert torch.allclose(log_w, expected, rtol=1e-5, atol=1e-4)
    # and the same gradients: -log q is differentiated through z and through q's own mean and variance (Burda §3)
    got = torch.autograd.grad(log_w.sum(), [mu, logvar], retain_graph=True)
    want = torch.autograd.grad(expected.sum(), [mu, logvar])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_the_decoder_starts_at_the_training_images_mean_as_in_burdas_code(arch):
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :4] = 255  # the top half always on, the bottom half off
    images[:5, :, 4:6] = 255  # two rows on half the time
    pixel_mean = images.double().mean(0) / 255
    args = vae.Args(arch=arch, image_size=8, dataset="cifar10", likelihood="bernoulli", z_dim=2, hidden=8,
                    conv_width=4, device="cpu")
    model = vae.build_model(args, images, torch.device("cpu"))
    bias = model.decoder.net[-1].bias if arch == "mlp" else model.decoder.convs[-1].bias
    expected = torch.logit(pixel_mean.clamp(0.001, 0.999)).flatten() if arch == "mlp" else \
        torch.logit(pixel_mean.mean().clamp(0.001, 0.999)).view(1)
    assert torch.allclose(bias.double(), expected, atol=1e-5)
    if arch == "mlp":
        assert bias[0] > 6 and bias[-1] < -6 and abs(bias[4 * 8]) < 1e-6  # logit(0.999), logit(0.001), logit(0.5)
    plain = vae.build_model(dataclasses.replace(args, decoder_bias="zero"), images, torch.device("cpu"))
    assert (plain.decoder.net[-1].bias if arch == "mlp" else plain.decoder.convs[-1].bias).abs().max() < 1


def test_pictures_show_the_decoders_mean():
    """E[x|z] on 0..255: sigmoid of the Bernoulli logits; the logistic's mean (on [-1, 1]) for 8-bit data."""
    bernoulli = vae.VAE("mlp", "bernoulli", 1, 2, 2, hidden=4)
    logits = torch.tensor([-3.0, 0.0, 0.5, 4.0]).view(1, 1, 2, 2)
    expected = (torch.sigmoid(logits) * 255).round().to(torch.uint8)  # 12, 128, 159, 250
    assert torch.equal(bernoulli.mean_image(logits), expected)
    logistic = vae.VAE("mlp", "logistic", 1, 2, 2, hidden=4)
    decoded = torch.cat([torch.tensor([-1.0, 0.0, 0.5, 1.0]).view(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)], dim=1)
    assert logistic.mean_image(decoded).flatten().tolist() == [0, 128, 191, 255]


def test_data_pictures_show_bits_as_black_and_white_and_8_bit_values_as_they_are():
    assert vae.to_picture(torch.tensor([0.0, 1.0, 1.0]), "bernoulli").tolist() == [0, 255, 255]
    assert vae.to_picture(torch.tensor([0.0, 127.0, 255.0]), "logistic").tolist() == [0, 127, 255]


def test_the_training_step_is_one_reparameterised_draw_and_the_closed_form_kl():
    """K&W eq. 10: -ELBO = -log p(x | mu + sigma eps) + KL(q || p), one eps ~ N(0, I) per image, recomputed here with
    torch.distributions from the same eps on a copy of the model taken before the step."""
    torch.manual_seed(0)
    model = vae.VAE("mlp", "bernoulli", 1, 28, 3, 16)
    before = copy.deepcopy(model)
    trainer = vae.Trainer(model, torch.optim.Adam(model.parameters()))
    x = (torch.rand(5, 1, 28, 28) > 0.5).float()
    torch.manual_seed(7)
    metrics = vae.train_step(trainer, vae.Args(z_dim=3, hidden=16, device="cpu"), x, 0, 100)
    torch.manual_seed(7)
    with torch.no_grad():
        mu, logvar = before.encoder(x.flatten(1))
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        z = mu + q.scale * torch.randn_like(mu)
        recon = -torch.distributions.Bernoulli(logits=before.decoder(z)).log_prob(x).flatten(1).sum(1).mean()
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1).mean()
    assert metrics["loss/recon"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert metrics["loss/kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert metrics["loss/elbo"].item() == pytest.approx((recon + kl).item(), rel=1e-5)


def test_training_losses_on_known_values():
    log_px_z, kl = torch.tensor([-10.0, -20.0]), torch.tensor([2.0, 4.0])
    loss, metrics = vae.elbo_loss(log_px_z, kl, kl_weight=0.5)
    assert loss.item() == pytest.approx(15 + 0.5 * 3) and metrics["loss/elbo"].item() == pytest.approx(18)
    log_w = torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # (k = 2, B = 2)
    loss, metrics = vae.iwae_loss(log_w)
    assert loss.item() == pytest.approx(-(math.log(2.0) + math.log(3.0)) / 2)  # -log of the mean weight
    assert metrics["loss/elbo"].item() == pytest.approx(-log_w.mean().item())


def test_active_units_follow_burdas_covariance_criterion():
    means = torch.zeros(1000, 3)
    means[:, 0] = torch.linspace(-1, 1, 1000)  # variance 0.33: active
    means[:, 1] = torch.linspace(-0.1, 0.1, 1000)  # variance 0.0033 < 0.01: inactive
    assert vae.active_units(means) == 1


def test_learning_rate_schedules_and_kl_warmup():
    args = vae.Args(epochs=vae.BURDA_PASSES, lr_schedule="burda")  # Burda's own schedule, one step per pass
    lr = lambda step: vae.learning_rate(args, step, vae.BURDA_PASSES)
    assert vae.BURDA_PASSES == 3280
    assert lr(0) == pytest.approx(1e-3) and lr(1) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert lr(3) == pytest.approx(1e-3 * 10 ** (-1 / 7)) and lr(4) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert lr(1093) == pytest.approx(1e-3 * 10 ** (-7 / 7)) and lr(1092) == pytest.approx(1e-3 * 10 ** (-6 / 7))
    assert lr(3279) == pytest.approx(1e-4)
    short = vae.Args(epochs=10, lr_schedule="burda")  # a shorter run follows the start of the schedule, in passes
    assert vae.learning_rate(short, 4 * 600, 10 * 600) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    cosine = vae.Args(lr_schedule="cosine")
    assert vae.learning_rate(cosine, 50, 100) == pytest.approx(5e-4) and vae.learning_rate(cosine, 100, 100) < 1e-12
    warm = vae.Args(beta=2.0, kl_warmup=100)
    assert [vae.kl_weight(warm, s) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]


def constant_grey_batches(seed, count=32, batch=8):
    images = torch.full((count, 1, 4, 4), 128, dtype=torch.uint8)
    return vae.TrainingData(common.Batches((images,), batch, seed, torch.device("cpu")), "bernoulli", seed)


def test_dynamic_binarisation_redraws_every_epoch_and_follows_the_seed():
    """Every image is the same grey 128/255, so an epoch's batches differ only by their binarisation."""
    def draws(seed, count=8):
        data = constant_grey_batches(seed)
        return [data.next() for _ in range(count)]

    first = draws(0)
    epoch0, epoch1 = torch.cat(first[:4]), torch.cat(first[4:])  # 32 images in batches of 8: 4 per epoch
    assert set(epoch0.unique().tolist()) == {0.0, 1.0} and abs(epoch0.mean().item() - 128 / 255) < 0.08
    assert not torch.equal(epoch0, epoch1)  # the same images, new bits
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0)))  # reproducible from the seed
    assert not torch.equal(first[0], draws(1)[0])
    # a resumed run continues the draws: position (epoch, batch) is all the state
    data = constant_grey_batches(0)
    data.batches.load_state_dict({"epoch": 1, "index": 0})
    assert torch.equal(data.next(), first[4])
    # the test set is binarised once, the same whatever the run's seed
    images = torch.full((4, 1, 4, 4), 128, dtype=torch.uint8)
    torch.manual_seed(5)
    once = vae.prepare_once(images, "bernoulli")
    torch.manual_seed(6)
    assert torch.equal(once, vae.prepare_once(images, "bernoulli"))


def test_flags_and_sizes():
    args = vae.Args()
    assert (args.dataset, args.size(), args.decoder_likelihood(), args.z_dim, args.hidden) == \
        ("mnist", 28, "bernoulli", 50, 200)
    assert vae.Args(dataset="cifar10").decoder_likelihood() == "logistic" and vae.Args(dataset="cifar10").size() == 32
    model = vae.VAE("conv", "logistic", 3, 32, 8, conv_width=4)
    mu, logvar = model.encode(torch.randint(0, 256, (2, 3, 32, 32)).float())
    assert mu.shape == logvar.shape == (2, 8) and model.decode(mu).shape == (2, 6, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Training through main()
# ---------------------------------------------------------------------------------------------------------------

def test_a_run_writes_every_output(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    vae.main(tiny_args(tiny_data_dir, out, max_steps=0, epochs=1, eval_every=16, sample_every=16,
                       checkpoint_every=0))  # 512 // 16 = 32 steps
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "samples_32.png", "samples.npz", "loss.png",
            "reconstructions.png", "real_samples.png"} <= names and "manifold.png" not in names
    lines = metrics_lines(out)
    final = lines[-1]
    assert final["final"] and final["step"] == 32 and final["eval/k"] == 20 and final["eval/images"] == 128
    model = vae.VAE("mlp", "bernoulli", 1, 28, 4, 16)
    model.load_state_dict(common.load_checkpoint(out)["trainer"]["model"])
    nll, elbo = independent_bounds(model, vae.prepare_once(common.load_image_dataset(
        "mnist", tiny_data_dir, 28, "test").images, "bernoulli"), 20, 0 + 13)
    assert final["eval/nll"] == pytest.approx(nll.mean().item(), rel=1e-5)  # the whole path: test bits, the bound
    assert final["eval/elbo"] == pytest.approx(elbo.mean().item(), rel=1e-5) and 0 <= final["eval/active_units"] <= 4
    bits = final["eval/nll"] / (784 * math.log(2))  # 28x28, no padding
    assert final["eval/bits_per_binary_pixel"] == pytest.approx(bits, rel=1e-4)
    assert [r["step"] for r in lines if "test/nll" in r] == [16, 32]
    assert all(k in lines[0] for k in ("loss/elbo", "loss/recon", "loss/kl", "opt/lr"))
    samples = np.load(out / "samples.npz")["images"]
    assert samples.shape == (64, 1, 28, 28) and samples.dtype == np.uint8
    assert Image.open(out / "reconstructions.png").size == (8 * 30 + 2, 8 * 30 + 2)
    real = np.asarray(Image.open(out / "real_samples.png"))
    assert set(np.unique(real)) == {0, 255}  # the model sees binarised digits


VARIANTS = {
    "conv": dict(arch="conv"), "iwae": dict(iw_train=5), "beta-warmup": dict(beta=4.0, kl_warmup=3),
    "logistic": dict(likelihood="logistic"), "burda": dict(lr_schedule="burda"),
    "fashion-conv-logistic": dict(dataset="fashion-mnist", arch="conv", likelihood="logistic"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains(name, tiny_data_dir, tmp_path):
    out = tmp_path / name
    vae.main(tiny_args(tiny_data_dir, out, **VARIANTS[name]))
    lines = metrics_lines(out)
    assert all(math.isfinite(v) for r in lines for k, v in r.items() if isinstance(v, float))
    final = lines[-1]
    assert final["final"] and lines[-2]["step"] == 4
    assert common.load_checkpoint(out)["args"] == dataclasses.asdict(tiny_args(tiny_data_dir, out,
                                                                               **VARIANTS[name]))
    if name == "beta-warmup":
        assert lines[0]["kl/weight"] == pytest.approx(4.0 * (0 + 1) / 3 / 2)  # mean of steps 0 and 1
    if "logistic" in name:  # bits/dim over the 784 8-bit pixels
        assert final["eval/bpd"] == pytest.approx(final["eval/nll"] / (784 * math.log(2)), rel=1e-4)


def test_rgb_folder_gets_the_discretised_logistic(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pictures").mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "pictures" / f"{i}.png")
    out = tmp_path / "run"
    vae.main(tiny_args(tmp_path / "data", out, dataset=f"folder:{tmp_path / 'pictures'}", image_size=12,
                       batch_size=8, arch="conv", max_steps=2, z_dim=2))
    final = metrics_lines(out)[-1]
    assert final["eval/bpd"] > 6  # uniform noise: 8 bits/dim is the best any model can do on it
    assert np.load(out / "samples.npz")["images"].shape == (64, 3, 12, 12)
    assert Image.open(out / "manifold.png").size == (20 * 14 + 2, 20 * 14 + 2)  # 2-d latent: the manifold grid


def test_same_seed_gives_identical_losses(tiny_data_dir, tmp_path):
    for name in ("a", "b"):
        vae.main(tiny_args(tiny_data_dir, tmp_path / name, deterministic=True))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(metrics_lines(tmp_path / "a")) == strip(metrics_lines(tmp_path / "b"))
    vae.main(tiny_args(tiny_data_dir, tmp_path / "c", deterministic=True, seed=1))
    assert strip(metrics_lines(tmp_path / "a")) != strip(metrics_lines(tmp_path / "c"))


@pytest.mark.parametrize("flags", [{}, dict(iw_train=3, lr_schedule="cosine")], ids=["vae", "iwae"])
def test_resume_equals_an_uninterrupted_run(flags, tiny_data_dir, tmp_path):
    """N steps, then resume for N more, is bit for bit the 2N-step run: weights, optimiser, data order, the dynamic
    binarisation and the reparameterisation noise continue exactly; the quick evaluations disturb nothing.
    20 steps cross an epoch boundary (16 steps of 32 per epoch)."""
    common_flags = dict(deterministic=True, epochs=2, batch_size=32, checkpoint_every=0, sample_every=0, log_every=2,
                        eval_every=4, num_samples=16, **flags)
    vae.main(tiny_args(tiny_data_dir, tmp_path / "whole", max_steps=20, **common_flags))
    vae.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=10, **common_flags))
    vae.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=20, resume=str(tmp_path / "split"),
                       **common_flags))
    whole, split = common.load_checkpoint(tmp_path / "whole"), common.load_checkpoint(tmp_path / "split")
    assert whole["step"] == split["step"] == 20 and whole["batches"] == split["batches"] == {"epoch": 1, "index": 4}
    for key, tensor in whole["trainer"]["model"].items():
        assert torch.equal(tensor, split["trainer"]["model"][key]), key
    assert str(whole["trainer"]["optimizer"]) == str(split["trainer"]["optimizer"])
    assert torch.equal(whole["rng"][0]["torch"], split["rng"][0]["torch"])
    whole_lines, split_lines = metrics_lines(tmp_path / "whole"), metrics_lines(tmp_path / "split")
    assert training_lines(whole_lines) == training_lines(split_lines) and len(training_lines(whole_lines)) == 10
    assert whole_lines[-1] == split_lines[-1]


def test_benchmark_prints_rates_and_writes_nothing(tiny_data_dir, tmp_path, capsys):
    vae.main(tiny_args(tiny_data_dir, tmp_path / "bench", benchmark=True, benchmark_steps=2, eval_rows=2000))
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert ("bf16 (--amp):" in out) == common.bf16_supported(torch.device("cpu")) and "float32:" in out
    assert "GFLOP per step" in out and "matmul" in out
    assert last.startswith("benchmark |") and "real data:" in last and "synthetic:" in last
    assert "samples/s" in last and "importance samples/s" in last
    assert not (tmp_path / "bench").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

def run_cli(flags, capsys):
    return conftest.run_cli(vae.main, vae.Args, flags, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--iw-train", "5", "--beta", "2"], "does not have"),
    (["--iw-train", "5", "--kl-warmup", "100"], "does not have"),
    (["--image-size", "32"], "28x28"),
    (["--dataset", "cifar10", "--arch", "conv", "--image-size", "30"], "multiple of 4"),
    (["--eval-k", "0"], "at least 1"),
    (["--lr", "0"], "must be positive"),
    (["--beta1", "1"], "must be in [0, 1)"),
    (["--dataset", "imagenet"], "is not one of"),
    (["--arch", "resnet"], "invalid choice"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = run_cli(flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_data_and_checkpoint_errors_are_one_line(tiny_data_dir, tmp_path, capsys):
    base = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--max-steps", "1",
            "--device", "cpu"]
    write_truncated_mnist(tiny_data_dir, tmp_path / "data")
    vae.main(tiny_args(tiny_data_dir, tmp_path / "small", max_steps=1))
    cases = [
        (base + ["--dataset", "mnist"], "unreadable"),
        (base + ["--dataset", f"folder:{tmp_path / 'missing'}"], "no such directory"),
        (base + ["--resume", str(tmp_path / "nothing")], "no checkpoint at"),
        (["--resume", str(tmp_path / "small"), "--hidden", "32"], "does not fit this model"),
    ]
    for flags, message in cases:
        code, err = run_cli(flags, capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code in (1, 2) and len(errors) == 1 and message in errors[0], (flags, err)
        assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# Command line and Ctrl-C
# ---------------------------------------------------------------------------------------------------------------

def cli(*args):
    return [sys.executable, str(ROOT / "vae.py"), *args]


def test_command_line_help_ctrl_c_and_resume(tiny_data_dir, tmp_path):
    helps = {option: action.help for action in common.build_parser(vae.Args)._actions
             for option in action.option_strings}
    for flag, source in [("--iw-train", "Burda eq. 8"), ("--beta", "Higgins"), ("--kl-warmup", "Sønderby"),
                         ("--adam-eps", "Burda"), ("--likelihood", "Salimans"), ("--z-dim", "Burda")]:
        assert source in helps[flag], (flag, helps[flag])
    out = tmp_path / "cli"
    flags = {**TINY, "dataset": "mnist", "data_dir": tiny_data_dir, "out": out, "max_steps": 100_000,
             "epochs": 10_000, "log_every": 1, "sample_every": 0, "checkpoint_every": 0}
    argv = [part for key, value in flags.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    process = subprocess.Popen(cli(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.stdout.readline().startswith("step 3/"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "checkpoint in" in stdout and "--resume" in stdout
    step = common.load_checkpoint(out)["step"]
    result = subprocess.run(cli("--resume", str(out), "--max-steps", str(step + 2)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert common.load_checkpoint(out)["step"] == step + 2 and (out / "samples.npz").is_file()
    assert metrics_lines(out)[-1]["final"] and "eval | eval/nll" in result.stdout


def test_torchrun_two_cpu_processes(tiny_data_dir, tmp_path):
    out = tmp_path / "ddp"
    flags = {**TINY, "dataset": "mnist", "data_dir": tiny_data_dir, "out": out, "max_steps": 3, "batch_size": 8,
             "eval_every": 3}
    argv = [part for key, value in flags.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "vae.py"), *argv], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("W1"))  # torchrun warnings
    assert result.returncode == 0, errors[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert result.stdout.count("step 3/3") == 1 and "test/nll" in result.stdout  # only rank 0 prints and evaluates
    checkpoint = common.load_checkpoint(out)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    assert metrics_lines(out)[-1]["final"]


# ---------------------------------------------------------------------------------------------------------------
# Real data (skipped when absent)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_real_data_smoke_run(dataset, tmp_path):
    data_dir = real_idx_dir(dataset)
    if data_dir is None:
        pytest.skip(f"{dataset} not found: set MINIGEN_DATA (or install Debian's dataset-fashion-mnist)")
    out = tmp_path / dataset
    vae.main(vae.Args(dataset=dataset, data_dir=str(data_dir), out=str(out), max_steps=10, log_every=5,
                      num_samples=100, eval_k=10, eval_images=500, device="cpu"))
    final = metrics_lines(out)[-1]
    # 784 binary pixels: a model no better than a fair coin per pixel has 784 ln 2 = 543 nats
    assert final["eval/images"] == 500 and final["eval/nll"] < 784 * math.log(2)
    assert final["eval/bits_per_binary_pixel"] == pytest.approx(final["eval/nll"] / (784 * math.log(2)), rel=1e-4)
