"""common.py: argument parsing, file formats, downloads, archives, datasets, batching, logging, checkpoints."""

import dataclasses
import hashlib
import importlib
import io
import json
import os
import pickle
import random
import re
import socket
import threading
import subprocess
import sys
import tarfile
import typing

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ONE_THREAD, ROOT, tiny_digits, write_idx


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ExampleArgs(common.RunArgs):
    learning_rate: float = 0.1  # step size (Someone et al. §2)
    # continued here
    use_trick: bool = False  # a switch
    mode: typing.Literal["a", "b"] = "a"  # one of two

    # a section heading, not help
    width: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.width > 100:
            raise ValueError("--width must be at most 100")


def test_flags_are_kebab_case_with_help_from_comments():
    parser = common.build_parser(ExampleArgs)
    text = parser.format_help()
    assert "--learning-rate" in text and "--use-trick" in text and "--no-use-trick" in text
    assert "step size (Someone et al. §2) continued here" in " ".join(text.split())
    assert "section heading" not in text
    args = common.parse_args(ExampleArgs, ["--learning-rate", "0.5", "--use-trick", "--mode", "b", "--seed", "3"])
    assert (args.learning_rate, args.use_trick, args.mode, args.seed) == (0.5, True, "b", 3)
    assert common.parse_args(ExampleArgs, ["--no-use-trick"]).use_trick is False


@pytest.mark.parametrize("argv, message", [
    (["--mode", "c"], "invalid choice"),
    (["--learning-rate", "fast"], "invalid float"),
    (["--width", "1000"], "--width must be at most 100"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_are_one_line_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(ExampleArgs, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_data_dir_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("MINIGEN_DATA", "/somewhere/data")
    assert common.parse_args(ExampleArgs, []).data_dir == "/somewhere/data"
    monkeypatch.delenv("MINIGEN_DATA")
    assert common.parse_args(ExampleArgs, []).data_dir == "data"


def test_resume_takes_saved_flags_and_explicit_ones_override(tmp_path):
    saved = dataclasses.asdict(ExampleArgs(learning_rate=0.3, mode="b", width=7, max_steps=10))
    common.save_checkpoint(tmp_path / "checkpoint.pt", {"args": saved})
    args = common.parse_args(ExampleArgs, ["--resume", str(tmp_path), "--max-steps", "20"])
    assert (args.learning_rate, args.mode, args.width, args.max_steps) == (0.3, "b", 7, 20)
    assert args.out == str(tmp_path)


def test_run_cli_turns_user_errors_into_one_line(capsys):
    def main(args):
        raise common.UserError("the data is missing; put it in ./data")

    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(main, ExampleArgs, [])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("error: the data is missing; put it in ./data") and "Traceback" not in err


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path, capsys):
    def fails_on_missing_data(args):
        common.setup(args, "example")
        raise common.UserError("the data is missing; put it in ./data")

    def fails_after_a_checkpoint(args):
        run = common.setup(args, "example")
        common.atomic_write_bytes(run.out / "checkpoint.pt", b"weights")
        raise common.UserError("the data is corrupt")

    for name, main, kept in [("fresh", fails_on_missing_data, False), ("written", fails_after_a_checkpoint, True)]:
        with pytest.raises(SystemExit):
            common.run_cli(main, ExampleArgs, ["--out", str(tmp_path / "runs" / name), "--device", "cpu"])
        assert (tmp_path / "runs" / name).exists() == kept and (tmp_path / "runs").exists() == kept  # runs/ too
    (tmp_path / "earlier").mkdir()  # a folder the user made or an earlier run filled: never removed
    with pytest.raises(SystemExit):
        common.run_cli(fails_on_missing_data, ExampleArgs, ["--out", str(tmp_path / "earlier"), "--device", "cpu"])
    assert (tmp_path / "earlier").is_dir()
    assert "error: the data is missing" in capsys.readouterr().err


DENORMAL_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[1])
import torch
import common

kept = float(torch.tensor([1e-39]) * 1) != 0  # one element: computed on this thread, no intra-op threads started
common.setup(common.RunArgs(out=sys.argv[2], device="cpu"), "denormal-check")
tiny = torch.full((4_000_000,), 1e-39)  # large enough to be split over every intra-op thread
print(kept, int((tiny * 1 != 0).sum()), torch.get_num_threads())
'''


def test_a_cpu_run_flushes_denormals_to_zero_on_every_thread(tmp_path):
    """TensorFlow's CPU threads flush denormals; torch's keep them, and the slow arithmetic on Adam's decaying moments
    cost seqgan_rl.py's D a tenth of its speed. After setup, no thread may keep one."""
    script = tmp_path / "denormal.py"
    script.write_text(DENORMAL_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(ROOT), str(tmp_path / "run")], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=120)
    assert done.returncode == 0, done.stderr
    kept_before, nonzero_after, threads = done.stdout.split()
    assert kept_before == "True" and threads == "2"  # torch's default keeps them; the flush is setup's doing
    assert nonzero_after == "0"


# ---------------------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------------------

def test_idx_round_trip_gzipped_and_plain(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(common.read_idx(tmp_path / "a.gz"), images)
    (tmp_path / "b").write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 8, 9]))
    assert common.read_idx(tmp_path / "b").tolist() == [7, 8, 9]


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + bytes(12), "not an IDX file of unsigned bytes"),  # float32
    (b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + bytes(3), "not an IDX file"),
    (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"), "truncated IDX header"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(3), "header says"),  # truncated data
    (b"", "not an IDX file"),
])
def test_idx_rejects_wrong_magic_and_truncation(tmp_path, content, message):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(common.UserError, match=message):
        common.read_idx(tmp_path / "bad")


def test_idx_rejects_a_broken_gzip(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((10, 28, 28), np.uint8))
    data = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserError, match="unreadable"):
        common.read_idx(tmp_path / "x.gz")


# ---------------------------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------------------------

def test_download_checks_sha256_and_renames_only_then(http_server, tmp_path):
    served, url = http_server
    payload = os.urandom(3 * 2**20 + 17)
    (served / "file.bin").write_bytes(payload)
    dest = tmp_path / "got" / "file.bin"
    common.download([url + "file.bin"], dest, hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_download_checksum_mismatch_leaves_nothing(http_server, tmp_path):
    served, url = http_server
    (served / "file.bin").write_bytes(b"not what was pinned")
    dest = tmp_path / "got" / "file.bin"
    with pytest.raises(common.UserError, match="checksum mismatch") as info:
        common.download([url + "file.bin"], dest, "0" * 64)
    assert url + "file.bin" in str(info.value) and str(dest) in str(info.value)
    assert list(dest.parent.iterdir()) == []


def test_download_falls_back_to_the_next_mirror(http_server, tmp_path):
    served, url = http_server
    (served / "file.bin").write_bytes(b"payload")
    dest = tmp_path / "file.bin"
    common.download([url + "missing.bin", url + "file.bin"], dest, hashlib.sha256(b"payload").hexdigest())
    assert dest.read_bytes() == b"payload"


def test_download_refused_connection_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "file.bin"
    with pytest.raises(common.UserError) as info:
        common.download([f"http://127.0.0.1:{port}/file.bin"], dest, "0" * 64, timeout=5)
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/file.bin" in message and "by hand" in message and "\n" not in message
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_a_download_cut_short_leaves_nothing_and_says_how_much_arrived(tmp_path):
    """A server that announces 100 bytes and closes after 50: a source with no checksum must not keep half a file."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def serve_half():
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)

        threading.Thread(target=serve_half, daemon=True).start()
        dest = tmp_path / "file.bin"
        with pytest.raises(common.UserError, match="connection closed after 50 of 100 bytes"):
            common.download([f"http://127.0.0.1:{server.getsockname()[1]}/file.bin"], dest, None, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_dataset_downloads_into_the_data_dir(http_server, tmp_path, monkeypatch):
    served, url = http_server
    images, labels = tiny_digits(64, 0)
    checksums = {}
    for name, array in (("train-images-idx3-ubyte.gz", images), ("train-labels-idx1-ubyte.gz", labels)):
        write_idx(served / name, array)
        checksums[name] = hashlib.sha256((served / name).read_bytes()).hexdigest()
    monkeypatch.setitem(common.SOURCES, "mnist", {"folder": "mnist", "mirrors": [url], "sha256": checksums,
                                                  "system_dirs": []})
    data = common.load_image_dataset("mnist", tmp_path, 28)
    assert data.images.shape == (64, 1, 28, 28) and torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Archives and pickles
# ---------------------------------------------------------------------------------------------------------------

def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            if kind == tarfile.SYMTYPE:
                info.size, info.linkname = 0, "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("bad_name, kind", [("../escape.txt", tarfile.REGTYPE), ("/abs/escape.txt", tarfile.REGTYPE),
                                            ("d/../../escape.txt", tarfile.REGTYPE), ("d/link", tarfile.SYMTYPE)])
def test_tar_extraction_refuses_unsafe_members(tmp_path, bad_name, kind):
    _tar(tmp_path / "a.tar.gz", [("d/good.txt", b"good", tarfile.REGTYPE), (bad_name, b"evil", kind)])
    with pytest.raises(common.UserError, match="refusing archive"):
        common.safe_extract(tmp_path / "a.tar.gz", ["d/good.txt"], tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "d" / "good.txt").exists()


def test_tar_extraction_takes_only_the_expected_members(tmp_path):
    _tar(tmp_path / "a.tar.gz", [("d/good.txt", b"good", tarfile.REGTYPE), ("d/other.txt", b"x", tarfile.REGTYPE)])
    common.safe_extract(tmp_path / "a.tar.gz", ["d/good.txt"], tmp_path / "out")
    assert (tmp_path / "out" / "d" / "good.txt").read_bytes() == b"good"
    assert not (tmp_path / "out" / "d" / "other.txt").exists()
    with pytest.raises(common.UserError, match="missing d/absent"):
        common.safe_extract(tmp_path / "a.tar.gz", ["d/absent"], tmp_path / "out")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_restricted_unpickler_loads_arrays_and_refuses_anything_else():
    batch = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2]}
    for protocol in (2, 4, 5):  # 5: Python 3.14's default, which writes arrays through numpy's _frombuffer
        loaded = common.restricted_load(pickle.dumps(batch, protocol=protocol))
        assert np.array_equal(loaded[b"data"], batch[b"data"]) and loaded[b"labels"] == [1, 2]
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        common.restricted_load(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        common.restricted_load(pickle.dumps(collections_counter()))


def collections_counter():
    import collections
    return collections.Counter("abc")


def test_cifar10_download_extract_and_parse(http_server, tmp_path, monkeypatch):
    """The official layout (pickled dicts of a uint8 array and a label list) round-trips through download, safe
    extraction and the restricted unpickler; rows are R, G, B planes."""
    served, url = http_server
    rng = np.random.default_rng(0)
    members = []
    for name in common.CIFAR_MEMBERS["train"] + common.CIFAR_MEMBERS["test"]:
        batch = {b"batch_label": b"x", b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 5)), b"filenames": [b"a.png"] * 5}
        members.append((name, pickle.dumps(batch, protocol=2), tarfile.REGTYPE))
    members.append(("cifar-10-batches-py/batches.meta", b"meta", tarfile.REGTYPE))
    _tar(served / "cifar-10-python.tar.gz", members)
    sha = hashlib.sha256((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setitem(common.SOURCES, "cifar10", {"folder": "cifar10", "mirrors": [url],
                                                    "sha256": {"cifar-10-python.tar.gz": sha}, "system_dirs": []})
    train = common.load_image_dataset("cifar10", tmp_path, 32)
    test = common.load_image_dataset("cifar10", tmp_path, 32, "test")
    assert train.images.shape == (25, 3, 32, 32) and test.images.shape == (5, 3, 32, 32)
    first = pickle.loads(members[0][1])
    assert torch.equal(train.images[0, 1].flatten(), torch.from_numpy(first[b"data"][0, 1024:2048]))
    assert train.labels[:5].tolist() == [int(v) for v in first[b"labels"]] and train.num_classes == 10


# ---------------------------------------------------------------------------------------------------------------
# Datasets and batching
# ---------------------------------------------------------------------------------------------------------------

def test_mnist_like_data_padded_to_32_and_resized_otherwise(tiny_data_dir):
    at28 = common.load_image_dataset("mnist", tiny_data_dir, 28)
    at32 = common.load_image_dataset("mnist", tiny_data_dir, 32)
    at16 = common.load_image_dataset("fashion-mnist", tiny_data_dir, 16, "test")
    assert at28.images.shape == (512, 1, 28, 28) and at28.images.dtype == torch.uint8
    assert torch.equal(at32.images[:, :, 2:30, 2:30], at28.images) and at32.images[:, :, :2].sum() == 0
    assert at16.images.shape == (128, 1, 16, 16) and at16.labels.shape == (128,)
    assert at28.labels.max() <= 9 and at28.num_classes == 10


def test_stacked_mnist_has_three_digit_channels_and_1000_modes(tiny_data_dir):
    digits = common.load_image_dataset("mnist", tiny_data_dir, 28)
    stacked = common.load_image_dataset("stacked-mnist", tiny_data_dir, 28)
    again = common.load_image_dataset("stacked-mnist", tiny_data_dir, 28)
    assert stacked.images.shape == (common.STACKED_MNIST_SIZE["train"], 3, 28, 28) and stacked.num_classes == 1000
    assert torch.equal(stacked.images, again.images)  # a fixed dataset, not a function of --seed
    for i in range(5):  # every channel is one of the digits, and the label spells their classes
        label = stacked.labels[i].item()
        for channel, digit_class in enumerate((label // 100, label // 10 % 10, label % 10)):
            matches = (digits.images[:, 0] == stacked.images[i, channel]).flatten(1).all(1).nonzero().flatten()
            assert len(matches) and digit_class in digits.labels[matches].tolist()


def test_folder_loader_skips_and_counts_non_images_and_caches(tmp_path, capsys):
    root = tmp_path / "pictures"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "cats" / "a.png")
    Image.new("RGB", (20, 30), (0, 255, 0)).save(root / "cats" / "b.jpg")
    Image.new("L", (16, 16), 128).save(root / "dogs" / "c.webp")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "dogs" / ".DS_Store").write_bytes(b"Bud1")  # hidden files are not data: neither read nor counted
    data = common.load_image_dataset(f"folder:{root}", tmp_path / "data", 8)
    assert data.images.shape == (3, 3, 8, 8) and data.labels.tolist() == [0, 0, 1] and data.num_classes == 2
    assert data.images[0, 0].float().mean() > 250 and data.images[0, 1].float().mean() < 5  # red stays red
    assert "3 images, 2 files skipped (1 not images, 1 unreadable)" in capsys.readouterr().err
    cached = list((tmp_path / "data" / "folder-cache").glob("folder-*.npz"))
    assert len(cached) == 1
    again = common.load_image_dataset(f"folder:{root}", tmp_path / "data", 8)
    assert torch.equal(again.images, data.images) and "images" not in capsys.readouterr().err  # from the cache


def test_folder_loader_greyscale_and_errors(tmp_path):
    (tmp_path / "grey").mkdir()
    Image.new("L", (10, 10), 7).save(tmp_path / "grey" / "a.png")
    data = common.load_image_dataset(f"folder:{tmp_path / 'grey'}", tmp_path / "d", 16)
    assert data.images.shape == (1, 1, 16, 16) and data.labels is None and data.num_classes == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(common.UserError, match="no readable images"):
        common.load_image_dataset(f"folder:{tmp_path / 'empty'}", tmp_path / "d", 16)
    with pytest.raises(common.UserError, match="no such directory"):
        common.load_image_dataset(f"folder:{tmp_path / 'nowhere'}", tmp_path / "d", 16)


@pytest.mark.parametrize("width, height", [(64, 16), (16, 64)])
def test_folder_images_are_scaled_by_their_short_side_and_centre_cropped(tmp_path, width, height):
    """A 64 x 16 picture red | green | blue along its long side (24, 16, 24 pixels) at size 8: scaled to 32 x 8
    and cropped to its middle 8 columns, exactly the green band - not squashed whole, not cut from one end."""
    picture = np.zeros((16, 64, 3), dtype=np.uint8)
    picture[:, :24, 0], picture[:, 24:40, 1], picture[:, 40:, 2] = 255, 255, 255
    if height > width:
        picture = picture.transpose(1, 0, 2).copy()
    (tmp_path / "bands").mkdir()
    Image.fromarray(picture).save(tmp_path / "bands" / "a.png")
    image = common.load_image_dataset(f"folder:{tmp_path / 'bands'}", tmp_path / "d", 8).images[0].float()
    middle = image[:, 2:6, :] if height > width else image[:, :, 2:6]  # away from the bicubic blur at the crop edge
    assert middle[1].min() > 240 and middle[0].max() < 15 and middle[2].max() < 15


def test_missing_data_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setitem(common.SOURCES, "mnist", {**common.SOURCES["mnist"], "mirrors": ["http://127.0.0.1:9/"]})
    with pytest.raises(common.UserError, match=r"put it at .*mnist/train-images-idx3-ubyte.gz"):
        common.load_image_dataset("mnist", tmp_path, 28)


def test_batches_cover_each_epoch_once_and_resume_exactly():
    images, labels = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1), torch.arange(20) * 10
    batches = common.Batches((images, labels), 4, seed=1, device=torch.device("cpu"))
    first = [batches.next() for _ in range(5)]
    epoch = torch.cat([b[0].flatten() for b in first])
    assert sorted(epoch.tolist()) == list(range(20))
    assert all(torch.equal(x.flatten().long() * 10, y) for x, y in first)  # rows of both tensors stay together
    second = [batches.next()[0].flatten() for _ in range(2)]
    state = batches.state_dict()
    rest = [batches.next()[0].flatten() for _ in range(6)]
    resumed = common.Batches((images, labels), 4, seed=1, device=torch.device("cpu"))
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next()[0].flatten()) for a in rest)
    assert not torch.equal(torch.cat(second), epoch[:8])  # a fresh permutation each epoch
    unlabelled = common.Batches((images, None), 4, seed=1, device=torch.device("cpu"))
    assert unlabelled.next()[1] is None and torch.equal(unlabelled.next()[0], first[1][0])
    # the state is the whole state: loaded into a batcher that is elsewhere (another epoch), it continues the same
    elsewhere = common.Batches((images, labels), 4, seed=1, device=torch.device("cpu"))
    for _ in range(13):
        elsewhere.next()
    elsewhere.load_state_dict(state)
    assert all(torch.equal(a, elsewhere.next()[0].flatten()) for a in rest)


def test_batches_give_each_rank_its_own_shard():
    images = torch.arange(24, dtype=torch.uint8).view(24, 1, 1, 1)
    ranks = [common.Batches((images,), 3, seed=0, device=torch.device("cpu"), rank=r, world_size=2)
             for r in range(2)]
    seen = [torch.cat([b.next()[0].flatten() for _ in range(b.steps_per_epoch)]) for b in ranks]
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert sorted(seen[0].tolist() + seen[1].tolist()) == list(range(24))


def test_a_batch_bigger_than_the_dataset_is_a_user_error():
    with pytest.raises(common.UserError, match="5 images are fewer than one batch of 8; lower --batch-size"):
        common.Batches((torch.zeros(5, 1, 2, 2, dtype=torch.uint8),), 8, seed=0, device=torch.device("cpu"),
                       what="images")


# ---------------------------------------------------------------------------------------------------------------
# Logging, grids, plots
# ---------------------------------------------------------------------------------------------------------------

def test_image_grid_layout_and_modes(tmp_path):
    grey = torch.full((5, 1, 4, 6), 100, dtype=torch.uint8)
    common.save_image_grid(grey, tmp_path / "g.png", nrow=3, padding=2)
    image = Image.open(tmp_path / "g.png")
    assert image.mode == "L" and image.size == (3 * 8 + 2, 2 * 6 + 2)
    pixels = np.asarray(image)
    assert pixels[2, 2] == 100 and pixels[0, 0] == 255 and pixels[-3, -3] == 255  # the 6th cell is empty
    rgb = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    rgb[:, 0] = 255
    assert common.image_grid(rgb).mode == "RGB" and common.image_grid(rgb).getpixel((3, 3)) == (255, 0, 0)
    assert common.image_grid(torch.zeros(2, 4, 5, 5, dtype=torch.uint8)).mode == "L"
    with pytest.raises(TypeError):
        common.image_grid(torch.zeros(2, 1, 5, 5))


def test_to_uint8_maps_tanh_range():
    assert common.to_uint8(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0, 128, 255, 255]


def test_metrics_logger_means_progress_and_resume_truncation(tmp_path, capsys):
    logger = common.MetricsLogger(tmp_path, total_steps=4, console_keys=("loss/d",))
    for step, value in enumerate([1.0, 3.0, 5.0, 7.0], start=1):
        logger.update({"loss/d": torch.tensor(value), "loss/g": value * 2})
        if step % 2 == 0:
            logger.log(step)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/d"], r["loss/g"]) for r in lines] == [(2, 2.0, 4.0), (4, 6.0, 12.0)]
    out = capsys.readouterr().out
    assert "step 2/4 (50%)" in out and "ETA" in out and "loss/d 2" in out and "loss/g" not in out
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/d": 0.')  # a line cut short by a crash
    common.MetricsLogger(tmp_path, total_steps=4, start_step=2)  # resuming from step 2 drops the later lines
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]


def test_metrics_logger_averages_each_metric_over_the_steps_that_reported_it(tmp_path):
    logger = common.MetricsLogger(tmp_path, total_steps=4)
    logger.update({"loss/d": 1.0})
    logger.update({"loss/d": 3.0, "loss/g": 10.0})  # G trains on one step in two
    logger.update({"loss/d": 5.0})
    record = logger.log(3)
    assert record["loss/d"] == 3.0 and record["loss/g"] == 10.0


def test_plot_metrics_draws_curves(tmp_path):
    rows = [{"step": s, "loss/d": 1 / s, "loss/g": s ** 0.5, "d/real": 0.5} for s in range(1, 50)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 49, "final": true}\n')
    common.plot_metrics(tmp_path / "m.jsonl", tmp_path / "loss.png", ("loss/",), "title")
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert image.shape == (480, 900, 3) and common.PALETTE[0] in colours and common.PALETTE[1] in colours
    assert common.PALETTE[2] not in colours  # d/real is not a loss


def test_exact_float32_turns_tf32_off_inside_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what setup() does on CUDA
        with pytest.raises(RuntimeError):
            with common.exact_float32():
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                raise RuntimeError
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("map_location", [
    "cpu",
    # the model files load checkpoints onto their device; the RNG states must still restore from there
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_checkpoint_round_trip_restores_rng(tmp_path, map_location):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    common.save_checkpoint(tmp_path / "c.pt", {"step": 3, "weights": torch.ones(2)})
    expected = torch.rand(3), np.random.rand(2), random.random()
    checkpoint = common.load_checkpoint(tmp_path / "c.pt", map_location=map_location)
    common.restore_rng(checkpoint)
    assert checkpoint["step"] == 3 and torch.equal(checkpoint["weights"].cpu(), torch.ones(2))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]  # Python's generator too, for a user's code that draws from it


def test_state_dicts_round_trip_and_a_trick_switched_on_or_off_does_not_fit():
    """A part that is None (a trick that is off) is saved as None; resuming with it switched the other way is the
    ValueError that resume turns into its one-line 'does not fit' message, in both directions."""
    torch.manual_seed(0)
    saved = common.state_dicts({"net": torch.nn.Linear(2, 2), "ema": None})
    assert saved["ema"] is None
    net = torch.nn.Linear(2, 2)
    common.load_state_dicts({"net": net, "ema": None}, saved)
    assert torch.equal(net.weight, saved["net"]["weight"])
    with pytest.raises(ValueError, match="ema is on here but not in the checkpoint"):
        common.load_state_dicts({"net": net, "ema": torch.nn.Linear(2, 2)}, saved)
    with_ema = common.state_dicts({"net": net, "ema": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="ema is off here but not in the checkpoint"):
        common.load_state_dicts({"net": net, "ema": None}, with_ema)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"step": 1})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    run = common.Run(torch.device("cpu"), tmp_path)
    checkpoints = common.Checkpoints(run, "model.py", "a lower --lr")
    layer = torch.nn.Linear(2, 2)
    checkpoints.save(3, {"weights": layer.state_dict()}, [layer])
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(common.UserError, match=r"diverged at step 4 \(non-finite weights\); the last good checkpoint "
                                               r"is .*checkpoint.pt \(step 3\).*a lower --lr"):
        checkpoints.save(4, {"weights": layer.state_dict()}, [layer])
    kept = common.load_checkpoint(tmp_path)
    assert kept["step"] == 3 and torch.isfinite(kept["weights"]["weight"]).all()


def test_corrupt_or_missing_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        common.load_checkpoint(tmp_path)
    with pytest.raises(common.UserError, match="no checkpoint at"):
        common.load_checkpoint(tmp_path / "nothing.pt")


def test_checkpoints_refuse_pickled_code(tmp_path):
    torch.save({"x": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(common.UserError):
        common.load_checkpoint(tmp_path / "evil.pt")


# ---------------------------------------------------------------------------------------------------------------
# torchrun: gradients averaged right, and rank 0 downloading before the others read
# ---------------------------------------------------------------------------------------------------------------

DDP_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[1])
import torch
import common

args = common.RunArgs(batch_size=int(sys.argv[2]), out=sys.argv[3], device="cpu", deterministic=True)
with common.session(args, "ddp-check") as run:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # no BatchNorm
    common.broadcast_module(model)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True).sin()
    batches = common.Batches((x, y), args.batch_size, 0, run.device, run.rank, run.world_size)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(6):
        xb, yb = batches.next()
        loss = (model(xb) - yb).pow(2).mean()  # a mean over this rank's share of the global batch
        optimiser.zero_grad()
        loss.backward()
        common.all_reduce_gradients(model)
        optimiser.step()
    if run.is_main:
        torch.save(model.state_dict(), f"{args.out}/weights.pt")
'''


def torchrun(script, *script_args, processes=2, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(script), *map(str, script_args)],
                          capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def test_two_ranks_of_batch_8_train_as_one_process_of_batch_16(tmp_path):
    """Each rank's mean-loss gradient over its 8 rows, averaged over 2 ranks, is the gradient over the global 16:
    after 6 SGD steps the weights equal those of one process with batch 16 (a sum instead of the average, or two
    ranks on the same rows, would not)."""
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    for name in ("two", "one"):
        (tmp_path / name).mkdir()
    result = torchrun(script, ROOT, 8, tmp_path / "two")
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run([sys.executable, str(script), str(ROOT), "16", str(tmp_path / "one")], capture_output=True,
                            text=True, timeout=120, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr[-2000:]
    two, one = (torch.load(tmp_path / name / "weights.pt", weights_only=True) for name in ("two", "one"))
    for key in one:
        assert torch.allclose(two[key], one[key], atol=1e-6), key
    start = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    assert not torch.allclose(start.state_dict()["0.weight"], one["0.weight"])  # it did train


ORACLE_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import common

url, sha256, data_dir, out = sys.argv[2:6]
common.ORACLE_SEQUENCES = 32
common.TEXT_SOURCES["oracle"]["files"]["params"] = [("target_params.npz", None, None),
                                                    ("target_params_py3.pkl", url, sha256)]
dist.init_process_group("gloo")
data = common.load_text_dataset("oracle", data_dir, oracle="paper")
torch.save({"train": data.train, "test": data.test}, f"{out}/rank{dist.get_rank()}.pt")
dist.barrier()
dist.destroy_process_group()
'''


def test_under_torchrun_the_oracle_is_downloaded_once_before_the_other_ranks_read_it(http_server, tmp_path):
    served, url = http_server
    params = {k: np.random.default_rng(0).standard_normal(
        (common.ORACLE_DIM, common.ORACLE_VOCAB) if k == "Wo" else (common.ORACLE_VOCAB, common.ORACLE_DIM)
        if k == "g_embeddings" else (common.ORACLE_VOCAB,) if k == "bo" else (common.ORACLE_DIM,) if k[0] == "b"
        else (common.ORACLE_DIM, common.ORACLE_DIM)).astype(np.float32) for k in common.ORACLE_KEYS}
    payload = pickle.dumps([params[k] for k in common.ORACLE_KEYS], protocol=2)
    (served / "target_params_py3.pkl").write_bytes(payload)
    script = tmp_path / "oracle_check.py"
    script.write_text(ORACLE_SCRIPT)
    result = torchrun(script, ROOT, url + "target_params_py3.pkl", hashlib.sha256(payload).hexdigest(),
                      tmp_path / "empty-data", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[0]["test"], ranks[1]["test"]) and ranks[0]["train"].shape == (32, 20)
    assert (tmp_path / "empty-data" / "seqgan-oracle" / "target_params.npz").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Ranges of flags; nearest-neighbour distances
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RangedArgs:
    count: int = 1
    rate: float = 0.1
    share: float = 0.5


@pytest.mark.parametrize("field, value, message", [
    ("count", 0, "--count must be at least 1, got 0"), ("rate", 0.0, "--rate must be positive, got 0.0"),
    ("rate", float("nan"), "--rate must be positive"), ("share", 1.0, "--share must be in [0, 1), got 1.0"),
    ("share", -0.1, "--share must be in [0, 1)")])
def test_check_ranges_names_the_flag_and_its_rule(field, value, message):
    common.check_ranges(RangedArgs(), at_least_1=("count",), positive=("rate",), fraction=("share",))
    with pytest.raises(ValueError, match=re.escape(message)):
        common.check_ranges(RangedArgs(**{field: value}), at_least_1=("count",), positive=("rate",),
                            fraction=("share",))


def test_nearest_neighbour_distances_against_brute_force():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8))
    test = torch.from_numpy(rng.integers(0, 256, (50, 1, 8, 8), dtype=np.uint8))
    samples = train.flip(0).clone()  # a G that copies its training images
    got = common.nearest_neighbour_distances(samples, train, test, "cpu", seed=3, count=20)
    picks = lambda n, s: torch.randperm(n, generator=torch.Generator().manual_seed(s)).numpy()  # noqa: E731
    test_sub = test.numpy()[picks(50, 3)[:20]].reshape(20, -1) / 255
    train_sub = train.numpy()[picks(40, 4)].reshape(40, -1) / 255
    fakes = samples.numpy().reshape(40, -1) / 255

    def mean_nearest(queries, keys):  # RMS per pixel to the nearest key, by brute force
        return np.mean([np.sqrt(((keys - q) ** 2).mean(1)).min() for q in queries])

    # torch.cdist's matrix-product form is off by ~1e-4 per pixel where a distance is 0 (a copy): a tolerance
    assert got["eval/nn_test_to_fake"] == pytest.approx(mean_nearest(test_sub, fakes), abs=5e-4)
    assert got["eval/nn_test_to_train"] == pytest.approx(mean_nearest(test_sub, train_sub), abs=5e-4)
    assert got["eval/nn_fake_to_train"] == pytest.approx(mean_nearest(fakes[:20], train_sub), abs=5e-4)
    assert mean_nearest(fakes[:20], train_sub) == 0 and got["eval/nn_test_to_train"] > 0.2


@pytest.mark.parametrize("module", ["dcgan", "vae", "flow", "glo", "seqgan_rl", "scratchgan"])
def test_every_flag_of_every_model_explains_itself(module):
    """--help has a line of text for every flag, taken from the comment beside its field."""
    args_cls = importlib.import_module(module).Args
    helps = {action.dest: action.help for action in common.build_parser(args_cls)._actions if action.dest != "help"}
    assert set(helps) == {f.name for f in dataclasses.fields(args_cls)}
    blank = [name for name, text in helps.items() if len(text.replace("(default:", "").split()) < 3]
    assert not blank, blank


def test_adam_is_torch_adam_with_the_fused_kernel_where_the_device_has_one():
    torch.manual_seed(0)
    start = torch.randn(50)
    target = torch.randn(50)

    def trajectory(make):
        w = torch.nn.Parameter(start.clone())
        optimiser = make([w])
        for _ in range(30):
            optimiser.zero_grad()
            ((w - target) ** 4).sum().backward()
            optimiser.step()
        return optimiser, w.detach()

    hyper = dict(lr=0.05, betas=(0.5, 0.99), eps=1e-6)
    fused, w_fused = trajectory(lambda params: common.adam(params, **hyper))
    _, w_plain = trajectory(lambda params: torch.optim.Adam(params, foreach=False, **hyper))
    assert fused.defaults["fused"] is True and fused.defaults["betas"] == (0.5, 0.99)
    assert torch.allclose(w_fused, w_plain, atol=1e-6) and not torch.allclose(w_fused, start, atol=1e-2)
    on_meta = common.adam([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1)
    assert not on_meta.defaults["fused"]  # no fused kernel there: the ordinary implementation
