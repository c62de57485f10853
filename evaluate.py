"""evaluate.py: every model's samples scored on the same data with the same metrics, so that runs of different
model files can be read side by side.

Each model file reports its own proxy (nearest-neighbour pixel distances, reconstruction MSE, a likelihood), and no
two of those compare. This file scores the samples every image model writes (samples.npz: 10,000 uint8 images) in
one feature space, against the 10,000 test images of the run's dataset:

  - the feature space is the penultimate layer (128 units) of a small CNN classifier trained here, on the dataset's
    training split with a fixed seed, and cached in the data folder under a name that changes with its recipe. No
    network is downloaded, so the numbers are in this project's feature space, not comparable with Inception-FID
    tables; they compare runs with each other and with two reference rows: the training images themselves (the
    floor: what a perfect model would score) and uniform noise (the ceiling);
  - Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the features, in float64;
  - KID (Bińkowski et al. 2018): the unbiased MMD^2 with the kernel k(a, b) = (a·b / d + 1)^3, mean and standard
    deviation over 100 random subsets of 1,000 from each side;
  - precision and recall (Kynkäänniemi et al. 2019, k = 3): the share of samples inside the test images'
    manifold (each test image's ball reaching its 3rd nearest test neighbour), and of test images inside the
    samples' manifold; density and coverage (Naeem et al. 2020, k = 5), the same balls counted rather than
    or-ed, and coverage asking only that a test image's own ball hold a sample;
  - KL(p_samples ‖ p_test) in nats between the classifier's class histograms, and recall per class (the share of
    each class's test images that the samples cover): which classes a model misses.
  - Stacked MNIST (three MNIST digits as the R, G, B channels: 1,000 modes): the MNIST classifier reads each
    channel of 26,000 samples; modes covered (at least one sample) out of 1,000 and KL(p_samples ‖ uniform) in nats,
    the protocol of VEEGAN (Srivastava et al. 2017) and PacGAN (Lin et al. 2018), beside what a perfect
    generator gets from 26,000 draws.
Likelihoods a run reports go into the same table, each in its own column with its setting: nats per image on
binarised pixels (vae.py) and bits per dimension on 8-bit pixels (flow.py) are different quantities.

Text runs (samples.txt) are scored on the oracle by NLL-oracle, and on real text by BLEU-2..5 and self-BLEU-2..5 (as
the model files compute them), the LM score (the samples' NLL under an LSTM trained on the real training split:
quality) and the reverse LM score (the real test split's NLL under the same LSTM trained on the samples: quality
and diversity together; Zhao et al. 2018, Caccia et al. 2020). A run with samples at several temperatures gets a
curve, since a GAN and MLE must be compared along their quality/diversity curves (Caccia et al. 2020).

`--tricks` trains dcgan.py with each trick of TRICKS alone, over seeds, and tabulates mean and spread: the
lecture's question, which tricks make a GAN train, measured on Stacked MNIST's modes or Fashion-MNIST's metrics.

Run it:
    python evaluate.py runs/dcgan-a runs/vae-b runs/flow-c --out comparison   # one table of runs on one dataset
    python evaluate.py runs/dcgan-stacked --out stacked                       # Stacked MNIST: modes and KL
    python evaluate.py runs/seqgan-coco runs/scratchgan-coco --out text       # text: BLEU, LM and reverse LM
    python evaluate.py --tricks stacked-mnist --out tricks --jobs 2           # the tricks table, 3 seeds each
    python evaluate.py --benchmark runs/dcgan-a                               # time of the classifier and a scoring

Results: README, "evaluate.py".
"""

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
# The dataset whose classifier reads a run's images: Stacked MNIST is read one channel at a time by MNIST's.
CLASSIFIER_DATASET = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10",
                      "stacked-mnist": "mnist"}
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "cifar10": 32}
ACCURACY_TARGET = {"mnist": 0.99, "fashion-mnist": 0.90}  # test accuracy below which the features are suspect
# How the feature network is trained. Its hash, with the source of Classifier and train_classifier, names the cache
# file, so changing any of them trains a new network instead of silently reusing an old one.
CLASSIFIER_RECIPE = dict(widths=(32, 64), features=128, epochs=6, batch_size=128, lr=2e-3, seed=0,
                         train_images=0)  # train_images 0: the whole training split
STACKED_MODES = 1000
PERFECT_DRAWS = 100  # simulated perfect generators averaged for the Stacked MNIST reference row
FEATURE_BATCH = 1000


@dataclasses.dataclass
class Args:
    runs: typing.List[str] = dataclasses.field(default_factory=list)  # run folders written by the model files
    out: str = "comparison"  # folder for comparison.md, comparison.json and comparison.png
    data_dir: str = dataclasses.field(default_factory=lambda: common.RunArgs().data_dir)
    # where the datasets are, and where the classifiers are cached (default: $MINIGEN_DATA, else ./data)
    device: typing.Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto picks cuda, then mps, then cpu
    seed: int = 0  # draws of the reference rows and of KID's subsets (the classifier has its own fixed seed)
    samples: int = 10_000  # samples scored per image run, against as many test images (all 10,000)
    stacked_samples: int = 26_000  # samples per Stacked MNIST run (VEEGAN's and PacGAN's protocol)
    kid_subsets: int = 100  # KID: subsets averaged
    kid_subset_size: int = 1_000  # KID: samples per subset, from each side
    k_precision: int = 3  # precision / recall: the k-th neighbour sets the radius (Kynkäänniemi et al. k = 3)
    k_density: int = 5  # density / coverage: the k of Naeem et al. (k = 5)
    text_samples: int = 10_000  # text: samples scored per run (the reverse LM trains on all of them)
    bleu_samples: int = 1_000  # text: samples scored by BLEU-2..5 against the test split (as the model files)
    self_bleu_samples: int = 500  # text: samples scored by self-BLEU-2..5 (as the model files)
    benchmark: bool = False  # time the classifier's training and the scoring of the first run; no files written
    tricks: str = ""  # stacked-mnist | fashion-mnist: train dcgan.py with each of TRICKS (runs not yet done), score
    budget: typing.Literal["cpu", "full"] = "cpu"  # --tricks: the step budget of each run (TRICK_BUDGETS)
    seeds: int = 3  # --tricks: seeds per trick (0, 1, ...)
    jobs: int = 1  # --tricks: trainings at once, one thread each when more than 1
    score_finished: bool = False  # --tricks: tabulate the runs that have finished and train nothing

    def __post_init__(self):
        common.check_ranges(self, at_least_1=("samples", "stacked_samples", "kid_subsets", "k_precision",
                                              "k_density", "seeds", "jobs", "text_samples", "bleu_samples"))
        if self.self_bleu_samples < 2:
            raise ValueError(f"--self-bleu-samples must be at least 2, got {self.self_bleu_samples}")
        if self.tricks and self.tricks not in ("stacked-mnist", "fashion-mnist"):
            raise ValueError(f"--tricks runs on stacked-mnist or fashion-mnist, got {self.tricks!r}")
        if self.tricks and self.runs:
            raise ValueError("--tricks trains and scores its own runs; give no run folders with it")
        if self.kid_subset_size < 2:
            raise ValueError(f"--kid-subset-size must be at least 2, got {self.kid_subset_size}")
        if not self.runs and not self.benchmark and not self.tricks:
            raise ValueError("give one or more run folders, e.g. python evaluate.py runs/dcgan-fashion-mnist-...")


# ---------------------------------------------------------------------------------------------------------------
# The feature network
# ---------------------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """Two conv blocks and a 128-unit layer whose activations are the features every image metric uses."""

    def __init__(self, channels: int, classes: int, size: int, widths=(32, 64), features: int = 128):
        super().__init__()
        a, b = widths
        self.body = nn.Sequential(
            nn.Conv2d(channels, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(), nn.MaxPool2d(2),  # a x s/2 x s/2
            nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2),  # b x s/4 x s/4
            nn.Flatten(), nn.Linear(b * (size // 4) ** 2, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def scaled(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def train_classifier(train: common.ImageData, recipe: dict, device: torch.device) -> Classifier:
    """Adam with a cosine learning rate over a few epochs; its own seeded generators, so the global RNG is untouched
    and the same recipe gives the same network."""
    images, labels = train.images, train.labels
    if recipe["train_images"]:
        images, labels = images[:recipe["train_images"]], labels[:recipe["train_images"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = Classifier(images.shape[1], train.num_classes, images.shape[-1], recipe["widths"],
                           recipe["features"]).to(device)
    order = torch.Generator().manual_seed(recipe["seed"] + 1)
    steps = recipe["epochs"] * math.ceil(len(images) / recipe["batch_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(recipe["seed"] + 2)  # dropout
        for _ in range(recipe["epochs"]):
            for batch in torch.randperm(len(images), generator=order).split(recipe["batch_size"]):
                loss = F.cross_entropy(model(scaled(images[batch].to(device))), labels[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def recipe_key(dataset: str, recipe: dict) -> str:
    code = inspect.getsource(Classifier) + inspect.getsource(train_classifier)
    blob = json.dumps({"dataset": dataset, "recipe": recipe}, sort_keys=True) + code
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass
class FeatureNetwork:
    model: Classifier
    dataset: str
    accuracy: float  # on the whole test split
    path: typing.Optional[Path]  # the cache file (None when it could not be written)
    seconds: float  # training time, 0 when loaded from the cache
    test_features: typing.Optional[torch.Tensor] = None  # of the whole test split, kept from the accuracy pass
    test_classes: typing.Optional[torch.Tensor] = None
    test_labels: typing.Optional[torch.Tensor] = None

    @torch.no_grad()
    def features_and_classes(self, images: torch.Tensor, device) -> tuple:
        """Penultimate features (float64, N x 128) and predicted classes of uint8 images at the dataset's size."""
        features, classes = [], []
        for chunk in images.split(FEATURE_BATCH):
            h = self.model.body(scaled(chunk.to(device)))
            features.append(h.double().cpu())
            classes.append(self.model.head(h).argmax(1).cpu())
        return torch.cat(features), torch.cat(classes)


def load_cached(model: nn.Module, path: Path, what: str, device) -> None:
    """Weights from an evaluate-cache file into `model` (eval mode), or a one-line error naming the file."""
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise common.UserError(f"{path}: cannot read the cached {what} ({type(e).__name__}); delete it to train it "
                               f"again")
    model.eval()


def save_cached(model: nn.Module, path: Path, what: str, log) -> bool:
    """Write `model`'s weights atomically; a read-only data folder only costs a retraining next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        common.atomic_write(path, lambda f: torch.save(model.state_dict(), f))
        return True
    except OSError as e:
        log(f"note: could not cache the {what} in {path.parent} ({e.strerror}); it will be trained again")
        return False


def load_feature_network(dataset: str, data_dir, device, recipe: typing.Optional[dict] = None, log=print,
                         use_cache: bool = True) -> FeatureNetwork:
    """The dataset's classifier from <data-dir>/evaluate-cache/, trained and saved there first if it is missing."""
    recipe = recipe or CLASSIFIER_RECIPE
    test = common.load_image_dataset(dataset, data_dir, NATIVE_SIZE[dataset], "test")
    path = Path(data_dir) / "evaluate-cache" / f"classifier-{dataset}-{recipe_key(dataset, recipe)}.pt"
    model = Classifier(test.images.shape[1], test.num_classes, NATIVE_SIZE[dataset], recipe["widths"],
                       recipe["features"]).to(device)
    seconds = 0.0
    if use_cache and path.is_file():
        load_cached(model, path, "classifier", device)
    else:
        where = f"; cached afterwards in {path.parent}" if use_cache else ", not cached"
        log(f"training the {dataset} feature classifier ({recipe['epochs']} epochs{where})")
        train = common.load_image_dataset(dataset, data_dir, NATIVE_SIZE[dataset], "train")
        started = time.perf_counter()
        model = train_classifier(train, recipe, device)
        seconds = time.perf_counter() - started
        if use_cache and not save_cached(model, path, "classifier", log):
            path = None
    network = FeatureNetwork(model, dataset, 0.0, path, seconds)
    network.test_features, network.test_classes = network.features_and_classes(test.images, device)
    network.test_labels = test.labels
    network.accuracy = (network.test_classes == test.labels).float().mean().item()
    target = ACCURACY_TARGET.get(dataset)
    verdict = "" if target is None or network.accuracy >= target else f", below the {target:.0%} it should reach"
    log(f"feature classifier {dataset}: test accuracy {network.accuracy:.2%}{verdict}"
        + (f" (trained in {seconds:.0f} s)" if seconds else ""))
    return network


# ---------------------------------------------------------------------------------------------------------------
# Metrics on features: pure functions, float64
# ---------------------------------------------------------------------------------------------------------------

def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)) (Heusel et al. 2017). The trace of the root is taken as
    tr((S_x^(1/2) S_y S_x^(1/2))^(1/2)), a symmetric PSD matrix with the same eigenvalues, so eigh suffices (no
    scipy.linalg.sqrtm and none of its complex round-off)."""
    x, y = x.double(), y.double()
    s_x, s_y = torch.cov(x.T), torch.cov(y.T)
    root_x = psd_sqrt(s_x)
    middle = root_x @ s_y @ root_x
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((x.mean(0) - y.mean(0)).square().sum() + s_x.trace() + s_y.trace() - 2 * trace_root).item()


def kernel_inception_distance(x: torch.Tensor, y: torch.Tensor, subsets: int, subset_size: int,
                              seed: int) -> tuple:
    """KID (Bińkowski et al. 2018): per subset, the unbiased MMD^2 (the diagonals of the within-set kernel
    matrices left out) with k(a, b) = (a·b / d + 1)^3; returns its mean and standard deviation over the subsets."""
    x, y = x.double(), y.double()
    m, dims = min(subset_size, len(x), len(y)), x.shape[1]
    draws = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=draws)[:m]]
        b = y[torch.randperm(len(y), generator=draws)[:m]]
        k_aa, k_bb, k_ab = [(p @ q.T / dims + 1) ** 3 for p, q in ((a, a), (b, b), (a, b))]
        within = (k_aa.sum() - k_aa.trace() + k_bb.sum() - k_bb.trace()) / (m * (m - 1))
        values.append((within - 2 * k_ab.mean()).item())
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def kth_neighbour_distances(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """For every point of x, the distance to its k-th nearest other point of x (the radius of its ball)."""
    if len(x) <= k:
        raise common.UserError(f"{len(x)} points cannot give each one a {k}-th nearest neighbour")
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)
        rows = torch.arange(len(d))
        d[rows, start + rows] = math.inf  # a point is not its own neighbour
        radii.append(d.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, k_precision: int, k_density: int,
                     real_radii: typing.Optional[dict] = None, chunk: int = 2048) -> dict:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) in one pass over
    the fake x real distances. A point lies in a ball when its distance is at most the radius. Also returns
    `recall_mask`: which real points the samples' manifold covers (for recall per class)."""
    real_radii = real_radii or {}
    r_pr = real_radii.get(k_precision)
    r_pr = kth_neighbour_distances(real, k_precision) if r_pr is None else r_pr
    r_dc = real_radii.get(k_density)
    r_dc = kth_neighbour_distances(real, k_density) if r_dc is None else r_dc
    fake_radii = kth_neighbour_distances(fake, k_precision)
    in_real_manifold = torch.zeros(len(fake), dtype=torch.bool)
    balls_holding = torch.zeros(len(fake), dtype=torch.float64)  # density: real balls around each sample
    covered_by_fake = torch.zeros(len(real), dtype=torch.bool)  # recall: real points inside some sample's ball
    nearest_fake = torch.full((len(real),), math.inf, dtype=torch.float64)
    for start in range(0, len(fake), chunk):
        d = torch.cdist(fake[start:start + chunk], real)  # samples x real
        in_real_manifold[start:start + chunk] = (d <= r_pr).any(1)
        balls_holding[start:start + chunk] = (d <= r_dc).sum(1).double()
        covered_by_fake |= (d <= fake_radii[start:start + chunk, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values.double())
    return {"precision": in_real_manifold.double().mean().item(),
            "recall": covered_by_fake.double().mean().item(),
            "density": (balls_holding.sum() / (k_density * len(fake))).item(),
            "coverage": (nearest_fake <= r_dc).double().mean().item(),
            "recall_mask": covered_by_fake}


def histogram_kl(classes_p: torch.Tensor, classes_q: torch.Tensor, count: int) -> float:
    """KL(p ‖ q) in nats between the histograms of two label vectors over `count` classes (inf where q misses a
    class that p has)."""
    p = torch.bincount(classes_p, minlength=count).double() / len(classes_p)
    q = torch.bincount(classes_q, minlength=count).double() / len(classes_q)
    terms = torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p))
    return terms.sum().item()


def stacked_modes(digits: torch.Tensor) -> tuple:
    """Stacked MNIST's modes covered and KL(p_samples ‖ uniform over 1,000) in nats, from N x 3 digits (R, G, B),
    as VEEGAN and PacGAN count them: a mode is covered when at least one sample falls in it."""
    modes = digits @ torch.tensor([100, 10, 1])
    counts = torch.bincount(modes, minlength=STACKED_MODES).double()
    p = counts / counts.sum()
    kl = torch.where(p > 0, p * (p * STACKED_MODES).log(), torch.zeros_like(p)).sum()
    return int((counts > 0).sum()), kl.item()


def perfect_stacked_reference(samples: int, seed: int, draws: int = PERFECT_DRAWS) -> tuple:
    """Mean modes and KL of a generator that draws the 1,000 modes uniformly, over `draws` sets of `samples`: the
    best any run can score at that sample count (KL is not 0: a finite sample is never exactly uniform)."""
    rng = torch.Generator().manual_seed(seed)
    results = [stacked_modes(torch.randint(0, 10, (samples, 3), generator=rng)) for _ in range(draws)]
    return sum(r[0] for r in results) / draws, sum(r[1] for r in results) / draws


# ---------------------------------------------------------------------------------------------------------------
# Runs: reading, scoring, tables
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunRecord:
    path: Path
    name: str
    model: str
    dataset: str
    command: str
    final: dict  # the run's final metrics line ({} when it has none)
    args: dict  # the run's flags
    images: typing.Optional[torch.Tensor] = None  # uint8 N x C x H x W (image runs)
    lines: typing.Optional[list] = None  # samples.txt (text runs)


def read_json_lines(path: Path) -> list:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return rows


def read_run(folder) -> RunRecord:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise common.UserError(f"{folder}: not a run folder (no config.json); give folders that a model file wrote")
    try:
        config = json.loads(config_path.read_text())
        model, dataset = config["model"], config["args"]["dataset"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise common.UserError(f"{config_path}: not a model file's config.json ({e})")
    metrics = folder / "metrics.jsonl"
    finals = [row for row in read_json_lines(metrics) if row.get("final")] if metrics.is_file() else []
    record = RunRecord(folder, folder.name, model, dataset, config.get("command", ""), finals[-1] if finals else {},
                       config["args"])
    if is_text(dataset):
        if not (folder / "samples.txt").is_file():
            raise common.UserError(f"{folder}: no samples.txt; a finished text run writes it at the end")
        record.lines = read_samples(folder / "samples.txt")
        return record
    if dataset not in CLASSIFIER_DATASET:
        raise common.UserError(f"{folder}: dataset {dataset!r} has no classifier here (images: "
                               f"{', '.join(CLASSIFIER_DATASET)}; text: {', '.join(common.TEXT_DATASETS)})")
    samples = folder / "samples.npz"
    if not samples.is_file():
        raise common.UserError(f"{folder}: no samples.npz; a finished image run writes it at the end")
    try:
        with np.load(samples, allow_pickle=False) as archive:
            images = archive["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise common.UserError(f"{samples}: not a readable samples file with an 'images' array ({e}); "
                               f"rerun the model to write it again")
    channels = 3 if dataset in ("stacked-mnist", "cifar10") else 1
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != channels or \
            images.shape[2] != images.shape[3]:
        raise common.UserError(f"{samples}: images are {images.dtype} {tuple(images.shape)}; expected uint8 "
                               f"N x {channels} x H x H for {dataset}")
    record.images = torch.from_numpy(images)
    return record


def read_samples(path: Path) -> list:
    """One sample per line, empty lines included: a sentence that ended at once is a sample too."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise common.UserError(f"{path}: not a readable UTF-8 samples file ({e}); rerun the model to write it again")
    return text.removesuffix("\n").split("\n") if text else []


def is_text(dataset: str) -> bool:
    return dataset in common.TEXT_DATASETS or dataset.startswith("file:")


def to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bring images to the classifier's size: a 28 px dataset loaded at 32 px was padded with black by
    common.resize_images, so its border is cropped off again (no blur); any other size is an antialiased resize."""
    h = images.shape[-1]
    if h == size:
        return images
    if size < h <= size + 4:
        before = (h - size) // 2
        return images[..., before:before + size, before:before + size]
    return torch.cat([F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True)
                      .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(4096)])


def likelihood_columns(final: dict) -> dict:
    """A run's own likelihood, labelled with its setting; vae.py's Bernoulli NLL and flow.py's bits/dim never share
    a column."""
    columns = {}
    if "eval/bits_per_binary_pixel" in final and "eval/nll" in final:
        columns["nll_binarised_nats"] = final["eval/nll"]
    elif "eval/bpd" in final:
        columns["bits_per_dim_8bit"] = final["eval/bpd"]
    return columns


class ImageScorer:
    """Scores image sets against the test split of one dataset; the test features and radii are computed once."""

    def __init__(self, dataset: str, args: Args, device, log=print, network: typing.Optional[FeatureNetwork] = None):
        self.dataset, self.args, self.device = dataset, args, device
        self.network = network or load_feature_network(dataset, args.data_dir, device, log=log)
        self.test_features, self.test_classes = self.network.test_features, self.network.test_classes
        self.test_labels = self.network.test_labels
        self.radii = {k: kth_neighbour_distances(self.test_features, k) for k in {args.k_precision, args.k_density}}

    def score(self, images: torch.Tensor) -> dict:
        args = self.args
        if len(images) < args.samples:
            raise common.UserError(f"{len(images)} samples, and evaluate.py scores {args.samples}: write more with "
                                   f"the model's --num-samples, or lower --samples")
        features, classes = self.network.features_and_classes(to_size(images[:args.samples],
                                                                       NATIVE_SIZE[self.dataset]), self.device)
        kid, kid_std = kernel_inception_distance(features, self.test_features, args.kid_subsets,
                                                 args.kid_subset_size, args.seed)
        manifold = manifold_metrics(self.test_features, features, args.k_precision, args.k_density, self.radii)
        covered = manifold.pop("recall_mask")
        names = CLASS_NAMES[self.dataset]
        per_class = {name: covered[self.test_labels == c].double().mean().item() for c, name in enumerate(names)}
        return {"fd": frechet_distance(features, self.test_features), "kid": kid, "kid_std": kid_std, **manifold,
                "class_kl": histogram_kl(classes, self.test_classes, len(names)), "recall_per_class": per_class}


def reference_images(dataset: str, args: Args, count: int) -> dict:
    """The two rows every table carries: `count` training images (the floor) and uniform noise (the ceiling)."""
    train = common.load_image_dataset(dataset, args.data_dir, 28 if dataset == "stacked-mnist" else
                                      NATIVE_SIZE[dataset], "train")
    draws = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(train.images), generator=draws)[:count]
    noise = torch.randint(0, 256, (count,) + tuple(train.images.shape[1:]), generator=draws, dtype=torch.uint8)
    return {"training images (floor)": train.images[picks], "uniform noise (ceiling)": noise}


def score_stacked(network: FeatureNetwork, images: torch.Tensor, args: Args, device) -> dict:
    if len(images) < args.stacked_samples:
        raise common.UserError(f"{len(images)} samples, and Stacked MNIST is scored on {args.stacked_samples}: "
                               f"run the model with --num-samples {args.stacked_samples}, or lower --stacked-samples")
    images = to_size(images[:args.stacked_samples], NATIVE_SIZE["mnist"])
    digits = torch.stack([network.features_and_classes(images[:, c:c + 1], device)[1] for c in range(3)], dim=1)
    modes, kl = stacked_modes(digits)
    return {"modes": modes, "kl_uniform": kl}


def image_table(rows: list, dataset: str) -> str:
    likelihood = any("nll_binarised_nats" in r for r in rows), any("bits_per_dim_8bit" in r for r in rows)
    header = ["run", "model", "FD", "KID", "precision", "recall", "density", "coverage", "class KL",
              "worst class (recall)"]
    header += ["NLL, nats / binarised image"] * likelihood[0] + ["bits/dim, 8-bit pixels"] * likelihood[1]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        worst = min(r["recall_per_class"].items(), key=lambda item: item[1])
        cells = [r["run"], r["model"], f"{r['fd']:.2f}", f"{r['kid']:.3g} ± {r['kid_std']:.2g}",
                 f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['density']:.3f}", f"{r['coverage']:.3f}",
                 f"{r['class_kl']:.4f}", f"{worst[0]} ({worst[1]:.3f})"]
        cells += [f"{r['nll_binarised_nats']:.2f}" if "nll_binarised_nats" in r else ""] * likelihood[0]
        cells += [f"{r['bits_per_dim_8bit']:.3f}" if "bits_per_dim_8bit" in r else ""] * likelihood[1]
        lines.append("| " + " | ".join(cells) + " |")
    names = CLASS_NAMES[dataset]
    lines += ["", "Recall per class (share of each class's test images inside the samples' manifold):", "",
              "| run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += ["| " + r["run"] + " | " + " | ".join(f"{r['recall_per_class'][n]:.2f}" for n in names) + " |"
              for r in rows]
    return "\n".join(lines)


def stacked_table(rows: list) -> str:
    lines = ["| run | model | modes (of 1,000) | KL(samples ‖ uniform), nats |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['model']} | {r['modes']:g} | {r['kl_uniform']:.3f} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Text: the oracle's NLL, BLEU, and the LM and reverse LM scores
# ---------------------------------------------------------------------------------------------------------------

# ScratchGAN's reader for its JSON sources; the others keep every word
TEXT_SETTINGS = {name: dict(max_len=52, vocab_size=20_000) for name in common.SCRATCHGAN_JSON}
# The language models of the LM and reverse LM scores. Like the classifier, the recipe and the source name the
# cache file of the LM trained on real text.
LM_RECIPE = dict(embed=64, hidden=256, epochs=5, batch_size=64, lr=2e-3, seed=0, max_sentences=100_000)
SCORE_ROWS = 512


class LanguageModel(nn.Module):
    """A one-layer LSTM language model: trained on the real training split it judges samples (the LM score);
    trained on a model's samples it is judged on the real test split (the reverse LM score)."""

    def __init__(self, vocab_size: int, embed: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.embedding(inputs))[0])  # (B, T) -> (B, T, V)


def token_losses(model: LanguageModel, tokens: torch.Tensor, scored: torch.Tensor, start: int, device):
    """Summed NLL (nats) of the scored targets of `tokens` (B, T) and their count; inputs are the start token then
    the tokens, so that position t predicts token t. Trimmed to the batch's last scored position."""
    length = int(scored.any(0).nonzero().max()) + 1 if scored.any() else 1
    tokens, scored = tokens[:, :length].to(device), scored[:, :length].to(device)
    inputs = torch.cat([torch.full_like(tokens[:, :1], start), tokens[:, :-1]], dim=1)
    nll = F.cross_entropy(model(inputs).flatten(0, 1), tokens.flatten(), reduction="none").view_as(tokens)
    return (nll * scored).sum(), scored.sum()


def train_language_model(tokens: torch.Tensor, scored: torch.Tensor, vocab_size: int, start: int, recipe: dict,
                         device) -> LanguageModel:
    """Adam on the mean NLL of the scored tokens, `epochs` passes in shuffled batches; seeded generators only."""
    tokens, scored = tokens[:recipe["max_sentences"]], scored[:recipe["max_sentences"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = LanguageModel(vocab_size, recipe["embed"], recipe["hidden"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    order = torch.Generator().manual_seed(recipe["seed"] + 1)
    model.train()
    for _ in range(recipe["epochs"]):
        for batch in torch.randperm(len(tokens), generator=order).split(recipe["batch_size"]):
            total, count = token_losses(model, tokens[batch], scored[batch], start, device)
            loss = total / count.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def mean_token_nll(model: LanguageModel, tokens: torch.Tensor, scored: torch.Tensor, start: int, device) -> float:
    """Nats per scored token over all of `tokens`."""
    total, count = 0.0, 0
    for rows in torch.arange(len(tokens)).split(SCORE_ROWS):
        t, c = token_losses(model, tokens[rows], scored[rows], start, device)
        total, count = total + t.item(), count + c.item()
    return total / max(count, 1)


def lm_key(dataset: str, recipe: dict) -> str:
    code = inspect.getsource(LanguageModel) + inspect.getsource(train_language_model) + \
        inspect.getsource(token_losses)
    blob = json.dumps({"dataset": dataset, "settings": TEXT_SETTINGS.get(dataset, {}), "recipe": recipe},
                      sort_keys=True) + code
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class TextScorer:
    """Scores sample files of one text dataset. Real text: BLEU-2..5 against the test split and self-BLEU-2..5 (as
    the model files compute them), the LM score (nats per token of the samples under an LSTM trained on the real
    training split: quality) and the reverse LM score (nats per token of the real test split under an LSTM trained
    on the samples: quality and diversity together; Zhao et al. 2018, Caccia et al. 2020, de Masson d'Autume
    et al. 2019). Words and EOS are counted, PAD and <unk> are not. The oracle: NLL-oracle of the samples."""

    def __init__(self, dataset: str, args: Args, device, oracle: str = "paper", oracle_seed: int = 0, log=print):
        self.args, self.device, self.log = args, device, log
        self.data = common.load_text_dataset(dataset, args.data_dir, oracle=oracle, seed=oracle_seed,
                                             **TEXT_SETTINGS.get(dataset, {}))
        self.recipe = LM_RECIPE
        self.lm = None if self.data.oracle is not None else self.real_text_lm(dataset)

    def real_text_lm(self, dataset: str) -> LanguageModel:
        data, recipe = self.data, self.recipe
        path = Path(self.args.data_dir) / "evaluate-cache" / f"lm-{dataset.replace('/', '_').replace(':', '-')}-" \
                                                             f"{lm_key(dataset, recipe)}.pt"
        if path.is_file():
            model = LanguageModel(len(data.vocab), recipe["embed"], recipe["hidden"]).to(self.device)
            load_cached(model, path, "language model", self.device)
        else:
            self.log(f"training the {dataset} language model ({recipe['epochs']} epochs; cached in {path.parent})")
            started = time.perf_counter()
            model = train_language_model(data.train, data.scored(data.train), len(data.vocab), data.start_token,
                                         recipe, self.device)
            self.log(f"  trained in {time.perf_counter() - started:.0f} s")
            save_cached(model, path, "language model", self.log)
        self.test_nll = mean_token_nll(model, data.test, data.scored(data.test), data.start_token, self.device)
        self.log(f"{dataset} language model: {self.test_nll:.3f} nats per token on the test split")
        return model

    def encode(self, lines: list, where: str) -> tuple:
        """Sample lines as (token lists, ids): ids for the oracle, words for real text (cut to the longest
        sentence the dataset holds, unknown words -> <unk>)."""
        data = self.data
        if data.oracle is not None:
            try:
                ids = torch.tensor([[int(t) for t in line.split()] for line in lines])
            except (ValueError, RuntimeError):
                raise common.UserError(f"{where}: not lines of {data.seq_len} token ids, as the oracle's samples are")
            if ids.ndim != 2 or ids.shape[1] != data.seq_len or ids.min() < 0 or ids.max() >= len(data.vocab):
                raise common.UserError(f"{where}: oracle samples must be {data.seq_len} ids in "
                                       f"0..{len(data.vocab) - 1} per line")
            return [line.split() for line in lines], ids
        sentences = [common.tokenize_line(line)[:data.seq_len - 1] for line in lines]
        return sentences, common.encode_sentences(sentences, data.vocab, data.seq_len)

    def score(self, lines: list, where: str, reference: bool = False) -> dict:
        """A run's first --text-samples lines (a reference row may have fewer: the oracle has 9,984 training
        sequences)."""
        args, data = self.args, self.data
        if len(lines) < args.text_samples and not reference:
            raise common.UserError(f"{where}: {len(lines)} samples, and evaluate.py scores {args.text_samples}: "
                                   f"write more with the model's --num-samples, or lower --text-samples")
        sentences, ids = self.encode(lines[:args.text_samples], where)
        if data.oracle is not None:
            return {"nll_oracle": data.oracle.nll(ids.to(data.oracle.device)).mean().item()}
        metrics = common.text_sample_metrics(sentences, data, args.bleu_samples, args.self_bleu_samples)
        scores = {k.removeprefix("eval/"): v for k, v in metrics.items() if "bleu" in k and k.startswith("eval/")
                  and not k.endswith(("hypotheses", "references", "samples"))}
        scored = data.scored(ids)
        scores["lm_score"] = mean_token_nll(self.lm, ids, scored, data.start_token, self.device)
        reverse = train_language_model(ids, scored, len(data.vocab), data.start_token, self.recipe, self.device)
        scores["reverse_lm_score"] = mean_token_nll(reverse, data.test, data.scored(data.test), data.start_token,
                                                    self.device)
        scores["mean_length"] = metrics["eval/mean_length"]
        return scores

    def references(self, count: int) -> dict:
        """Training sequences (the floor) and uniform random tokens (the ceiling), as sample lines."""
        data = self.data
        draws = torch.Generator().manual_seed(self.args.seed)
        picks = torch.randperm(len(data.train), generator=draws)[:count]
        floor = common.sample_lines(data, data.train[picks])
        if data.oracle is not None:
            noise = torch.randint(0, len(data.vocab), (count, data.seq_len), generator=draws)
            return {"training sequences (floor)": floor, "uniform tokens (ceiling)": common.sample_lines(data, noise)}
        lengths = (data.train[picks] != 0).sum(1) - 1  # words before EOS, as in the training sentences
        words = torch.randint(4, len(data.vocab), (count, data.seq_len), generator=draws)  # no specials
        noise = [" ".join(data.vocab.tokens[i] for i in row[:n]) for row, n in zip(words.tolist(), lengths.tolist())]
        return {"training sentences (floor; the LM's own training data)": floor,
                "uniform random words (ceiling)": noise}


def text_table(rows: list, oracle: bool) -> str:
    if oracle:
        lines = ["| run | model | NLL-oracle, nats / token | NLL-test (the run's own), nats / token |",
                 "|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['model']} | {r['nll_oracle']:.3f} | "
                  f"{r['nll_test']:.3f} |" if "nll_test" in r else f"| {r['run']} | {r['model']} | "
                  f"{r['nll_oracle']:.3f} | |" for r in rows]
        return "\n".join(lines)
    header = ["run", "model", "BLEU-2 / 3 / 4 / 5", "self-BLEU-2 / 3 / 4 / 5", "LM score, nats / token",
              "reverse LM score, nats / token", "mean length", "NLL-test (the run's own), nats / token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        bleu = " / ".join(f"{r[f'bleu{n}']:.3f}" for n in range(2, 6))
        self_bleu = " / ".join(f"{r[f'self_bleu{n}']:.3f}" for n in range(2, 6))
        own = f"{r['nll_test']:.3f}" if "nll_test" in r else ""
        lines.append(f"| {r['run']} | {r['model']} | {bleu} | {self_bleu} | {r['lm_score']:.3f} | "
                     f"{r['reverse_lm_score']:.3f} | {r['mean_length']:.1f} | {own} |")
    return "\n".join(lines)


def temperature_files(folder: Path) -> list:
    """(T, path) of every samples_T<T>.txt a run wrote (scratchgan.py --eval-temperatures), by T."""
    found = []
    for path in folder.glob("samples_T*.txt"):
        try:
            found.append((float(path.stem[len("samples_T"):]), path))
        except ValueError:
            continue
    return sorted(found)


def text_comparison(records: list, dataset: str, args: Args, device, out: Path) -> tuple:
    oracles = {(r.args.get("oracle", "paper"), r.args.get("seed", 0) if r.args.get("oracle") == "random" else 0)
               for r in records}
    if len(oracles) > 1:
        raise common.UserError("the oracle runs use different oracles (--oracle random with different seeds); "
                               "compare runs of one oracle per table")
    oracle, oracle_seed = oracles.pop() if oracles else ("paper", 0)
    scorer = TextScorer(dataset, args, device, oracle, oracle_seed)
    is_oracle = scorer.data.oracle is not None
    rows, curves = [], {}
    # what a cached row depends on: the LM (its recipe and code), the scoring code, the oracle and the settings
    code = inspect.getsource(TextScorer.score) + inspect.getsource(mean_token_nll) + inspect.getsource(common.bleu)
    setting = [lm_key(dataset, scorer.recipe), hashlib.sha256(code.encode()).hexdigest()[:12], oracle, oracle_seed,
               args.text_samples, args.bleu_samples, args.self_bleu_samples]
    # Each distinct samples file is scored once: each score trains a reverse LM, and identical files occur
    # (scratchgan.py's samples_T1.txt repeats samples.txt, drawn from the same seed).
    by_content = {}

    def scores_of(folder: Path, name: str, lines) -> dict:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if digest not in by_content:
            by_content[digest] = cached_scores(folder, setting, lambda: scorer.score(lines(), str(folder / name)),
                                               name)
        return by_content[digest]

    for r in records:
        own = {"nll_test": r.final["eval/nll_test"]} if "eval/nll_test" in r.final else {}
        scores = scores_of(r.path, "samples.txt", lambda: r.lines)
        rows.append({"run": r.name, "model": r.model, "command": r.command, **scores, **own})
        # On the oracle a run's curve is NLL-oracle against its own NLL-test at each temperature, T = 1 included:
        # the quality/diversity trade-off along which a GAN and MLE are compared (Caccia et al. 2020, §4).
        oracle_curve = {1.0: (own["nll_test"], scores["nll_oracle"])} if is_oracle and own else {}
        for temperature, path in temperature_files(r.path):
            scores = scores_of(r.path, path.name, lambda: read_samples(path))
            key = f"eval_T{temperature:g}/nll_test"  # scratchgan.py's NLL-test with the logits divided by T
            tempered = {"nll_test": r.final[key]} if key in r.final else {}
            rows.append({"run": f"{r.name} at T = {temperature:g}", "model": r.model, "command": r.command,
                         "temperature": temperature, **scores, **tempered})
            if not is_oracle:
                curves.setdefault(r.name, []).append((scores["reverse_lm_score"], scores["lm_score"]))
            elif tempered:
                oracle_curve[temperature] = (tempered["nll_test"], scores["nll_oracle"])
        if len(oracle_curve) > 1:
            curves[r.name] = [oracle_curve[t] for t in sorted(oracle_curve)]
    references = scorer.references(args.text_samples)  # drawn with --seed: cached beside the LM
    reference_scores = cached_json(
        Path(args.data_dir) / "evaluate-cache" / f"text-references-{slug(dataset)}.json",
        {"setting": setting + [args.seed]},
        lambda: {name: scorer.score(lines, name, reference=True) for name, lines in references.items()})
    for name, lines in references.items():
        label = name if len(lines) == args.text_samples else f"{name}, {len(lines):,} of them"
        rows.append({"run": label, "model": "reference", "command": "", "samples": len(lines),
                     **reference_scores[name]})
    if is_oracle and curves:
        common.plot_series({f"{k} (T sweep)": v for k, v in curves.items()}, out / "comparison.png",
                           f"{dataset}: NLL-oracle against NLL-test across temperatures (lower is better on both)",
                           x_label="NLL-test, nats / token", y_label="NLL-oracle, nats / token")
    if not is_oracle:
        points = {r["run"]: [(r["reverse_lm_score"], r["lm_score"])] for r in rows if "temperature" not in r}
        common.plot_series({**points, **{f"{k} (T sweep)": v for k, v in curves.items()}}, out / "comparison.png",
                           f"{dataset}: LM score against reverse LM score (lower is better on both)",
                           x_label="reverse LM score, nats / token", y_label="LM score, nats / token")
    table = text_table(rows, is_oracle)
    if is_oracle:
        setting = (f"{scorer.data.name}: NLL-oracle of the first {args.text_samples:,} samples of each run under "
                   f"the oracle, nats per token, recomputed here; NLL-test is the run's own figure at the row's "
                   f"temperature.")
    else:
        setting = (f"{dataset}: the first {args.text_samples:,} samples of each run. BLEU of the first "
                   f"{args.bleu_samples:,} against the whole test split, self-BLEU of the first "
                   f"{args.self_bleu_samples}; LM score under an LSTM trained on the training split "
                   f"({scorer.test_nll:.3f} nats per token on the test split), reverse LM score of the test split "
                   f"under the same LSTM recipe trained on the samples; words and EOS counted, PAD and <unk> not.")
    return rows, table, setting, not is_oracle or bool(curves)


# ---------------------------------------------------------------------------------------------------------------
# The tricks, measured: dcgan.py's defaults against each trick alone, on one budget, over seeds
# ---------------------------------------------------------------------------------------------------------------

WGAN_GP = ["--loss", "wgan-gp", "--d-steps", "5", "--lr-g", "1e-4", "--lr-d", "1e-4", "--beta1", "0",
           "--beta2", "0.9"]  # Gulrajani et al. Alg. 1
BIGGAN = ["--loss", "hinge", "--spectral-norm", "--spectral-norm-g", "--lr-g", "5e-5", "--lr-d", "2e-4",
          "--d-steps", "2", "--beta1", "0", "--ema-decay", "0.999", "--ortho-reg", "1e-4", "--z-dist", "normal"]
# Each trick alone on top of dcgan.py's defaults, at the setting its source gives (dcgan.py's Args cite them). The
# BigGAN recipe is the README's without --conditional: on Stacked MNIST the labels are the 1,000 modes themselves,
# so a class-conditional G would be told which mode to draw.
TRICKS = {
    "defaults (DCGAN)": [],
    "label smoothing 0.1": ["--label-smoothing", "0.1"],
    "instance noise 0.1": ["--instance-noise", "0.1"],
    "spectral norm": ["--spectral-norm"],
    "hinge + spectral norm": ["--loss", "hinge", "--spectral-norm"],
    "EMA of G, 0.999": ["--ema-decay", "0.999"],
    "R1, gamma 10": ["--r1", "10"],
    "replay buffer, 1000": ["--replay-size", "1000"],
    "2 D steps": ["--d-steps", "2"],
    "packing, m = 2 (PacGAN)": ["--pack", "2"],
    "BigGAN recipe, unconditional": BIGGAN,
    "WGAN-GP, its paper's setting": WGAN_GP,  # last: 5 critic steps with a double backward make it the costliest
}
# cpu: one epoch (468 G steps of 128 images on either dataset) with networks of half the width (32 channels where
# DCGAN has 64), about 4x fewer operations per step: 36 runs in hours on 2 CPU cores. full: dcgan.py's defaults.
# Either way every run makes the same number of G steps (budget_flags), up to the leftover D batches dcgan.py drops
# per epoch: 468 G steps for k = 1 or 2 D steps, 465 (5 x 93) for WGAN-GP's 5.
TRICK_BUDGETS = {"cpu": ["--epochs", "1", "--g-width", "32", "--d-width", "32"], "full": ["--epochs", "5"]}


def budget_flags(budget: str, trick: list) -> list:
    """The budget's flags with --epochs multiplied by the trick's D steps per G step: dcgan.py counts an epoch in
    D's batches, so k D steps would otherwise leave G k times fewer steps. Every run makes the same G steps, and D
    sees k times the data, as in the papers (WGAN-GP's 5 critic steps per G step)."""
    flags = list(TRICK_BUDGETS[budget])
    k = int(trick[trick.index("--d-steps") + 1]) if "--d-steps" in trick else 1
    if "--epochs" in flags:
        at = flags.index("--epochs") + 1
        flags[at] = str(int(flags[at]) * k)
    return flags


def finished(folder: Path) -> bool:
    metrics = folder / "metrics.jsonl"
    return (folder / "samples.npz").is_file() and metrics.is_file() and \
        any(row.get("final") for row in read_json_lines(metrics))


def train_tricks(args: Args) -> list:
    """Train every (trick, seed) run of the table that has not finished, --jobs at a time, each as its own
    `python dcgan.py` (a run interrupted earlier resumes from its checkpoint). Returns (trick, seed, folder)."""
    count = args.stacked_samples if args.tricks == "stacked-mnist" else args.samples
    plan = trick_plan(args)
    pending = [entry for entry in plan if not finished(entry[2])]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
    running = []
    print(f"tricks on {args.tricks}: {len(plan) - len(pending)} of {len(plan)} runs done; training {len(pending)}")

    def launch(name, seed, folder):
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).with_name("dcgan.py"))]
        if (folder / "checkpoint.pt").is_file():
            command += ["--resume", str(folder)]
        else:
            command += ["--dataset", args.tricks, *budget_flags(args.budget, TRICKS[name]), *TRICKS[name],
                        "--seed", str(seed),
                        "--out", str(folder), "--num-samples", str(count), "--sample-every", "0",
                        "--data-dir", args.data_dir, "--device", args.device]
        log = open(folder.with_suffix(".log"), "a")
        # its own session: a Ctrl-C at the terminal reaches this process only, which then stops each training
        # with one SIGTERM (a second signal would stop it before its checkpoint)
        running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True), folder, log, time.perf_counter()))

    def reap(block: bool):
        for entry in list(running):
            process, folder, log, started = entry
            if block or process.poll() is not None:
                code = process.wait()
                log.close()
                running.remove(entry)
                if code != 0:
                    raise common.UserError(f"dcgan.py exited with status {code} for {folder}; see "
                                           f"{folder.with_suffix('.log')}, then run the same command again")
                print(f"  {folder.name}: {time.perf_counter() - started:.0f} s")
                return

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM as Ctrl-C: stop the trainings (they checkpoint), then leave

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for entry in pending:
            while len(running) >= args.jobs:
                reap(block=False)
                time.sleep(1)
            launch(*entry)
        while running:
            reap(block=True)
    except BaseException:
        for process, *_ in running:
            process.terminate()  # dcgan.py saves a checkpoint on SIGTERM, and the next call resumes from it
        for process, *_ in running:
            process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return plan


def trick_plan(args: Args) -> list:
    """(trick, seed, run folder) for every run of the table."""
    root = Path(args.out) / "runs"
    return [(name, seed, root / f"{args.tricks}-{slug(name)}-seed{seed}") for name in TRICKS
            for seed in range(args.seeds)]


def cached_json(path: Path, stamp: dict, compute) -> dict:
    """compute()'s result from the JSON file `path` when it was saved with the same `stamp`, else computed and
    saved there; a folder that cannot be written only costs computing it again next time."""
    try:
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["scores"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    scores = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        common.atomic_write_bytes(path, json.dumps({**stamp, "scores": scores}).encode())
    except OSError:
        pass
    return scores


def cached_scores(folder: Path, setting: list, compute, samples: str = "samples.npz") -> dict:
    """A run's scores of its file `samples`, cached in <run>/evaluate-scores-<stem>.json (evaluate-scores.json for
    samples.npz) under the networks and settings that computed them and the samples file's size and modification
    time: a table of 36 runs, or a text table whose reverse language models take minutes each, is scored once."""
    stat = (folder / samples).stat()
    path = folder / ("evaluate-scores.json" if samples == "samples.npz" else
                     f"evaluate-scores-{Path(samples).stem}.json")
    return cached_json(path, {"setting": setting, "samples": [stat.st_size, stat.st_mtime_ns]}, compute)


def slug(name: str) -> str:
    return re.sub("[^a-z0-9]+", "-", name.lower()).strip("-")


def mean_and_spread(values: list) -> str:
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.4g}"
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4g} ± {spread:.2g}"


def tricks_table(args: Args, device) -> None:
    plan = trick_plan(args) if args.score_finished else train_tricks(args)
    missing = [entry for entry in plan if not finished(entry[2])]
    plan = [entry for entry in plan if finished(entry[2])]
    if not plan:
        raise common.UserError(f"no finished run in {Path(args.out) / 'runs'}; run without --score-finished")
    stacked = args.tricks == "stacked-mnist"
    network = load_feature_network(CLASSIFIER_DATASET[args.tricks], args.data_dir, device)
    scorer = None if stacked else ImageScorer(args.tricks, args, device, network=network)
    scores = {}
    setting = [recipe_key(network.dataset, CLASSIFIER_RECIPE), args.stacked_samples] if stacked else \
        [recipe_key(network.dataset, CLASSIFIER_RECIPE), args.samples, args.kid_subsets, args.kid_subset_size,
         args.k_precision, args.k_density, args.seed]
    for name, seed, folder in plan:
        def compute():
            images = read_run(folder).images
            return score_stacked(network, images, args, device) if stacked else \
                {k: v for k, v in scorer.score(images).items() if k in ("fd", "recall", "coverage", "precision")}
        scores.setdefault(name, []).append(cached_scores(folder, setting, compute))
    keys = ["modes", "kl_uniform"] if stacked else ["fd", "precision", "recall", "coverage"]
    labels = {"modes": "modes (of 1,000)", "kl_uniform": "KL(samples ‖ uniform), nats", "fd": "FD",
              "precision": "precision", "recall": "recall", "coverage": "coverage"}
    lines = ["| trick | dcgan.py flags | seeds | " + " | ".join(labels[k] for k in keys) + " | per seed |",
             "|" + "---|" * (len(keys) + 4)]
    for name, rows in scores.items():
        per_seed = "; ".join(", ".join(f"{r[k]:.4g}" for k in keys) for r in rows)
        lines.append(f"| {name} | `{' '.join(TRICKS[name]) or '(none)'}` | {len(rows)} | " +
                     " | ".join(mean_and_spread([r[k] for r in rows]) for k in keys) + f" | {per_seed} |")
    if missing:
        lines += ["", "Not finished yet (the same command without --score-finished trains them): " +
                  ", ".join(f"{name} seed {seed}" for name, seed, _ in missing) + "."]
    budget = " ".join(TRICK_BUDGETS[args.budget]) + " (times k for k D steps per G step: the same G steps)"
    setting = (f"dcgan.py on {args.tricks}, budget `{budget}`, seeds 0-{args.seeds - 1}; mean ± standard deviation "
               f"over seeds. " + (f"{args.stacked_samples:,} samples per run, each channel read by the MNIST "
                                  f"classifier (test accuracy {network.accuracy:.2%})." if stacked else
                                  f"{args.samples:,} samples per run against the test split, in this project's "
                                  f"{args.tricks} feature space (classifier test accuracy {network.accuracy:.2%})."))
    text = f"# The tricks, measured\n\n{setting}\n\n" + "\n".join(lines) + "\n"
    out = Path(args.out)
    common.atomic_write_bytes(out / "tricks.md", text.encode())
    common.atomic_write_bytes(out / "tricks.json", json.dumps({"setting": setting, "scores": scores,
                                                               "flags": TRICKS}, indent=2).encode())
    print(text)
    print(f"wrote {out / 'tricks.md'}, tricks.json")


def main(args: Args) -> None:
    device = common.pick_device(args.device)
    if args.tricks:
        return tricks_table(args, device)
    records = [read_run(folder) for folder in args.runs]
    datasets = sorted({r.dataset for r in records})
    if len(datasets) > 1:
        raise common.UserError(f"the runs are on different datasets ({', '.join(datasets)}); one table compares one "
                               f"dataset: call evaluate.py once per dataset")
    dataset = datasets[0] if datasets else "fashion-mnist"
    if args.benchmark:
        return benchmark(records, dataset, args, device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise common.UserError(f"cannot create {out} ({e.strerror}); choose another --out")
    if is_text(dataset):
        rows, table, setting, plotted = text_comparison(records, dataset, args, device, out)
        return write_comparison(out, dataset, setting, table, rows, None, plotted)
    stacked = dataset == "stacked-mnist"
    network = load_feature_network(CLASSIFIER_DATASET[dataset], args.data_dir, device)
    count = args.stacked_samples if stacked else args.samples
    subjects = [(r.name, r.model, r.command, r.images, likelihood_columns(r.final)) for r in records]
    subjects += [(name, "reference", "", images, {}) for name, images in reference_images(dataset, args,
                                                                                          count).items()]
    if stacked:
        rows = [{"run": name, "model": model, "command": command, **score_stacked(network, images, args, device)}
                for name, model, command, images, _ in subjects]
        modes, kl = perfect_stacked_reference(count, args.seed)
        rows.append({"run": f"a perfect generator, {count:,} samples (mean of {PERFECT_DRAWS} draws)",
                     "model": "reference", "command": "", "modes": modes, "kl_uniform": kl})
        table = stacked_table(rows)
        setting = (f"Stacked MNIST, {count:,} samples per row; each channel read by the MNIST classifier (test "
                   f"accuracy {network.accuracy:.2%}).")
    else:
        scorer = ImageScorer(dataset, args, device, network=network)
        rows = [{"run": name, "model": model, "command": command, **scorer.score(images), **likelihood}
                for name, model, command, images, likelihood in subjects]
        table = image_table(rows, dataset)
        setting = (f"{dataset}: {args.samples:,} samples per row against the {len(scorer.test_features):,} test "
                   f"images, in the penultimate features of this project's {dataset} classifier (test accuracy "
                   f"{network.accuracy:.2%}); in this project's feature space, not comparable with Inception-FID "
                   f"tables. KID over {args.kid_subsets} subsets of {args.kid_subset_size}; precision / recall "
                   f"k = {args.k_precision}, density / coverage k = {args.k_density}.")
        series = {r["run"]: [(r["recall"], r["precision"])] for r in rows}
        common.plot_series(series, out / "comparison.png", f"{dataset}: precision against recall",
                           x_label="recall", y_label="precision")
    write_comparison(out, dataset, setting, table, rows, {
        "dataset": network.dataset, "test_accuracy": network.accuracy,
        "cache": str(network.path) if network.path else None}, plotted=not stacked)


def write_comparison(out: Path, dataset: str, setting: str, table: str, rows: list, classifier,
                     plotted: bool) -> None:
    common.atomic_write_bytes(out / "comparison.md", f"# evaluate.py\n\n{setting}\n\n{table}\n".encode())
    summary = {"dataset": dataset, "setting": setting, "classifier": classifier, "rows": rows}
    common.atomic_write_bytes(out / "comparison.json", json.dumps(summary, indent=2).encode())
    print(setting + "\n\n" + table)
    print(f"wrote {out / 'comparison.md'}, comparison.json" + (", comparison.png" if plotted else ""))


def benchmark(records: list, dataset: str, args: Args, device) -> None:
    """The first evaluation's extra cost (training the classifier or the language model, nothing cached) and the
    time of scoring one run with it in memory, measured here rather than in a test."""
    threads = f"{device}, {torch.get_num_threads()} threads"
    if is_text(dataset):
        if not records:
            raise common.UserError("--benchmark on text needs a run folder to score")
        scorer = TextScorer(dataset, args, device, records[0].args.get("oracle", "paper"), log=lambda *_: None)
        data = scorer.data
        if data.oracle is None:
            started = time.perf_counter()
            train_language_model(data.train, data.scored(data.train), len(data.vocab), data.start_token, LM_RECIPE,
                                 device)
            print(f"benchmark: training the {dataset} language model: {time.perf_counter() - started:.1f} s on "
                  f"{threads}")
        started = time.perf_counter()
        scorer.score(records[0].lines, records[0].name)
        print(f"benchmark: scoring {records[0].name} ({dataset}; BLEU, self-BLEU, LM score, and the reverse LM's "
              f"training and scoring): {time.perf_counter() - started:.1f} s on {threads}")
        return
    name = CLASSIFIER_DATASET[dataset]
    started = time.perf_counter()
    network = load_feature_network(name, args.data_dir, device, use_cache=False)
    print(f"benchmark: training the {name} classifier and its test accuracy: {time.perf_counter() - started:.1f} s "
          f"on {threads}")
    images = records[0].images if records else reference_images(dataset, args, args.samples)["uniform noise (ceiling)"]
    started = time.perf_counter()
    if dataset == "stacked-mnist":
        score_stacked(network, images, args, device)
    else:
        ImageScorer(dataset, args, device, network=network).score(images)
    print(f"benchmark: scoring {records[0].name if records else 'uniform noise'} ({dataset}, classifier in memory, "
          f"test features included): {time.perf_counter() - started:.1f} s on {threads}")


if __name__ == "__main__":
    common.run_cli(main, Args)
