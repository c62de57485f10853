"""Generative Latent Optimisation (GLO), and the naive fixed-latent regression it fixes.

Bojanowski, Joulin, Lopez-Paz, Szlam, "Optimizing the Latent Space of Generative Networks", ICML 2018,
arXiv:1707.05776. The generator is DCGAN's (Radford, Metz, Chintala, ICLR 2016, arXiv:1511.06434).

The naive idea: give every training image x_i its own Gaussian vector z_i, drawn once, and regress image on vector,
min_theta sum_i l(g_theta(z_i), x_i). It works badly: the pairing of random vectors with images is arbitrary, so
nearby z's are asked for unrelated images and g can only learn their blurry average. GLO (§3) also optimises the
vectors, jointly with the generator, each one constrained to a set Z:

    min_theta  1/N sum_i  min_{z_i in Z}  l(g_theta(z_i), x_i)                                                 (GLO)

so that similar images get nearby codes and g becomes smooth in z. Z is the unit l2 sphere (a code is projected
back onto it after every update; the unit ball, projecting only codes that leave it, is `--constraint ball`). Codes
start from PCA of the images (reported as crucial by people who re-implemented the paper), the generator is DCGAN's,
and both are trained by SGD with learning rate 1 for theta and 10 for the codes, batch 128, 25 epochs (§4). The loss
is the Laplacian-pyramid L1 loss (§3.2)

    Lap1(x, x') = sum_j 2^{2j} |L^j(x) - L^j(x')|_1                                                           (Lap1)

with L^j(x) the j-th level of the Laplacian pyramid of x (Burt & Adelson 1983; the paper cites Ling & Okada 2006).
The sign of the exponent: with j = 0 the finest level, level j has 4^-j as many coefficients as the image, so
2^{2j} = 4^j exactly undoes the shrinking and every level, the low-pass residual included, weighs the same in total.
Divided by the number of pixels, Lap1 is the sum over levels of the mean absolute coefficient difference, which is
what `lap1` below computes (the test checks the two forms agree). The other sign, 2^{-2j}, would weight the 4x4
residual, which carries brightness and shape, 16^3 times less than the finest band at 32 px. The full text of the
paper could not be opened while writing this file: the formula, hyper-parameters and section numbers here are from
the paper as we recall it and as the project's issue quotes it, not checked against the PDF.

Sampling (§4): fit one full-covariance Gaussian to the learned codes and decode draws from it; the draws are not
projected onto the sphere: in 100 dimensions their norms concentrate near 1 anyway (eval/sample_norm logs it).

`--fixed-latents` freezes the codes and changes nothing else, seeds included, so that two runs differ only in whether
the codes learn; `--code-init random` replaces the PCA start by Gaussian draws (projected onto Z). Fixed random codes
are the naive regression. The 2 x 2 of the two switches separates what learning the codes buys from what a good
start does (README, "glo.py").

Evaluation: reconstruction MSE of the training images from their codes; and, since a test image has no code, codes
for test images found by optimising the codes alone with the generator frozen (both modes: it is the only way to
embed a new image), with the same procedure on as many training images for a fair comparison.

Run it:
    python glo.py                                      # Fashion-MNIST at 32 px, GLO, about 9 minutes on 2 CPU cores
    python glo.py --fixed-latents --code-init random   # the naive regression, same seeds
    python glo.py --dataset mnist --epochs 25          # the paper's 25 epochs
    python glo.py --loss l2 --optimizer adam           # plain L2 loss, Adam
    python glo.py --dataset cifar10 --image-size 64 --z-dim 512 --device cuda
    torchrun --nproc_per_node=2 glo.py                 # one process per GPU (or CPU: gloo)
    python glo.py --resume runs/<folder>               # continue an interrupted run

Results: README, "glo.py".
"""

import dataclasses
import functools
import math
import typing

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclasses.dataclass
class Args(common.RunArgs):
    epochs: int = 12  # passes over the training set; the paper trains 25 (Bojanowski §4); 12 take ~8 min on 2 cores
    image_size: int = 32  # a power of two from 16 to 128; 28 px digits are padded to 32, other sizes resized
    z_dim: int = 100  # size of each image's code (Bojanowski §4: 100 for small images, 512 for 64-128 px)
    g_width: int = 64  # G's channels before its output layer, doubled at each layer towards 4x4 (DCGAN)
    loss: typing.Literal["lap1", "l2", "l1"] = "lap1"  # lap1: Laplacian-pyramid L1 (Bojanowski §3.2); l2, l1: pixels
    constraint: typing.Literal["sphere", "ball"] = "sphere"
    # Z: the unit l2 sphere, every code projected back after each update (Bojanowski §3.1), or the unit ball
    code_init: typing.Literal["pca", "random"] = "pca"  # initial codes: PCA of the images (Bojanowski §4) or Gaussian
    fixed_latents: bool = False
    # codes never optimised: only G learns. With --code-init random this is the naive regression, codes drawn at
    # random once (the lecture's "random vector, supervised"); with pca, a decoder of fixed PCA scores
    optimizer: typing.Literal["sgd", "adam"] = "sgd"  # sgd as in the paper (§4); adam: Adam for G, lazy Adam for codes
    lr_g: float = 0.0  # learning rate of G; 0: 1 with sgd (Bojanowski §4), 1e-3 with adam
    lr_z: float = 0.0  # learning rate of the codes; 0: 10 with sgd (Bojanowski §4), 1e-2 with adam
    eval_images: int = 1000  # test images (and as many training images) whose codes are found with G frozen; 0: skip
    eval_steps: int = 50  # Adam steps on those codes (cosine-annealed learning rate)
    eval_lr: float = 0.05  # Adam learning rate on those codes
    num_samples: int = 10_000  # images decoded from the fitted Gaussian into samples.npz

    def __post_init__(self):
        super().__post_init__()
        common.check_image_dataset(self.dataset)
        size = self.image_size
        if not (16 <= size <= 128 and size & (size - 1) == 0):
            raise ValueError(f"--image-size must be a power of two from 16 to 128, got {size}")
        common.check_ranges(self, at_least_1=("z_dim", "g_width", "num_samples", "eval_steps"),
                            at_least_0=("lr_g", "lr_z", "eval_images"), positive=("eval_lr",))

    def learning_rates(self) -> tuple:
        default_g, default_z = (1.0, 10.0) if self.optimizer == "sgd" else (1e-3, 1e-2)
        return self.lr_g or default_g, self.lr_z or default_z


# ---------------------------------------------------------------------------------------------------------------
# Generator: DCGAN's (Radford §3), as in the paper (Bojanowski §4)
# ---------------------------------------------------------------------------------------------------------------

def init_weights(module: nn.Module) -> None:
    """Radford §4: all weights ~ N(0, 0.02); BatchNorm gains ~ N(1, 0.02) and biases 0."""
    if isinstance(module, nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z -> image by transposed convolutions that double the size from 4x4, BatchNorm and ReLU, tanh output.
    At 32 px with width 64: z (B, 100) -> (B, 256, 4, 4) -> (B, 128, 8, 8) -> (B, 64, 16, 16) -> (B, C, 32, 32);
    at 64 px one doubling more, at 16 px one fewer."""

    def __init__(self, z_dim: int, channels: int, image_size: int, width: int = 64):
        super().__init__()
        doublings = int(math.log2(image_size)) - 2  # 4x4 -> image_size
        widths = [width * 2 ** i for i in reversed(range(doublings))]  # e.g. 32 px: [256, 128, 64]
        layers = [nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]  # no BN on the output
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])  # (B, z_dim, 1, 1) -> (B, C, H, W) in [-1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Laplacian pyramid (Burt & Adelson 1983) and the losses: pure functions, float32
# ---------------------------------------------------------------------------------------------------------------

BINOMIAL_KERNEL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)  # Burt & Adelson's 5-tap generating kernel, a = 0.375


@functools.lru_cache(maxsize=None)
def _blur_matrix(n: int) -> torch.Tensor:
    """(n, n): the 5-tap binomial filter along one axis of length n, reflected at the borders as F.pad's 'reflect'
    does. The pyramid is separable and linear, so its steps are products with small matrices along H and W, much
    faster on a CPU than depthwise convolutions of one-channel images."""
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k, weight in enumerate(BINOMIAL_KERNEL):
            p = abs(i + k - 2)  # reflect at the start ...
            p = 2 * (n - 1) - p if p > n - 1 else p  # ... and at the end
            matrix[i, p] += weight
    return matrix


def _along_both_axes(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """matrix @ x @ matrix^T on the last two axes: (..., h, w) -> (..., m, m) for a (m, h) matrix and h = w."""
    matrix = matrix.to(dtype=x.dtype, device=x.device)
    return matrix @ x @ matrix.T


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then keep every other row and column: (B, C, H, W) -> (B, C, H/2, W/2)."""
    return _along_both_axes(x, _blur_matrix(x.shape[-1])[::2])


def pyramid_up(x: torch.Tensor) -> torch.Tensor:
    """Insert zeros between samples, then blur with gain 2 per axis (4 in all) to restore the mean:
    (B, C, h, w) -> (B, C, 2h, 2w). Only the even columns of the blur meet non-zero samples."""
    return _along_both_axes(x, 2 * _blur_matrix(2 * x.shape[-1])[:, ::2])


def pyramid_levels(image_size: int) -> int:
    """Band-pass levels at image_size, image_size/2, ..., 8, plus the 4x4 low-pass residual."""
    return int(math.log2(image_size)) - 1


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list:
    """[L^0 (finest band, full size), ..., L^{levels-2}, low-pass residual]; L^j = G_j - up(G_{j+1})."""
    bands, current = [], x
    for _ in range(levels - 1):
        smaller = pyramid_down(current)
        bands.append(current - pyramid_up(smaller))
        current = smaller
    return bands + [current]


def reconstruct_from_pyramid(bands: list) -> torch.Tensor:
    """The inverse: G_j = L^j + up(G_{j+1}), from the residual up to the full image (exact by construction)."""
    x = bands[-1]
    for band in reversed(bands[:-1]):
        x = band + pyramid_up(x)
    return x


def lap1(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Lap1 (Bojanowski §3.2) per image, divided by the number of pixels C*H*W: (B,). With j = 0 the finest level,
    2^{2j} times the L1 norm of level j over C*H*W is the mean absolute difference over that level's coefficients.
    The pyramid is linear, so L^j(x_hat) - L^j(x) = L^j(x_hat - x): one pyramid instead of two."""
    difference = laplacian_pyramid(x_hat - x, pyramid_levels(x.shape[-1]))
    pixels = x[0].numel()
    return sum(2 ** (2 * j) * band.abs().flatten(1).sum(dim=1) / pixels for j, band in enumerate(difference))


def image_losses(kind: str, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction loss of each image, (B,), on images in [-1, 1]."""
    x_hat, x = x_hat.float(), x.float()
    if kind == "lap1":
        return lap1(x_hat, x)
    if kind == "l2":  # squared error per pixel; blurry on its own (Bojanowski §3.2)
        return (x_hat - x).pow(2).flatten(1).mean(dim=1)
    if kind == "l1":
        return (x_hat - x).abs().flatten(1).mean(dim=1)
    raise ValueError(f"unknown loss {kind!r}")


def reconstruction_loss(kind: str, x_hat: torch.Tensor, x: torch.Tensor):
    """The batch mean of the loss, and the per-pixel MSE on the [0, 1] scale (the same yardstick for every loss)."""
    loss = image_losses(kind, x_hat, x).mean()
    mse = ((x_hat.detach().float() - x.float()) / 2).pow(2).mean()
    return loss, {"loss/rec": loss.detach(), "rec/mse": mse}


# ---------------------------------------------------------------------------------------------------------------
# Codes: the constraint set Z, their initialisation, the Gaussian fit for sampling
# ---------------------------------------------------------------------------------------------------------------

def project(z: torch.Tensor, constraint: str) -> torch.Tensor:
    """Euclidean projection onto Z: the unit sphere (every code scaled to norm 1), or the unit ball (only codes
    outside it are scaled back)."""
    norm = z.norm(dim=-1, keepdim=True)
    if constraint == "sphere":
        return z / norm.clamp_min(1e-12)
    return z / norm.clamp_min(1.0)


def into_constraint_set(z: torch.Tensor, constraint: str) -> torch.Tensor:
    """Initial codes in Z. On the sphere each is normalised. In the ball all are divided by the largest norm, so
    they keep their relative lengths (projecting would put them all on the sphere, since PCA scores of whole images
    have norms far above 1)."""
    if constraint == "sphere":
        return project(z, "sphere")
    return z / z.norm(dim=1).max().clamp_min(1e-12)


def flat_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C*H*W) in [-1, 1], the scale the generator outputs."""
    return images.flatten(1).float() / 127.5 - 1


@torch.no_grad()
def principal_components(images: torch.Tensor, count: int, seed: int, max_images: int = 10_000):
    """(mean (D,), components (count, D)): the mean and top principal directions of up to `max_images` images
    drawn with `seed`. Exact SVD when the problem is small, a seeded randomised SVD otherwise. Components beyond
    the data's rank are zero."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(images), generator=generator)[:max_images]
    x = flat_images(images[chosen.to(images.device)].cpu())
    mean = x.mean(dim=0)
    x = x - mean
    rank = min(count, *x.shape)
    if min(x.shape) <= 4096:
        components = torch.linalg.svd(x, full_matrices=False).Vh[:rank]
    else:  # e.g. 64 px colour: D = 12,288; the random projections are drawn from a fixed seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            components = torch.svd_lowrank(x, q=min(rank + 10, *x.shape), niter=4)[2].T[:rank]
    padded = torch.zeros(count, x.shape[1])
    padded[:rank] = components
    return mean, padded


@torch.no_grad()
def initial_codes(images: torch.Tensor, args: Args) -> torch.Tensor:
    """One code per training image, in Z: PCA scores (the centred image projected onto the top z_dim principal
    directions), or Gaussian draws for --code-init random. Both come from --seed."""
    if args.code_init == "random":
        z = torch.randn(len(images), args.z_dim, generator=torch.Generator().manual_seed(args.seed + 17))
    else:
        mean, components = principal_components(images, args.z_dim, args.seed + 17)
        z = torch.cat([(flat_images(chunk.cpu()) - mean) @ components.T for chunk in images.split(4096)])
    return into_constraint_set(z, args.constraint)


@torch.no_grad()
def fit_gaussian(codes: torch.Tensor, jitter: float = 1e-6):
    """(mean, covariance, Cholesky factor) of one full-covariance Gaussian fitted to the codes (Bojanowski §4), in
    float64; the factor is of covariance + jitter * mean variance * I, so a rank-deficient fit can still be drawn."""
    z = common.to_host_float64(codes)
    mean = z.mean(dim=0)
    centred = z - mean
    covariance = centred.T @ centred / max(len(z) - 1, 1)
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    factor = torch.linalg.cholesky(covariance + jitter * scale * torch.eye(len(mean), dtype=z.dtype,
                                                                           device=z.device))
    return mean, covariance, factor


def gaussian_codes(mean: torch.Tensor, factor: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """mean + L eps for standard normal eps (count, d): draws from the fitted Gaussian, computed in float64 where the
    fit is (the CPU) and returned in float32 where the noise is."""
    return (mean + common.to_host_float64(noise) @ factor.T).float().to(noise.device)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The great circle between two codes on the sphere: every point stays in Z (a straight line would cut inside)."""
    omega = torch.arccos(F.cosine_similarity(z0, z1, dim=-1).clamp(-1 + 1e-7, 1 - 1e-7))[..., None]
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, constraint: str) -> torch.Tensor:
    """Within Z: a great circle on the sphere, a straight line in the (convex) ball."""
    return slerp(z0, z1, t) if constraint == "sphere" else (1 - t) * z0 + t * z1


@torch.no_grad()
def decode(generator: nn.Module, z: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """uint8 images from G in eval mode (BatchNorm uses its running statistics), in batches."""
    was_training = generator.training
    generator.eval()
    images = torch.cat([common.to_uint8(generator(z[i:i + batch])) for i in range(0, len(z), batch)])
    generator.train(was_training)
    return images


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GLO:
    generator: Generator
    codes: nn.Embedding  # one row per training image, indexed by its position in the training set
    opt_g: torch.optim.Optimizer
    opt_z: typing.Optional[torch.optim.Optimizer]  # None with --fixed-latents


def build_glo(args: Args, channels: int, codes: torch.Tensor, device: torch.device) -> GLO:
    generator = Generator(args.z_dim, channels, args.image_size, args.g_width).to(device)
    common.broadcast_module(generator)  # every rank starts from rank 0's weights
    # sparse gradients: only the rows of the batch get a gradient, and only they are updated (plain SGD would leave
    # the other rows alone anyway, but Adam's momentum would keep moving every code it had ever seen)
    table = nn.Embedding(len(codes), args.z_dim, sparse=True).to(device)
    with torch.no_grad():
        table.weight.copy_(codes)
    lr_g, lr_z = args.learning_rates()
    if args.optimizer == "sgd":  # plain SGD (Bojanowski §4)
        opt_g = torch.optim.SGD(generator.parameters(), lr=lr_g)
        opt_z = torch.optim.SGD(table.parameters(), lr=lr_z)
    else:  # SparseAdam: "lazy" Adam, whose moments of a row change only when the row is in a batch
        opt_g = common.adam(generator.parameters(), lr=lr_g)
        opt_z = torch.optim.SparseAdam(list(table.parameters()), lr=lr_z)
    if args.fixed_latents:
        table.weight.requires_grad_(False)
        opt_z = None
    return GLO(generator, table, opt_g, opt_z)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def write_code_rows(weight: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """weight[ids] = rows on every rank: under torchrun each rank updated the codes of its own slice of the global
    batch, so the slices are exchanged and every rank keeps the whole, identical table."""
    if world_size() > 1:
        all_ids, all_rows = [torch.empty_like(ids) for _ in range(world_size())], \
            [torch.empty_like(rows) for _ in range(world_size())]
        dist.all_gather(all_ids, ids.contiguous())
        dist.all_gather(all_rows, rows.contiguous())
        ids, rows = torch.cat(all_ids), torch.cat(all_rows)
    weight[ids] = rows


def train_step(glo: GLO, args: Args, next_batch, device: torch.device) -> dict:
    """One joint update of G and of the batch's codes (Bojanowski §3: SGD on theta and z together), then the codes
    are projected back onto Z. Returns the step's metrics as tensors (no host synchronisation)."""
    images, ids = next_batch()
    x = images.float() / 127.5 - 1  # uint8 -> [-1, 1], the range of G's tanh
    z = glo.codes(ids)  # (B, z_dim), a copy of the rows; their gradient flows back to the table
    with common.autocast(device, args.amp):
        x_hat = glo.generator(z)
    loss, metrics = reconstruction_loss(args.loss, x_hat, x)
    glo.opt_g.zero_grad(set_to_none=True)
    if glo.opt_z is not None:
        glo.opt_z.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_gradients(glo.generator)
    metrics["grad/g"] = nn.utils.clip_grad_norm_(glo.generator.parameters(), float("inf"))  # the norm only
    glo.opt_g.step()
    if glo.opt_z is not None:
        if world_size() > 1:  # the local loss is a mean over B, the global one over B * world size
            glo.codes.weight.grad = glo.codes.weight.grad / world_size()
        glo.opt_z.step()
        with torch.no_grad():
            updated = project(glo.codes.weight[ids], args.constraint)
            metrics["codes/step"] = (updated - z.detach()).norm(dim=1).mean()
            write_code_rows(glo.codes.weight, ids, updated)
    else:
        metrics["codes/step"] = torch.zeros((), device=device)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: reconstruction of training and test images, sample quality by nearest neighbours
# ---------------------------------------------------------------------------------------------------------------

def pixel_mse(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Mean squared error per pixel between two uint8 image sets, on the [0, 1] scale."""
    return ((images_a.float() - images_b.float()) / 255).pow(2).mean().item()


@torch.no_grad()
def nearest_codes(queries: torch.Tensor, train_images: torch.Tensor, codes: torch.Tensor,
                  exclude: typing.Optional[torch.Tensor] = None, batch: int = 500) -> torch.Tensor:
    """The code of each query's nearest training image in pixel space: the starting point for fitting its own code.
    `exclude` gives, per query, a training index it may not use (itself, when the queries are training images)."""
    keys = flat_images(train_images)
    picked = []
    for start in range(0, len(queries), batch):
        distances = torch.cdist(flat_images(queries[start:start + batch]), keys)
        if exclude is not None:
            rows = torch.arange(len(distances), device=distances.device)
            distances[rows, exclude[start:start + batch]] = float("inf")
        picked.append(distances.argmin(dim=1))
    return codes[torch.cat(picked)]


def fit_codes(generator: nn.Module, images: torch.Tensor, start: torch.Tensor, args: Args, batch: int = 500):
    """Codes for images the model was not trained on: minimise the squared error, the error that is reported, over
    the codes alone (whatever --loss trained G), G frozen and in eval mode (so each image is fitted independently of
    its batch), with Adam and projection onto Z after each step. Returns (codes, reconstructions uint8)."""
    was_training = generator.training
    generator.eval()
    generator.requires_grad_(False)
    codes, reconstructions = [], []
    try:
        for i in range(0, len(images), batch):
            x = images[i:i + batch].float() / 127.5 - 1
            z = start[i:i + batch].clone().requires_grad_(True)
            optimiser = torch.optim.Adam([z], lr=args.eval_lr)
            # Adam moves every coordinate by about lr per step, whatever the gradient, so the step size is annealed
            # to 0 (a cosine) or the codes would keep jittering around their optimum
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.eval_steps)
            for _ in range(args.eval_steps):
                loss = image_losses("l2", generator(z), x).sum()  # a sum: each code sees its own loss only
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if args.constraint == "sphere":  # keep the gradient's tangent part: Adam would spend its per-
                    with torch.no_grad():  # coordinate steps on the radial part, which the projection then undoes
                        z.grad -= (z.grad * z).sum(dim=1, keepdim=True) * z
                optimiser.step()
                schedule.step()
                with torch.no_grad():
                    z.copy_(project(z, args.constraint))
            codes.append(z.detach())
            with torch.no_grad():
                reconstructions.append(common.to_uint8(generator(z)))
    finally:
        generator.requires_grad_(True)
        generator.train(was_training)
    return torch.cat(codes), torch.cat(reconstructions)


def evaluate(glo: GLO, args: Args, train_images: torch.Tensor, test_images: torch.Tensor, samples: torch.Tensor,
             sample_z: torch.Tensor, out, device: torch.device) -> dict:
    """Reconstruction MSE per pixel ([0, 1] scale): of every training image from its own code (learned or fixed);
    and of `eval_images` test images and as many training images from codes fitted with G frozen,
    each started from the code of its nearest (other) training image. Also writes reconstructions.png."""
    G, codes = glo.generator, glo.codes.weight.detach()
    metrics = {"eval/mse_train": pixel_mse(decode(G, codes), train_images)}
    order = lambda n, seed: torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:args.eval_images]
    grid = []
    if args.eval_images:
        train_ids = order(len(train_images), args.seed + 23).to(device)
        test_ids = order(len(test_images), args.seed + 29).to(device)
        train_subset, test_subset = train_images[train_ids], test_images[test_ids]
        start = nearest_codes(train_subset, train_images, codes, exclude=train_ids)
        _, train_refit = fit_codes(G, train_subset, start, args)
        start = nearest_codes(test_subset, train_images, codes)
        _, test_refit = fit_codes(G, test_subset, start, args)
        metrics["eval/mse_train_subset"] = pixel_mse(decode(G, codes[train_ids]), train_subset)
        metrics["eval/mse_train_refit"] = pixel_mse(train_refit, train_subset)
        metrics["eval/mse_test"] = pixel_mse(test_refit, test_subset)
        # rows: training images, their reconstructions from the learned codes (twice), test images and their
        # reconstructions from the fitted codes (twice)
        shown = min(10, len(test_ids) // 2, len(train_ids) // 2)
        for real, rebuilt in ((train_subset, decode(G, codes[train_ids])), (test_subset, test_refit)):
            for block in range(2):
                part = slice(block * shown, (block + 1) * shown)
                grid += [real[part], rebuilt[part]]
        if shown:
            common.save_image_grid(torch.cat(grid), out / "reconstructions.png", nrow=shown)
    metrics["eval/sample_norm"] = sample_z.norm(dim=1).mean().item()
    metrics.update(common.nearest_neighbour_distances(samples, train_images, test_images, device, args.seed))
    return metrics


def benchmark(glo: GLO, args: Args, batches: common.Batches, run: common.Run, count: int) -> None:
    """Steps/s on real batches and on synthetic tensors of the same shape, in float32 and under --amp side by side,
    the share of step time spent fetching real batches, and the step's GFLOP/s against the machine's matmul rate."""
    images, ids = batches.next()
    synthetic = lambda: (torch.randint(0, 256, images.shape, dtype=torch.uint8, device=run.device),  # noqa: E731
                         torch.randperm(count, device=run.device)[:len(ids)])
    lines = common.benchmark_in_both_precisions(lambda next_batch, step: train_step(glo, args, next_batch, run.device),
                                                batches.next, synthetic, args, run.device,
                                                args.batch_size * run.world_size)
    if run.is_main:
        mode = "fixed latents" if args.fixed_latents else "GLO"
        print(f"benchmark | {mode}, {run.device.type} x{run.world_size}, {torch.get_num_threads()} threads, "
              f"{args.image_size} px, batch {args.batch_size}, loss {args.loss}")
        for line in lines:
            print(f"benchmark | {line}")


def main(args: Args) -> None:
    with common.session(args, "glo") as run:
        train(args, run)


def train(args: Args, run: common.Run) -> None:
    device = run.device
    train_data = common.load_image_dataset(args.dataset, args.data_dir, args.image_size, "train", run.out)
    count, channels = len(train_data.images), train_data.images.shape[1]
    # the batcher returns each image's index with it, which selects the image's code
    batches = common.Batches((train_data.images, torch.arange(count)), args.batch_size, args.seed, device, run.rank,
                             run.world_size, "images")
    start_codes = torch.zeros(count, args.z_dim) if args.resume else initial_codes(train_data.images, args)
    glo = build_glo(args, channels, start_codes.to(device), device)
    common.maybe_compile(glo.generator, args.compile)
    planned_steps = args.epochs * batches.steps_per_epoch
    total_steps = min(planned_steps, args.max_steps or planned_steps)
    if args.benchmark:
        return benchmark(glo, args, batches, run, count)

    def load_state(checkpoint):
        common.load_state_dicts(vars(glo), checkpoint["glo"])
        batches.load_state_dict(checkpoint["batches"])

    step = common.resume(args, run, load_state)["step"] if args.resume else 0
    checkpoints = common.Checkpoints(run, "glo.py", "lower --lr-g and --lr-z, or --optimizer adam",
                                     step if args.resume else None)
    state = lambda: {"args": dataclasses.asdict(args), "glo": common.state_dicts(vars(glo)),  # noqa: E731
                     "batches": batches.state_dict()}
    logger = common.MetricsLogger(run.out, total_steps, run.is_main, start_step=step,
                                  console_keys=("loss/rec", "rec/mse", "grad/g", "codes/step"))
    mode = "fixed codes" if args.fixed_latents else "GLO"
    logger.print(f"glo | {mode} | {args.dataset} {tuple(train_data.images.shape)} | G "
                 f"{sum(p.numel() for p in glo.generator.parameters()):,} params, codes {count:,} x {args.z_dim} "
                 f"({args.code_init}, {args.constraint}) | {args.loss} loss, {args.optimizer} lr "
                 f"{args.learning_rates()} | {device} x{run.world_size} | {total_steps} steps | out {run.out}")

    # fixed standard-normal noise for the sample grids: each grid decodes mean + L eps of the current Gaussian fit
    grid_noise = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 3)).to(device)

    def save_samples(path):
        if run.is_main:
            mean, _, factor = fit_gaussian(glo.codes.weight.detach())
            common.save_image_grid(decode(glo.generator, gaussian_codes(mean, factor, grid_noise)), path, nrow=8)

    if run.is_main and not (run.out / "real_samples.png").exists():
        common.save_image_grid(train_data.images[:64], run.out / "real_samples.png", nrow=8)

    with common.StopRequest() as stop:
        while step < total_steps:
            metrics = train_step(glo, args, batches.next, device)
            step += 1
            logger.update(metrics)
            if step % args.log_every == 0 or step == total_steps:
                checkpoints.check_losses(logger.log(step), step)
            if args.sample_every and step % args.sample_every == 0:
                save_samples(run.out / f"samples_{step}.png")
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, state(), [glo.generator, glo.codes])
            if stop(device):
                checkpoints.stop(step, state(), [glo.generator, glo.codes])

    checkpoints.save(step, state(), [glo.generator, glo.codes])
    common.teardown()  # the rest is rank 0's alone
    if not run.is_main:
        return
    if not (args.sample_every and step % args.sample_every == 0):  # else the loop just drew this grid
        save_samples(run.out / f"samples_{step}.png")
    write_results(glo, args, train_data, run, logger, step)


def write_results(glo: GLO, args: Args, train_data: common.ImageData, run: common.Run, logger: common.MetricsLogger,
                  step: int) -> None:
    """samples.npz, interpolations.png, reconstructions.png, the final evaluation and loss.png, by rank 0."""
    device = run.device
    # a folder has no test split, so its training images stand in
    test_data = train_data if args.dataset.startswith("folder:") else \
        common.load_image_dataset(args.dataset, args.data_dir, args.image_size, "test", run.out)
    G, codes = glo.generator, glo.codes.weight.detach()
    mean, _, factor = fit_gaussian(codes)
    noise = torch.randn(args.num_samples, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 5))
    sample_z = gaussian_codes(mean, factor, noise.to(device))
    samples = decode(G, sample_z)
    common.save_samples_npz(run.out / "samples.npz", samples)
    # 8 pairs of training images, 10 steps from the code of one to the code of the other
    ends = torch.randperm(len(codes), generator=torch.Generator().manual_seed(args.seed + 7))[:16].to(device)
    t = torch.linspace(0, 1, 10, device=device)[None, :, None]
    path = interpolate(codes[ends[:8], None], codes[ends[8:], None], t, args.constraint)
    common.save_image_grid(decode(G, path.reshape(80, args.z_dim)), run.out / "interpolations.png", nrow=10)
    train_images, test_images = train_data.images.to(device), test_data.images.to(device)
    logger.log_eval(step, evaluate(glo, args, train_images, test_images, samples, sample_z, run.out, device))
    common.plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png", ("loss/", "rec/"), f"glo {args.dataset}")
    logger.print(f"done: {run.out} (samples_{step}.png, samples.npz, reconstructions.png, interpolations.png, "
                 f"loss.png)")


if __name__ == "__main__":
    common.run_cli(main, Args)
