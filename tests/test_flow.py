"""flow.py: every layer and the whole flow invert exactly and their log-determinants match autograd in float64;
bits/dim on known inputs; training through main() and the command line, resume, divergence and bad inputs."""

import dataclasses
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import flow
import conftest
from conftest import ONE_THREAD, ROOT, metrics_lines, real_idx_dir, training_lines, write_truncated_mnist

TINY = dict(batch_size=16, levels=2, steps_per_level=2, width=8, init_batch=64, eval_batch=64, num_samples=32,
            log_every=2, sample_every=2, checkpoint_every=2, eval_every=0, warmup_steps=2, max_steps=4, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


def tiny_args(data_dir, out, **overrides) -> flow.Args:
    return flow.Args(**{"dataset": "mnist", "data_dir": str(data_dir), "out": str(out), **TINY, **overrides})


def perturb(module: nn.Module, std: float = 0.1, rotation_std: float = 0.3) -> None:
    """Move every zero-initialised last layer (and the priors) off zero, so couplings are not the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, flow.ZeroConv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype) * std)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator, dtype=m.bias.dtype) * std)
            if isinstance(m, flow.InvertibleConv1x1):
                for p in (m.lower, m.upper, m.log_s):
                    p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * rotation_std)


def brute_force_log_det(function, x: torch.Tensor) -> float:
    """log |det J| of x -> function(x) for one example, from the full autograd Jacobian."""
    jacobian = torch.autograd.functional.jacobian(lambda v: function(v.view_as(x)).flatten(), x.flatten(),
                                                  vectorize=True)
    return torch.linalg.slogdet(jacobian).logabsdet.item()


# ---------------------------------------------------------------------------------------------------------------
# Layers and the whole flow: exact inverses, log-determinants against autograd (float64)
# ---------------------------------------------------------------------------------------------------------------

def test_squeeze_moves_each_2x2_patch_into_channels_and_unsqueeze_undoes_it():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    y = flow.squeeze(x)
    assert y.shape == (2, 12, 2, 3) and torch.equal(flow.unsqueeze(y), x)
    assert torch.equal(y.flatten().sort().values, x.flatten())  # a permutation: log-det 0
    assert y[0, :4, 0, 0].tolist() == [x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]


def make_layer(kind: str, channels: int = 4):
    torch.manual_seed(0)
    layer = {"actnorm": lambda: flow.ActNorm(channels), "invconv": lambda: flow.InvertibleConv1x1(channels),
             "affine": lambda: flow.Coupling(channels, 8, affine=True),
             "additive": lambda: flow.Coupling(channels, 8, affine=False),
             "step": lambda: flow.FlowStep(channels, 8, affine=True)}[kind]().double()
    data = torch.randn(16, channels, 3, 3, dtype=torch.float64) * 2 + 3
    for m in layer.modules():  # data-dependent initialisation, as Glow.initialise does it
        if isinstance(m, flow.ActNorm):
            m.initialising = True
    layer(data)
    for m in layer.modules():
        if isinstance(m, flow.ActNorm):
            m.initialising = False
    perturb(layer)
    return layer


@pytest.mark.parametrize("kind", ["actnorm", "invconv", "affine", "additive", "step"])
def test_each_layer_inverts_and_its_log_det_matches_autograd(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    y, log_det = layer(x)
    assert log_det.shape == (3,) and not torch.allclose(y, x)  # not the identity
    assert torch.allclose(layer.inverse(y), x, atol=1e-12)
    for i in range(3):
        expected = brute_force_log_det(lambda v: layer(v)[0], x[i:i + 1])
        assert log_det[i].item() == pytest.approx(expected, abs=1e-9), kind
    if kind == "additive":
        assert log_det.abs().max() == 0  # volume preserving (NICE)


def test_lu_weight_is_a_rotation_at_initialisation():
    torch.manual_seed(0)
    conv = flow.InvertibleConv1x1(6).double()
    w = conv.weight()
    assert torch.allclose(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert conv.log_s.sum().item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 4)], ids=["grey", "rgb"])
def test_whole_flow_inverts_and_log_det_matches_autograd(channels, size):
    torch.manual_seed(0)
    glow = flow.Glow(channels, size, levels=2, steps_per_level=2, width=8).double()
    glow.initialise(torch.rand(32, channels, size, size, dtype=torch.float64) - 0.5)
    perturb(glow)
    x = torch.rand(2, channels, size, size, dtype=torch.float64) - 0.5
    latents, log_det, log_prior = glow(x)
    assert sum(z[0].numel() for z in latents) == x[0].numel()
    assert torch.allclose(glow.inverse(latents), x, atol=1e-10)
    all_latents = lambda v: torch.cat([z.flatten(1) for z in glow(v)[0]], dim=1)
    for i in range(2):
        assert log_det[i].item() == pytest.approx(brute_force_log_det(all_latents, x[i:i + 1]), abs=1e-8)
    assert log_det.dtype == log_prior.dtype == torch.float64


def test_split_prior_is_conditioned_on_the_half_that_stays():
    torch.manual_seed(0)
    split = flow.SplitPrior(4).double()
    kept, z = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    _, _, at_init = split(torch.cat([kept, z.expand(2, -1, -1, -1)], dim=1))
    standard_normal = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    assert torch.allclose(at_init, standard_normal.expand(2))  # zero-initialised: N(0, 1)
    perturb(split)
    kept_out, z_out, log_prob = split(torch.cat([kept, z.expand(2, -1, -1, -1)], dim=1))
    assert torch.equal(kept_out, kept) and torch.equal(z_out[0], z[0])
    assert log_prob[0] != log_prob[1]  # same z, different kept halves: different priors
    mean, log_std = split.conv(kept).chunk(2, dim=1)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(z.expand(2, -1, -1, -1)).flatten(1).sum(1)
    assert torch.allclose(log_prob, expected)


def test_log_prior_sums_the_split_priors_and_the_learned_top_gaussian():
    """log p(z) of Glow Fig. 2b: each split's conditional prior plus N(top_mean, exp(top_log_std)^2) on what leaves
    the last level (Glow's code: --learntop), here moved off N(0, 1) so that dropping either term shows."""
    torch.manual_seed(0)
    glow = flow.Glow(1, 8, 2, 1, 8).double()
    perturb(glow)
    with torch.no_grad():
        glow.top_mean.copy_(torch.linspace(-1, 1, glow.top_mean.numel()).view_as(glow.top_mean))
        glow.top_log_std.copy_(torch.linspace(-0.5, 0.5, glow.top_log_std.numel()).view_as(glow.top_log_std))
    split_log_probs = []
    glow.splits[0].register_forward_hook(lambda module, inputs, output: split_log_probs.append(output[2]))
    latents, _, log_prior = glow(torch.rand(3, 1, 8, 8, dtype=torch.float64) - 0.5)
    top = torch.distributions.Normal(glow.top_mean, glow.top_log_std.exp()).log_prob(latents[-1]).flatten(1).sum(1)
    assert torch.allclose(log_prior, split_log_probs[0] + top)


def test_likelihood_terms_stay_float32_when_the_coupling_network_runs_in_bf16(monkeypatch):
    """What --amp does on CUDA (bf16 networks), emulated on the CPU: log-dets and priors are float32."""
    torch.manual_seed(0)
    glow = flow.Glow(1, 8, 2, 2, 8)
    glow.initialise(torch.rand(16, 1, 8, 8) - 0.5)
    perturb(glow)
    forward = flow.CouplingNetwork.forward
    monkeypatch.setattr(flow.CouplingNetwork, "forward", lambda self, x: forward(self, x).bfloat16())
    _, log_det, log_prior = glow(torch.rand(4, 1, 8, 8) - 0.5)
    assert log_det.dtype == log_prior.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# ActNorm initialisation, dequantisation, bits/dim, sampling
# ---------------------------------------------------------------------------------------------------------------

def test_actnorm_initialisation_normalises_and_survives_save_and_load():
    torch.manual_seed(0)
    glow = flow.Glow(1, 8, 2, 2, 8)
    assert not glow.is_initialised()
    data = torch.rand(64, 1, 8, 8) * 0.3 + 0.1
    glow.initialise(data)
    assert glow.is_initialised()
    first = glow.levels[0][0].layers[0]  # the first ActNorm sees the squeezed data
    y, _ = first(flow.squeeze(data))
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), correction=0), torch.ones(4), atol=1e-4)
    buffer = io.BytesIO()
    torch.save(glow.state_dict(), buffer)
    buffer.seek(0)
    restored = flow.Glow(1, 8, 2, 2, 8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.is_initialised() and all(bool(m.initialized) for m in restored.actnorms())
    assert torch.equal(restored.levels[0][0].layers[0].log_scale, first.log_scale)


def test_dequantisation_keeps_n_bits_and_stays_in_its_bin():
    images = torch.tensor([0, 7, 8, 128, 255], dtype=torch.uint8).view(1, 1, 1, 5).repeat(1000, 1, 1, 1)
    x8 = flow.dequantize(images, 8)
    assert x8.min() >= -0.5 and x8.max() < 0.5
    assert torch.equal(flow.to_uint8(x8, 8), images)  # the noise never leaves the bin
    x5 = flow.dequantize(images, 5)  # 32 bins of 8 levels: 0 and 7 share a bin
    assert torch.equal(flow.to_uint8(x5, 5)[0, 0, 0], torch.tensor([0, 0, 8, 128, 248], dtype=torch.uint8))
    assert (x5[:, 0, 0, 4] >= 31 / 32 - 0.5).all() and (x5[:, 0, 0, 4] < 0.5).all()
    # the noise fills the bin uniformly: 1,000 copies of one pixel spread over its bin with U[0, 1)'s mean and std
    position = (x8[:, 0, 0, 3] + 0.5) * 256 - 128  # pixel 128 at 8 bits: u itself
    assert position.mean().item() == pytest.approx(0.5, abs=0.03)
    assert position.std().item() == pytest.approx(1 / math.sqrt(12), abs=0.02)


def test_bits_per_dim_includes_the_bin_width_term():
    assert flow.bits_per_dim(torch.tensor([0.0]), 784, 8).item() == pytest.approx(8.0)  # density 1: 8 bits
    log_p = torch.tensor([-784 * math.log(2)])  # one more bit per dimension
    assert flow.bits_per_dim(log_p, 784, 5).item() == pytest.approx(6.0)


def test_evaluation_draws_its_noise_from_its_own_generator_and_averages_over_images():
    """Test bits/dim is compared across steps and runs only if every evaluation sees the same dequantisation noise:
    it must come from the seeded generator it is given (never the training RNG, which it must not advance), and the
    mean is over images, not over chunks of unequal size."""
    torch.manual_seed(0)
    glow = flow.Glow(1, 8, 2, 1, 8)
    perturb(glow)
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    glow.initialise(flow.dequantize(images, 8))
    args = flow.Args(eval_batch=8, device="cpu")  # chunks of 8, 8 and 4 images
    training_rng = torch.get_rng_state()
    first = flow.evaluate_bpd(glow, images, args, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), training_rng)
    assert flow.evaluate_bpd(glow, images, args, torch.Generator().manual_seed(3)) == first
    assert flow.evaluate_bpd(glow, images, args, torch.Generator().manual_seed(4)) != first

    noise = torch.Generator().manual_seed(3)  # the same draws, chunk by chunk, each image scored on its own
    per_image = []
    with torch.no_grad():
        for chunk in images.split(8):
            x = flow.dequantize(chunk, 8, noise)
            for one in x:
                _, log_det, log_prior = glow(one[None])
                per_image.append(flow.bits_per_dim(log_prior + log_det, 64, 8).item())
    assert first == pytest.approx(sum(per_image) / len(per_image), abs=1e-5)
    chunk_means = [sum(per_image[:8]) / 8, sum(per_image[8:16]) / 8, sum(per_image[16:]) / 4]
    assert abs(first - sum(chunk_means) / 3) > 1e-4  # the two averages differ here, so the check above can fail


@pytest.mark.parametrize("n_bits", [8, 5])
def test_uniform_noise_under_an_untrained_flow_costs_a_little_over_n_bits_per_dim(n_bits):
    """Uniform pixels have entropy n bits/dim, so no model can do better. An untrained flow (ActNorm initialised on
    the noise, every coupling the identity, rotations, N(0, 1) priors) standardises U(-1/2, 1/2) and pays
    0.5 log(2 pi e) - log(sqrt(12)) = 0.177 nats = 0.255 bits/dim above that. Without the D log 2^n term the result
    would be near 0.25; without the log-dets near n + 2."""
    torch.manual_seed(0)
    glow = flow.Glow(1, 28, 2, 2, 8)
    images = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
    glow.initialise(flow.dequantize(images, n_bits))
    loss, metrics = flow.flow_loss(glow, images, n_bits)
    assert n_bits < loss.item() < n_bits + 0.35
    assert loss.item() == pytest.approx(n_bits + 0.255, abs=0.03)
    assert metrics["loss/bpd"] == loss


@pytest.mark.parametrize("channels", [1, 3])
def test_temperature_sampling_shapes_and_finiteness(channels):
    torch.manual_seed(0)
    glow = flow.Glow(channels, 8, 2, 2, 8)
    glow.initialise(torch.rand(32, channels, 8, 8) - 0.5)
    perturb(glow, 0.02, 0.05)  # an untrained flow whose inverse stays tame, like a trained one
    spreads = []
    for t in (0.0, 0.7, 1.0):
        x = glow.inverse(count=200, temperature=t, generator=torch.Generator().manual_seed(0))
        assert x.shape == (200, channels, 8, 8) and torch.isfinite(x).all()
        spreads.append(x.std(dim=0).mean().item())
    assert spreads[0] == pytest.approx(0, abs=1e-6) and spreads[0] < spreads[1] < spreads[2]  # T = 0: the mode
    images = flow.sample(glow, 10, 0.7, 8, torch.Generator().manual_seed(0), batch=4)
    assert images.shape == (10, channels, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, flow.sample(glow, 10, 0.7, 8, torch.Generator().manual_seed(0), batch=4))


# ---------------------------------------------------------------------------------------------------------------
# Training through main()
# ---------------------------------------------------------------------------------------------------------------

def test_a_run_writes_every_output_and_learns(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    flow.main(tiny_args(tiny_data_dir, out, max_steps=30, log_every=5, sample_every=15, checkpoint_every=15,
                        eval_every=10, lr=3e-3))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "samples_15.png", "samples_30.png", "samples.npz",
            "loss.png", "temperatures.png", "real_samples.png"} <= names
    lines = metrics_lines(out)
    training, final = lines[:-1], lines[-1]
    assert [r["step"] for r in training] == list(range(5, 31, 5))
    assert [r["step"] for r in training if "eval/bpd" in r] == [10, 20]
    assert {"loss/bpd", "grad/norm", "lr", "time/steps_per_s"} <= set(training[0])
    assert training[-1]["loss/bpd"] < training[0]["loss/bpd"] - 0.5  # it learns the tiny digits
    assert final["final"] and final["step"] == 30 and final["eval/test_images"] == 128 and final["eval/dims"] == 784
    assert final["eval/nll"] == pytest.approx(final["eval/bpd"] * 784 * math.log(2), rel=1e-5)
    assert final["eval/bpd"] < training[1]["eval/bpd"] + 0.05 and math.isfinite(final["eval/bpd_train"])
    samples = np.load(out / "samples.npz")["images"]
    assert samples.shape == (32, 1, 28, 28) and samples.dtype == np.uint8
    assert Image.open(out / "temperatures.png").size == (10 * 30 + 2, 8 * 30 + 2)
    assert training[0]["lr"] == pytest.approx((1.5e-3 + 4 * 3e-3) / 5)  # warm-up over 2 steps, then constant
    assert training[-1]["lr"] == pytest.approx(3e-3)


def test_rgb_folder_trains(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pictures").mkdir()
    for i in range(40):
        pixels = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
        pixels[..., i % 3] = 255
        Image.fromarray(pixels).save(tmp_path / "pictures" / f"{i}.png")
    out = tmp_path / "rgb"
    flow.main(tiny_args(tmp_path / "data", out, dataset=f"folder:{tmp_path / 'pictures'}", image_size=16,
                        batch_size=8, init_batch=40, max_steps=2, coupling="additive"))
    assert np.load(out / "samples.npz")["images"].shape == (32, 3, 16, 16)
    assert metrics_lines(out)[-1]["eval/dims"] == 3 * 16 * 16
    assert Image.open(out / "samples_2.png").mode == "RGB"


def test_resume_equals_an_uninterrupted_run(tiny_data_dir, tmp_path):
    """N steps, then resume for N more, is bit for bit the 2N-step run: weights, ActNorm flags, Adam, warm-up,
    data order, evaluations and RNG continue exactly. 24 steps cross an epoch boundary (16 steps per epoch)."""
    flags = dict(deterministic=True, epochs=2, batch_size=32, checkpoint_every=0, sample_every=0, log_every=4,
                 eval_every=8, warmup_steps=20, num_samples=8)
    flow.main(tiny_args(tiny_data_dir, tmp_path / "whole", max_steps=24, **flags))
    flow.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=12, **flags))
    flow.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=24, resume=str(tmp_path / "split"), **flags))
    whole, split = common.load_checkpoint(tmp_path / "whole"), common.load_checkpoint(tmp_path / "split")
    assert whole["step"] == split["step"] == 24 and whole["batches"] == split["batches"] == {"epoch": 1, "index": 8}
    assert whole["flow"].keys() == split["flow"].keys()
    for key in whole["flow"]:
        assert torch.equal(whole["flow"][key], split["flow"][key]), key
    assert torch.equal(whole["rng"][0]["torch"], split["rng"][0]["torch"])
    assert str(whole["optimizer"]) == str(split["optimizer"])
    whole_lines, split_lines = metrics_lines(tmp_path / "whole"), metrics_lines(tmp_path / "split")
    assert training_lines(whole_lines) == training_lines(split_lines) and len(training_lines(whole_lines)) == 6
    assert [r["step"] for r in training_lines(whole_lines) if "eval/bpd" in r] == [8, 16]
    assert whole_lines[-1] == split_lines[-1]


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    calls = [0]
    real_loss = flow.flow_loss

    def loss_turning_nan(*args, **kwargs):
        calls[0] += 1
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * math.nan, metrics) if calls[0] == 5 else (loss, metrics)

    monkeypatch.setattr(flow, "flow_loss", loss_turning_nan)
    out = tmp_path / "nan"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "max_steps": 8, "dataset": "mnist",
                                                         "data_dir": tiny_data_dir, "out": out}.items()]
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(flow.main, flow.Args, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "diverged at step 5" in err and "loss/bpd is nan" in err and "step 4" in err and "--lr" in err
    checkpoint = common.load_checkpoint(out)
    assert checkpoint["step"] == 4 and all(torch.isfinite(v).all() for v in checkpoint["flow"].values())


def test_benchmark_prints_rates_and_writes_nothing(tiny_data_dir, tmp_path, capsys):
    flow.main(tiny_args(tiny_data_dir, tmp_path / "bench", benchmark=True, benchmark_steps=2, eval_batch=8))
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert ("bf16 (--amp):" in out) == common.bf16_supported(torch.device("cpu")) and "float32:" in out
    assert "GFLOP per step" in out and "matmul" in out
    assert last.startswith("benchmark |") and "real data:" in last and "synthetic:" in last
    assert "steps/s" in last and "images/s" in last and "samples/s" in last and "% of step time" in last
    assert not (tmp_path / "bench").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

def run_cli(flags, capsys):
    return conftest.run_cli(flow.main, flow.Args, flags, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "mnist", "--levels", "3"], "28 px allows at most 2 levels"),
    (["--image-size", "30"], "multiple of 4"),
    (["--n-bits", "9"], "from 1 to 8"),
    (["--temperature", "-1"], "0 or more"),
    (["--coupling", "spline"], "invalid choice"),
    (["--width", "0"], "at least 1"),
    (["--lr", "0"], "must be positive"),
    (["--dataset", "imagenet"], "is not one of"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = run_cli(flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_data_errors_are_one_line(tiny_data_dir, tmp_path, capsys):
    base = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--max-steps", "1",
            "--device", "cpu"]
    write_truncated_mnist(tiny_data_dir, tmp_path / "data")
    cases = [(["--dataset", "mnist"], "unreadable"),
             (["--dataset", f"folder:{tmp_path / 'missing'}"], "no such directory"),
             (["--resume", str(tmp_path / "nothing")], "no checkpoint at")]
    for flags, message in cases:
        code, err = run_cli(base + flags, capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code in (1, 2) and len(errors) == 1 and message in errors[0], (flags, err)
        assert "Traceback" not in err


def test_resuming_into_a_different_architecture_is_a_user_error(tiny_data_dir, tmp_path, capsys):
    flow.main(tiny_args(tiny_data_dir, tmp_path / "run", max_steps=1, num_samples=4))
    code, err = run_cli(["--resume", str(tmp_path / "run"), "--width", "16"], capsys)
    assert code == 1 and "does not fit this model" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def test_command_line_help_run_and_resume(tiny_data_dir, tmp_path):
    cli = [sys.executable, str(ROOT / "flow.py")]
    result = subprocess.run(cli + ["--help"], capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert result.returncode == 0 and "Glow" in result.stdout
    helps = {option: action.help for action in common.build_parser(flow.Args)._actions
             for option in action.option_strings}
    for flag, source in [("--levels", "Glow"), ("--steps-per-level", "Glow"), ("--coupling", "NICE"),
                         ("--n-bits", "Glow"), ("--temperature", "Glow"), ("--init-batch", "§3.1")]:
        assert source in helps[flag], (flag, helps[flag])
    out = tmp_path / "cli"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "dataset": "mnist", "data_dir": tiny_data_dir,
                                                          "out": out, "max_steps": 2}.items()]
    result = subprocess.run(cli + flags, capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "eval | eval/bpd" in result.stdout and (out / "samples.npz").is_file()
    result = subprocess.run(cli + ["--resume", str(out), "--max-steps", "4"], capture_output=True, text=True,
                            timeout=120, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert common.load_checkpoint(out)["step"] == 4
    assert dataclasses.asdict(tiny_args(tiny_data_dir, out))["width"] == common.load_checkpoint(out)["args"]["width"]


def test_torchrun_two_cpu_processes(tiny_data_dir, tmp_path):
    out = tmp_path / "ddp"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "dataset": "mnist", "data_dir": tiny_data_dir,
                                                          "out": out, "max_steps": 3, "batch_size": 8}.items()]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "flow.py"), *flags], capture_output=True, text=True, timeout=240,
                            env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert result.stdout.count("step 2/3") == 1  # only rank 0 prints
    checkpoint = common.load_checkpoint(out)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Real data (skipped when absent)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_real_data_smoke_run(dataset, tmp_path):
    data_dir = real_idx_dir(dataset)
    if data_dir is None:
        pytest.skip(f"{dataset} not found: set MINIGEN_DATA (or install Debian's dataset-fashion-mnist)")
    out = tmp_path / dataset
    flow.main(flow.Args(dataset=dataset, data_dir=str(data_dir), out=str(out), max_steps=3, batch_size=16,
                        steps_per_level=2, width=8, init_batch=64, eval_batch=1000, num_samples=16, log_every=3,
                        eval_every=0, device="cpu"))
    final = metrics_lines(out)[-1]
    assert final["final"] and final["eval/test_images"] == 10_000 and final["eval/dims"] == 784
    assert 0.5 < final["eval/bpd"] < 9  # 8-bit pixels over 28 x 28: a real number of bits, not padding's
    real = np.asarray(Image.open(out / "real_samples.png"))
    assert real.std() > 30
