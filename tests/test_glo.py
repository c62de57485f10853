"""glo.py: pyramid and losses on known inputs, the constraint set, PCA and Gaussian fits; runs through main() and the
command line, exact resume, bad inputs."""

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
import glo
import conftest
from conftest import ROOT, assert_same, metrics_lines, real_idx_dir, training_lines, write_truncated_mnist

TINY = dict(image_size=16, batch_size=16, g_width=8, z_dim=8, num_samples=64, log_every=2, sample_every=2,
            checkpoint_every=2, max_steps=4, eval_images=20, eval_steps=3, device="cpu")


def tiny_args(data_dir, out, **overrides) -> glo.Args:
    return glo.Args(**{"dataset": "mnist", "data_dir": str(data_dir), "out": str(out), **TINY, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Generator, Laplacian pyramid, losses
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_works_at_every_power_of_two_size(size, channels):
    G = glo.Generator(z_dim=10, channels=channels, image_size=size, width=4)
    images = G(glo.project(torch.randn(3, 10), "sphere"))
    assert images.shape == (3, channels, size, size) and images.abs().max() <= 1


def test_generator_follows_the_dcgan_initialisation():
    """GLO's generator is DCGAN's (Bojanowski et al. §4.1), with its initialisation (Radford §4)."""
    torch.manual_seed(0)
    G = glo.Generator(z_dim=100, channels=3, image_size=32, width=64)
    convs = [m for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    norms = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    gains = torch.cat([n.weight.flatten() for n in norms])
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert gains.mean().item() == pytest.approx(1, abs=0.005) and gains.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(n.bias.abs().max() == 0 for n in norms) and convs[-1].bias.abs().max() == 0


@pytest.mark.parametrize("size", [16, 32, 64])
def test_laplacian_pyramid_reconstructs_its_input_exactly(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    bands = glo.laplacian_pyramid(x, glo.pyramid_levels(size))
    assert [b.shape[-1] for b in bands] == [size >> j for j in range(len(bands))] and bands[-1].shape[-1] == 4
    assert torch.allclose(glo.reconstruct_from_pyramid(bands), x, atol=1e-12, rtol=0)
    # the band-pass levels of a constant image are 0 and its residual is the constant: borders and gains are right
    flat = glo.laplacian_pyramid(torch.full((1, 1, size, size), 0.3, dtype=torch.float64), glo.pyramid_levels(size))
    assert all(b.abs().max() < 1e-12 for b in flat[:-1]) and torch.allclose(flat[-1], torch.tensor(0.3).double())


def test_pyramid_steps_match_a_reflected_binomial_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    kernel = torch.tensor(glo.BINOMIAL_KERNEL, dtype=torch.float64)
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(2, 1, 5, 5)
    blur = lambda t: torch.nn.functional.conv2d(torch.nn.functional.pad(t, (2, 2, 2, 2), mode="reflect"), kernel2d,
                                                groups=2)
    assert torch.allclose(glo.pyramid_down(x), blur(x)[:, :, ::2, ::2], atol=1e-12)
    zeros = torch.zeros(2, 2, 32, 32, dtype=torch.float64)
    zeros[:, :, ::2, ::2] = x
    assert torch.allclose(glo.pyramid_up(x), 4 * blur(zeros), atol=1e-12)


def test_lap1_is_zero_for_identical_images_and_follows_the_paper_formula():
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(glo.lap1(x, x), torch.zeros(4))
    levels = glo.pyramid_levels(32)
    pyramid_x, pyramid_y = glo.laplacian_pyramid(x, levels), glo.laplacian_pyramid(y, levels)
    # sum_j 2^{2j} |L^j(x) - L^j(y)|_1, j = 0 the finest level, over the number of pixels ...
    paper = sum(2 ** (2 * j) * (a - b).abs().flatten(1).sum(1) for j, (a, b) in enumerate(zip(pyramid_x, pyramid_y)))
    assert torch.allclose(glo.lap1(x, y), paper / (3 * 32 * 32), rtol=1e-5)
    # ... is the sum of the per-level mean absolute differences: every level weighs the same
    per_level = sum((a - b).abs().flatten(1).mean(1) for a, b in zip(pyramid_x, pyramid_y))
    assert torch.allclose(glo.lap1(x, y), per_level, rtol=1e-5)
    # a brightness shift lives only in the low-pass residual: Lap1 is the shift, whatever the image size
    assert torch.allclose(glo.lap1(x + 0.25, x), torch.full((4,), 0.25), atol=1e-5)


def test_pixel_losses_on_known_values():
    x_hat, x = torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    x_hat[0] = 0.5
    assert glo.image_losses("l2", x_hat, x).tolist() == pytest.approx([0.25, 0.0])
    assert glo.image_losses("l1", x_hat, x).tolist() == pytest.approx([0.5, 0.0])
    loss, metrics = glo.reconstruction_loss("l2", x_hat, x)
    assert loss.item() == pytest.approx(0.125) and metrics["rec/mse"].item() == pytest.approx(0.0625 / 2)


# ---------------------------------------------------------------------------------------------------------------
# Codes: constraint set, PCA initialisation, Gaussian fit, fitting codes with G frozen
# ---------------------------------------------------------------------------------------------------------------

def test_projection_onto_the_sphere_and_the_ball():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(glo.project(z, "sphere"), torch.tensor([[0.6, 0.8], [0.6, 0.8]]))
    assert torch.allclose(glo.project(z, "ball"), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    inside = glo.into_constraint_set(z, "ball")
    assert torch.allclose(inside, z / 5)  # relative lengths kept, the longest on the sphere


def test_interpolation_follows_the_great_circle_on_the_sphere_and_the_line_in_the_ball():
    """On the sphere every point of the path has norm 1 and the angle from z0 grows evenly with t (slerp); the ball
    is convex, so its path is the straight line."""
    z0, z1 = glo.project(torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64), "sphere")
    t = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
    path = glo.interpolate(z0, z1, t, "sphere")
    angle = torch.arccos(z0 @ z1)
    torch.testing.assert_close(path.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(torch.arccos((path @ z0).clamp(-1, 1)), t[:, 0] * angle, atol=1e-6, rtol=0)
    torch.testing.assert_close(path[[0, -1]], torch.stack([z0, z1]))
    torch.testing.assert_close(glo.interpolate(z0 / 2, z1 / 2, t, "ball"), (1 - t) * z0 / 2 + t * z1 / 2)


class Replay(torch.nn.Module):
    """A stand-in G that outputs fixed images whatever the codes (0 * z keeps the codes in the graph), times a gain of
    1 that gives it a parameter to report a gradient norm for."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images, self.gain = images, torch.nn.Parameter(torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gain * self.images + 0 * z.sum()


def test_g_learns_pixels_in_minus_one_to_one_and_decodes_them_back_to_uint8():
    """G ends in tanh, so pixel p in 0..255 is the target p / 127.5 - 1: a G that outputs exactly that has zero loss,
    and decode turns its output back into the same uint8 images."""
    torch.manual_seed(0)
    args = glo.Args(z_dim=6, image_size=16, g_width=4, loss="l2")
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    model = glo.build_glo(args, 1, glo.into_constraint_set(torch.randn(8, 6), args.constraint), torch.device("cpu"))
    model.generator = Replay(images.float() / 127.5 - 1)
    metrics = glo.train_step(model, args, lambda: (images, torch.arange(8)), torch.device("cpu"))
    assert metrics["loss/rec"].item() == 0.0
    assert torch.equal(glo.decode(model.generator, torch.zeros(8, 6)), images)


@pytest.mark.parametrize("constraint", ["sphere", "ball"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_codes_stay_in_the_constraint_set_after_updates_and_only_the_batch_moves(constraint, optimizer):
    torch.manual_seed(0)
    args = glo.Args(z_dim=6, image_size=16, g_width=4, constraint=constraint, optimizer=optimizer, lr_z=1000.0)
    start = glo.into_constraint_set(torch.randn(40, 6), constraint)
    model = glo.build_glo(args, 1, start, torch.device("cpu"))
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    ids = torch.arange(8)
    glo.train_step(model, args, lambda: (images[ids], ids), torch.device("cpu"))
    codes = model.codes.weight.detach()
    norms = codes.norm(dim=1)
    assert not torch.allclose(codes[:8], start[:8]) and torch.equal(codes[8:], start[8:])
    if constraint == "sphere":
        assert torch.allclose(norms, torch.ones(40), atol=1e-6)
    else:
        assert norms.max() <= 1 + 1e-6 and norms[8:].min() < 0.99  # rows that never left the ball keep their length


def test_pca_initialisation_spans_the_top_components():
    """Images on a 2-D plane (two orthonormal pixel patterns with std 400 and 200) plus noise of std 2: the top two
    principal directions are the plane, and each code is its image's coordinates in that plane, normalised. The
    images are bright (grey level 165, 0.29 on G's [-1, 1] scale), so that a decomposition of the uncentred data
    would put the mean image first."""
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(256, 2)))[0].T  # (2, 256) orthonormal
    coords = rng.normal(size=(300, 2)) * [400, 200]  # patterns of norm 1 over 256 pixels: about 25 and 12 grey levels
    pixels = 165 + coords @ directions + rng.normal(size=(300, 256)) * 2
    images = torch.from_numpy(np.clip(pixels, 0, 255).round().astype(np.uint8).reshape(300, 1, 16, 16))
    mean, components = glo.principal_components(images, 3, seed=0)
    plane = torch.from_numpy(directions).float()
    within = components[:2] @ plane.T  # (2, 2): the top two components expressed in the plane's basis
    assert torch.allclose(within @ within.T, torch.eye(2), atol=0.02)  # they span the plane
    assert (components[2] @ plane.T).abs().max() < 0.05  # the third is orthogonal to it
    codes = glo.initial_codes(images, glo.Args(z_dim=2, seed=0))
    assert torch.allclose(codes.norm(dim=1), torch.ones(300), atol=1e-5)
    truth = glo.project(torch.from_numpy(coords - coords.mean(0)).float(), "sphere")  # PCA centres the data
    # the codes are the true coordinates up to a rotation or reflection of the plane (the sign of each component)
    rotation = torch.linalg.lstsq(truth, codes).solution
    assert torch.allclose(rotation @ rotation.T, torch.eye(2), atol=0.05)
    assert (truth @ rotation - codes).norm(dim=1).mean() < 0.02


def test_fitted_gaussian_matches_the_codes_mean_and_covariance():
    torch.manual_seed(0)
    codes = torch.randn(5000, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.3, 0.2], [0.0, 0.0, 0.1]]) + 0.7
    mean, covariance, factor = glo.fit_gaussian(codes)
    assert torch.allclose(mean, codes.double().mean(0)) and torch.allclose(covariance, torch.cov(codes.double().T))
    draws = glo.gaussian_codes(mean, factor, torch.randn(200_000, 3, dtype=torch.float64))
    assert torch.allclose(draws.mean(0).double(), mean, atol=0.01)
    assert torch.allclose(torch.cov(draws.T.double()), covariance, atol=0.01)


def test_fitting_codes_with_a_frozen_generator_recovers_an_image():
    torch.manual_seed(0)
    G = glo.Generator(6, 1, 16, 8).eval()
    for m in G.modules():
        if isinstance(m, torch.nn.ConvTranspose2d):
            torch.nn.init.normal_(m.weight, 0, 0.3)  # a generator whose output depends strongly on z
    target_z = glo.project(torch.randn(4, 6), "sphere")
    with torch.no_grad():
        images = common.to_uint8(G(target_z))
    start = glo.project(target_z + 0.5 * torch.randn(4, 6), "sphere")
    args = glo.Args(z_dim=6, loss="l2", eval_steps=150, eval_lr=0.05)
    before = glo.pixel_mse(glo.decode(G, start), images)
    codes, rebuilt = glo.fit_codes(G, images, start, args)
    assert glo.pixel_mse(rebuilt, images) < 0.1 * before
    assert torch.allclose(codes.norm(dim=1), torch.ones(4), atol=1e-5)
    assert all(p.requires_grad for p in G.parameters()) and not G.training  # left as it was found
    assert all(p.grad is None for p in G.parameters())  # G frozen: fitting codes left nothing in its gradients


def test_one_fitting_step_is_adams_first_step_on_the_tangent_gradient_of_the_squared_error(monkeypatch):
    """fit_codes minimises the reported error (squared, whatever --loss trained G), keeps the gradient's part
    tangent to the sphere, and projects back: Adam's first step moves each coordinate by lr g / (|g| + eps)."""
    torch.manual_seed(0)
    G = glo.Generator(6, 1, 16, 8).eval()
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    start = glo.project(torch.randn(3, 6), "sphere")
    kinds = []
    losses = glo.image_losses
    monkeypatch.setattr(glo, "image_losses", lambda kind, *a: kinds.append(kind) or losses(kind, *a))
    codes, _ = glo.fit_codes(G, images, start, glo.Args(z_dim=6, loss="lap1", eval_steps=1, eval_lr=0.05))
    assert kinds == ["l2"]
    z = start.clone().requires_grad_(True)
    x = images.float() / 127.5 - 1
    (grad,) = torch.autograd.grad((G(z) - x).pow(2).flatten(1).mean(1).sum(), z)
    tangent = grad - (grad * start).sum(dim=1, keepdim=True) * start
    expected = glo.project(start - 0.05 * tangent / (tangent.abs() + 1e-8), "sphere")
    assert torch.allclose(codes, expected, atol=1e-5)


def test_evaluation_starts_from_the_nearest_other_training_images_code_and_reports_mse_on_0_1():
    train = torch.tensor([0, 100, 110, 255], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    codes = torch.arange(4.0)[:, None] * torch.ones(1, 3)
    queries = torch.tensor([105, 250, 100], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    assert glo.nearest_codes(queries, train, codes)[:, 0].tolist() == [1.0, 3.0, 1.0]  # ties go to the first
    # a training image as its own query may not pick itself: image 1's nearest other is image 2
    assert glo.nearest_codes(train[[1, 2]], train, codes, exclude=torch.tensor([1, 2]))[:, 0].tolist() == [2.0, 1.0]
    assert glo.pixel_mse(train[:1], train[3:]) == pytest.approx(1.0)  # black against white: 1 on [0, 1]
    assert glo.pixel_mse(train[1:2], train[2:3]) == pytest.approx((10 / 255) ** 2)


# ---------------------------------------------------------------------------------------------------------------
# Training through main()
# ---------------------------------------------------------------------------------------------------------------

def test_a_run_writes_every_output(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    glo.main(tiny_args(tiny_data_dir, out, max_steps=0, epochs=1, log_every=8, sample_every=16))  # 32 steps
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint.pt", "samples_16.png", "samples_32.png", "samples.npz",
            "loss.png", "interpolations.png", "reconstructions.png", "real_samples.png"} <= names
    lines = metrics_lines(out)
    assert [r["step"] for r in lines[:-1]] == [8, 16, 24, 32]
    assert {"loss/rec", "rec/mse", "grad/g", "codes/step", "time/steps_per_s"} <= set(lines[0])
    final = lines[-1]
    assert final["final"] and {"eval/mse_train", "eval/mse_train_subset", "eval/mse_train_refit", "eval/mse_test",
                               "eval/sample_norm", "eval/nn_test_to_fake"} <= set(final)
    assert all(math.isfinite(v) for v in final.values() if isinstance(v, float))
    assert lines[-2]["rec/mse"] < lines[0]["rec/mse"]  # it learns
    samples = np.load(out / "samples.npz")["images"]
    assert samples.shape == (64, 1, 16, 16) and samples.dtype == np.uint8
    assert Image.open(out / "reconstructions.png").size == (10 * 18 + 2, 8 * 18 + 2)
    assert Image.open(out / "interpolations.png").size == (10 * 18 + 2, 8 * 18 + 2)


@pytest.mark.parametrize("code_init", ["pca", "random"])
def test_fixed_latents_leave_the_codes_unchanged_and_glo_moves_them(code_init, tiny_data_dir, tmp_path):
    """--fixed-latents changes only whether the codes learn: with either start, the fixed run keeps its start and
    the learning run moves away from the same start."""
    images = common.load_image_dataset("mnist", tiny_data_dir, 16).images
    starts = {}
    for fixed in (True, False):
        args = tiny_args(tiny_data_dir, tmp_path / f"{fixed}", fixed_latents=fixed, code_init=code_init,
                         eval_images=0)
        glo.main(args)
        starts[fixed] = glo.initial_codes(images, args)
        codes = common.load_checkpoint(tmp_path / f"{fixed}")["glo"]["codes"]["weight"]
        assert torch.equal(codes, starts[fixed]) == fixed
        assert (metrics_lines(tmp_path / f"{fixed}")[0]["codes/step"] == 0) == fixed
    assert torch.equal(starts[True], starts[False])  # the same start: the switch changes one thing
    pca = glo.initial_codes(images, tiny_args(tiny_data_dir, tmp_path, code_init="pca"))
    assert torch.equal(starts[True], pca) == (code_init == "pca")


@pytest.mark.parametrize("flags", [{}, dict(optimizer="adam", constraint="ball", loss="l1")], ids=["paper", "adam"])
def test_resume_equals_an_uninterrupted_run(flags, tiny_data_dir, tmp_path):
    """N steps, then resume for N more, is bit for bit the 2N-step run: generator, codes, both optimisers, data order
    and RNG continue exactly. 40 steps cross an epoch boundary (32 steps per epoch)."""
    common_flags = dict(deterministic=True, epochs=2, checkpoint_every=0, sample_every=0, log_every=4,
                        eval_images=0, **flags)
    glo.main(tiny_args(tiny_data_dir, tmp_path / "whole", max_steps=40, **common_flags))
    glo.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=20, **common_flags))
    glo.main(tiny_args(tiny_data_dir, tmp_path / "split", max_steps=40, resume=str(tmp_path / "split"),
                       **common_flags))
    whole, split = common.load_checkpoint(tmp_path / "whole"), common.load_checkpoint(tmp_path / "split")
    assert whole["step"] == split["step"] == 40 and whole["batches"] == split["batches"] == {"epoch": 1, "index": 8}

    assert_same(whole["glo"], split["glo"], "glo")
    if flags.get("optimizer") == "adam":  # plain SGD has no state; lazy Adam keeps moments for every code
        assert whole["glo"]["opt_z"]["state"][0]["exp_avg"].shape == (512, 8)
    assert_same(whole["rng"][0]["torch"], split["rng"][0]["torch"], "rng")
    assert training_lines(metrics_lines(tmp_path / "whole")) == training_lines(metrics_lines(tmp_path / "split"))
    assert metrics_lines(tmp_path / "whole")[-1] == metrics_lines(tmp_path / "split")[-1]


def test_benchmark_prints_rates_and_writes_nothing(tiny_data_dir, tmp_path, capsys):
    glo.main(tiny_args(tiny_data_dir, tmp_path / "bench", benchmark=True, benchmark_steps=2))
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert ("bf16 (--amp):" in out) == common.bf16_supported(torch.device("cpu")) and "float32:" in out
    assert "GFLOP per step" in out and "matmul" in out
    assert last.startswith("benchmark |") and "real data:" in last and "synthetic:" in last
    assert "steps/s" in last and "% of step time" in last and not (tmp_path / "bench").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

def run_cli(flags, capsys):
    return conftest.run_cli(glo.main, glo.Args, flags, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "48"], "power of two"),
    (["--lr-g", "-1"], "must be 0 or more"),
    (["--eval-lr", "0"], "--eval-lr must be positive"),
    (["--eval-images", "-5"], "must be 0 or more"),
    (["--z-dim", "0"], "--z-dim must be at least 1"),
    (["--constraint", "cube"], "invalid choice"),
    (["--dataset", "imagenet"], "is not one of"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = run_cli(flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_data_and_checkpoint_errors_are_one_line(tiny_data_dir, tmp_path, capsys):
    glo.main(tiny_args(tiny_data_dir, tmp_path / "run", max_steps=1, eval_images=0))
    base = ["--data-dir", str(tiny_data_dir), "--device", "cpu", "--max-steps", "2"]
    write_truncated_mnist(tiny_data_dir, tmp_path / "data")
    cases = [
        (["--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "x")], "unreadable"),
        (["--resume", str(tmp_path / "nothing")], "no checkpoint at"),
        (["--resume", str(tmp_path / "run"), "--z-dim", "5"], "does not fit this model"),
        (["--resume", str(tmp_path / "run"), "--fixed-latents"], "does not fit this model"),
        (["--resume", str(tmp_path / "run"), "--image-size", "32"], "does not fit this model"),
    ]
    for flags, message in cases:
        code, err = run_cli(base + flags, capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code in (1, 2) and len(errors) == 1 and message in errors[0], (flags, err)
        assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# Command line and Ctrl-C; real data (skipped when absent)
# ---------------------------------------------------------------------------------------------------------------

def test_command_line_run_and_ctrl_c_then_resume(tiny_data_dir, tmp_path):
    out = tmp_path / "cli"
    flags = {**TINY, "dataset": "mnist", "data_dir": tiny_data_dir, "out": out, "max_steps": 100_000,
             "epochs": 10_000, "log_every": 1, "sample_every": 0, "checkpoint_every": 0}
    argv = [sys.executable, str(ROOT / "glo.py")] + [part for key, value in flags.items()
                                                     for part in (f"--{key.replace('_', '-')}", str(value))]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.stdout.readline().startswith("step 3/"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "checkpoint in" in stdout and "--resume" in stdout
    step = common.load_checkpoint(out)["step"]
    result = subprocess.run([sys.executable, str(ROOT / "glo.py"), "--resume", str(out), "--max-steps",
                             str(step + 2)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert common.load_checkpoint(out)["step"] == step + 2 and (out / "samples.npz").is_file()
    assert metrics_lines(out)[-1]["final"]
    helps = {option: action.help for action in common.build_parser(glo.Args)._actions
             for option in action.option_strings}
    for flag, source in [("--loss", "§3.2"), ("--constraint", "§3.1"), ("--lr-g", "§4"), ("--epochs", "25"),
                         ("--fixed-latents", "never optimised")]:
        assert source in helps[flag], (flag, helps[flag])


def test_torchrun_two_cpu_processes_share_one_code_table(tiny_data_dir, tmp_path):
    """Each rank updates the codes of its own half of the global batch; the halves are exchanged, so after one step
    the table rank 0 saves has both halves updated (16 rows for 2 x 8 images)."""
    out = tmp_path / "ddp"
    flags = {**TINY, "dataset": "mnist", "data_dir": tiny_data_dir, "out": out, "max_steps": 1, "batch_size": 8,
             "eval_images": 0, "sample_every": 0, "num_samples": 16}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "glo.py"),
         *[part for key, value in flags.items() for part in (f"--{key.replace('_', '-')}", str(value))]],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    checkpoint = common.load_checkpoint(out)
    start = glo.initial_codes(common.load_image_dataset("mnist", tiny_data_dir, 16).images, tiny_args(
        tiny_data_dir, out))
    # a tolerance: the ranks ran with one thread, this process may not, and the SVD's last bits depend on that
    changed = ((checkpoint["glo"]["codes"]["weight"] - start).abs() > 1e-5).any(dim=1)
    assert changed.sum() == 16 and len(checkpoint["rng"]) == 2


def test_real_data_smoke_run(tmp_path):
    data_dir = real_idx_dir("fashion-mnist")
    if data_dir is None:
        pytest.skip("fashion-mnist not found: set MINIGEN_DATA (or install Debian's dataset-fashion-mnist)")
    out = tmp_path / "fashion"
    glo.main(glo.Args(dataset="fashion-mnist", data_dir=str(data_dir), out=str(out), max_steps=3, batch_size=32,
                      g_width=8, z_dim=16, num_samples=256, log_every=3, eval_images=20, eval_steps=2,
                      device="cpu"))
    final = metrics_lines(out)[-1]
    assert final["final"] and math.isfinite(final["eval/mse_test"]) and final["eval/mse_test"] < 0.5
    assert np.asarray(Image.open(out / "real_samples.png")).std() > 30  # real garments, not a blank grid
