"""DCGAN with the GAN-training tricks as switches.

Radford, Metz, Chintala, "Unsupervised Representation Learning with Deep Convolutional Generative Adversarial
Networks", ICLR 2016, arXiv:1511.06434; the game is Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014,
arXiv:1406.2661.

A generator G maps noise z to an image; a discriminator D scores images as real or fake. They play (Goodfellow eq. 1)

    min_G max_D  E_x[log D(x)] + E_z[log(1 - D(G(z)))]                                                     (1)

and G is trained with the non-saturating loss -log D(G(z)) instead of log(1 - D(G(z))), whose gradient vanishes
exactly when G is losing (Goodfellow §3). Each player's loss is the other's moving target: if D wins outright,
D(G(z)) -> 0 and G gets no useful gradient; if G outruns D, D's signal is noise. Both must improve together.

DCGAN's recipe for making that work with convolutions (Radford §3-4), the defaults here: strided convolutions, no
pooling, BatchNorm in both networks except G's output and D's input, no fully connected hidden layers, ReLU in G
with a tanh output, LeakyReLU(0.2) in D, weights ~ N(0, 0.02), Adam lr 2e-4 and beta1 0.5, batch 128,
z ~ U[-1, 1]^100. Every other trick is a flag, off by default, its source beside it in `Args`: ganhacks (label
smoothing, noisy and flipped labels, instance noise, k D steps, replay buffer, Gaussian z, slerp), BigGAN (hinge
loss, spectral norm, EMA of G, orthogonal regularisation, TTUR, truncation, conditional BN with a projection D),
LSGAN, WGAN-GP, R1 and PacGAN's packing. Failure tracking is always on (ganhacks #10): gradient norms are logged,
and a warning is printed when D's loss sits near 0 (D wins, G starves) or a gradient norm explodes.

Run it:
    python dcgan.py                                    # Fashion-MNIST at 32 px; CPU or GPU, whichever is here
    python dcgan.py --dataset mnist --epochs 10
    python dcgan.py --dataset cifar10 --image-size 64 --amp --compile      # on CUDA
    python dcgan.py --loss hinge --spectral-norm --ema-decay 0.999 --lr-g 5e-5 --lr-d 2e-4 --d-steps 2 --beta1 0
    torchrun --nproc_per_node=4 dcgan.py --dataset cifar10                 # one process per GPU (or CPU: gloo)
    python dcgan.py --resume runs/<folder>                                 # continue an interrupted run

Results: README, "dcgan.py, default flags" and "At 64 px".
"""

import copy
import dataclasses
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

Loss = typing.Literal["ns", "hinge", "lsgan", "wgan-gp"]


@dataclasses.dataclass
class Args(common.RunArgs):
    epochs: int = 5  # passes over the training set (5 x 468 steps of 128 on Fashion-MNIST)
    image_size: int = 32  # a power of two from 16 to 128; 28 px digits are padded to 32, other sizes resized
    z_dim: int = 100  # size of the noise vector z (Radford §3: 100)
    z_dist: typing.Literal["uniform", "normal"] = "uniform"
    # z ~ U[-1,1] (Radford §4) or N(0,1) (ganhacks #3); interpolations.png always follows great circles between two
    # z, slerp (White 2016; ganhacks #3), since a straight line passes near 0, where the prior has little mass
    g_width: int = 64  # G's channels before its output layer, doubled at each layer towards 4x4
    d_width: int = 64  # D's channels after its input layer, doubled at each layer towards 4x4
    lr_g: float = 2e-4  # Adam learning rate of G (Radford §4); TTUR: give D a larger one (Heusel et al. 2017)
    lr_d: float = 2e-4
    # Adam learning rate of D (Radford §4); BigGAN: D 2e-4 and G 5e-5 with 2 D steps per G step (Brock et al. 2019
    # §3); SAGAN: D 4e-4 and G 1e-4 (Zhang et al. 2019)
    beta1: float = 0.5  # Adam beta1 (Radford §4: 0.9 oscillated); BigGAN and WGAN-GP use 0
    beta2: float = 0.999  # Adam beta2 (WGAN-GP uses 0.9)
    loss: Loss = "ns"  # ns: non-saturating (Goodfellow §3); hinge (BigGAN); lsgan (Mao et al. 2017); wgan-gp
    d_norm: typing.Literal["auto", "batch", "layer", "none"] = "auto"
    # D's normalisation: batch (Radford §3); auto uses none with --spectral-norm (Miyato et al. 2018) and layer
    # with wgan-gp, whose per-sample gradient penalty batch norm would couple (Gulrajani et al. 2017 §4)
    d_steps: int = 1  # D updates per G update, each on a fresh batch (Goodfellow Alg. 1: k; ganhacks #14; WGAN-GP: 5)
    label_smoothing: float = 0.0  # one-sided: D's target for real images is 1 - s (Salimans et al. 2016 §3.4)
    noisy_labels: bool = False  # D's targets drawn from U(0.7, 1.2) for real and U(0, 0.3) for fake (ganhacks #6)
    label_flip: float = 0.0  # probability of swapping real/fake targets in D's batches (ganhacks #6)
    instance_noise: float = 0.0  # std of Gaussian noise on D's inputs, annealed linearly to 0 (Sønderby et al. 2017)
    replay_size: int = 0  # buffer of past fakes shown to D again (Shrivastava et al. 2017 §2.3; ganhacks #8); 0: off
    replay_fraction: float = 0.5  # share of each fake batch for D taken from the replay buffer (Shrivastava: half)
    spectral_norm: bool = False  # spectral normalisation of D's layers (Miyato et al. 2018; BigGAN §3)
    spectral_norm_g: bool = False  # spectral normalisation of G's layers too (Zhang et al. 2019; BigGAN §3)
    ema_decay: float = 0.0  # sample from an exponential moving average of G's weights (BigGAN §4: 0.9999); 0: off
    ortho_reg: float = 0.0  # beta of BigGAN's orthogonal regularisation of G's filters (Brock §3.1 eq. 3: 1e-4)
    truncation: float = 0.0  # sample z from N(0,1) truncated to [-psi, psi] (BigGAN §3.1); 0: off
    conditional: bool = False
    # class-conditional: conditional BatchNorm in G from a shared class embedding (BigGAN §3) and a projection
    # discriminator (Miyato & Koyama 2018); "if you have labels, use them" (ganhacks #12)
    embed_dim: int = 128  # size of the shared class embedding (BigGAN: 128)
    gp_weight: float = 10.0  # lambda of WGAN-GP's gradient penalty (Gulrajani et al. 2017 eq. 3)
    r1: float = 0.0  # gamma of the R1 penalty on D's gradient at real data (Mescheder et al. 2018 eq. 9); 0: off
    pack: int = 1
    # PacGAN (Lin et al. 2018): D judges packs of m images concatenated along the channels, all real or all fake,
    # so a G that repeats itself is seen doing it; a batch of B images makes B/m packs (PacGAN's code draws m x 64)
    num_samples: int = 10_000  # images written to samples.npz at the end

    def __post_init__(self):
        super().__post_init__()
        common.check_image_dataset(self.dataset)
        size = self.image_size
        if not (16 <= size <= 128 and size & (size - 1) == 0):
            raise ValueError(f"--image-size must be a power of two from 16 to 128, got {size}")
        common.check_ranges(self, at_least_1=("z_dim", "g_width", "d_width", "d_steps", "embed_dim", "num_samples",
                                              "pack"),
                            positive=("lr_g", "lr_d"),
                            fraction=("beta1", "beta2", "label_smoothing", "label_flip", "ema_decay"),
                            at_least_0=("instance_noise", "replay_size", "ortho_reg", "truncation", "gp_weight", "r1"))
        if not 0 < self.replay_fraction <= 1:
            raise ValueError(f"--replay-fraction must be in (0, 1], got {self.replay_fraction}")
        label_tricks = self.label_smoothing or self.noisy_labels or self.label_flip
        if label_tricks and self.loss not in ("ns", "lsgan"):
            raise ValueError(f"label smoothing, noisy and flipped labels act on D's targets, which --loss "
                             f"{self.loss} does not have; use --loss ns or lsgan")
        if self.truncation and self.z_dist != "normal":
            raise ValueError("--truncation truncates a Gaussian; add --z-dist normal")
        if self.batch_size % self.pack:
            raise ValueError(f"--batch-size {self.batch_size} does not split into packs of --pack {self.pack}")
        if self.pack > 1 and self.conditional:
            raise ValueError("--pack mixes images of different classes in one pack; it cannot go with --conditional")
        if self.loss == "wgan-gp" and self.d_norm == "batch":
            raise ValueError("--loss wgan-gp penalises each sample's gradient, which batch norm couples across the "
                             "batch (Gulrajani et al. §4); use --d-norm layer, none or auto")

    def discriminator_norm(self) -> str:
        if self.d_norm != "auto":
            return self.d_norm
        return "none" if self.spectral_norm else "layer" if self.loss == "wgan-gp" else "batch"


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------

def init_weights(module: nn.Module) -> None:
    """Radford §4: all weights ~ N(0, 0.02); BatchNorm gains ~ N(1, 0.02) and biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def apply_spectral_norm(module: nn.Module) -> None:
    """W / sigma(W), sigma estimated by one power iteration per forward pass (Miyato et al. 2018 §2.1)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            # a transposed conv's weight is (in, out, k, k): its output dimension is 1
            setattr(module, name, nn.utils.parametrizations.spectral_norm(
                child, dim=1 if isinstance(child, nn.ConvTranspose2d) else 0))
        else:
            apply_spectral_norm(child)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are linear in a class embedding shared by all layers (BigGAN §3, after de Vries
    et al. 2017 and Dumoulin et al. 2017): BN(h) * (1 + W_g e) + W_b e. Without an embedding, plain BatchNorm."""

    def __init__(self, channels: int, embed_dim: int = 0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=embed_dim == 0)
        self.gain = nn.Linear(embed_dim, channels, bias=False) if embed_dim else None
        self.bias = nn.Linear(embed_dim, channels, bias=False) if embed_dim else None

    def forward(self, h: torch.Tensor, embedding: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.bn(h)
        if self.gain is None:
            return h
        return h * (1 + self.gain(embedding))[:, :, None, None] + self.bias(embedding)[:, :, None, None]


class Generator(nn.Module):
    """z -> image, by transposed convolutions that double the size from 4x4 (Radford Fig. 1). At 64 px with
    width 64: z (B, 100, 1, 1) -> (B, 512, 4, 4) -> (B, 256, 8, 8) -> (B, 128, 16, 16) -> (B, 64, 32, 32)
    -> (B, C, 64, 64); at 32 px one doubling fewer, at 128 px one more."""

    def __init__(self, z_dim: int, channels: int, image_size: int, width: int = 64, num_classes: int = 0,
                 embed_dim: int = 128):
        super().__init__()
        doublings = int(math.log2(image_size)) - 2  # 4x4 -> image_size
        widths = [width * 2 ** i for i in reversed(range(doublings))]  # e.g. 32 px: [256, 128, 64]
        self.embedding = nn.Embedding(num_classes, embed_dim) if num_classes else None  # shared by all BN layers
        cond_dim = embed_dim if num_classes else 0
        # project z to 4x4 with a "fractionally strided" convolution, which is the paper's projection layer
        self.convs = nn.ModuleList([nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False)])
        self.norms = nn.ModuleList([ConditionalBatchNorm(widths[0], cond_dim)])
        for w_in, w_out in zip(widths, widths[1:]):
            self.convs.append(nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False))  # doubles H and W
            self.norms.append(ConditionalBatchNorm(w_out, cond_dim))
        self.to_image = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)  # no BN on the output (Radford §3)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor, labels: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
        embedding = self.embedding(labels) if self.embedding is not None else None
        h = z[:, :, None, None]  # (B, z_dim, 1, 1)
        for conv, norm in zip(self.convs, self.norms):
            h = F.relu(norm(conv(h), embedding))
        return torch.tanh(self.to_image(h))  # (B, C, H, W) in [-1, 1], the range of the scaled data


class Discriminator(nn.Module):
    """image -> one score per image (a logit for the ns loss), by strided convolutions that halve the size down to
    4x4 and a final 4x4 convolution, which is a linear layer on the flattened features, not a hidden FC layer.
    At 32 px with width 64: (B, C, 32, 32) -> (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 256, 4, 4) -> (B,).

    Conditional: the projection discriminator (Miyato & Koyama 2018 eq. 3), f(x, y) = psi(phi(x)) + e(y)^T phi(x),
    with phi(x) the 4x4 features summed over space.

    Packing (PacGAN, Lin et al. 2018): with pack m, each m consecutive images of the batch are one input of m x C
    channels and get one score, so (B, C, H, W) -> (B/m,). Only the input layer grows."""

    def __init__(self, channels: int, image_size: int, width: int = 64, norm: str = "batch", num_classes: int = 0,
                 pack: int = 1):
        super().__init__()
        self.pack = pack
        channels *= pack
        halvings = int(math.log2(image_size)) - 2  # image_size -> 4x4
        widths = [width * 2 ** i for i in range(halvings)]  # e.g. 32 px: [64, 128, 256]
        self.convs = nn.ModuleList([nn.Conv2d(channels, widths[0], 4, 2, 1)])  # no norm on D's input (Radford §3)
        self.norms = nn.ModuleList([nn.Identity()])
        for w_in, w_out in zip(widths, widths[1:]):
            self.convs.append(nn.Conv2d(w_in, w_out, 4, 2, 1, bias=norm == "none"))  # halves H and W
            self.norms.append(nn.BatchNorm2d(w_out) if norm == "batch" else  # GroupNorm(1): LayerNorm over C, H, W
                              nn.GroupNorm(1, w_out) if norm == "layer" else nn.Identity())
        self.score = nn.Conv2d(widths[-1], 1, 4, 1, 0)  # psi: (B, w, 4, 4) -> (B, 1, 1, 1)
        self.embedding = nn.Embedding(num_classes, widths[-1]) if num_classes else None
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, labels: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x.reshape(len(x) // self.pack, self.pack * x.shape[1], *x.shape[2:])  # (B/m, m C, H, W)
        for conv, norm in zip(self.convs, self.norms):
            h = F.leaky_relu(norm(conv(h)), 0.2)  # LeakyReLU(0.2) everywhere in D (Radford §3)
        score = self.score(h).flatten()  # (B,)
        if self.embedding is not None:
            score = score + (self.embedding(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return score


class ReplayBuffer:
    """Fakes from earlier steps, mixed into D's fake batches so that D keeps rejecting what G produced before and G
    cannot escape by returning to an old mode (Shrivastava et al. 2017 §2.3; ganhacks #8)."""

    def __init__(self, capacity: int, fraction: float):
        self.capacity, self.fraction = capacity, fraction
        self.images: typing.Optional[torch.Tensor] = None  # (size, C, H, W), filled as training goes

    def mix(self, fakes: torch.Tensor) -> torch.Tensor:
        """Replace a share of `fakes` by stored ones, then store a share of `fakes` (random slots once full)."""
        fakes = fakes.detach()
        count = max(1, round(self.fraction * len(fakes)))
        mixed = fakes
        if self.images is not None:
            mixed = fakes.clone()
            mixed[:count] = self.images[torch.randint(len(self.images), (count,), device=fakes.device)]
        if self.images is None:
            self.images = fakes[:self.capacity].clone()
        elif len(self.images) < self.capacity:
            self.images = torch.cat([self.images, fakes[:self.capacity - len(self.images)]])
        else:
            slots = torch.randperm(self.capacity, device=fakes.device)[:count]
            self.images[slots] = fakes[:count]
        return mixed

    def state_dict(self) -> dict:
        return {"images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.images = state["images"]


# ---------------------------------------------------------------------------------------------------------------
# Losses: pure functions of D's scores, in float32 whatever the autocast dtype
# ---------------------------------------------------------------------------------------------------------------

def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor, real_target: torch.Tensor,
                       fake_target: torch.Tensor):
    """D's loss on its scores for a real and a fake batch, which went through D separately (ganhacks #4)."""
    real, fake = real.float(), fake.float()
    if kind == "ns":  # -log D(x) - log(1 - D(G(z))) (eq. 1), in the logits form: BCE with logits, no sigmoid
        loss = F.binary_cross_entropy_with_logits(real, real_target) + \
            F.binary_cross_entropy_with_logits(fake, fake_target)
    elif kind == "lsgan":  # Mao et al. 2017 eq. 2 with a = 0, b = 1: 1/2 (D(x) - b)^2 + 1/2 (D(G(z)) - a)^2
        loss = 0.5 * (real - real_target).pow(2).mean() + 0.5 * (fake - fake_target).pow(2).mean()
    elif kind == "hinge":  # E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] (Lim & Ye 2017; BigGAN)
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    elif kind == "wgan-gp":  # the critic's E[D(G(z))] - E[D(x)] (Gulrajani eq. 3, without the penalty)
        loss = fake.mean() - real.mean()
    else:
        raise ValueError(f"unknown loss {kind!r}")
    return loss, {"loss/d": loss.detach()}


def generator_loss(kind: str, fake: torch.Tensor):
    fake = fake.float()
    if kind == "ns":  # -log D(G(z)) = softplus(-logit): strong gradient while D rejects fakes (Goodfellow §3)
        loss = F.softplus(-fake).mean()
    elif kind == "lsgan":  # 1/2 (D(G(z)) - c)^2 with c = 1 (Mao et al. eq. 2)
        loss = 0.5 * (fake - 1).pow(2).mean()
    else:  # hinge and wgan-gp: -E[D(G(z))]
        loss = -fake.mean()
    return loss, {"loss/g": loss.detach()}


def discriminator_targets(args: Args, batch: int, device: torch.device):
    """D's targets for real and fake batches: 1 and 0, unless a label trick is on."""
    real = torch.full((batch,), 1.0 - args.label_smoothing, device=device)  # one-sided: fakes keep 0
    fake = torch.zeros(batch, device=device)
    if args.noisy_labels:
        real = torch.empty(batch, device=device).uniform_(0.7, 1.2)
        fake = torch.empty(batch, device=device).uniform_(0.0, 0.3)
    if args.label_flip:
        flip_real = torch.rand(batch, device=device) < args.label_flip
        flip_fake = torch.rand(batch, device=device) < args.label_flip
        real, fake = torch.where(flip_real, 1 - real, real), torch.where(flip_fake, 1 - fake, fake)
    return real, fake


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, labels) -> torch.Tensor:
    """WGAN-GP (Gulrajani eq. 3): E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) G(z), eps ~ U[0, 1]."""
    pack = getattr(discriminator, "pack", 1)  # with packing, D's input and so the gradient's norm are per pack
    packs = len(real) // pack
    eps = torch.rand(packs, 1, 1, 1, device=real.device).repeat_interleave(pack, dim=0)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(x_hat, labels).float().sum(), x_hat, create_graph=True)
    return (grad.float().reshape(packs, -1).norm(dim=1) - 1).pow(2).mean()


def r1_penalty(real_scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018 eq. 9) without its gamma / 2: E[||grad_x D(x)||^2] on real data, one D input (an
    image, or a pack of them) per norm."""
    (grad,) = torch.autograd.grad(real_scores.float().sum(), real, create_graph=True)
    return grad.float().pow(2).reshape(len(real_scores), -1).sum(dim=1).mean()


def orthogonal_regularisation(module: nn.Module) -> torch.Tensor:
    """BigGAN §3.1 eq. 3: sum over layers of ||W W^T * (1 - I)||_F^2, W one row per output filter; it pushes
    filters apart without constraining their norms, which makes G amenable to truncation."""
    total = torch.zeros((), device=next(module.parameters()).device)
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            w = layer.weight.transpose(0, 1) if isinstance(layer, nn.ConvTranspose2d) else layer.weight
            w = w.flatten(1)  # (filters, in * k * k)
            gram = w @ w.t()
            total = total + (gram * (1 - torch.eye(len(gram), device=gram.device))).pow(2).sum()
    return total


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------

def sample_z(args: Args, count: int, device: torch.device, generator: typing.Optional[torch.Generator] = None,
             truncation: float = 0.0) -> torch.Tensor:
    """The prior p(z). Training always draws from the full prior; `truncation` (BigGAN §3.1) is for sampling only."""
    if args.z_dist == "uniform":  # U[-1, 1] (Radford §4)
        return torch.rand(count, args.z_dim, device=device, generator=generator) * 2 - 1
    if truncation:  # N(0, 1) truncated to [-psi, psi] by inverting the CDF: BigGAN's resampling, without the loop
        lo = torch.special.ndtr(torch.tensor(-truncation)).item()
        u = lo + (1 - 2 * lo) * torch.rand(count, args.z_dim, device=device, generator=generator)
        return torch.special.ndtri(u)
    return torch.randn(count, args.z_dim, device=device, generator=generator)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (White 2016, "Sampling Generative Networks"; ganhacks #3): a straight line between
    two high-dimensional samples passes near the origin, where the prior has almost no mass; the great circle stays
    at a typical radius."""
    omega = torch.arccos(F.cosine_similarity(z0, z1, dim=-1).clamp(-1 + 1e-7, 1 - 1e-7))[..., None]
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, labels: typing.Optional[torch.Tensor], batch: int = 500):
    """uint8 images from G in eval mode (BatchNorm uses its running statistics), in batches."""
    was_training = generator.training
    generator.eval()
    chunks = [common.to_uint8(generator(z[i:i + batch], None if labels is None else labels[i:i + batch]))
              for i in range(0, len(z), batch)]
    generator.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def recompute_batchnorm_statistics(generator: nn.Module, args: Args, num_classes: int, device, batches: int = 20):
    """"Standing statistics" (BigGAN Appendix C): an EMA of the weights is not matched by the running BatchNorm
    statistics of the trained G, so measure them afresh with the averaged weights over fixed noise."""
    noise = torch.Generator(device=device).manual_seed(args.seed + 7)
    batchnorms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in batchnorms]
    for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # a plain average over the batches below
    generator.train()
    for _ in range(batches):
        z = sample_z(args, args.batch_size, device, noise, args.truncation)
        labels = torch.randint(num_classes, (args.batch_size,), device=device, generator=noise) if num_classes \
            else None
        generator(z, labels)
    for module, momentum in zip(batchnorms, momenta):
        module.momentum = momentum
    generator.eval()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """theta_ema <- d theta_ema + (1 - d) theta, with d ramped up as min(d, (1 + t) / (10 + t)) so that the average
    is not anchored to the random initialisation in short runs (BigGAN instead starts its EMA at step 20k)."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GAN:
    generator: Generator
    discriminator: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: typing.Optional[Generator]
    replay: typing.Optional[ReplayBuffer]


def build_gan(args: Args, channels: int, num_classes: int, device: torch.device) -> GAN:
    generator = Generator(args.z_dim, channels, args.image_size, args.g_width, num_classes, args.embed_dim)
    discriminator = Discriminator(channels, args.image_size, args.d_width, args.discriminator_norm(), num_classes,
                                  args.pack)
    if args.spectral_norm:
        apply_spectral_norm(discriminator)
    if args.spectral_norm_g:
        apply_spectral_norm(generator)
    generator = common.channels_last_on_cpu(generator.to(device), device)
    discriminator = common.channels_last_on_cpu(discriminator.to(device), device)
    common.broadcast_module(generator)  # every rank starts from rank 0's weights
    common.broadcast_module(discriminator)
    ema = copy.deepcopy(generator).requires_grad_(False) if args.ema_decay else None
    return GAN(generator, discriminator,
               common.adam(generator.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2)),
               common.adam(discriminator.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2)),
               ema, ReplayBuffer(args.replay_size, args.replay_fraction) if args.replay_size else None)


def train_step(gan: GAN, args: Args, next_batch, step: int, planned_steps: int, device: torch.device) -> dict:
    """k = --d-steps updates of D, each on a fresh real batch and fresh fakes, then one update of G on the last
    fakes (Goodfellow Alg. 1). Returns the step's metrics as tensors (no host synchronisation). Schedules run over
    `planned_steps` (all epochs), which --max-steps does not change, so a capped run and its resumption match."""
    G, D = gan.generator, gan.discriminator
    sigma = args.instance_noise * max(0.0, 1 - step / planned_steps)  # annealed linearly to 0 (Sønderby et al.)
    metrics = {}
    for _ in range(args.d_steps):
        images, labels = next_batch()
        real = images.float() / 127.5 - 1  # uint8 -> [-1, 1], the range of G's tanh (Radford §3)
        batch = len(real)
        z = sample_z(args, batch, device)
        fake_labels = torch.randint(gan_num_classes(G), (batch,), device=device) if args.conditional else None
        with common.autocast(device, args.amp):
            fake = G(z, fake_labels)
        d_real_in, d_fake_in = real, fake.detach()
        if gan.replay is not None:
            d_fake_in = gan.replay.mix(d_fake_in)
        if sigma > 0:  # the same noise law on both sides blurs the supports together, so D cannot be perfect
            d_real_in = d_real_in + sigma * torch.randn_like(d_real_in)
            d_fake_in = d_fake_in + sigma * torch.randn_like(d_fake_in)
        if args.r1:
            d_real_in = d_real_in.detach().requires_grad_(True)
        with common.autocast(device, args.amp):
            real_scores = D(d_real_in, labels)
            fake_scores = D(d_fake_in, fake_labels)
        real_target, fake_target = discriminator_targets(args, len(real_scores), device)  # one per D input
        loss_d, d_metrics = discriminator_loss(args.loss, real_scores, fake_scores, real_target, fake_target)
        metrics.update(d_metrics)
        if args.loss == "wgan-gp":
            with common.autocast(device, args.amp):
                penalty = gradient_penalty(D, real, fake.detach(), labels)
            loss_d = loss_d + args.gp_weight * penalty
            metrics["penalty/gp"] = penalty.detach()
        if args.r1:
            penalty = r1_penalty(real_scores, d_real_in)
            loss_d = loss_d + args.r1 / 2 * penalty
            metrics["penalty/r1"] = penalty.detach()
        gan.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        common.all_reduce_gradients(D)
        metrics["grad/d"] = nn.utils.clip_grad_norm_(D.parameters(), float("inf"))  # the norm, nothing clipped
        gan.opt_d.step()
        as_probability = torch.sigmoid if args.loss == "ns" else (lambda s: s)
        metrics["d/real"] = as_probability(real_scores.detach().float()).mean()
        metrics["d/fake"] = as_probability(fake_scores.detach().float()).mean()

    # G's step on the last fakes, now judged by the updated D
    d_g_in = fake + sigma * torch.randn_like(fake) if sigma > 0 else fake
    with common.autocast(device, args.amp):
        scores = D(d_g_in, fake_labels)
    loss_g, g_metrics = generator_loss(args.loss, scores)
    metrics.update(g_metrics)
    if args.ortho_reg:
        ortho = orthogonal_regularisation(G)
        loss_g = loss_g + args.ortho_reg * ortho
        metrics["reg/ortho"] = ortho.detach()
    gan.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    common.all_reduce_gradients(G)
    metrics["grad/g"] = nn.utils.clip_grad_norm_(G.parameters(), float("inf"))
    gan.opt_g.step()
    if gan.ema is not None:
        update_ema(gan.ema, G, args.ema_decay, step)
    if sigma > 0:
        metrics["noise/sigma"] = sigma
    return metrics


def gan_num_classes(generator: Generator) -> int:
    return generator.embedding.num_embeddings if generator.embedding is not None else 0


# Failure tracking (ganhacks #10): a loss of D near 0 means D separates real from fake perfectly and G's gradient
# vanishes; gradient norms above 100 mean something has blown up.
D_LOSS_NEAR_ZERO = 0.05
D_FAKE_NEAR_ZERO = 0.01
GRAD_NORM_EXPLODED = 100.0


def health_warnings(record: dict, args: Args) -> list:
    warnings = []
    loss_d, d_fake = record.get("loss/d", math.nan), record.get("d/fake", math.nan)
    if args.loss != "wgan-gp" and (loss_d < D_LOSS_NEAR_ZERO or (args.loss == "ns" and d_fake < D_FAKE_NEAR_ZERO)):
        warnings.append(f"D wins (loss/d {loss_d:.3g}, d/fake {d_fake:.3g}): G's gradient vanishes and samples "
                        f"stop improving; try --label-smoothing 0.1, --instance-noise 0.1 or --spectral-norm")
    for key in ("grad/d", "grad/g"):
        if record.get(key, 0) > GRAD_NORM_EXPLODED:
            warnings.append(f"{key} = {record[key]:.3g} > {GRAD_NORM_EXPLODED:g}: gradients are exploding; "
                            f"try lower learning rates, --spectral-norm or --r1 10")
    return warnings


WGAN_GP_SETTING = dict(d_steps=5, lr_g=1e-4, lr_d=1e-4, beta1=0.0, beta2=0.9)  # Gulrajani et al. Alg. 1


def setting_warnings(args: Args) -> list:
    """Flags that leave a loss outside the setting its paper trains it in: DCGAN's defaults (1 D step, beta1 0.5)
    are not WGAN-GP's, whose critic has to be near its optimum for the penalty's argument to hold."""
    if args.loss != "wgan-gp" or all(getattr(args, k) == v for k, v in WGAN_GP_SETTING.items()):
        return []
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in WGAN_GP_SETTING.items())
    return [f"--loss wgan-gp is trained with {flags} in its paper (Gulrajani et al. Alg. 1); these flags differ"]


@torch.no_grad()
def evaluate(gan: GAN, sampler: nn.Module, args: Args, samples: torch.Tensor, train: common.ImageData,
             test: common.ImageData, device: torch.device, count: int = 2000) -> dict:
    """What can be measured without a pretrained classifier: the nearest-neighbour distances of common.py, and D's
    mean score on training, test and fresh fake images: D scoring training images well above test images is D
    overfitting (Karras et al. 2020, ADA §2)."""
    noise = torch.Generator(device=device).manual_seed(args.seed + 11)
    metrics = common.nearest_neighbour_distances(samples, train.images, test.images, device, args.seed, count)

    def mean_score(images, labels):  # D in training mode, as it judged batches during training
        chunk = 500 // args.pack * args.pack  # whole packs
        images = images[:len(images) // args.pack * args.pack]
        scores = torch.cat([gan.discriminator(images[i:i + chunk].to(device).float() / 127.5 - 1,
                                              None if labels is None else labels[i:i + chunk].to(device)).float()
                            for i in range(0, len(images), chunk)])
        return (torch.sigmoid(scores) if args.loss == "ns" else scores).mean().item()

    labelled = lambda data: data.labels[:count] if args.conditional else None  # noqa: E731
    metrics["eval/d_train"] = mean_score(train.images[:count], labelled(train))
    metrics["eval/d_test"] = mean_score(test.images[:count], labelled(test))
    fake_labels = torch.randint(train.num_classes, (count,), device=device, generator=noise) \
        if args.conditional else None
    z = sample_z(args, count, device, noise, args.truncation)
    metrics["eval/d_fake"] = mean_score(generate(sampler, z, fake_labels), fake_labels)
    return metrics


def benchmark(gan: GAN, args: Args, batches: common.Batches, run: common.Run, planned_steps: int) -> None:
    """Steps/s on real batches and on synthetic tensors of the same shape, in float32 and under --amp side by side,
    the share of step time spent fetching real batches, and the step's GFLOP/s against the machine's matmul rate."""
    images, labels = batches.next()
    classes = max(1, gan_num_classes(gan.generator))
    synthetic = lambda: (torch.randint(0, 256, images.shape, dtype=torch.uint8, device=run.device),  # noqa: E731
                         None if labels is None else torch.randint(classes, labels.shape, device=run.device))
    lines = common.benchmark_in_both_precisions(
        lambda next_batch, step: train_step(gan, args, next_batch, step, planned_steps, run.device), batches.next,
        synthetic, args, run.device, args.batch_size * args.d_steps * run.world_size)
    if run.is_main:
        print(f"benchmark | {run.device.type} x{run.world_size}, {torch.get_num_threads()} threads, {args.image_size} "
              f"px, batch {args.batch_size}")
        for line in lines:
            print(f"benchmark | {line}")


def main(args: Args) -> None:
    with common.session(args, "dcgan") as run:
        train(args, run)


def train(args: Args, run: common.Run) -> None:
    device = run.device
    train_data = common.load_image_dataset(args.dataset, args.data_dir, args.image_size, "train", run.out)
    if args.conditional and not train_data.num_classes:
        raise common.UserError(f"--conditional needs class labels, and {args.dataset} has none "
                               f"(a folder needs one subfolder per class)")
    num_classes = train_data.num_classes if args.conditional else 0
    gan = build_gan(args, train_data.images.shape[1], num_classes, device)
    # double backward (R1, WGAN-GP) does not go through compiled graphs, so D is then left eager
    common.maybe_compile(gan.generator, args.compile)
    common.maybe_compile(gan.discriminator, args.compile and not (args.r1 or args.loss == "wgan-gp"))
    batches = common.Batches((train_data.images, train_data.labels), args.batch_size, args.seed, device, run.rank,
                             run.world_size, "images")
    planned_steps = args.epochs * max(1, batches.steps_per_epoch // args.d_steps)
    total_steps = min(planned_steps, args.max_steps or planned_steps)
    if args.benchmark:
        return benchmark(gan, args, batches, run, planned_steps)

    def load_state(checkpoint):
        common.load_state_dicts(vars(gan), checkpoint["gan"])
        batches.load_state_dict(checkpoint["batches"])

    step = common.resume(args, run, load_state)["step"] if args.resume else 0
    checkpoints = common.Checkpoints(run, "dcgan.py", "lower learning rates, --spectral-norm or --r1 10",
                                     step if args.resume else None)
    state = lambda: {"args": dataclasses.asdict(args), "gan": common.state_dicts(vars(gan)),  # noqa: E731
                     "batches": batches.state_dict()}
    logger = common.MetricsLogger(run.out, total_steps, run.is_main, start_step=step,
                                  console_keys=("loss/d", "loss/g", "d/real", "d/fake", "grad/d", "grad/g"))
    sizes = [sum(p.numel() for p in net.parameters()) for net in (gan.generator, gan.discriminator)]
    logger.print(f"dcgan | {args.dataset} {tuple(train_data.images.shape)} | G {sizes[0]:,} params, "
                 f"D {sizes[1]:,} params | {device} x{run.world_size} | {total_steps} steps | out {run.out}")
    for warning in setting_warnings(args):
        logger.print(f"note: {warning}")

    # fixed noise for the sample grids, so that grids from different steps show the same z
    grid_noise = torch.Generator(device=device).manual_seed(args.seed + 3)
    grid_z = sample_z(args, 100 if num_classes and num_classes <= 10 else 64, device, grid_noise, args.truncation)
    grid_labels = torch.arange(len(grid_z), device=device) % num_classes if num_classes else None
    grid_rows = 10 if num_classes and num_classes <= 10 else 8
    sampler = gan.ema if gan.ema is not None else gan.generator

    def save_samples(path):
        if gan.ema is not None:
            recompute_batchnorm_statistics(gan.ema, args, num_classes, device)
        if run.is_main:
            common.save_image_grid(generate(sampler, grid_z, grid_labels), path, nrow=grid_rows)

    if run.is_main and not (run.out / "real_samples.png").exists():
        common.save_image_grid(train_data.images[:64], run.out / "real_samples.png", nrow=8)

    with common.StopRequest() as stop:
        while step < total_steps:
            metrics = train_step(gan, args, batches.next, step, planned_steps, device)
            step += 1
            logger.update(metrics)
            if step % args.log_every == 0 or step == total_steps:
                record = logger.log(step)
                checkpoints.check_losses(record, step)
                for warning in health_warnings(record, args):
                    logger.print(f"warning: step {step}: {warning}")
            if args.sample_every and step % args.sample_every == 0:
                save_samples(run.out / f"samples_{step}.png")
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, state(), [gan.generator])
            if stop(device):
                checkpoints.stop(step, state(), [gan.generator])

    checkpoints.save(step, state(), [gan.generator])
    if not (args.sample_every and step % args.sample_every == 0):  # else the loop just drew this grid
        save_samples(run.out / f"samples_{step}.png")
    common.teardown()  # the rest is rank 0's alone
    if run.is_main:
        write_results(gan, sampler, args, train_data, num_classes, run, logger, step)


def write_results(gan: GAN, sampler: nn.Module, args: Args, train_data: common.ImageData, num_classes: int,
                  run: common.Run, logger: common.MetricsLogger, step: int) -> None:
    """samples.npz, interpolations.png, the final evaluation and loss.png, by rank 0 after training."""
    device = run.device
    final_noise = torch.Generator(device=device).manual_seed(args.seed + 5)
    z = sample_z(args, args.num_samples, device, final_noise, args.truncation)
    labels = torch.randint(num_classes, (args.num_samples,), device=device, generator=final_noise) \
        if num_classes else None
    samples = generate(sampler, z, labels)
    # a folder has no test split, so its training images stand in
    test_data = train_data if args.dataset.startswith("folder:") else \
        common.load_image_dataset(args.dataset, args.data_dir, args.image_size, "test", run.out)
    common.save_samples_npz(run.out / "samples.npz", samples, labels)
    # slerp between 8 pairs of z, 10 steps each (White 2016); conditional rows keep one class
    ends = sample_z(args, 16, device, final_noise, args.truncation)
    t = torch.linspace(0, 1, 10, device=device)[None, :, None]
    path = slerp(ends[:8, None], ends[8:, None], t).reshape(80, args.z_dim)
    path_labels = torch.arange(8, device=device).repeat_interleave(10) % num_classes if num_classes else None
    common.save_image_grid(generate(sampler, path, path_labels), run.out / "interpolations.png", nrow=10)
    logger.log_eval(step, evaluate(gan, sampler, args, samples, train_data, test_data, device))
    common.plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png", ("loss/",), f"dcgan {args.dataset}")
    logger.print(f"done: {run.out} (samples_{step}.png, samples.npz, interpolations.png, loss.png)")


if __name__ == "__main__":
    common.run_cli(main, Args)
