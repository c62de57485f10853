"""Shared fixtures and helpers: a tiny dataset in MNIST's own file format, a local HTTP server, the real-data
location, and what every model's tests do with a run (its metrics lines, its command line, bit-exact comparisons)."""

import functools
import gzip
import http.server
import json
import os
import random
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped, as MNIST publishes them."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_digits(count: int, seed: int):
    """28x28 images of one bright square per class, at a class-dependent place, plus noise: learnable shapes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 40, (count, 28, 28))
    for image, label in zip(images, labels):
        row, col = 2 + 2 * (label // 5) * 5, 2 + 5 * (label % 5)
        image[row:row + 8, col:col + 6] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """<dir>/mnist and <dir>/fashion-mnist with 512 training and 128 test images each, in the real file layout."""
    root = tmp_path_factory.mktemp("data")
    for folder in ("mnist", "fashion-mnist"):
        for split, count, seed in (("train", 512, 0), ("t10k", 128, 1)):
            images, labels = tiny_digits(count, seed)
            write_idx(root / folder / f"{split}-images-idx3-ubyte.gz", images)
            write_idx(root / folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def write_truncated_mnist(tiny_data_dir: Path, data_root: Path) -> None:
    """<data_root>/mnist with the tiny training files cut to 300 bytes: data a model file must refuse in one line."""
    corrupt = data_root / "mnist"
    corrupt.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (corrupt / name).write_bytes((tiny_data_dir / "mnist" / name).read_bytes()[:300])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server(tmp_path):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving that folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def shared_data() -> Path:
    """The real datasets: $MINIGEN_DATA, else ../shared/data beside the checkout."""
    return Path(os.environ.get("MINIGEN_DATA") or ROOT.parent / "shared" / "data")


def real_idx_dir(dataset: str):
    """A data dir holding `dataset` in real IDX files, or None."""
    for root in (shared_data(), ROOT / "data"):
        if (root / dataset / "train-images-idx3-ubyte.gz").is_file():
            return root
    if dataset == "fashion-mnist" and Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        return Path("/nonexistent-data-dir")  # the loader falls back to the Debian package's location
    return None


# ---- runs ---------------------------------------------------------------------------------------------------------

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for subprocesses: tiny networks, two cores shared


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread; on a busy 2-core machine two threads spin against each other at
    every OpenMP barrier (the seqgan and flow tests took 3-7 times longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metrics_lines(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def training_lines(rows: list) -> list:
    """The metrics lines of training, without the final evaluation and without wall-clock fields."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows if not r.get("final")]


def assert_same(a, b, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit (a checkpoint against another)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def assert_help_states_presets(module) -> None:
    """--help of a model with presets states each preset's value of every flag the presets set."""
    import common
    helps = {action.dest: " ".join(action.help.split()) for action in common.build_parser(module.Args)._actions}
    for name in module.PRESETS["paper"]:
        for preset, values in module.PRESETS.items():
            value = values[name]
            assert f"{preset} {value:g}" in helps[name] if isinstance(value, float) else \
                f"{preset} {value}" in helps[name], (name, preset, helps[name])


def argv(flags: dict) -> list:
    """{"batch_size": 8, ...} -> ["--batch-size", "8", ...]"""
    return [part for key, value in flags.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def run_cli(main, args_cls, flags: list, capsys):
    """common.run_cli in-process: (exit status, stderr)."""
    import common
    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(main, args_cls, flags)
    return exit_info.value.code, capsys.readouterr().err


# ---- text --------------------------------------------------------------------------------------------------------

@pytest.fixture()
def small_oracle(monkeypatch):
    """The random oracle with 64 training and 64 test sequences instead of 9,984 each."""
    import common
    monkeypatch.setattr(common, "ORACLE_SEQUENCES", 64)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A file: dataset of 300 sentences from a small grammar (about 20 words, at most 7 tokens)."""
    rng = random.Random(0)
    subjects, verbs = ["the cat", "a dog", "my friend", "the old man", "she"], ["sees", "likes", "finds", "draws"]
    objects = ["the ball", "a red hat", "the sea", "his book"]
    lines = [" ".join([rng.choice(subjects), rng.choice(verbs), rng.choice(objects)] +
                      (["again"] if rng.random() < 0.3 else [])) for _ in range(300)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
