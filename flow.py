"""Glow: a multi-scale normalising flow with invertible 1x1 convolutions, built on RealNVP's couplings.

Kingma, Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018, arXiv:1807.03039;
Dinh, Sohl-Dickstein, Bengio, "Density estimation using Real NVP", ICLR 2017, arXiv:1605.08803.

A flow is an invertible map z = f(x) = f_K(...f_1(x)) from images to latents whose Jacobians are cheap. The change
of variables gives the exact log-likelihood, with h_0 = x and h_K = z (Glow eq. 7):

    log p(x) = log p(z) + sum_i log |det(dh_i / dh_(i-1))|                                                  (7)

One step of flow (Glow §3, Table 1), repeated K times per level, on activations of shape C x H x W:
  ActNorm (§3.1):       y = exp(log s) * (x + b) per channel; b and log s are set from the first batch so that its
                        activations have zero mean and unit variance, then trained. log-det = H W sum(log s).
  1x1 convolution (§3.2): y = W x at every pixel, with W = P L (U + diag(s)) (eq. 10): P a fixed permutation, L
                        unit lower and U strictly upper triangular, so log-det = H W sum(log |s|) (eqs. 9, 11).
  affine coupling (§3.3; RealNVP §3.3): x_a, x_b = split(x); (t, h) = NN(x_a); s = sigmoid(h + 2);
                        y_b = (x_b + t) * s; y_a = x_a. log-det = sum(log s). The last layer of NN starts at zero, so
                        every step starts as the identity; the sigmoid (the official code's form; the paper writes
                        exp) bounds the scale so the log-det cannot run away. `--coupling additive` is NICE's
                        y_b = x_b + t (Dinh et al. 2014), with log-det 0.
Multi-scale (RealNVP §3.6, Glow Fig. 2): each of L levels squeezes (2x2xC -> 1x1x4C), runs K steps, and then, except
at the last level, splits: half of the channels leave as latents z_i ~ N(mu, sigma^2), where (mu, log sigma) is a
zero-initialised convolution of the half that stays (the learned conditional prior of Glow's code). The top latent has
a learned per-channel Gaussian prior.

Data and bits/dim. Pixels are integers, so a density needs dequantisation (Glow eq. 2; Theis et al. 2016 §3.1):

    x = (floor(x_8 / 2^(8 - n)) + u) / 2^n - 1/2,      u ~ U[0, 1)^D,      n = --n-bits
    bits/dim = (-log p(x) + D log 2^n) / (D log 2)

The D log 2^n term turns the density of x (bins of width 1/2^n) into a probability per bin. By Jensen's inequality
the dequantised log-likelihood bounds the discrete pixels' from below (Theis et al. 2016), so these bits/dim are an
upper bound on the discrete model's. Every Jacobian term is included and summed in float32 or float64; under --amp
only the coupling networks train in bf16, and evaluations run in float32 with CUDA's TF32 off.

Image size. Digits are modelled at their own 28x28 (D = 784): 28 -> 14 -> 7 allows L = 2 levels. Padding to 32 px
(as Glow's code does for MNIST) adds 240 constant black pixels that a flow predicts almost exactly, which lowers
bits/dim without modelling any digit better; `--image-size 32` works but prints that the padding is counted.

Run it:
    python flow.py                                      # Fashion-MNIST at 28 px, 2 epochs; ~10 min on 2 CPU cores
    python flow.py --dataset mnist --epochs 10 --max-steps 8500                  # the README's CPU run (28 min)
    python flow.py --dataset cifar10 --levels 3 --steps-per-level 32 --width 512 --device cuda --amp   # Glow's size
    torchrun --nproc_per_node=4 flow.py --dataset cifar10                     # one process per GPU (or CPU: gloo)
    python flow.py --resume runs/<folder>                                     # continue an interrupted run

Results: README, "flow.py".
"""

import dataclasses
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# The datasets' own image sizes: bits/dim are then over the real pixels only (see the docstring)
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "stacked-mnist": 28, "cifar10": 32}
GRID_TEMPERATURES = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # rows of temperatures.png (Glow's code draws these)


@dataclasses.dataclass
class Args(common.RunArgs):
    epochs: int = 2  # passes over the training set (2 x 937 steps of 64 on the MNISTs)
    batch_size: int = 64  # per process (Glow's code: 64)
    image_size: int = 0  # 0: the dataset's own size (28 for the MNISTs, 32 otherwise); divisible by 2^levels
    levels: int = 2  # L, the number of scales (Glow: 3 at 32 px; 28 px allows 2: 28 -> 14 -> 7)
    steps_per_level: int = 16  # K, steps of flow per level (Glow §5: 32)
    width: int = 64  # hidden channels of each coupling network NN (Glow §5: 512)
    coupling: typing.Literal["affine", "additive"] = "affine"  # affine (Glow §3.3, RealNVP) or additive (NICE)
    n_bits: int = 8  # bits kept per pixel before dequantisation (Glow: 8 for its likelihood tables, 5 for CelebA-HQ)
    lr: float = 1e-3  # Adam learning rate (Glow §5 and its code: 1e-3)
    warmup_steps: int = 200  # linear learning-rate warm-up from 0 over this many steps (Glow's code: 10 epochs); 0: off
    grad_clip: float = 100.0  # clip the global gradient norm to this (grad/norm logs it before clipping); 0: off
    init_batch: int = 512  # training images for ActNorm's data-dependent initialisation (Glow §3.1; its code: 256)
    temperature: float = 0.7  # T of the sample grids: latents ~ N(mu, (T sigma)^2) (Glow §5: 0.7); samples.npz uses 1
    eval_every: int = 1000  # steps between eval/bpd on the whole test split (0: only at the end)
    eval_batch: int = 500  # images per batch when evaluating and sampling
    num_samples: int = 10_000  # images written to samples.npz, drawn at temperature 1 (the model's own distribution)

    def __post_init__(self):
        super().__post_init__()
        common.check_image_dataset(self.dataset)
        common.check_ranges(self, at_least_1=("levels", "steps_per_level", "width", "init_batch", "eval_batch",
                                              "num_samples"), positive=("lr",),
                            at_least_0=("warmup_steps", "grad_clip", "temperature", "eval_every", "image_size"))
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"--n-bits must be from 1 to 8, got {self.n_bits}")
        size, factor = self.resolved_image_size(), 2 ** self.levels
        if size % factor or size > 256:
            hint = "; 28 px allows at most 2 levels, or use --image-size 32 (pads digits with black)" \
                if size == 28 else ""
            raise ValueError(f"--levels {self.levels} squeezes {self.levels} times, so the image size must be a "
                             f"multiple of {factor} up to 256, got {size}{hint}")

    def resolved_image_size(self) -> int:
        return self.image_size or NATIVE_SIZE.get(self.dataset, 32)


# ---------------------------------------------------------------------------------------------------------------
# Layers: each maps x -> (y, log-det per example) and has an exact inverse
# ---------------------------------------------------------------------------------------------------------------

def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels (RealNVP §3.6); a permutation, log-det 0.
    Channel 4c + 2i + j holds pixel (i, j) of each patch of channel c."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """y = exp(log_scale) * (x + bias), per channel (Glow §3.1). `Glow.initialise` sets bias and log_scale from one
    batch so that its output has zero mean and unit variance per channel. The `initialized` flag is a buffer, so it
    is in every checkpoint and a resumed run never initialises again over trained values."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.initialising = False  # True only during Glow.initialise's forward pass

    def forward(self, x: torch.Tensor):
        if self.initialising:
            with torch.no_grad():
                x32 = at_least_float32(x)
                self.bias.copy_(-x32.mean(dim=(0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x32.std(dim=(0, 2, 3), keepdim=True, correction=0) + 1e-6))
                self.initialized.fill_(True)
        y = (x + self.bias) * torch.exp(self.log_scale)
        log_det = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, log_det.expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvertibleConv1x1(nn.Module):
    """y = W x at every pixel, W = P L (U + diag(sign(s) exp(log|s|))) (Glow §3.2, eq. 10). W starts as a random
    rotation (log-det 0); P and sign(s) stay fixed, and log|det W| = sum(log|s|) (eq. 11) costs O(C), not O(C^3)."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]  # a random rotation
        permutation, lower, upper = torch.linalg.lu(w)
        s = upper.diagonal()
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", s.sign())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)  # strictly lower part; the diagonal of L is 1
        self.upper = nn.Parameter(upper.triu(1))  # strictly upper part
        self.log_s = nn.Parameter(s.abs().log())

    def weight(self) -> torch.Tensor:
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper  # (C_out, C_in)

    def forward(self, x: torch.Tensor):
        y = F.conv2d(x, self.weight()[:, :, None, None])
        log_det = x.shape[2] * x.shape[3] * self.log_s.sum()  # eq. 9 with eq. 11
        return y, log_det.expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inverse = torch.linalg.inv(common.to_host_float64(self.weight())).to(y.dtype).to(y.device)
        return F.conv2d(y, w_inverse[:, :, None, None])


class ZeroConv2d(nn.Conv2d):
    """A 3x3 convolution that starts at exactly zero (Glow §3.3: each coupling then starts as the identity)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class CouplingNetwork(nn.Module):
    """NN() of Glow §3.3 and its code: 3x3 conv -> ActNorm -> ReLU -> 1x1 conv -> ActNorm -> ReLU -> zero 3x3 conv.
    (B, C_in, H, W) -> (B, width, H, W) -> (B, width, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)  # ActNorm's bias replaces conv bias
        self.norm1 = ActNorm(width)
        self.conv2 = nn.Conv2d(width, width, 1, bias=False)
        self.norm2 = ActNorm(width)
        self.out = ZeroConv2d(width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        return self.out(h)


class Coupling(nn.Module):
    """Affine: y_b = (x_b + t) * sigmoid(h + 2), (t, h) = NN(x_a); additive: y_b = x_b + t (Glow §3.3, Table 1).
    NN may run in bf16 under --amp; its output is cast to float32 before the scale and the log-det."""

    def __init__(self, channels: int, width: int, affine: bool = True):
        super().__init__()
        self.affine = affine
        half = channels // 2
        self.net = CouplingNetwork(half, 2 * half if affine else half, width)
        self.amp = False

    def _shift_and_log_scale(self, x_a: torch.Tensor):
        with common.autocast(x_a.device, self.amp):
            h = self.net(x_a)
        h = at_least_float32(h)
        if not self.affine:
            return h, None
        shift, pre_scale = h[:, 0::2], h[:, 1::2] + 2.0  # +2: the scale starts near sigmoid(2) = 0.88, not 0.5
        return shift, F.logsigmoid(pre_scale)  # log s, computed stably

    def forward(self, x: torch.Tensor):
        x_a, x_b = x.chunk(2, dim=1)
        shift, log_scale = self._shift_and_log_scale(x_a)
        if log_scale is None:
            return torch.cat([x_a, x_b + shift], dim=1), x.new_zeros(len(x), dtype=shift.dtype)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], dim=1), log_scale.flatten(1).sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y.chunk(2, dim=1)
        shift, log_scale = self._shift_and_log_scale(y_a)
        x_b = y_b - shift if log_scale is None else y_b * torch.exp(-log_scale) - shift
        return torch.cat([y_a, x_b], dim=1)


class FlowStep(nn.Module):
    """One step of flow (Glow Fig. 2a): ActNorm -> invertible 1x1 convolution -> coupling."""

    def __init__(self, channels: int, width: int, affine: bool):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvertibleConv1x1(channels), Coupling(channels, width, affine)])

    def forward(self, x: torch.Tensor):
        log_det = 0
        for layer in self.layers:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_std)^2) summed per example, in float32 or better."""
    z, mean, log_std = at_least_float32(z), at_least_float32(mean), at_least_float32(log_std)
    log_density = -0.5 * math.log(2 * math.pi) - log_std - 0.5 * ((z - mean) * torch.exp(-log_std)) ** 2
    return log_density.flatten(1).sum(dim=1)


class SplitPrior(nn.Module):
    """The split of Glow Fig. 2b (RealNVP §3.6): the second half of the channels leaves the flow as latents with
    prior N(mu, sigma^2), (mu, log sigma) = ZeroConv(first half). (B, C, H, W) -> kept (B, C/2, H, W), z_i."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = ZeroConv2d(channels // 2, channels)  # to a mean and a log-std for each of the C/2 latents

    def forward(self, x: torch.Tensor):
        kept, z = x.chunk(2, dim=1)
        mean, log_std = self.conv(kept).chunk(2, dim=1)
        return kept, z, gaussian_log_prob(z, mean, log_std)

    def inverse(self, kept: torch.Tensor, z: typing.Optional[torch.Tensor], temperature: float,
                generator: typing.Optional[torch.Generator]) -> torch.Tensor:
        mean, log_std = self.conv(kept).chunk(2, dim=1)
        if z is None:  # sample at temperature T: N(mu, (T sigma)^2) (Glow §5)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + temperature * torch.exp(log_std) * eps
        return torch.cat([kept, z], dim=1)


class Glow(nn.Module):
    """L levels of squeeze -> K steps of flow -> split (none after the last level), then a learned Gaussian prior
    on what is left (Glow Fig. 2b). At 28 px, grey, L = 2: (B, 1, 28, 28) -> squeeze (B, 4, 14, 14) -> K steps ->
    split: z_1 (B, 2, 14, 14) -> squeeze (B, 8, 7, 7) -> K steps -> z_2 (B, 8, 7, 7): 392 + 392 = 784 latents."""

    def __init__(self, channels: int, image_size: int, levels: int, steps_per_level: int, width: int,
                 affine: bool = True):
        super().__init__()
        self.levels, self.splits = nn.ModuleList(), nn.ModuleList()
        size = image_size
        for level in range(levels):
            channels, size = 4 * channels, size // 2
            self.levels.append(nn.ModuleList([FlowStep(channels, width, affine) for _ in range(steps_per_level)]))
            if level < levels - 1:
                self.splits.append(SplitPrior(channels))
                channels //= 2
        self.top_shape = (channels, size, size)
        # the top prior: a learned mean and log-std per channel, starting at N(0, 1) (Glow's code: --learntop)
        self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.top_log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor):
        """x (B, C, H, W) -> (latents [z_1, ..., z_L], log_det (B,), log_prior (B,)); log p(x) = log_prior + log_det
        (eq. 7). Both sums are float32 (float64 for a float64 model) whatever the autocast dtype."""
        latents, log_det, log_prior = [], 0, 0
        h = x
        for level, steps in enumerate(self.levels):
            h = squeeze(h)
            for step in steps:
                h, step_log_det = step(h)
                log_det = log_det + step_log_det
            if level < len(self.splits):
                h, z, split_log_prob = self.splits[level](h)
                latents.append(z)
                log_prior = log_prior + split_log_prob
        latents.append(h)
        log_prior = log_prior + gaussian_log_prob(h, self.top_mean, self.top_log_std)
        return latents, log_det, log_prior

    def inverse(self, latents: typing.Optional[list] = None, count: int = 0, temperature: float = 1.0,
                generator: typing.Optional[torch.Generator] = None) -> torch.Tensor:
        """x = f^-1(z). Given latents (as forward returns them) this reconstructs x exactly; without them it samples
        `count` images at temperature T, drawing every latent from its prior with standard deviation T sigma."""
        if latents is None:
            eps = torch.randn((count, *self.top_shape), generator=generator, device=self.top_mean.device,
                              dtype=self.top_mean.dtype)
            h = self.top_mean + temperature * torch.exp(self.top_log_std) * eps
        else:
            h = latents[-1]
        for level in reversed(range(len(self.levels))):
            if level < len(self.splits):
                h = self.splits[level].inverse(h, None if latents is None else latents[level], temperature, generator)
            for step in reversed(self.levels[level]):
                h = step.inverse(h)
            h = unsqueeze(h)
        return h

    def actnorms(self) -> list:
        return [m for m in self.modules() if isinstance(m, ActNorm)]

    def is_initialised(self) -> bool:
        return all(bool(m.initialized) for m in self.actnorms())

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Glow §3.1's data-dependent initialisation: one forward pass in which every ActNorm, in order, normalises
        its input batch to zero mean and unit variance per channel."""
        for m in self.actnorms():
            m.initialising = True
        try:
            self(x)
        finally:
            for m in self.actnorms():
                m.initialising = False

    def set_amp(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, Coupling):
                m.amp = enabled


# ---------------------------------------------------------------------------------------------------------------
# Dequantisation, bits/dim and the loss: pure functions, float32 or better
# ---------------------------------------------------------------------------------------------------------------

def dequantize(images: torch.Tensor, n_bits: int, generator: typing.Optional[torch.Generator] = None):
    """uint8 pixels -> x in [-1/2, 1/2): keep the top n_bits, add u ~ U[0, 1) per pixel, divide by 2^n_bits
    (Glow eq. 2 and its code; Theis et al. 2016 §3.1)."""
    bins = torch.div(images, 2 ** (8 - n_bits), rounding_mode="floor").float()
    noise = torch.rand(bins.shape, generator=generator, device=bins.device)
    return (bins + noise) / 2 ** n_bits - 0.5


def bits_per_dim(log_p: torch.Tensor, num_dims: int, n_bits: int) -> torch.Tensor:
    """(-log p(x) + D log 2^n) / (D log 2) per example: the density of x turned into a probability per bin of width
    2^-n, in bits per dimension. An upper bound on the discrete model's bits/dim (Theis et al. 2016)."""
    return (-log_p + num_dims * n_bits * math.log(2)) / (num_dims * math.log(2))


def flow_loss(flow: nn.Module, images: torch.Tensor, n_bits: int,
              generator: typing.Optional[torch.Generator] = None):
    """The mean bits/dim of a batch of uint8 images under one draw of dequantisation noise: maximum likelihood."""
    x = dequantize(images, n_bits, generator)
    _, log_det, log_prior = flow(x)
    bpd = bits_per_dim(log_prior + log_det, x[0].numel(), n_bits)
    loss = bpd.mean()
    return loss, {"loss/bpd": loss.detach()}


# ---------------------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ---------------------------------------------------------------------------------------------------------------

def to_uint8(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """x in [-1/2, 1/2) -> the bin it falls in, shown on 0..255 (the inverse of `dequantize` without the noise)."""
    n_bins = 2 ** n_bits
    x = torch.nan_to_num(at_least_float32(x), nan=0.0)
    bins = torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1)
    return (bins * (256 // n_bins)).to(torch.uint8)


@torch.no_grad()
def sample(flow: Glow, count: int, temperature: float, n_bits: int, generator: torch.Generator,
           batch: int = 500) -> torch.Tensor:
    """uint8 images (count, C, H, W) drawn at temperature T."""
    chunks = [to_uint8(flow.inverse(count=min(batch, count - i), temperature=temperature, generator=generator),
                       n_bits) for i in range(0, count, batch)]
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_bpd(flow: Glow, images: torch.Tensor, args: Args, generator: torch.Generator) -> float:
    """Mean bits/dim over `images`, with dequantisation noise from `generator` (seeded the same at every evaluation,
    so that they compare across steps and runs); the networks in float32 with TF32 off whatever --amp says, the
    sum in float64 on the CPU."""
    device = flow.top_mean.device
    total = 0.0
    flow.set_amp(False)
    try:
        with common.exact_float32():
            for chunk in images.split(args.eval_batch):
                x = dequantize(chunk.to(device), args.n_bits, generator)
                _, log_det, log_prior = flow(x)
                total += common.to_host_float64(bits_per_dim(log_prior + log_det, x[0].numel(), args.n_bits)).sum()
    finally:
        flow.set_amp(args.amp)
    return float(total) / len(images)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def learning_rate(args: Args, step: int) -> float:
    """Linear warm-up from 0 over --warmup-steps, then constant (Glow's code warms up over 10 epochs)."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr


class Diverged(Exception):
    """The loss of a step was not finite; nothing was updated with it."""


def train_step(flow: Glow, optimizer: torch.optim.Optimizer, args: Args, next_batch, step: int,
               device: torch.device) -> dict:
    """One Adam step on the mean bits/dim of a batch. The loss is checked on every step, before the update, so a
    non-finite loss never reaches the weights (one host synchronisation per step)."""
    lr = learning_rate(args, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    images, _ = next_batch()
    loss, metrics = flow_loss(flow, images, args.n_bits)
    if common.any_rank(not torch.isfinite(loss).item(), device):
        raise Diverged(f"loss/bpd is {loss.item():g}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_gradients(flow)
    metrics["grad/norm"] = nn.utils.clip_grad_norm_(flow.parameters(), args.grad_clip or float("inf"))
    optimizer.step()
    metrics["lr"] = lr
    return metrics


def benchmark(flow: Glow, optimizer, args: Args, batches: common.Batches, run: common.Run) -> None:
    """Training steps/s on real batches and on synthetic tensors of the same shape, in float32 and under --amp side
    by side, the share of step time spent fetching real batches, the step's GFLOP/s against the machine's matmul
    rate, and sampling throughput (samples/s at T = 1, in the same precision)."""
    device = run.device
    images, _ = batches.next()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def step(next_batch, index):
        flow.set_amp(args.amp)  # benchmark_precisions toggles args.amp between rounds
        return train_step(flow, optimizer, args, next_batch, index, device)

    def sampling():
        flow.set_amp(args.amp)
        sample(flow, args.eval_batch, 1.0, args.n_bits, generator, args.eval_batch)  # warm-up
        clock = common.Clock(device)
        sample(flow, args.eval_batch, 1.0, args.n_bits, generator, args.eval_batch)
        return f"sampling: {args.eval_batch / clock():.0f} samples/s"

    lines = common.benchmark_in_both_precisions(
        step, batches.next, lambda: (torch.randint(0, 256, images.shape, dtype=torch.uint8, device=device), None),
        args, device, args.batch_size * run.world_size, extra=sampling)
    flow.set_amp(args.amp)
    if run.is_main:
        print(f"benchmark | {device.type} x{run.world_size}, {torch.get_num_threads()} threads, {images.shape[-1]} px, "
              f"batch {args.batch_size}, L {args.levels} K {args.steps_per_level} width {args.width}")
        for line in lines:
            print(f"benchmark | {line}")


def main(args: Args) -> None:
    with common.session(args, "flow") as run:
        train(args, run)


def train(args: Args, run: common.Run) -> None:
    device = run.device
    size = args.resolved_image_size()
    train_data = common.load_image_dataset(args.dataset, args.data_dir, size, "train", run.out)
    channels = train_data.images.shape[1]
    num_dims = channels * size * size
    flow = Glow(channels, size, args.levels, args.steps_per_level, args.width, args.coupling == "affine").to(device)
    common.channels_last_on_cpu(flow, device)
    flow.set_amp(args.amp)
    common.broadcast_module(flow)  # every rank starts from rank 0's weights
    optimizer = common.adam(flow.parameters(), lr=args.lr)
    batches = common.Batches((train_data.images, train_data.labels), args.batch_size, args.seed, device, run.rank,
                             run.world_size, "images")
    planned_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(planned_steps, args.max_steps or planned_steps)

    def load_state(checkpoint):
        flow.load_state_dict(checkpoint["flow"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        batches.load_state_dict(checkpoint["batches"])

    step = common.resume(args, run, load_state)["step"] if args.resume else 0
    if not flow.is_initialised():  # a fresh run (a checkpoint carries the flags, so a resumed run skips this)
        order = torch.randperm(len(train_data.images), generator=torch.Generator().manual_seed(args.seed))
        flow.initialise(dequantize(train_data.images[order[:args.init_batch]].to(device), args.n_bits))
        common.broadcast_module(flow)
    common.maybe_compile(flow, args.compile)  # compiles forward (training, evaluation); sampling stays eager
    if args.benchmark:
        return benchmark(flow, optimizer, args, batches, run)
    checkpoints = common.Checkpoints(run, "flow.py", "a lower --lr, a longer --warmup-steps or a smaller --grad-clip",
                                     step if args.resume else None)
    state = lambda: {"args": dataclasses.asdict(args), "flow": flow.state_dict(),  # noqa: E731
                     "optimizer": optimizer.state_dict(), "batches": batches.state_dict()}

    logger = common.MetricsLogger(run.out, total_steps, run.is_main, start_step=step,
                                  console_keys=("loss/bpd", "eval/bpd", "grad/norm", "lr"))
    logger.print(f"flow | {args.dataset} {tuple(train_data.images.shape)}, D = {num_dims} | L {args.levels} "
                 f"K {args.steps_per_level} width {args.width} {args.coupling}, "
                 f"{sum(p.numel() for p in flow.parameters()):,} params | {device} x{run.world_size} | "
                 f"{total_steps} steps | out {run.out}")
    if size > NATIVE_SIZE.get(args.dataset, size):
        logger.print(f"note: {args.dataset} is {NATIVE_SIZE[args.dataset]} px; at {size} px the black padding is "
                     f"counted in bits/dim, which are then not comparable with {NATIVE_SIZE[args.dataset]} px results")
    # a folder has no test split, so its training images stand in
    test_data = train_data if args.dataset.startswith("folder:") else \
        common.load_image_dataset(args.dataset, args.data_dir, size, "test", run.out)
    test_bpd = lambda images: evaluate_bpd(  # noqa: E731 (the same dequantisation noise at every evaluation)
        flow, images, args, torch.Generator(device=device).manual_seed(args.seed + 1_000))

    def save_samples(path):
        generator = torch.Generator(device=device).manual_seed(args.seed + 3)  # the same latents in every grid
        if run.is_main:
            common.save_image_grid(sample(flow, 64, args.temperature, args.n_bits, generator), path, nrow=8)

    if run.is_main and not (run.out / "real_samples.png").exists():
        common.save_image_grid(train_data.images[:64], run.out / "real_samples.png", nrow=8)

    pending_eval = {}
    with common.StopRequest() as stop:
        while step < total_steps:
            try:
                metrics = train_step(flow, optimizer, args, batches.next, step, device)
            except Diverged as e:  # raised before the update: the weights are still those of the last step
                raise checkpoints.diverged(step + 1, str(e))
            step += 1
            logger.update(metrics)
            if args.eval_every and step % args.eval_every == 0 and step < total_steps and run.is_main:
                pending_eval = {"eval/bpd": round(test_bpd(test_data.images), 6)}
            if step % args.log_every == 0 or step == total_steps:
                logger.log(step, pending_eval)
                pending_eval = {}
            if args.sample_every and step % args.sample_every == 0:
                save_samples(run.out / f"samples_{step}.png")
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, state(), [flow])
            if stop(device):
                checkpoints.stop(step, state(), [flow])

    checkpoints.save(step, state(), [flow])
    common.teardown()  # the rest is rank 0's alone
    if not run.is_main:
        return
    if not (args.sample_every and step % args.sample_every == 0):  # else the loop just drew this grid
        save_samples(run.out / f"samples_{step}.png")
    write_results(flow, args, test_bpd, train_data, test_data, run, logger, step)


def write_results(flow: Glow, args: Args, test_bpd, train_data: common.ImageData, test_data: common.ImageData,
                  run: common.Run, logger: common.MetricsLogger, step: int) -> None:
    """temperatures.png, samples.npz, the final evaluation and loss.png, by rank 0 after training."""
    device = run.device
    # one row per temperature, the same latents (scaled by T) in each column
    rows = [sample(flow, 10, t, args.n_bits, torch.Generator(device=device).manual_seed(args.seed + 4))
            for t in GRID_TEMPERATURES]
    common.save_image_grid(torch.cat(rows), run.out / "temperatures.png", nrow=10)
    samples = sample(flow, args.num_samples, 1.0, args.n_bits, torch.Generator(device=device).manual_seed(
        args.seed + 5), args.eval_batch)
    common.save_samples_npz(run.out / "samples.npz", samples)
    bpd, num_dims = test_bpd(test_data.images), test_data.images[0].numel()
    logger.log_eval(step, {"eval/bpd": bpd, "eval/nll": bpd * num_dims * math.log(2),
                           "eval/bpd_train": test_bpd(train_data.images[:len(test_data.images)]),
                           "eval/test_images": len(test_data.images), "eval/dims": num_dims})
    common.plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png", ("loss/", "eval/bpd"), f"flow {args.dataset}")
    logger.print(f"done: {run.out} (samples_{step}.png, temperatures.png, samples.npz, loss.png)")


if __name__ == "__main__":
    common.run_cli(main, Args)
