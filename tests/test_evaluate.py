"""evaluate.py: each metric against an independent reference (closed forms, hand-worked point sets, brute force),
the classifier cache, reading runs and their errors, and a whole comparison of a real dcgan.py run."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import dcgan
import evaluate
from conftest import ONE_THREAD, ROOT, metrics_lines, run_cli

TINY_RECIPE = dict(widths=(8, 16), features=32, epochs=3, batch_size=32, lr=5e-3, seed=0, train_images=0)
SMALL = dict(samples=100, stacked_samples=100, kid_subsets=5, kid_subset_size=50)


@pytest.fixture()
def tiny_recipe(monkeypatch):
    monkeypatch.setattr(evaluate, "CLASSIFIER_RECIPE", TINY_RECIPE)


# ---- Fréchet distance -----------------------------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ \
        torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(evaluate.frechet_distance(x, x)) < 1e-8


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    # The columns of a Hadamard matrix (all but the constant one) have mean 0 and are orthogonal, so these sets have
    # exactly diagonal sample covariances, where FD = ||mu_x - mu_y||^2 + sum_i (sigma_x,i - sigma_y,i)^2.
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])  # 16 x 16
    design = h[:, 1:4]
    x = torch.tensor([1.0, -2.0, 0.5]) + design * torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([0.0, 1.0, 0.5]) + design * torch.tensor([2.0, 0.5, 3.0])
    var = 16 / 15  # each column is +-1: sum of squares 16, divided by n - 1
    expected = (1 + 9 + 0) + var * ((1 - 2) ** 2 + (2 - 0.5) ** 2 + 0)
    assert evaluate.frechet_distance(x.double(), y.double()) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_eigenvalues_of_the_covariance_product():
    # tr((S_x S_y)^(1/2)) from the eigenvalues of the non-symmetric product, another route than the code's.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(300, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 5, generator=gen,
                                                                              dtype=torch.float64) + 1
    s_x, s_y = np.cov(x.numpy().T), np.cov(y.numpy().T)
    root_trace = np.sqrt(np.linalg.eigvals(s_x @ s_y).real.clip(min=0)).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum().item() + np.trace(s_x) + np.trace(s_y) - 2 * root_trace
    assert evaluate.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


# ---- KID ------------------------------------------------------------------------------------------------------

def brute_force_mmd(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, pair by pair."""
    d = a.shape[1]
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    m = len(a)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_of_one_subset_equals_the_brute_force_sum():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(12, 3, generator=gen,
                                                                                dtype=torch.float64) + 0.5
    kid, spread = evaluate.kernel_inception_distance(x, y, subsets=1, subset_size=12, seed=0)
    assert kid == pytest.approx(brute_force_mmd(x.numpy(), y.numpy()), rel=1e-10) and spread == 0.0


def test_kid_subsets_are_seeded_random_draws_from_both_sets():
    """Each of the subsets takes m random rows of each set (Bińkowski et al.: 100 subsets of 1,000), drawn from the
    seed's generator, x's rows then y's; the mean and spread are over the subsets' brute-force MMDs."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(9, 3, generator=gen,
                                                                               dtype=torch.float64) + 0.5
    kid, spread = evaluate.kernel_inception_distance(x, y, subsets=3, subset_size=5, seed=7)
    draws = torch.Generator().manual_seed(7)
    values = []
    for _ in range(3):
        a, b = torch.randperm(12, generator=draws)[:5], torch.randperm(9, generator=draws)[:5]
        values.append(brute_force_mmd(x[a].numpy(), y[b].numpy()))
    assert kid == pytest.approx(np.mean(values), rel=1e-10) and spread == pytest.approx(np.std(values, ddof=1))


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    # E[unbiased MMD^2] = 0 when both sides come from one distribution; with the diagonal kept (the biased form) the
    # mean would sit clearly above 0 at this small subset size.
    gen = torch.Generator().manual_seed(1)
    values = [evaluate.kernel_inception_distance(torch.randn(20, 4, generator=gen, dtype=torch.float64),
                                                 torch.randn(20, 4, generator=gen, dtype=torch.float64),
                                                 subsets=1, subset_size=20, seed=i)[0] for i in range(400)]
    values = torch.tensor(values)
    assert abs(values.mean()) < 4 * values.std() / math.sqrt(len(values))
    shifted = evaluate.kernel_inception_distance(torch.randn(200, 4, generator=gen, dtype=torch.float64),
                                                 torch.randn(200, 4, generator=gen, dtype=torch.float64) + 1,
                                                 subsets=10, subset_size=100, seed=0)
    assert shifted[0] > 10 * values.std()


# ---- precision, recall, density, coverage ---------------------------------------------------------------------

def test_manifold_metrics_on_a_hand_worked_line():
    # Real points 0, 1, ..., 9 on a line, k = 1: every real ball has radius 1. Samples at 0.5, 4.2 and 20.
    real = torch.arange(10, dtype=torch.float64)[:, None]
    fake = torch.tensor([[0.5], [4.2], [20.0]], dtype=torch.float64)
    m = evaluate.manifold_metrics(real, fake, k_precision=1, k_density=1)
    assert m["precision"] == pytest.approx(2 / 3)  # 0.5 and 4.2 lie in a real ball, 20 in none
    # The samples' radii are 3.7, 3.7 and 15.8 (their nearest other sample): their balls cover [-3.2, 4.2],
    # [0.5, 7.9] and [4.2, 35.8], so every real point; the outlier at 20 inflates recall (why coverage exists).
    assert m["recall"] == pytest.approx(1.0)
    assert m["density"] == pytest.approx((2 + 2 + 0) / 3)  # 0.5 in the balls of 0 and 1; 4.2 in those of 4 and 5
    assert m["coverage"] == pytest.approx(4 / 10)  # 0, 1 (nearest sample 0.5), 4, 5 (4.2) hold a sample in their ball
    assert m["recall_mask"].tolist() == [True] * 10


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> dict:
    def radii(points, k):
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    d = np.linalg.norm(fake[:, None] - real[None], axis=2)  # samples x real
    r_real, r_dc, r_fake = radii(real, k_pr), radii(real, k_dc), radii(fake, k_pr)
    precision = np.mean([any(d[j, i] <= r_real[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[j, i] <= r_fake[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(d[j, i] <= r_dc[i] for j in range(len(fake)) for i in range(len(real))) / (k_dc * len(fake))
    coverage = np.mean([d[:, i].min() <= r_dc[i] for i in range(len(real))])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


def test_manifold_metrics_match_a_brute_force_count():
    gen = np.random.default_rng(0)
    real, fake = gen.normal(size=(60, 3)), gen.normal(size=(45, 3)) * 1.3 + 0.4
    m = evaluate.manifold_metrics(torch.from_numpy(real), torch.from_numpy(fake), 3, 5, chunk=16)
    for key, value in brute_force_prdc(real, fake, 3, 5).items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_kth_neighbour_distances_skip_the_point_itself_but_not_its_duplicates():
    x = torch.tensor([[0.0], [0.0], [3.0]], dtype=torch.float64)
    assert evaluate.kth_neighbour_distances(x, 1).tolist() == [0.0, 0.0, 3.0]
    assert evaluate.kth_neighbour_distances(x, 2).tolist() == [3.0, 3.0, 3.0]
    # in chunks of rows (as for 10,000 test features), each chunk skips its own rows' diagonal, not the first rows'
    points = torch.randn(11, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    brute = torch.cdist(points, points) + torch.diag(torch.full((11,), math.inf, dtype=torch.float64))
    expected = brute.sort(dim=1).values[:, 1]  # the second nearest other point
    assert torch.equal(evaluate.kth_neighbour_distances(points, 2, chunk=4), expected)


# ---- class histograms and Stacked MNIST -----------------------------------------------------------------------

def test_histogram_kl_by_hand():
    p = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4, 0)
    q = torch.tensor([0, 1, 2, 2])  # q = (1/4, 1/4, 1/2)
    assert evaluate.histogram_kl(p, q, 3) == pytest.approx(0.75 * math.log(3) + 0.25 * math.log(1))
    assert evaluate.histogram_kl(q, q, 3) == 0.0
    assert evaluate.histogram_kl(q, p, 3) == math.inf  # q has class 2, p never does


def test_a_spread_across_seeds_is_the_sample_standard_deviation():
    assert evaluate.mean_and_spread([1, 2, 3, 4]) == "2.5 ± 1.3"  # sqrt(5/3); the population std would be 1.1
    assert evaluate.mean_and_spread([3]) == "3"  # one seed: no spread to show


def test_stacked_modes_on_constructed_stacks():
    every_mode = torch.tensor([[a, b, c] for a in range(10) for b in range(10) for c in range(10)])
    assert evaluate.stacked_modes(every_mode) == (1000, pytest.approx(0.0, abs=1e-12))
    one_mode = torch.tensor([[1, 2, 3]] * 50)
    assert evaluate.stacked_modes(one_mode) == (1, pytest.approx(math.log(1000)))
    two_modes = torch.tensor([[1, 2, 3]] * 30 + [[3, 2, 1]] * 10)  # p = (3/4, 1/4) on two of 1,000 modes
    assert evaluate.stacked_modes(two_modes) == (2, pytest.approx(0.75 * math.log(750) + 0.25 * math.log(250)))
    swapped = torch.tensor([[3, 2, 1]] * 30 + [[1, 2, 3]] * 10)  # channel order matters: 321 and 123 differ
    assert evaluate.stacked_modes(torch.cat([two_modes, swapped]))[0] == 2


def test_perfect_generator_reference_matches_the_multinomial_expectation():
    # For N uniform draws over K modes, E[modes] = K (1 - (1 - 1/K)^N), and E[KL] ~ (K - 1) / (2N) for large N.
    modes, kl = evaluate.perfect_stacked_reference(26_000, seed=0, draws=20)
    assert modes == pytest.approx(1000 * (1 - (1 - 1 / 1000) ** 26_000), abs=0.3)
    assert kl == pytest.approx(999 / (2 * 26_000), rel=0.05)


# ---- sizes, likelihood columns --------------------------------------------------------------------------------

def test_to_size_undoes_the_32px_padding_exactly():
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    padded = common.resize_images(images, 32)
    assert torch.equal(evaluate.to_size(padded, 28), images)
    assert evaluate.to_size(torch.zeros(2, 1, 64, 64, dtype=torch.uint8), 28).shape == (2, 1, 28, 28)


def test_likelihoods_keep_their_settings_apart():
    assert evaluate.likelihood_columns({"eval/nll": 92.3, "eval/bits_per_binary_pixel": 0.17}) == \
        {"nll_binarised_nats": 92.3}
    assert evaluate.likelihood_columns({"eval/nll": 1800.0, "eval/bpd": 3.79}) == {"bits_per_dim_8bit": 3.79}
    assert evaluate.likelihood_columns({"eval/mse_test": 0.002}) == {}


# ---- the classifier cache -------------------------------------------------------------------------------------

def test_classifier_is_cached_and_retrained_when_its_recipe_changes(tiny_data_dir, tmp_path, one_thread):
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for f in (tiny_data_dir / "mnist").iterdir():
        (data / "mnist" / f.name).symlink_to(f)
    cpu = torch.device("cpu")
    first = evaluate.load_feature_network("mnist", data, cpu, TINY_RECIPE, log=lambda *_: None)
    assert first.seconds > 0 and first.path.is_file() and first.accuracy > 0.9  # tiny digits are easy
    again = evaluate.load_feature_network("mnist", data, cpu, TINY_RECIPE, log=lambda *_: None)
    assert again.seconds == 0 and again.path == first.path and again.accuracy == first.accuracy
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    changed = evaluate.load_feature_network("mnist", data, cpu, {**TINY_RECIPE, "epochs": 1}, log=lambda *_: None)
    assert changed.seconds > 0 and changed.path != first.path
    first.path.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="delete it"):
        evaluate.load_feature_network("mnist", data, cpu, TINY_RECIPE, log=lambda *_: None)


def test_same_recipe_trains_the_same_network(tiny_data_dir, one_thread):
    train = common.load_image_dataset("mnist", tiny_data_dir, 28, "train")
    a = evaluate.train_classifier(train, TINY_RECIPE, torch.device("cpu"))
    state = torch.random.get_rng_state()
    b = evaluate.train_classifier(train, TINY_RECIPE, torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())  # its own generators: the global RNG is untouched
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_recipe_key_changes_with_the_recipe_and_the_dataset():
    key = evaluate.recipe_key("mnist", TINY_RECIPE)
    assert key == evaluate.recipe_key("mnist", dict(TINY_RECIPE))
    assert key != evaluate.recipe_key("fashion-mnist", TINY_RECIPE)
    assert key != evaluate.recipe_key("mnist", {**TINY_RECIPE, "lr": 1e-3})


# ---- runs and their errors ------------------------------------------------------------------------------------

def fake_run(folder, dataset="mnist", images=None, model="dcgan", final=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": model, "args": {"dataset": dataset},
                                                    "command": f"{model}.py"}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/d": 1.0}) + "\n" +
                                          json.dumps({"step": 1, "final": True, **(final or {})}) + "\n")
    if images is not None:
        np.savez(folder / "samples.npz", images=images)
    return folder


def test_bad_run_folders_give_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    good = np.zeros((10, 1, 28, 28), np.uint8)
    cases = {
        "empty": ("not a run folder", []),
        "floats": ("expected uint8", [fake_run(tmp_path / "floats", images=good.astype(np.float32))]),
        "colour": ("expected uint8 N x 1", [fake_run(tmp_path / "colour", images=np.zeros((4, 3, 28, 28), np.uint8))]),
        "nosamples": ("no samples.npz", [fake_run(tmp_path / "nosamples")]),
        "text": ("no samples.txt", [fake_run(tmp_path / "text", dataset="coco")]),
        "folder": ("has no classifier", [fake_run(tmp_path / "folder", dataset="folder:/pictures")]),
        "mixed": ("different datasets", [fake_run(tmp_path / "a", images=good),
                                         fake_run(tmp_path / "b", dataset="fashion-mnist", images=good)]),
    }
    for name, (message, folders) in cases.items():
        runs = [str(f) for f in folders] or [str(tmp_path / name)]
        code, err = run_cli(evaluate.main, evaluate.Args, runs + ["--out", str(tmp_path / "cmp")], capsys)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (name, err)
    (tmp_path / "corrupt").mkdir()
    fake_run(tmp_path / "corrupt" / "run")
    (tmp_path / "corrupt" / "run" / "samples.npz").write_bytes(b"PK\x03\x04 cut short")
    code, err = run_cli(evaluate.main, evaluate.Args, [str(tmp_path / "corrupt" / "run")], capsys)
    assert code == 1 and "not a readable samples file" in err
    code, err = run_cli(evaluate.main, evaluate.Args, [], capsys)
    assert code == 2 and "give one or more run folders" in err


def test_too_few_samples_say_how_to_get_more(tiny_data_dir, tmp_path, tiny_recipe, one_thread):
    run = fake_run(tmp_path / "run", images=np.zeros((50, 1, 28, 28), np.uint8))
    args = evaluate.Args(runs=[str(run)], out=str(tmp_path / "cmp"), data_dir=str(tiny_data_dir), **SMALL)
    with pytest.raises(common.UserError, match="--num-samples"):
        evaluate.main(args)


def test_a_dcgan_run_is_compared_with_the_reference_rows(tiny_data_dir, tmp_path, tiny_recipe, one_thread):
    run = tmp_path / "dcgan"
    dcgan.main(dcgan.Args(dataset="mnist", data_dir=str(tiny_data_dir), out=str(run), image_size=32, batch_size=16,
                          g_width=8, d_width=8, z_dim=8, num_samples=100, max_steps=2, log_every=1,
                          sample_every=0))
    vae_like = fake_run(tmp_path / "vae", images=np.full((100, 1, 28, 28), 60, np.uint8), model="vae",
                        final={"eval/nll": 99.5, "eval/bits_per_binary_pixel": 0.18})
    out = tmp_path / "cmp"
    evaluate.main(evaluate.Args(runs=[str(run), str(vae_like)], out=str(out), data_dir=str(tiny_data_dir),
                                device="cpu", **SMALL))
    summary = json.loads((out / "comparison.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert list(rows) == ["dcgan", "vae", "training images (floor)", "uniform noise (ceiling)"]
    floor, ceiling = rows["training images (floor)"], rows["uniform noise (ceiling)"]
    assert floor["fd"] < rows["dcgan"]["fd"] < ceiling["fd"] and floor["fd"] < rows["vae"]["fd"]
    assert floor["precision"] > ceiling["precision"] and floor["coverage"] > ceiling["coverage"]
    assert rows["vae"]["nll_binarised_nats"] == 99.5 and "nll_binarised_nats" not in rows["dcgan"]
    assert set(floor["recall_per_class"]) == set(evaluate.CLASS_NAMES["mnist"])
    text = (out / "comparison.md").read_text()
    assert "not comparable with Inception-FID" in text and "NLL, nats / binarised image" in text
    assert (out / "comparison.png").stat().st_size > 0


def test_stacked_mnist_rows_count_modes(tiny_data_dir, tmp_path, tiny_recipe, one_thread):
    stacked = common.load_image_dataset("stacked-mnist", tiny_data_dir, 28, "test").images
    copies = fake_run(tmp_path / "copies", dataset="stacked-mnist", images=common.resize_images(stacked[:100], 32)
                      .numpy())
    one = fake_run(tmp_path / "one", dataset="stacked-mnist", images=stacked[:1].repeat(100, 1, 1, 1).numpy())
    out = tmp_path / "cmp"
    evaluate.main(evaluate.Args(runs=[str(copies), str(one)], out=str(out), data_dir=str(tiny_data_dir),
                                device="cpu", **SMALL))
    rows = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert rows["one"]["modes"] == 1 and rows["one"]["kl_uniform"] == pytest.approx(math.log(1000))
    assert rows["copies"]["modes"] > 50  # 100 random stacks, read by a classifier that is right on tiny digits
    assert "a perfect generator, 100 samples (mean of 100 draws)" in rows


def test_command_line_on_tiny_runs_of_every_model_file(tiny_data_dir, corpus, tmp_path, one_thread):
    import flow
    import glo
    import seqgan_rl
    import vae
    from test_flow import TINY as FLOW
    from test_glo import TINY as GLO
    from test_seqgan_rl import TINY as SEQGAN
    from test_vae import TINY as VAE
    data = {"dataset": "mnist", "data_dir": str(tiny_data_dir)}
    dcgan.main(dcgan.Args(**data, out=str(tmp_path / "dcgan"), image_size=16, batch_size=16, g_width=8, d_width=8,
                          z_dim=8, num_samples=100, max_steps=2, log_every=1, sample_every=0))
    vae.main(vae.Args(**{**data, **VAE, "out": str(tmp_path / "vae"), "num_samples": 100}))
    flow.main(flow.Args(**{**data, **FLOW, "out": str(tmp_path / "flow"), "num_samples": 100}))
    glo.main(glo.Args(**{**data, **GLO, "out": str(tmp_path / "glo"), "num_samples": 100}))
    image_runs = [str(tmp_path / name) for name in ("dcgan", "vae", "flow", "glo")]
    small = ["--samples", "100", "--kid-subsets", "3", "--kid-subset-size", "50", "--device", "cpu"]
    result = subprocess.run([sys.executable, "evaluate.py", *image_runs, "--out", str(tmp_path / "images"),
                             "--data-dir", str(tiny_data_dir), *small],
                            cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| run | model | FD |" in result.stdout and "test accuracy" in result.stdout
    rows = {r["run"]: r for r in json.loads((tmp_path / "images" / "comparison.json").read_text())["rows"]}
    assert "nll_binarised_nats" in rows["vae"] and "bits_per_dim_8bit" in rows["flow"] and "fd" in rows["glo"]
    seqgan_rl.main(seqgan_rl.Args(**{**SEQGAN, "dataset": f"file:{corpus}", "out": str(tmp_path / "seqgan"),
                                     "num_samples": 40}))
    result = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "seqgan"), "--out", str(tmp_path / "text"),
                             "--data-dir", str(tmp_path / "data"), "--text-samples", "40", "--bleu-samples", "40",
                             "--self-bleu-samples", "20", "--device", "cpu"],
                            cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reverse LM score" in result.stdout and "| seqgan | seqgan_rl |" in result.stdout
    mixed = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "seqgan"), str(tmp_path / "vae")],
                           cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert mixed.returncode == 1 and "different datasets" in mixed.stderr and "Traceback" not in mixed.stderr


def test_language_model_reaches_the_entropy_of_a_known_corpus(one_thread):
    """Sentences "w 5 6 EOS" with w uniform over four words: the best model pays log 4 on w and nothing on the
    three tokens after it, log(4) / 4 nats per scored token."""
    w = torch.arange(400) % 4 + 7
    tokens = torch.stack([w, torch.full_like(w, 5), torch.full_like(w, 6), torch.full_like(w, 2),
                          torch.zeros_like(w)], dim=1)  # ..., EOS (2), PAD (0)
    scored = tokens != 0
    model = evaluate.train_language_model(tokens, scored, 11, 1, {**TINY_LM, "epochs": 30}, torch.device("cpu"))
    nll = evaluate.mean_token_nll(model, tokens, scored, 1, torch.device("cpu"))
    assert nll == pytest.approx(math.log(4) / 4, abs=0.03)


def test_tricks_table_trains_the_missing_runs_and_aggregates_seeds(tiny_data_dir, tmp_path, tiny_recipe,
                                                                   monkeypatch):
    monkeypatch.setattr(evaluate, "TRICKS", {"defaults (DCGAN)": [], "packing, m = 2 (PacGAN)": ["--pack", "2"]})
    monkeypatch.setattr(evaluate, "TRICK_BUDGETS", {"cpu": ["--image-size", "16", "--batch-size", "16", "--g-width",
                                                            "8", "--d-width", "8", "--z-dim", "8", "--max-steps", "2",
                                                            "--log-every", "1"]})
    out = tmp_path / "tricks"
    args = evaluate.Args(tricks="stacked-mnist", out=str(out), data_dir=str(tiny_data_dir), device="cpu", seeds=2,
                         jobs=2, **SMALL)
    evaluate.main(args)
    table = (out / "tricks.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| defaults") or line.startswith("| packing")]
    assert len(rows) == 2 and all(" ± " in row for row in rows) and "`--pack 2`" in rows[1]
    saved = json.loads((out / "tricks.json").read_text())["scores"]
    assert [len(v) for v in saved.values()] == [2, 2]
    modes = [r["modes"] for r in saved["defaults (DCGAN)"]]
    assert rows[0].split(" | ")[2] == "2" and rows[0].split(" | ")[3].startswith(f"{sum(modes) / 2:.4g}")
    config = json.loads((out / "runs" / "stacked-mnist-packing-m-2-pacgan-seed1" / "config.json").read_text())
    assert config["args"]["pack"] == 2 and config["args"]["seed"] == 1 and config["args"]["num_samples"] == 100
    stamp = (out / "runs" / "stacked-mnist-defaults-dcgan-seed0" / "samples.npz").stat().st_mtime_ns
    evaluate.main(args)  # everything finished: nothing is trained again
    assert (out / "runs" / "stacked-mnist-defaults-dcgan-seed0" / "samples.npz").stat().st_mtime_ns == stamp
    (out / "runs" / "stacked-mnist-defaults-dcgan-seed1" / "samples.npz").unlink()  # as if still training
    evaluate.main(dataclasses.replace(args, score_finished=True))
    table = (out / "tricks.md").read_text()
    assert "| defaults (DCGAN) | `(none)` | 1 |" in table and "Not finished yet" in table and \
        "defaults (DCGAN) seed 1." in table
    assert not (out / "runs" / "stacked-mnist-defaults-dcgan-seed1" / "samples.npz").exists()  # nothing trained
    monkeypatch.setattr(evaluate, "TRICKS", {"broken": ["--pack", "3"]})
    with pytest.raises(common.UserError, match="exited with status 2"):
        evaluate.main(args)


def test_recall_per_class_names_the_classes_a_model_misses(tiny_data_dir, tiny_recipe, one_thread):
    train = common.load_image_dataset("mnist", tiny_data_dir, 28, "train")
    half = train.images[train.labels < 5][:100]  # a "model" that only ever draws classes 0-4
    args = evaluate.Args(runs=["unused"], data_dir=str(tiny_data_dir), **SMALL)
    scorer = evaluate.ImageScorer("mnist", args, torch.device("cpu"), log=lambda *_: None)
    scores = scorer.score(half)
    recall = scores["recall_per_class"]
    assert min(recall[str(c)] for c in range(5)) > 0.8 and max(recall[str(c)] for c in range(5, 10)) < 0.2
    assert scores["class_kl"] > 0.5  # about log 2: half the classes carry all the mass
    # KL(samples || test): finite although the samples miss classes; the other direction would be infinite
    _, classes = scorer.network.features_and_classes(half, torch.device("cpu"))
    assert scores["class_kl"] == pytest.approx(evaluate.histogram_kl(classes, scorer.test_classes, 10))


# ---- text -----------------------------------------------------------------------------------------------------

TINY_LM = dict(embed=8, hidden=16, epochs=8, batch_size=32, lr=1e-2, seed=0, max_sentences=100_000)
TEXT = dict(text_samples=40, bleu_samples=40, self_bleu_samples=20)


def test_token_nll_predicts_each_token_from_the_ones_before_it():
    """The LM's NLL step by step by hand: position t's distribution, from the start token and tokens < t, scores
    token t; only the scored positions count."""
    torch.manual_seed(0)
    model = evaluate.LanguageModel(7, 3, 5).eval()
    tokens = torch.tensor([[4, 5, 2, 0, 0], [6, 3, 4, 5, 2]])
    scored = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)  # token 3 is <unk>: not scored
    total, count = 0.0, 0
    for row in range(2):
        state, previous = None, 1  # start token 1
        for t in range(5):
            out, state = model.lstm(model.embedding(torch.tensor([[previous]])), state)
            log_p = torch.log_softmax(model.out(out[0, 0]), dim=-1)
            if scored[row, t]:
                total, count = total - log_p[tokens[row, t]].item(), count + 1
            previous = tokens[row, t].item()
    assert evaluate.mean_token_nll(model, tokens, scored, 1, torch.device("cpu")) == pytest.approx(total / count,
                                                                                                    rel=1e-5)


def text_scorer(dataset, tmp_path, oracle="paper", **extra):
    args = evaluate.Args(runs=["unused"], data_dir=str(tmp_path / "data"), **{**TEXT, **extra})
    return evaluate.TextScorer(dataset, args, torch.device("cpu"), oracle=oracle, log=lambda *_: None)


def test_lm_scores_tell_fluent_text_and_collapse_apart(corpus, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(evaluate, "LM_RECIPE", TINY_LM)
    scorer = text_scorer(f"file:{corpus}", tmp_path)
    train = [" ".join(scorer.data.vocab.decode(row)) for row in scorer.data.train[:40]]
    shuffled = [" ".join(random_order(line.split(), seed)) for seed, line in enumerate(train)]
    collapsed = [train[0]] * 40
    fluent, scrambled, repeated = (scorer.score(lines, name) for name, lines in
                                   (("train", train), ("shuffled", shuffled), ("collapsed", collapsed)))
    assert fluent["lm_score"] < scrambled["lm_score"] - 0.5  # the LM knows word order
    # One sentence repeated reads well (low LM score) but a model of it cannot explain the test split.
    assert repeated["reverse_lm_score"] > fluent["reverse_lm_score"] + 0.5
    assert repeated["self_bleu2"] == pytest.approx(1.0) and fluent["self_bleu2"] < 1
    assert fluent["mean_length"] == pytest.approx(sum(len(s.split()) for s in train) / 40)


def test_real_text_references_are_training_sentences_and_random_words_of_the_same_lengths(corpus, tmp_path,
                                                                                             monkeypatch):
    """The ceiling row draws words only (no PAD, BOS, EOS or <unk>), as many per line as the floor row's training
    sentence has words, so that the two rows differ in word choice alone."""
    monkeypatch.setattr(evaluate.TextScorer, "real_text_lm", lambda self, dataset: None)
    scorer = text_scorer(f"file:{corpus}", tmp_path)
    floor, ceiling = scorer.references(60).values()
    assert len(floor) == len(ceiling) == 60
    assert [len(line.split()) for line in ceiling] == [len(line.split()) for line in floor]
    assert {" ".join(scorer.data.vocab.decode(row)) for row in scorer.data.train} >= set(floor)
    drawn = {word for line in ceiling for word in line.split()}
    assert drawn <= set(scorer.data.vocab.tokens[4:]) and len(drawn) > 10


def random_order(words, seed):
    import random
    words = list(words)
    random.Random(seed).shuffle(words)
    return words


def test_oracle_samples_are_scored_by_the_oracle(small_oracle, tmp_path):
    scorer = text_scorer("oracle", tmp_path, oracle="random", text_samples=64)
    data = scorer.data
    lines = common.sample_lines(data, data.test)
    assert scorer.score(lines, "lines")["nll_oracle"] == pytest.approx(data.oracle.nll(data.test).mean().item())
    rows = scorer.references(64)
    floor, ceiling = (scorer.score(lines, name, reference=True)["nll_oracle"] for name, lines in rows.items())
    assert floor < ceiling - 1  # the oracle's own sequences against uniform tokens
    with pytest.raises(common.UserError, match="20 ids"):
        scorer.score(["1 2 3"] * 64, "short")
    with pytest.raises(common.UserError, match="token ids"):
        scorer.score(["a b c"] * 64, "words")


def test_text_runs_with_a_temperature_sweep_are_compared(corpus, tmp_path, monkeypatch, one_thread):
    import scratchgan
    monkeypatch.setattr(evaluate, "LM_RECIPE", TINY_LM)
    runs = []
    for name, extra in (("gan", {}), ("mle", {"mle": True})):
        out = tmp_path / name
        scratchgan.main(scratchgan.Args(dataset=f"file:{corpus}", out=str(out), device="cpu", batch_size=8, steps=4,
                                        g_hidden=8, d_hidden=8, emb_dim=8, eval_every=4, num_samples=40,
                                        bleu_samples=20, self_bleu_samples=10, log_every=2, checkpoint_every=0,
                                        eval_temperatures="0.5,1,2" if name == "gan" else "", **extra))
        runs.append(str(out))
    out = tmp_path / "cmp"
    evaluate.main(evaluate.Args(runs=runs, out=str(out), data_dir=str(tmp_path / "data"), device="cpu", **TEXT))
    rows = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert {"gan", "mle", "gan at T = 0.5", "gan at T = 2"} <= set(rows)
    assert rows["gan at T = 0.5"]["temperature"] == 0.5 and "nll_test" in rows["gan"]
    # T = 1 draws samples.txt again: the same scores, without a second reverse LM
    assert (Path(runs[0]) / "samples_T1.txt").read_bytes() == (Path(runs[0]) / "samples.txt").read_bytes()
    assert rows["gan at T = 1"]["reverse_lm_score"] == rows["gan"]["reverse_lm_score"]
    floor = rows["training sentences (floor; the LM's own training data)"]
    assert floor["lm_score"] < rows["uniform random words (ceiling)"]["lm_score"]
    assert (out / "comparison.png").is_file() and "reverse LM score" in (out / "comparison.md").read_text()
    assert any(p.name.startswith("lm-file-") for p in (tmp_path / "data" / "evaluate-cache").iterdir())
    # scored again: every row comes from a cache (the runs' in their folders, the references' beside the LM)
    scored, real_metrics = [], common.text_sample_metrics
    monkeypatch.setattr(common, "text_sample_metrics", lambda *a, **k: scored.append(1) or real_metrics(*a, **k))
    evaluate.main(evaluate.Args(runs=runs, out=str(out), data_dir=str(tmp_path / "data"), device="cpu", **TEXT))
    again = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert again == rows and not scored
    assert {p.name for p in Path(runs[0]).glob("evaluate-scores-*.json")} == {
        "evaluate-scores-samples.json", "evaluate-scores-samples_T0.5.json", "evaluate-scores-samples_T2.json"}
    (Path(runs[1]) / "samples.txt").write_text("\n".join(["the cat sees the sea"] * 40) + "\n")  # new samples
    evaluate.main(evaluate.Args(runs=runs, out=str(out), data_dir=str(tmp_path / "data"), device="cpu", **TEXT))
    rescored = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert len(scored) == 1 and rescored["mle"]["self_bleu2"] == pytest.approx(1.0)
    assert rescored["gan at T = 2"] == rows["gan at T = 2"]
    # another setting (fewer samples for BLEU) scores every file again instead of reusing the cached rows
    scored.clear()
    evaluate.main(evaluate.Args(runs=runs, out=str(out), data_dir=str(tmp_path / "data"), device="cpu",
                                **{**TEXT, "bleu_samples": 20}))
    assert len(scored) == 6  # samples.txt of each run, the two other temperatures, the floor and the ceiling


def test_oracle_runs_with_a_temperature_sweep_get_their_own_nll_test_per_temperature(small_oracle, tmp_path,
                                                                                       one_thread, monkeypatch):
    """Each T row carries the run's NLL-test at that T (not T = 1's), and the sweep is drawn as one curve."""
    import scratchgan
    out = tmp_path / "gan"
    scratchgan.main(scratchgan.Args(dataset="oracle", oracle="random", out=str(out), device="cpu", batch_size=8,
                                    steps=2, g_hidden=8, d_hidden=8, emb_dim=8, eval_every=2, eval_samples=64,
                                    final_samples=64, num_samples=64, log_every=1, checkpoint_every=0,
                                    eval_temperatures="0.5,2"))
    final = evaluate.read_json_lines(out / "metrics.jsonl")[-1]
    cmp = tmp_path / "cmp"
    plotted, real_plot = {}, common.plot_series
    monkeypatch.setattr(common, "plot_series", lambda series, *a, **k: plotted.update(series) or
                        real_plot(series, *a, **k))
    evaluate.main(evaluate.Args(runs=[str(out)], out=str(cmp), data_dir=str(tmp_path / "data"), device="cpu",
                                text_samples=64))
    rows = {r["run"]: r for r in json.loads((cmp / "comparison.json").read_text())["rows"]}
    for temperature in ("0.5", "2"):
        assert rows[f"gan at T = {temperature}"]["nll_test"] == final[f"eval_T{temperature}/nll_test"]
    assert rows["gan"]["nll_test"] == final["eval/nll_test"]
    assert len({rows["gan"]["nll_test"], rows["gan at T = 0.5"]["nll_test"], rows["gan at T = 2"]["nll_test"]}) == 3
    assert (cmp / "comparison.png").is_file()
    # the curve: (NLL-test, NLL-oracle) at each T in increasing order, T = 1 from samples.txt (Caccia et al. §4)
    in_order = [rows["gan at T = 0.5"], rows["gan"], rows["gan at T = 2"]]
    assert plotted["gan (T sweep)"] == [(r["nll_test"], r["nll_oracle"]) for r in in_order]


def test_tricks_table_interrupted_keeps_the_checkpoint_and_resumes(tiny_data_dir, tmp_path):
    """SIGTERM to evaluate.py --tricks stops its training with a checkpoint; the same command then resumes it."""
    import signal
    import time
    out = tmp_path / "tricks"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import evaluate, common\n"
              f"evaluate.TRICKS = {{'defaults (DCGAN)': []}}\n"
              f"evaluate.TRICK_BUDGETS = {{'cpu': ['--image-size', '16', '--batch-size', '16', '--g-width', '8', "
              f"'--d-width', '8', '--z-dim', '8', '--max-steps', '300', '--log-every', '1', "
              f"'--checkpoint-every', '100000']}}\n"
              f"evaluate.CLASSIFIER_RECIPE = {TINY_RECIPE!r}\n"
              f"common.run_cli(evaluate.main, evaluate.Args, ['--tricks', 'stacked-mnist', '--seeds', '1', "
              f"'--out', {str(out)!r}, '--data-dir', {str(tiny_data_dir)!r}, '--device', 'cpu', '--samples', "
              f"'100', '--stacked-samples', '100'])\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    log = out / "runs" / "stacked-mnist-defaults-dcgan-seed0.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "step 3/" in log.read_text()):
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=120) != 0
    folder = log.with_suffix("")
    assert (folder / "checkpoint.pt").is_file() and not evaluate.finished(folder)
    stopped_at = common.load_checkpoint(folder)["step"]
    assert 3 <= stopped_at < 300
    again = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "0 of 1 runs done; training 1" in again.stdout and (out / "tricks.md").is_file()
    assert evaluate.finished(folder) and "--resume" in json.loads((folder / "config.json").read_text())["command"]
    assert [r["step"] for r in metrics_lines(folder) if not r.get("final")] == list(range(1, 301))


def test_every_trick_gets_the_same_g_steps():
    assert evaluate.budget_flags("cpu", ["--spectral-norm"])[:2] == ["--epochs", "1"]
    assert evaluate.budget_flags("cpu", evaluate.WGAN_GP)[:2] == ["--epochs", "5"]  # 5 D batches per G step
    assert evaluate.budget_flags("full", ["--d-steps", "2"]) == ["--epochs", "10"]
    for name, flags in evaluate.TRICKS.items():  # through dcgan.py's own parser, as the runs get them
        args = common.parse_args(dcgan.Args, ["--dataset", "stacked-mnist"] + evaluate.budget_flags("cpu", flags) +
                                 flags)
        assert args.epochs / args.d_steps == 1, name  # one epoch's 468 G steps each


def test_the_language_model_cache_key_changes_with_its_recipe():
    assert evaluate.lm_key("file:x", TINY_LM) == evaluate.lm_key("file:x", dict(TINY_LM))
    assert evaluate.lm_key("file:x", TINY_LM) != evaluate.lm_key("file:x", {**TINY_LM, "hidden": 17})
    assert evaluate.lm_key("file:x", TINY_LM) != evaluate.lm_key("file:y", TINY_LM)


def test_samples_files_keep_empty_samples_at_either_end(tmp_path):
    """A sentence that ended at its first token is an empty line, and still one of the samples."""
    path = tmp_path / "samples.txt"
    path.write_text("\na b\n\n")
    assert evaluate.read_samples(path) == ["", "a b", ""]
    path.write_text("")
    assert evaluate.read_samples(path) == []


def test_the_floor_row_is_a_seeded_random_subset_of_the_training_images(tiny_data_dir):
    """Not the first images of the file: a folder dataset is stored class by class."""
    train = common.load_image_dataset("mnist", tiny_data_dir, 28, "train").images.flatten(1)
    floors = [evaluate.reference_images("mnist", evaluate.Args(runs=["unused"], data_dir=str(tiny_data_dir), seed=seed), 50)
              for seed in (0, 1)]
    first, second = (f["training images (floor)"].flatten(1) for f in floors)
    position = {bytes(row.numpy()): i for i, row in enumerate(train)}
    picked = [position[bytes(row.numpy())] for row in first]
    assert len(set(picked)) == 50 and picked != list(range(50)) and max(picked) > 100
    assert not torch.equal(first, second)
    assert floors[0]["uniform noise (ceiling)"].shape == (50, 1, 28, 28)


def test_cached_scores_are_reused_until_the_samples_or_settings_change(tmp_path):
    run = fake_run(tmp_path / "run", images=np.zeros((4, 1, 28, 28), np.uint8))
    calls = []
    compute = lambda: calls.append(1) or {"modes": len(calls)}  # noqa: E731
    assert evaluate.cached_scores(run, ["key", 100], compute) == {"modes": 1}
    assert evaluate.cached_scores(run, ["key", 100], compute) == {"modes": 1} and len(calls) == 1
    assert evaluate.cached_scores(run, ["key", 200], compute) == {"modes": 2}  # another setting
    np.savez(run / "samples.npz", images=np.ones((5, 1, 28, 28), np.uint8))  # new samples
    assert evaluate.cached_scores(run, ["key", 200], compute) == {"modes": 3}
