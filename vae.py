"""Variational autoencoder with the importance-weighted bound.

Kingma, Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114; Burda, Grosse, Salakhutdinov,
"Importance Weighted Autoencoders", ICLR 2016, arXiv:1509.00519.

A latent variable model p(x, z) = p(z) p(x|z) with p(z) = N(0, I) and a decoder network for p(x|z) has an intractable
log p(x). An encoder network q(z|x) = N(mu(x), diag sigma^2(x)) gives the evidence lower bound (Kingma & Welling eq. 3)

    log p(x) >= L(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))                                            (3)

trained by stochastic gradients through the reparameterisation z = mu + sigma * eps, eps ~ N(0, I) (K&W §2.4), with
the KL term in closed form (K&W eq. 10 and Appendix B):  -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
Burda et al. tighten the bound with k importance samples z_1..z_k ~ q(z|x) and weights w_i = p(x, z_i) / q(z_i|x):

    L_k(x) = E[log 1/k sum_i w_i]                                                                      (Burda eq. 8)

with log p(x) >= L_{k+1} >= L_k >= L_1 = L (Burda Theorem 1), and L_k -> log p(x) as k grows. Training on L_k
(`--iw-train k`) is the IWAE; training on L (the default) is the VAE. Either way, the test log-likelihood is
estimated with L_5000 (Burda §5), here `--eval-k`.

Settings. On MNIST and Fashion-MNIST the decoder is Bernoulli over the 28x28 = 784 pixels (no padding) and the data
are *dynamically* binarised, each pixel redrawn every epoch as x ~ Bernoulli(intensity / 255) (Burda §5; the setting
of the published tables, not Larochelle & Murray's fixed binarisation). The test set is binarised once, with a seed
that does not depend on --seed, so every run is measured on the same bits. On 8-bit data (cifar10, folders, or
`--likelihood logistic`) the decoder is a discretised logistic per sub-pixel (Salimans et al. 2017, PixelCNN++ eq. 2,
one component), a probability mass over the 256 values, so -log p(x) is a code length for the 8-bit data.
eval/nll is in nats per image. Divided by D ln 2, D = C x H x W, it is eval/bpd for the 8-bit logistic, the same
quantity as the flow's bits/dim, and eval/bits_per_binary_pixel for the Bernoulli decoder: bits per *binarised*
pixel (at most 1 where an 8-bit pixel holds 8), never to be put beside a bits/dim.

Burda's code (yburda/iwae) differs from its paper in ways that matter for its 86.76 nats: it starts the decoder's
output bias at the logit of the training images' mean (datasets.get_train_bias_np), done here too (--decoder-bias);
it sums the loss over its batch of 20 where this file averages over the batch, so its Adam epsilon 1e-4 acts on
gradients 20 times larger: Adam is otherwise invariant to the loss's scale, and eps 1e-4 / 20 = 5e-6 on the mean is
its equivalent (--adam-eps). Its Adam has beta1 0.99, not the paper's 0.9, and starts its second moments at 1;
it trains on the first 59,600 training images. Those three are left as the paper says.

Networks: `--arch mlp` is Burda's one-stochastic-layer model, two deterministic layers of 200 tanh units in each of
q and p and 50 latent units (Burda §5); `--arch conv` has two strided convolutions each way.

Run it:
    python vae.py                                     # MLP VAE on dynamically binarised MNIST, 50 epochs
    python vae.py --arch conv --epochs 20
    python vae.py --iw-train 50                       # IWAE, k = 50
    python vae.py --beta 4 --kl-warmup 10000          # beta-VAE with a linear KL warm-up
    python vae.py --z-dim 2 --epochs 20               # writes manifold.png, the 2-d latent space (K&W Fig. 4)
    python vae.py --dataset cifar10 --arch conv       # discretised logistic decoder, bits/dim
    python vae.py --resume runs/<folder> --eval-k 5000   # evaluate a finished run again, with k = 5000
    torchrun --nproc_per_node=2 vae.py                # one process per GPU (or CPU: gloo)

Results: README, "vae.py".
"""

import dataclasses
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

BINARY_DATASETS = ("mnist", "fashion-mnist")  # 28x28 grey digits and garments: the Bernoulli setting of the tables
TEST_BINARISATION_SEED = 2016  # the test set's one binarisation, the same for every run whatever its --seed
ACTIVE_UNIT_THRESHOLD = 1e-2  # a latent unit is active if Cov_x(E_q[u]) > 10^-2 (Burda §5)
LOGISTIC_MIN_LOG_SCALE = -7.0  # floor on the logistic's log-scale, as in PixelCNN++ (Salimans et al. 2017)


@dataclasses.dataclass
class Args(common.RunArgs):
    dataset: str = "mnist"  # mnist (default: the published tables are binarised MNIST) | fashion-mnist | cifar10 | ...
    epochs: int = 50  # passes over the training set (Burda: 3,280; here 50 x 600 steps of 100: minutes on a CPU)
    batch_size: int = 100  # per process (Burda §5: 20; 100 runs faster per image on a CPU)
    arch: typing.Literal["mlp", "conv"] = "mlp"  # mlp: Burda's 2 x 200 tanh units each way; conv: strided convs
    likelihood: typing.Literal["auto", "bernoulli", "logistic"] = "auto"
    # p(x|z): bernoulli on dynamically binarised pixels (auto for mnist and fashion-mnist, Burda §5) or a
    # discretised logistic on 8-bit values (auto otherwise; Salimans et al. 2017 eq. 2)
    image_size: int = 0  # 0: the data's own size (28 for MNIST, 32 otherwise); folders are resized to it
    z_dim: int = 50  # latent units (Burda §5: 50 for one stochastic layer); 2 also draws manifold.png
    hidden: int = 200  # units in each of the MLP's two tanh layers (Burda §5: 200)
    conv_width: int = 32  # channels of the conv arch's first layer, doubled in the second
    beta: float = 1.0  # weight of the KL term, beta-VAE (Higgins et al. 2017); 1: the ELBO (K&W eq. 3)
    kl_warmup: int = 0  # steps over which the KL weight rises linearly from 0 to --beta (Sønderby et al. 2016)
    iw_train: int = 1  # train on the importance-weighted bound L_k with this k (Burda eq. 8); 1: the VAE's ELBO
    lr: float = 1e-3  # Adam learning rate at the start (Burda §5: 0.001)
    lr_schedule: typing.Literal["cosine", "burda", "constant"] = "cosine"
    # cosine: to 0 over --epochs (for a fixed short budget); burda: lr * 10^(-i/7) for 3^i passes, i = 0..7, 3,280
    # passes in all (Burda §5; a shorter run follows its start); constant
    beta1: float = 0.9  # Adam beta1 (Burda §5; their code's Adam has 0.99)
    beta2: float = 0.999  # Adam beta2 (Burda §5)
    adam_eps: float = 5e-6
    # Adam epsilon: Burda §5's 10^-4 is on a loss summed over 20 images, which is 10^-4 / 20 on this per-image mean
    decoder_bias: typing.Literal["data", "zero"] = "data"
    # Bernoulli decoder's output bias at the start: the logit of the training images' mean, per pixel for the MLP and
    # per channel for conv (Burda's code: get_train_bias_np, the mean clipped to [0.001, 0.999]); zero: PyTorch's
    eval_k: int = 1000  # importance samples per test image for eval/nll (Burda §5 reports k = 5000)
    eval_images: int = 0  # test images for the evaluations (0: the whole test split, 10,000 for MNIST)
    eval_rows: int = 5000  # decoder evaluations per pass when evaluating: bounds the memory a large k needs
    eval_every: int = 0  # steps between quick test evaluations (test/nll with --eval-every-k); 0: only the final one
    eval_every_k: int = 100  # importance samples for the quick evaluations of --eval-every
    eval_every_images: int = 1000  # test images for the quick evaluations of --eval-every (the first ones)
    num_samples: int = 10_000  # images written to samples.npz at the end (decoder means)

    def __post_init__(self):
        super().__post_init__()
        common.check_image_dataset(self.dataset)
        common.check_ranges(self, at_least_1=("z_dim", "hidden", "conv_width", "iw_train", "eval_k", "eval_rows",
                                              "eval_every_k", "eval_every_images", "num_samples"),
                            at_least_0=("kl_warmup", "eval_images", "eval_every", "beta", "image_size"),
                            positive=("lr", "adam_eps"), fraction=("beta1", "beta2"))
        if self.iw_train > 1 and (self.beta != 1 or self.kl_warmup):
            raise ValueError("--beta and --kl-warmup weight the ELBO's KL term, which the importance-weighted bound "
                             "(--iw-train > 1) does not have; use one or the other")
        if self.dataset in BINARY_DATASETS + ("stacked-mnist",) and self.image_size not in (0, 28):
            raise ValueError(f"{self.dataset} likelihoods are over its 28x28 pixels (published tables: 784 dims); "
                             f"padding or resizing would change what the NLL measures, so leave --image-size at 0")
        if self.arch == "conv" and self.size() % 4:
            raise ValueError(f"--arch conv halves the image twice, so --image-size must be a multiple of 4, "
                             f"got {self.size()}")
        if self.size() < 4:
            raise ValueError(f"--image-size must be at least 4, got {self.size()}")

    def size(self) -> int:
        if self.image_size:
            return self.image_size
        return 28 if self.dataset in BINARY_DATASETS + ("stacked-mnist",) else 32

    def decoder_likelihood(self) -> str:
        if self.likelihood != "auto":
            return self.likelihood
        return "bernoulli" if self.dataset in BINARY_DATASETS else "logistic"


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------

class MLPEncoder(nn.Module):
    """q(z|x): x (B, C, H, W) -> flatten (B, D) -> tanh (B, 200) -> tanh (B, 200) -> mu, log sigma^2 (B, z_dim) each
    (Burda §5: two deterministic layers of 200 tanh units, then the Gaussian's parameters)."""

    def __init__(self, data_dim: int, hidden: int, z_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2 * z_dim))

    def forward(self, x: torch.Tensor):
        return self.net(x.flatten(1)).chunk(2, dim=1)


class MLPDecoder(nn.Module):
    """p(x|z): z (B, z_dim) -> tanh (B, 200) -> tanh (B, 200) -> (B, P * C, H, W), P = 1 (Bernoulli logits) or 2
    (logistic means, then log-scales)."""

    def __init__(self, z_dim: int, hidden: int, out_shape: tuple):
        super().__init__()
        self.out_shape = out_shape
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, math.prod(out_shape)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.out_shape)


class ConvEncoder(nn.Module):
    """q(z|x) with strided convolutions. At 28 px, width 32: (B, C, 28, 28) -> (B, 32, 14, 14) -> (B, 64, 7, 7)
    -> flatten (B, 3136) -> (B, 512) -> mu, log sigma^2 (B, z_dim) each."""

    def __init__(self, channels: int, size: int, width: int, z_dim: int, hidden: int = 512):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.ELU(),  # halves H and W
                                   nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ELU())
        self.head = nn.Sequential(nn.Linear(2 * width * (size // 4) ** 2, hidden), nn.ELU(),
                                  nn.Linear(hidden, 2 * z_dim))

    def forward(self, x: torch.Tensor):
        return self.head(self.convs(x).flatten(1)).chunk(2, dim=1)


class ConvDecoder(nn.Module):
    """p(x|z), the encoder's mirror: z (B, z_dim) -> (B, 512) -> (B, 64, 7, 7) -> (B, 32, 14, 14)
    -> (B, P * C, 28, 28) at 28 px, width 32."""

    def __init__(self, z_dim: int, size: int, width: int, out_channels: int, hidden: int = 512):
        super().__init__()
        self.start = (2 * width, size // 4, size // 4)
        self.head = nn.Sequential(nn.Linear(z_dim, hidden), nn.ELU(), nn.Linear(hidden, math.prod(self.start)),
                                  nn.ELU())
        self.convs = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ELU(),  # doubles H and W
                                   nn.ConvTranspose2d(width, out_channels, 4, 2, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.convs(self.head(z).view(-1, *self.start))


class VAE(nn.Module):
    """The encoder q(z|x), the decoder p(x|z) and the likelihood that turns the decoder's output into log p(x|z).

    Data tensors `x` are float: {0, 1} pixels for the Bernoulli likelihood, the integers 0..255 for the logistic."""

    def __init__(self, arch: str, likelihood: str, channels: int, size: int, z_dim: int, hidden: int = 200,
                 conv_width: int = 32):
        super().__init__()
        self.likelihood, self.z_dim = likelihood, z_dim
        self.data_shape = (channels, size, size)
        out_channels = channels * (1 if likelihood == "bernoulli" else 2)
        if arch == "mlp":
            self.encoder = MLPEncoder(math.prod(self.data_shape), hidden, z_dim)
            self.decoder = MLPDecoder(z_dim, hidden, (out_channels, size, size))
        else:
            self.encoder = ConvEncoder(channels, size, conv_width, z_dim)
            self.decoder = ConvDecoder(z_dim, size, conv_width, out_channels)

    def encode(self, x: torch.Tensor):
        """(mu, log sigma^2) of q(z|x), each (B, z_dim), in float32."""
        inputs = x if self.likelihood == "bernoulli" else x / 127.5 - 1  # 8-bit values to [-1, 1]
        mu, logvar = self.encoder(inputs)
        return mu.float(), logvar.float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's raw output (B, P * C, H, W) in float32: likelihoods are computed in float32 under AMP."""
        return self.decoder(z).float()

    def log_likelihood(self, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per image, summed over every pixel and channel: decoded (..., P * C, H, W) and x (B, C, H, W)
        broadcast, so a leading dimension of k samples per image needs no copies of x."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(decoded, x)
        mean, log_scale = decoded.chunk(2, dim=-3)
        return discretised_logistic_log_likelihood(mean, log_scale, x)

    def mean_image(self, decoded: torch.Tensor) -> torch.Tensor:
        """E[x|z] as uint8 images: the pixel probabilities, or the logistic's means."""
        if self.likelihood == "bernoulli":
            return (torch.sigmoid(decoded) * 255).round().to(torch.uint8)
        return common.to_uint8(decoded.chunk(2, dim=1)[0].clamp(-1, 1))


def build_model(args: Args, train_images: torch.Tensor, device: torch.device) -> VAE:
    model = VAE(args.arch, args.decoder_likelihood(), train_images.shape[1], args.size(), args.z_dim, args.hidden,
                args.conv_width)
    if args.decoder_bias == "data" and model.likelihood == "bernoulli":  # Burda's code: datasets.get_train_bias_np
        mean = train_images.double().mean(dim=0) / 255  # (C, H, W): each pixel's probability of being on
        last = model.decoder.net[-1] if args.arch == "mlp" else model.decoder.convs[-1]
        with torch.no_grad():
            last.bias.copy_(torch.logit(mean.clamp(0.001, 0.999)).flatten() if args.arch == "mlp" else
                            torch.logit(mean.mean(dim=(1, 2)).clamp(0.001, 0.999)))
    model = model.to(device)
    common.broadcast_module(model)  # every rank starts from rank 0's weights
    return model


# ---------------------------------------------------------------------------------------------------------------
# Likelihoods and bounds: pure functions, in float32 (or float64) whatever the autocast dtype
# ---------------------------------------------------------------------------------------------------------------

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per row, in closed form (K&W Appendix B):
    1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=-1)


def diagonal_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag sigma^2), summed over the last dimension."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(dim=-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension: the prior p(z)."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_d x_d log p_d + (1 - x_d) log(1 - p_d) with p = sigmoid(l), in the logits form sum_d x_d l_d - softplus(l_d)
    (stable: no log of a probability that rounds to 0). Summed over the last three dimensions (C, H, W); x
    broadcasts against a leading dimension of samples without being copied."""
    logits = logits.float()
    return (logits * x).sum(dim=(-3, -2, -1)) - F.softplus(logits).sum(dim=(-3, -2, -1))


def discretised_logistic_log_likelihood(mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor):
    """log P(x) per image (summed over C, H, W) for 8-bit x (values 0..255) under a logistic(mean, s) on [-1, 1],
    integrated over each value's bin of width 2/255; the end bins take the tails to -inf and +inf (Salimans et al.
    2017 eq. 2, one mixture component). The masses of the 256 values sum to 1: a code length for the 8-bit data.

    With a = (c + 1/255 - mean) / s and b = (c - 1/255 - mean) / s around the bin centre c, the mass of an inner bin
    is sigmoid(a) - sigmoid(b) = sigmoid(a) (1 - sigmoid(b)) (1 - exp(b - a)), whose log is computed term by term:
    exact, and finite however narrow or wide the logistic."""
    mean, log_scale = mean.float(), log_scale.float().clamp(min=LOGISTIC_MIN_LOG_SCALE)
    centre = x.float() / 127.5 - 1
    inv_scale = torch.exp(-log_scale)
    a = (centre + 1 / 255 - mean) * inv_scale
    b = (centre - 1 / 255 - mean) * inv_scale
    log_cdf_upper = F.logsigmoid(a)  # log P(X <= upper edge): the whole mass of the bin of 0
    log_survival_lower = -F.softplus(b)  # log P(X > lower edge): the whole mass of the bin of 255
    log_inner = log_cdf_upper + log_survival_lower + torch.log(-torch.expm1(-(a - b)))
    log_mass = torch.where(x <= 0, log_cdf_upper, torch.where(x >= 255, log_survival_lower, log_inner))
    return log_mass.sum(dim=(-3, -2, -1))


def elbo_loss(log_px_z: torch.Tensor, kl: torch.Tensor, kl_weight: float = 1.0):
    """-(E_q[log p(x|z)] - w KL) averaged over the batch, one sample of z per image (K&W eq. 10); w = 1 is the
    negative ELBO (eq. 3), w = beta the beta-VAE. Metrics are in nats per image, with the unweighted KL."""
    recon, kl = -log_px_z.mean(), kl.mean()
    loss = recon + kl_weight * kl
    return loss, {"loss/elbo": (recon + kl).detach(), "loss/recon": recon.detach(), "loss/kl": kl.detach()}


def iwae_loss(log_w: torch.Tensor):
    """-L_k = -log 1/k sum_i w_i for log-weights (k, B), averaged over the batch (Burda eq. 8). The mean of the
    log-weights is a k-sample estimate of the ELBO on the same draws, logged for comparison."""
    k = log_w.shape[0]
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    loss = -bound.mean()
    return loss, {"loss/iwae": loss.detach(), "loss/elbo": -log_w.mean().detach()}


def log_importance_weights(model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int,
                           generator: typing.Optional[torch.Generator] = None, amp: bool = False) -> torch.Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for z_i ~ q(z|x), i = 1..k: (k, B) in float32.
    Uses the reparameterisation, so gradients reach both networks (Burda §3)."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn((k, *mu.shape), device=mu.device, generator=generator)
    z = mu + std * eps  # (k, B, z_dim)
    log_q = diagonal_gaussian_log_prob(z, mu, logvar)
    with common.autocast(x.device, amp):
        decoded = model.decode(z.flatten(0, 1))  # (k * B, P * C, H, W)
    log_px_z = model.log_likelihood(decoded.view(k, len(x), *decoded.shape[1:]), x)  # x broadcasts: (k, B)
    return log_px_z + standard_normal_log_prob(z) - log_q


# ---------------------------------------------------------------------------------------------------------------
# Data: dynamic binarisation
# ---------------------------------------------------------------------------------------------------------------

def binarise(images: torch.Tensor, generator: typing.Optional[torch.Generator] = None) -> torch.Tensor:
    """x ~ Bernoulli(intensity / 255), pixel by pixel: uint8 images -> float {0, 1}."""
    return torch.bernoulli(images.float() / 255, generator=generator)


class TrainingData:
    """Batches of model-ready data tensors. For the Bernoulli likelihood each batch is binarised afresh ("dynamic
    binarisation", Burda §5), with a generator seeded by (seed, epoch, batch, rank): every epoch draws new bits, the
    same seed draws the same bits, and a resumed run continues the uninterrupted run's draws exactly."""

    def __init__(self, batches: common.Batches, likelihood: str, seed: int, rank: int = 0):
        self.batches, self.likelihood, self.seed, self.rank = batches, likelihood, seed, rank
        self.device = batches.device

    def next(self) -> torch.Tensor:
        (images,) = self.batches.next()
        if self.likelihood != "bernoulli":
            return images.float()
        epoch, index = self.batches.epoch, self.batches.index  # index: the batch just taken, counted from 1
        key = ((self.seed * 1_000_003 + epoch) * 1_000_033 + index) * 1_009 + self.rank
        return binarise(images, torch.Generator(device=self.device).manual_seed(key % 2**63))


def prepare_once(images: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The evaluation data: binarised once with a fixed seed (the same bits for every run), or the 8-bit values."""
    if likelihood != "bernoulli":
        return images.float()
    return binarise(images, torch.Generator().manual_seed(TEST_BINARISATION_SEED))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

BURDA_PASSES = sum(3 ** i for i in range(8))  # 3,280 passes: stage i lasts 3^i passes at lr 0.001 * 10^(-i/7)


def learning_rate(args: Args, step: int, planned_steps: int) -> float:
    """'burda': stage i = 0..7 covers passes (3^i - 1) / 2 to (3^(i+1) - 1) / 2 at lr * 10^(-i/7), counted in
    passes over the data (Burda §5), so a shorter run follows the start of the paper's schedule and --epochs 3280
    all of it. 'cosine' anneals to 0 over --epochs, which suits a fixed short budget."""
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * step / max(planned_steps, 1)))
    passes = step / max(planned_steps, 1) * args.epochs  # epochs done, fractional
    stage = min(7, int(math.log(2 * passes + 1, 3) + 1e-9))
    return args.lr * 10 ** (-stage / 7)


def kl_weight(args: Args, step: int) -> float:
    """beta, ramped linearly from 0 over the first --kl-warmup steps: the "warm-up" of Sønderby et al. 2016 (Ladder
    VAE), like the "KL cost annealing" of Bowman et al. 2016, which keeps early training from switching latent
    units off before the decoder has learnt to use them."""
    return args.beta * min(1.0, step / args.kl_warmup) if args.kl_warmup else args.beta


@dataclasses.dataclass
class Trainer:
    model: VAE
    optimizer: torch.optim.Optimizer


def train_step(trainer: Trainer, args: Args, x: torch.Tensor, step: int, planned_steps: int) -> dict:
    """One Adam step on a batch of data tensors: the (beta-weighted) ELBO with the analytic KL, or -L_k."""
    model = trainer.model
    lr = learning_rate(args, step, planned_steps)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    with common.autocast(x.device, args.amp):
        mu, logvar = model.encode(x)
    if args.iw_train > 1:
        loss, metrics = iwae_loss(log_importance_weights(model, x, mu, logvar, args.iw_train, amp=args.amp))
    else:
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # the reparameterisation (K&W §2.4)
        with common.autocast(x.device, args.amp):
            decoded = model.decode(z)
        weight = kl_weight(args, step)
        loss, metrics = elbo_loss(model.log_likelihood(decoded, x), gaussian_kl(mu, logvar), weight)
        if weight != 1:
            metrics["kl/weight"] = weight
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_gradients(model)
    trainer.optimizer.step()
    metrics["opt/lr"] = lr
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Sampling and pictures
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_means(model: VAE, z: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """uint8 images E[x|z] for each z. Pictures and samples.npz hold these means, as is customary: a draw from
    p(x|z) only adds independent per-pixel noise."""
    return torch.cat([model.mean_image(model.decode(z[i:i + batch])) for i in range(0, len(z), batch)])


def to_picture(x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Data tensors as uint8 pictures."""
    return (x * 255 if likelihood == "bernoulli" else x).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def save_reconstructions(model: VAE, x: torch.Tensor, path) -> None:
    """Rows of 8 test images, each followed by a row of their reconstructions E[x | z = mu(x)]."""
    mu, _ = model.encode(x[:32])
    recon = decode_means(model, mu)
    rows = [torch.cat([to_picture(x[i:i + 8], model.likelihood), recon[i:i + 8]]) for i in range(0, 32, 8)]
    common.save_image_grid(torch.cat(rows), path, nrow=8)


@torch.no_grad()
def save_manifold(model: VAE, path, count: int = 20) -> None:
    """For a 2-d latent: the decoder's means over a grid of z at the Gaussian quantiles of evenly spaced
    probabilities, so that equal areas hold equal prior mass (K&W Fig. 4)."""
    device = next(model.parameters()).device
    quantiles = torch.special.ndtri(torch.linspace(0.05, 0.95, count, device=device))
    z = torch.stack(torch.meshgrid(quantiles, quantiles.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
    common.save_image_grid(decode_means(model, z), path, nrow=count)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def importance_weighted_bounds(model: VAE, x: torch.Tensor, k: int, rows: int, generator: torch.Generator,
                               progress=None):
    """Per image: the k-sample importance-weighted bound L_k (Burda eq. 8), whose negative is the NLL estimate, and
    the ELBO estimated from the same k draws (the mean log-weight). Images go through in groups and the k samples
    in chunks of at most `rows` decoder evaluations, in float32 whatever --amp says; the chunks are combined by a
    running log-sum-exp in float64 on the CPU, so memory stays bounded for any k. Also returns the encoder means,
    for the active-unit count."""
    chunk = min(k, rows)
    group = max(1, rows // chunk)
    bounds, elbos, means = [], [], []
    for start in range(0, len(x), group):
        batch = x[start:start + group]
        mu, logvar = model.encode(batch)
        log_sum = torch.full((len(batch),), -math.inf, dtype=torch.float64)
        weight_sum = torch.zeros(len(batch), dtype=torch.float64)
        for done in range(0, k, chunk):
            log_w = common.to_host_float64(log_importance_weights(model, batch, mu, logvar, min(chunk, k - done),
                                                                  generator))
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
            weight_sum += log_w.sum(dim=0)
        bounds.append(log_sum - math.log(k))
        elbos.append(weight_sum / k)
        means.append(mu)
        if progress is not None:
            progress(start + len(batch), len(x))
    return torch.cat(bounds), torch.cat(elbos), torch.cat(means)


def active_units(means: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Burda §5: unit u is active if A_u = Cov_x(E_q(u|x)[u]) > 10^-2, the variance over the data of its
    posterior mean. An inactive unit's posterior is the same for every x: it carries no information."""
    return int((common.to_host_float64(means).var(dim=0) > threshold).sum().item())


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, k: int, args: Args, prefix: str = "eval", progress=None) -> dict:
    """eval/nll: -L_k averaged over the test images, in nats per image, with its standard error over images (the
    spread of the data, not Monte Carlo error); the same in bits per binarised pixel (Bernoulli) or bits per 8-bit
    dimension (eval/bpd, logistic); eval/elbo: the negative
    ELBO; eval/active_units. Fixed noise, so the same model always gets the same numbers; float32 with TF32 off."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(args.seed + 13)
    with common.exact_float32():
        bounds, elbos, means = importance_weighted_bounds(model, x, k, args.eval_rows, generator, progress)
    model.train(was_training)
    nll = -bounds
    dims = math.prod(x.shape[1:])
    metrics = {f"{prefix}/nll": nll.mean().item(),
               f"{prefix}/stderr_nll": (nll.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else 0.0,
               f"{prefix}/{'bits_per_binary_pixel' if model.likelihood == 'bernoulli' else 'bpd'}":
                   nll.mean().item() / (dims * math.log(2)),
               f"{prefix}/elbo": -elbos.mean().item(),
               f"{prefix}/active_units": active_units(means),
               f"{prefix}/k": k, f"{prefix}/images": len(x)}
    return metrics


def benchmark(trainer: Trainer, args: Args, data: TrainingData, run: common.Run, planned_steps: int) -> None:
    """Training steps/s on real (freshly binarised) batches and on synthetic tensors of the same shape, in float32
    and under --amp side by side, the share of step time spent preparing real batches, the step's GFLOP/s against
    the machine's matmul rate, and the rates of sampling and of the importance-weighted evaluation (both run in float32
    under either precision, as in a run)."""
    device = run.device
    shape = data.next().shape
    high = 2 if args.decoder_likelihood() == "bernoulli" else 256
    model = trainer.model

    def sampling_and_evaluation():
        z = torch.randn(1000, args.z_dim, device=device)
        decode_means(model, z)  # float32, as the run draws its samples
        clock = common.Clock(device)
        decode_means(model, z)
        sample_rate = len(z) / clock()
        x = torch.randint(0, high, (max(1, args.eval_rows // 1000), *shape[1:]), device=device).float()
        generator = torch.Generator(device=device).manual_seed(0)
        importance_weighted_bounds(model, x, 1000, args.eval_rows, generator)
        clock()
        importance_weighted_bounds(model, x, 1000, args.eval_rows, generator)
        iw_rate = len(x) * 1000 / clock()
        return (f"sampling (float32): {sample_rate:.0f} samples/s | IW evaluation (float32): {iw_rate:.0f} importance "
                f"samples/s ({10_000 * 5000 / iw_rate / 60:.1f} min for k = 5000 on 10,000 images)")

    lines = common.benchmark_in_both_precisions(
        lambda next_batch, step: train_step(trainer, args, next_batch(), step, planned_steps), data.next,
        lambda: torch.randint(0, high, shape, device=device).float(), args, device, args.batch_size * run.world_size)
    float32_rates = sampling_and_evaluation()  # float32 under either precision: measured once, not per round
    if run.is_main:
        iw = f", iw-train {args.iw_train}" if args.iw_train > 1 else ""
        print(f"benchmark | {device.type} x{run.world_size}, {torch.get_num_threads()} threads, {args.arch}, "
              f"{args.decoder_likelihood()}, batch {args.batch_size}{iw}")
        for line in lines:
            print(f"benchmark | {line} | {float32_rates}")


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    with common.session(args, "vae") as run:
        train(args, run)


def train(args: Args, run: common.Run) -> None:
    device = run.device
    likelihood = args.decoder_likelihood()
    train_data = common.load_image_dataset(args.dataset, args.data_dir, args.size(), "train", run.out)
    model = build_model(args, train_data.images, device)
    optimizer = common.adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.adam_eps)
    trainer = Trainer(model, optimizer)
    common.maybe_compile(model.encoder, args.compile)  # encode/decode are methods, so compile the two networks
    common.maybe_compile(model.decoder, args.compile)
    batches = common.Batches((train_data.images,), args.batch_size, args.seed, device, run.rank, run.world_size,
                             "images")
    data = TrainingData(batches, likelihood, args.seed, run.rank)
    planned_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(planned_steps, args.max_steps or planned_steps)
    if args.benchmark:
        return benchmark(trainer, args, data, run, planned_steps)

    def load_state(checkpoint):
        common.load_state_dicts(vars(trainer), checkpoint["trainer"])
        batches.load_state_dict(checkpoint["batches"])

    step = common.resume(args, run, load_state)["step"] if args.resume else 0
    checkpoints = common.Checkpoints(run, "vae.py", "a lower --lr", step if args.resume else None)
    state = lambda: {"args": dataclasses.asdict(args), "trainer": common.state_dicts(vars(trainer)),  # noqa: E731
                     "batches": batches.state_dict()}
    # a folder has no test split, so its training images stand in
    test_images = train_data.images if args.dataset.startswith("folder:") else \
        common.load_image_dataset(args.dataset, args.data_dir, args.size(), "test", run.out).images
    test_x = prepare_once(test_images[:args.eval_images or len(test_images)], likelihood).to(device)

    logger = common.MetricsLogger(run.out, total_steps, run.is_main, start_step=step,
                                  console_keys=("loss/elbo", "loss/iwae", "loss/recon", "loss/kl", "test/nll"))
    logger.print(f"vae | {args.dataset} {tuple(train_data.images.shape)}, {likelihood} | {args.arch}, z {args.z_dim}, "
                 f"{sum(p.numel() for p in model.parameters()):,} params | {device} x{run.world_size} | "
                 f"{total_steps} steps | out {run.out}")
    grid_z = torch.randn(64, args.z_dim, device=device, generator=torch.Generator(device=device).manual_seed(
        args.seed + 3))  # fixed noise: successive grids show the same z

    def save_samples(path):
        if run.is_main:
            common.save_image_grid(decode_means(model, grid_z), path, nrow=8)

    if run.is_main and not (run.out / "real_samples.png").exists():  # training images as the model sees them
        common.save_image_grid(to_picture(prepare_once(train_data.images[:64], likelihood), likelihood),
                               run.out / "real_samples.png", nrow=8)

    with common.StopRequest() as stop:
        while step < total_steps:
            metrics = train_step(trainer, args, data.next(), step, planned_steps)
            step += 1
            logger.update(metrics)
            quick_eval = args.eval_every and step % args.eval_every == 0
            if step % args.log_every == 0 or step == total_steps or quick_eval:
                # only rank 0 evaluates; the other ranks wait for it at their next gradient exchange
                extra = evaluate(model, test_x[:args.eval_every_images], args.eval_every_k, args, "test") \
                    if quick_eval and run.is_main else None
                checkpoints.check_losses(logger.log(step, extra), step)
            if args.sample_every and step % args.sample_every == 0:
                save_samples(run.out / f"samples_{step}.png")
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, state(), [model])
            if stop(device):
                checkpoints.stop(step, state(), [model])

    checkpoints.save(step, state(), [model])
    common.teardown()  # the rest is rank 0's alone
    if not run.is_main:
        return
    if not (args.sample_every and step % args.sample_every == 0):  # else the loop just drew this grid
        save_samples(run.out / f"samples_{step}.png")
    write_results(model, args, test_x, run, logger, step)


def write_results(model: VAE, args: Args, test_x: torch.Tensor, run: common.Run, logger: common.MetricsLogger,
                  step: int) -> None:
    """samples.npz, reconstructions.png (and manifold.png), the final evaluation and loss.png, by rank 0."""
    model.eval()
    final_noise = torch.Generator(device=run.device).manual_seed(args.seed + 5)
    samples = decode_means(model, torch.randn(args.num_samples, args.z_dim, device=run.device,
                                              generator=final_noise))
    common.save_samples_npz(run.out / "samples.npz", samples)
    save_reconstructions(model, test_x, run.out / "reconstructions.png")
    if args.z_dim == 2:
        save_manifold(model, run.out / "manifold.png")
    reported = [0.0]

    def progress(done, total):  # a k = 5000 evaluation takes minutes on a CPU
        if done == total or done / total >= reported[0] + 0.1:
            reported[0] = done / total
            logger.print(f"evaluating with k = {args.eval_k}: {done}/{total} test images")

    logger.log_eval(step, evaluate(model, test_x, args.eval_k, args, "eval", progress))
    common.plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png", ("loss/", "test/nll", "test/elbo"),
                        f"vae {args.dataset} ({args.arch}, {args.decoder_likelihood()})")
    extra = ", manifold.png" if args.z_dim == 2 else ""
    logger.print(f"done: {run.out} (samples_{step}.png, samples.npz, reconstructions.png{extra}, loss.png)")


if __name__ == "__main__":
    common.run_cli(main, Args)
