"""minigen plumbing shared by the model files: arguments, runs, data, logging, checkpoints. It knows no model.

A model file declares its `Args` as a subclass of `RunArgs` and ends with `common.run_cli(main, Args)`; its `main` is
`with common.session(args, name) as run: ...`. Copy this file along with any one model file and it runs.

Contents, in order:
  Errors and arguments     UserError, RunArgs, check_ranges, parse_args (--resume takes the saved flags), run_cli
  Runs                     session (setup and restore), devices, seeds, AMP (bf16 on CUDA and the CPU), channels-last,
                           torchrun (DDP by hand), StopRequest, Clock, benchmarks (both precisions side by side,
                           FLOPs per step, the machine's matmul rate)
  Safe file I/O            atomic writes, downloads with pinned checksums, tar extraction, restricted unpickling
  Image datasets           MNIST, Fashion-MNIST, CIFAR-10, Stacked MNIST, image folders; Batches (images or tokens)
  Text datasets            COCO, EMNLP2017 (two preprocessings, never mixed), poems, files; the SeqGAN oracle; BLEU
                           and the other sample metrics; samples as lines of text
  Metrics                  MetricsLogger, nearest-neighbour distances, image grids, line plots
  Checkpoints              save / load / RNG state, Checkpoints (the last good checkpoint, divergence, Ctrl-C)
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pickle
import random
import signal
import struct
import sys
import tarfile
import time
import tokenize
import typing
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError


# ---------------------------------------------------------------------------------------------------------------
# Errors and arguments
# ---------------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """Something the user can fix (missing data, a bad flag, a corrupt file). `run_cli` prints it as one line."""


@dataclasses.dataclass
class RunArgs:
    """The flags every model file shares. Model files subclass this and may redeclare a field to change its default."""

    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | cifar10 | stacked-mnist | folder:PATH
    data_dir: str = dataclasses.field(default_factory=lambda: os.environ.get("MINIGEN_DATA") or "data")
    # where datasets live, as <data-dir>/<dataset>/<the source's file names> (default: $MINIGEN_DATA, else ./data)
    out: str = ""  # output folder (default: runs/<model>-<dataset>-<timestamp>; on --resume, the checkpoint's folder)
    seed: int = 0  # seeds python, numpy and torch; under torchrun rank r draws its noise with seed + r
    device: typing.Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto picks cuda, then mps, then cpu
    batch_size: int = 128  # per process
    epochs: int = 1  # passes over the training set
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no cap, run all epochs)
    log_every: int = 50  # steps between metrics lines (means over the interval)
    sample_every: int = 500  # steps between sample grids samples_<step>.png (0: only at the end)
    checkpoint_every: int = 500  # steps between checkpoint writes (one is always written at the end and on Ctrl-C)
    resume: str = ""  # a checkpoint.pt (or its folder) to continue; flags given with it override the saved ones
    amp: bool = False  # bf16 autocast on CUDA and on CPUs with bf16 instructions (likelihoods stay float32)
    compile: bool = False  # torch.compile the networks (first steps are slow while it compiles)
    deterministic: bool = False  # deterministic kernels: same seed, same bits (slower on CUDA)
    benchmark: bool = False  # time training steps on real and synthetic data, print steps/s and exit; writes nothing
    benchmark_steps: int = 30  # timed steps per data source for --benchmark (after a few untimed warm-up steps)

    def __post_init__(self):
        check_ranges(self, at_least_1=("batch_size", "epochs", "log_every", "benchmark_steps"),
                     at_least_0=("max_steps", "sample_every", "checkpoint_every"))


def check_ranges(args, at_least_1=(), at_least_0=(), positive=(), fraction=()) -> None:
    """Raise ValueError (parse_args turns it into an argparse error) for the first named flag out of its range;
    fraction means [0, 1). Written so that NaN fails every rule."""
    rules = ((at_least_1, lambda v: v >= 1, "be at least 1"), (at_least_0, lambda v: v >= 0, "be 0 or more"),
             (positive, lambda v: v > 0, "be positive"), (fraction, lambda v: 0 <= v < 1, "be in [0, 1)"))
    for names, holds, rule in rules:
        for name in names:
            if not holds(getattr(args, name)):
                raise ValueError(f"--{name.replace('_', '-')} must {rule}, got {getattr(args, name)}")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage of forty flags would bury it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_comments(cls) -> dict:
    """Help text for each dataclass field: the comment on its line, continued by comment-only lines directly below
    it (a comment after a blank line is a section heading, not help). Comments are found by tokenizing, so a '#'
    inside a default string is not one."""
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines(keepends=True) if dataclasses.is_dataclass(klass) else []
        except (OSError, TypeError):
            continue
        if not lines:
            continue
        tokens = list(tokenize.generate_tokens(iter(lines).__next__))
        notes = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
        layout = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        code = {t.start[0] for t in tokens if t.type not in layout}
        names = {f.name for f in dataclasses.fields(klass)}
        for number, line in enumerate(lines, 1):
            name = line[4:].split(":")[0] if line.startswith("    ") and not line[4].isspace() else ""
            if name in names:
                text, following = [notes.get(number, "")], number + 1
                while following in notes and following not in code:
                    text, following = text + [notes[following]], following + 1
                comments[name] = " ".join(text).strip()
    return comments


def build_parser(args_cls, prog=None) -> argparse.ArgumentParser:
    """argparse from a dataclass: kebab-case flags, help from the field comments, booleans as --x/--no-x."""
    module = sys.modules.get(args_cls.__module__)
    description = (inspect.getdoc(module) or "").split("\n\n")[0] if module else ""
    parser = _OneLineErrorParser(prog=prog, description=description)
    hints = typing.get_type_hints(args_cls)
    helps = _field_comments(args_cls)
    for f in dataclasses.fields(args_cls):
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = helps.get(f.name, "")
        if "default" not in text and default not in ("", None):  # the comment may say it better, as for --out
            text += f" (default: {default})"
        kwargs = dict(default=default, help=text.replace("%", "%%").strip() or " ", dest=f.name)
        if tp == typing.List[str]:  # the one positional kind: a list of words, as evaluate.py's run folders
            parser.add_argument(f.name, nargs="*", metavar=f.name.upper(), default=default, help=kwargs["help"])
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            parser.add_argument(flag, type=type(choices[0]), choices=choices, **kwargs)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, metavar=tp.__name__.upper(), **kwargs)
        else:
            raise TypeError(f"{args_cls.__name__}.{f.name}: unsupported flag type {tp}")
    return parser


def parse_args(args_cls, argv=None):
    """Parse the command line into `args_cls`. With --resume, the checkpoint's own arguments become the defaults, so
    `python dcgan.py --resume runs/x` continues run x as it was configured, and any flag given overrides."""
    parser = build_parser(args_cls)
    namespace = parser.parse_args(argv)
    if getattr(namespace, "resume", ""):
        try:
            saved = load_checkpoint(namespace.resume, map_location="cpu")["args"]
        except UserError as e:
            parser.error(str(e))
        known = {f.name for f in dataclasses.fields(args_cls)}
        saved = {k: v for k, v in saved.items() if k in known and k not in ("resume", "benchmark")}
        saved["out"] = str(checkpoint_path(namespace.resume).parent)
        parser.set_defaults(**saved)
        namespace = parser.parse_args(argv)
    try:
        return args_cls(**vars(namespace))
    except ValueError as e:
        parser.error(str(e))


def run_cli(main, args_cls, argv=None):
    """The entry point of every model file: parse flags, run main, and turn user errors into one line and exit 1."""
    args = parse_args(args_cls, argv)
    prog = Path(sys.argv[0]).name
    try:
        main(args)
    except UserError as e:
        if get_rank() == 0:
            discard_unused_run_folder()
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError in newer releases
        if get_rank() == 0:
            print(f"{prog}: error: out of memory on {args.device}; lower --batch-size", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before or after the training loop, which handles Ctrl-C itself
        if get_rank() == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# Runs: session (setup and restore), devices, seeds, AMP, compile, torchrun (DDP), Ctrl-C, timing
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What a model's main() needs to know about where and how it runs."""

    device: torch.device
    out: Path  # the output folder (created by rank 0 only; not created for --benchmark)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but CUDA is not available here; use --device cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps, but MPS is not available here; use --device cpu (or auto)")
    return torch.device(name)


def to_host_float64(t: torch.Tensor) -> torch.Tensor:
    """t as float64 on the CPU, where sums and factorisations that need float64 are done: MPS has no float64 at
    all, and these are small tensors (per-image totals, a covariance, a 1x1 convolution's matrix)."""
    return t.detach().to("cpu", torch.float64)


@contextlib.contextmanager
def exact_float32():
    """Matrix products and convolutions in full float32 inside the block. setup() turns TF32 on for CUDA training
    (10 mantissa bits, ~1e-3 relative error per product); a likelihood that users compare with published tables is
    evaluated without it. No effect on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _process_state() -> dict:
    """Everything setup() changes for the whole process, so that `import dcgan; dcgan.main(args)` leaves none of
    it behind: kernel choices, TF32, CUBLAS_WORKSPACE_CONFIG and every global RNG."""
    return {"deterministic": (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()),
            "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                      torch.backends.cudnn.allow_tf32),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "rng": rng_state()}


def _restore_process_state(state: dict) -> None:
    torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = state["cudnn"]
    if state["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state["cublas"]
    set_rng_state(state["rng"])


@contextlib.contextmanager
def session(args, model_name: str):
    """`with session(args, "dcgan") as run:` is a model's main(): setup() before, and after (errors and Ctrl-C
    included) the process group left and the process-wide state setup() changed put back as it was."""
    saved = _process_state()
    try:
        yield setup(args, model_name)
    finally:
        teardown()
        _restore_process_state(saved)


_CREATED_RUN_FOLDERS = []  # the folders setup() made for the current run: its output folder, then those above it


def discard_unused_run_folder() -> None:
    """After a user error, remove a folder that setup() made for this run and that holds nothing but its config.json
    (the run stopped before it wrote anything, e.g. on missing data), so that failed starts leave no clutter in runs/.
    A folder that existed before, or that holds any other file, is kept."""
    created, _CREATED_RUN_FOLDERS[:] = list(_CREATED_RUN_FOLDERS), []
    if not created or [p.name for p in created[0].iterdir()] != ["config.json"]:
        return
    (created[0] / "config.json").unlink()
    for folder in created:  # the output folder, then runs/ if mkdir made it and it is now empty
        if any(folder.iterdir()):
            break
        folder.rmdir()


def setup(args, model_name: str) -> Run:
    """Start a run: join the torchrun group if there is one, pick the device, seed, make the output folder, write
    config.json. Under torchrun, rank r seeds with seed + r (different noise per rank); call `broadcast_module` after
    building a network so that every rank starts from rank 0's weights."""
    rank, world_size, local_rank = 0, 1, 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    if device.type == "cpu":
        # Denormal floats flushed to zero, as TensorFlow (the reference code's framework) does on its CPU threads; on
        # x86 each operation on a denormal is many times slower. Adam's moments for parameters whose gradient stays 0
        # (embedding rows absent from a batch, dead filters) decay geometrically through that range: after 3,000
        # steps of seqgan_rl.py's paper-sized D, 940,000 of its Adam values were denormal and the step had slowed from
        # 23 to 20.5 steps/s (README, "float32 and bf16"). The setting is per thread, and the intra-op threads that
        # torch starts later inherit it; called before the first parallel operation, it covers all of them.
        torch.set_flush_denormal(True)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0's evaluations during training (--eval-every) keep the others waiting at their next collective;
        # NCCL's default 10 minutes would end the job. The final evaluation runs after the group is left (teardown).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    torch.use_deterministic_algorithms(args.deterministic)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the shapes never change, so autotuning pays once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed + rank)
    if args.amp and not bf16_supported(device):
        args.amp = False  # config.json then records what ran
        if rank == 0:
            print(f"note: --amp needs bf16 arithmetic, which this {device.type} lacks ({BF16_NEEDS[device.type]}); "
                  f"running in float32", file=sys.stderr)
    elif args.amp and device.type == "cpu" and not args.benchmark and rank == 0:
        bf16, float32 = matmul_rate(device, "bf16", 1024, 4), matmul_rate(device, "float32", 1024, 4)
        if bf16 < float32:  # AVX512-BF16 without AMX can lose to float32's FMA units (a virtual machine hides AMX)
            print(f"note: this CPU multiplies bf16 matrices at {bf16:.0f} GFLOP/s against {float32:.0f} in float32, "
                  f"so --amp is likely slower here; --benchmark times both", file=sys.stderr)

    out = Path(args.out or f"runs/{model_name}-{args.dataset.replace(':', '-').replace('/', '_')}-"
                           f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if rank == 0 and not args.benchmark:
        try:
            _CREATED_RUN_FOLDERS[:] = [folder for folder in [out, *out.parents] if not folder.exists()]
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output folder {out} ({e.strerror}); choose another with --out")
        config = {"model": model_name, "args": dataclasses.asdict(args), "device": str(device),
                  "world_size": world_size, "torch": torch.__version__, "command": " ".join(sys.argv),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    return Run(device=device, out=out, rank=rank, world_size=world_size)


def teardown() -> None:
    """Leave the process group, all ranks together after a normal finish: a rank that tears down while another is
    still in the last collective can abort the job under load (gloo: "terminate called without an active
    exception"). Model files call it right after their final checkpoint, so that rank 0 alone draws and evaluates
    afterwards, with no rank waiting for it. After an error no barrier: the other ranks may be elsewhere."""
    if dist.is_available() and dist.is_initialized():
        try:
            if sys.exc_info()[0] is None:  # called from a `finally`: is an exception on its way out?
                dist.barrier()
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first():
    """Under torchrun, rank 0 runs the block first (downloads, caches) and the other ranks after it, finding its
    files. Rank 0 releases them even when it fails, so that they report the missing file instead of hanging."""
    if not dist.is_initialized():
        yield
    elif get_rank() != 0:
        dist.barrier()
        yield
    else:
        try:
            yield
        finally:
            dist.barrier()


BF16_NEEDS = {"cuda": "compute capability 8.0 or later", "cpu": "AVX512-BF16 or AMX instructions",
              "mps": "--amp is not supported on mps"}


def bf16_supported(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices in hardware, so that --amp is faster and not an emulation. On the
    CPU, oneDNN's bf16 kernels need AVX512-BF16 or AMX (Intel Cooper Lake / Sapphire Rapids, AMD Zen 4 and later);
    without them torch still runs bf16, converting every operand, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID probes
        return torch.backends.mkldnn.is_available() and any(getattr(torch.cpu, name, lambda: False)()
                                                             for name in checks)
    return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA or the CPU when enabled (`setup` has turned --amp off where bf16 is not supported);
    otherwise a no-op context. bf16 keeps float32's exponent range, so it needs no loss scaling (no GradScaler).
    Autocast runs matrix products and convolutions in bf16 and keeps the ops it lists as precision-sensitive (the
    losses, linear algebra) in float32; each model file casts its likelihood terms to float32 itself as well."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last_on_cpu(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Convolution weights in NHWC order on the CPU, where oneDNN's convolutions skip a reorder per call in that
    layout: measured on 2 Xeon cores, 1.2x for dcgan.py's step at 64 px (float32 and bf16) and 1.25x for flow.py's
    defaults; glo.py's generator gained nothing and is left alone. The values are unchanged, so checkpoints load
    either way. On CUDA cuDNN picks its own layouts and the module is left as it is."""
    if device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps")  # where torch.optim.Adam(fused=True) has a kernel


def adam(params, **hyper) -> torch.optim.Adam:
    """torch.optim.Adam(params, **hyper), the same algorithm, with its fused kernel where the parameters' device has
    one: the update of every tensor in one call, not a dozen elementwise passes per tensor. On 2 CPU cores the
    unfused update was half of the time of seqgan_rl.py's paper-sized D step under --amp (README, "float32 and
    bf16"). Elsewhere (a meta device in the tests) the ordinary implementation runs."""
    params = list(params)
    fused = all(p.device.type in FUSED_ADAM_DEVICES for p in params)
    return torch.optim.Adam(params, fused=fused, **hyper)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Compile in place (module.compile), so the state_dict keys and the module object stay the same."""
    if enabled:
        module.compile()
    return module


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (DDP does this in its constructor; we do it by hand)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Average gradients over ranks, as DDP would. Done by hand because a GAN step calls D several times and takes
    gradients of gradients (R1, WGAN-GP), which DDP's hooks do not support."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one message instead of one per tensor
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is True on any rank, so that all ranks leave a loop at the same step."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag that the training loop checks between steps, so the checkpoint it
    then writes is never from the middle of a step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if get_rank() == 0:
            print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def __call__(self, device: torch.device) -> bool:
        """True if any rank was asked to stop (all ranks must leave the loop at the same step)."""
        return any_rank(self.requested, device)


class Clock:
    """Seconds since the last call, with the device's queued work waited for, so that a split of time between the
    parts of a step is true on a GPU too."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.sync()
        self.last = time.perf_counter()

    def __call__(self) -> float:
        self.sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def benchmark_training(train_step, real_batch, synthetic_batch, steps: int, device: torch.device,
                       warmup: int = 3) -> dict:
    """--benchmark: steps/s of `train_step(next_batch, step)` fed by real batches and by synthetic tensors of the
    same shape, each timed after `warmup` untimed steps (allocator, cudnn autotuning, compilation), and the share of
    the real run spent fetching batches (it should stay under 5%). Returns {"real", "synthetic", "fetch_share"}."""
    clock, fetch = Clock(device), [0.0]

    def timed_real_batch():
        fetching = Clock(device)
        batch = real_batch()
        fetch[0] += fetching()
        return batch

    rates = {}
    for name, next_batch in (("real", timed_real_batch), ("synthetic", synthetic_batch)):
        for step in range(warmup):
            train_step(next_batch, step)
        clock()
        fetch[0] = 0.0
        for step in range(steps):
            train_step(next_batch, step)
        elapsed = clock()
        rates[name] = steps / elapsed
        if name == "real":
            rates["fetch_share"] = fetch[0] / elapsed
    return rates


def count_flops(fn) -> int:
    """Floating-point operations of one call of `fn` (matrix products and convolutions, forward and backward, the
    work that dominates these models), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode  # imported here: it loads torch's op registry
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


_MATMUL_RATES = {}


def matmul_rate(device: torch.device, precision: str, size: int = 2048, calls: int = 10) -> float:
    """GFLOP/s of a size x size matrix product in `precision` ("float32" or "bf16") on `device`: the machine's own
    ceiling, against which --benchmark puts a training step's achieved rate. Measured once per process."""
    key = (str(device), precision, size)
    if key not in _MATMUL_RATES:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        a @ b  # the first call loads kernels and warms the caches
        best = float("inf")
        for _ in range(3):  # the best of 3 rounds: another process's burst slows one round, not the ceiling
            clock = Clock(device)
            for _ in range(calls):
                a @ b
            best = min(best, clock())
        _MATMUL_RATES[key] = 2 * size ** 3 * calls / best / 1e9
    return _MATMUL_RATES[key]


def benchmark_precisions(measure, args, device: torch.device, rounds: int = 2) -> dict:
    """--benchmark in both precisions side by side: `measure()` (which reads args.amp) in float32 and, where the
    device supports it, under --amp (bf16 autocast), alternating `rounds` times so that a change in the machine's
    load falls on both; each precision keeps its fastest round, judged by the first value `measure` returns.
    Returns {"float32": result, "bf16": result} (no "bf16" without support; `setup` has said so)."""
    precisions = ["float32"] + (["bf16"] if bf16_supported(device) else [])
    saved, results = args.amp, {}
    try:
        for _ in range(rounds):
            for precision in precisions:
                args.amp = precision == "bf16"
                result = measure()
                first = next(iter(result))
                if precision not in results or result[first] > results[precision][first]:
                    results[precision] = result
    finally:
        args.amp = saved
    return results


def precision_lines(results: dict, rate_key: str, flops_per_step: int, device: torch.device, describe) -> list:
    """One line per precision: `describe(result)`, then the step's achieved GFLOP/s (`flops_per_step` at
    result[rate_key] steps/s) as a share of this machine's matrix-product rate in the same precision, and for bf16
    its speed-up over float32 measured in the same run."""
    lines = []
    for precision, result in results.items():
        achieved = flops_per_step * result[rate_key] / 1e9
        peak = matmul_rate(device, precision)
        line = (f"{precision + (' (--amp)' if precision == 'bf16' else '')}: {describe(result)} | "
                f"{flops_per_step / 1e9:.1f} GFLOP per step, {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of "
                f"this {device.type}'s {precision} 2048x2048 matmul ({peak:.0f} GFLOP/s)")
        if precision == "bf16":
            line += f" | {result[rate_key] / results['float32'][rate_key]:.2f}x float32"
        lines.append(line)
    return lines


def benchmark_in_both_precisions(train_step, real_batch, synthetic_batch, args, device: torch.device,
                                 items_per_step: int, unit: str = "images", extra=None) -> list:
    """The --benchmark of a model whose step is `train_step(next_batch, step)`: the FLOPs of one float32 step,
    then `benchmark_training` in float32 and under --amp side by side (`benchmark_precisions`), one report line per
    precision (`precision_lines`). `extra()`, when given, measures more in the same precision and returns text."""
    saved, args.amp = args.amp, False
    flops = count_flops(lambda: train_step(synthetic_batch, 0))
    args.amp = saved

    def measure():
        rates = benchmark_training(train_step, real_batch, synthetic_batch, args.benchmark_steps, device)
        rates["text"] = format_rates(rates, items_per_step, unit) + (f" | {extra()}" if extra else "")
        return rates

    results = benchmark_precisions(measure, args, device)
    return precision_lines(results, "real", flops, device, lambda rates: rates["text"])


def format_rates(rates: dict, items_per_step: int, unit: str = "images") -> str:
    return (f"real data: {rates['real']:.2f} steps/s, {rates['real'] * items_per_step:.0f} {unit}/s | synthetic: "
            f"{rates['synthetic']:.2f} steps/s, {rates['synthetic'] * items_per_step:.0f} {unit}/s | data loading "
            f"{100 * rates['fetch_share']:.1f}% of step time")


# ---------------------------------------------------------------------------------------------------------------
# Safe file I/O: atomic writes, downloads with pinned checksums, archives, restricted unpickling
# ---------------------------------------------------------------------------------------------------------------

def atomic_write(path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`: a reader (or a crash) never
    sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def download(urls, dest, sha256: typing.Optional[str], timeout: float = 60.0) -> Path:
    """Fetch the first of `urls` that works into `dest`, checking its sha256 (None: the source publishes no checksum;
    the digest is printed instead). Written to a temporary file and renamed only after the checksum matches (and the
    length is complete), so a failure never leaves a partial or wrong file at `dest`."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest.parent} to download {dest.name} into ({e.strerror}); "
                        f"pass a writable --data-dir")
    failures = []
    for url in urls:
        tmp = dest.with_name(f".{dest.name}.part{os.getpid()}")
        try:
            digest, done, last_report = hashlib.sha256(), 0, 0.0
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0)
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if sys.stderr.isatty() and time.time() - last_report > 0.5:
                        last_report = time.time()
                        share = f" {100 * done / total:.0f}%" if total else ""
                        print(f"\rdownloading {url}: {done / 2**20:.1f} MiB{share}", end="", file=sys.stderr)
            if total and done != total:
                failures.append(f"{url}: connection closed after {done} of {total} bytes")
                continue
            if sha256 is not None and digest.hexdigest() != sha256:
                failures.append(f"{url}: checksum mismatch (sha256 {digest.hexdigest()[:16]}…, "
                                f"expected {sha256[:16]}…)")
                continue
            os.replace(tmp, dest)
            unpinned = "" if sha256 else f", sha256 {digest.hexdigest()} (the source publishes none)"
            print(f"\rdownloaded {url} -> {dest} ({done / 2**20:.1f} MiB{unpinned})", file=sys.stderr)
            return dest
        except urllib.error.HTTPError as e:
            failures.append(f"{url}: HTTP {e.code}")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(f"could not download {dest.name} ({'; '.join(failures)}); "
                    f"download it by hand and put it at {dest}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only containers of numpy arrays: the classes and functions numpy's array pickles reference, and
    nothing else. A plain pickle.load on downloaded bytes would run whatever callable the file names."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # protocol 5 (Python 3.14's default) writes an array as _frombuffer(buffer, dtype, shape, order)
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 pickles: encode(str, "latin1")
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core to numpy._core; old pickles use the former
            module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


def restricted_load(data: bytes, encoding: str = "bytes"):
    """Load a pickle of plain containers and numpy arrays (encoding="bytes" reads Python 2 pickles such as CIFAR's)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def safe_extract(archive, members, dest) -> None:
    """Extract `members` (regular files) from a tar archive into `dest`. Refuses the whole archive if any member
    has an absolute path, a '..' component or is a link or device, so nothing can be written outside `dest`."""
    dest = Path(dest)
    try:
        with tarfile.open(archive) as tar:
            entries = tar.getmembers()
            for m in entries:
                parts = Path(m.name).parts
                if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
                    raise UserError(f"{archive}: refusing archive with unsafe member path {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise UserError(f"{archive}: refusing archive with link or special member {m.name!r}")
            by_name = {m.name: m for m in entries}
            missing = [name for name in members if name not in by_name]
            if missing:
                raise UserError(f"{archive}: missing {', '.join(missing)}; delete it to download it again")
            for name in members:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(by_name[name])
                atomic_write(target, lambda f: f.write(source.read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{archive}: not a readable tar archive ({e}); delete it to download it again")


def read_idx(path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (MNIST's format, gzipped or not): magic 0x0000 08 <ndim>, then ndim
    big-endian uint32 sizes, then the bytes."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it to download it again, or replace it")
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex() or 'empty'}); replace it")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise UserError(f"{path}: truncated IDX header; delete it to download it again, or replace it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path}: IDX header says {shape} ({header + math.prod(shape)} bytes) but the file has "
                        f"{len(data)}; delete it to download it again, or replace it")
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape)  # bytearray: writable


# ---------------------------------------------------------------------------------------------------------------
# Image datasets: each loaded once into a uint8 tensor N x C x H x W, batched by random permutation
# ---------------------------------------------------------------------------------------------------------------

IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

# Where each dataset comes from. Checksums are sha256 of the files as the sources publish them.
SOURCES = {
    "mnist": {
        "folder": "mnist",
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        "sha256": {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        "system_dirs": [],
    },
    "fashion-mnist": {
        "folder": "fashion-mnist",
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "sha256": {
            "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf"},
        # Debian/Ubuntu's dataset-fashion-mnist package (recompressed, so its checksums differ; parsed and checked
        # for shape like any local file)
        "system_dirs": ["/usr/share/datasets/fashion-mnist"],
    },
    "cifar10": {
        "folder": "cifar10",
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "sha256": {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
        "system_dirs": [],
    },
}
CIFAR_MEMBERS = {"train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
                 "test": ["cifar-10-batches-py/test_batch"]}
IMAGE_DATASETS = ("fashion-mnist", "mnist", "cifar10", "stacked-mnist", "folder:PATH")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
STACKED_MNIST_SIZE = {"train": 60_000, "test": 10_000}  # as many stacks as MNIST has digits, one epoch the same


@dataclasses.dataclass
class ImageData:
    images: torch.Tensor  # uint8, N x C x H x W, values 0..255
    labels: typing.Optional[torch.Tensor]  # int64, N (None when the source has no labels)
    num_classes: int  # 0 when unlabelled
    name: str


def check_image_dataset(name: str) -> None:
    """Raise ValueError (an argparse error from parse_args) for an unknown image dataset name."""
    known = name in IMAGE_DATASETS and name != "folder:PATH"
    if not (known or (name.startswith("folder:") and len(name) > len("folder:"))):
        raise ValueError(f"--dataset {name!r} is not one of {', '.join(IMAGE_DATASETS)}")


def find_or_download(dataset: str, filename: str, data_dir) -> Path:
    """A source file in <data-dir>/<folder>/ (gzipped or not), else in a system location, else downloaded."""
    source = SOURCES[dataset]
    local = Path(data_dir) / source["folder"]
    for folder in [local] + [Path(d) for d in source["system_dirs"]]:
        for candidate in (folder / filename, folder / filename.removesuffix(".gz")):
            if candidate.is_file():
                return candidate
    if get_rank() != 0:
        raise UserError(f"{filename} is missing; rank 0 should have downloaded it")
    return download([m + filename for m in source["mirrors"]], local / filename, source["sha256"][filename])


def _load_idx_pair(dataset: str, split: str, data_dir):
    image_file, label_file = IDX_FILES[split]
    images = read_idx(find_or_download(dataset, image_file, data_dir))
    labels = read_idx(find_or_download(dataset, label_file, data_dir))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{dataset} {split}: images {images.shape} and labels {labels.shape} do not match; "
                        f"replace the files in {Path(data_dir) / SOURCES[dataset]['folder']}")
    return images[:, None], labels.astype(np.int64)  # N x 1 x 28 x 28


def _load_cifar10(split: str, data_dir):
    folder = Path(data_dir) / "cifar10"
    if not all((folder / m).is_file() for m in CIFAR_MEMBERS[split]):
        archive = find_or_download("cifar10", "cifar-10-python.tar.gz", data_dir)
        safe_extract(archive, CIFAR_MEMBERS["train"] + CIFAR_MEMBERS["test"], folder)
    images, labels = [], []
    for member in CIFAR_MEMBERS[split]:
        try:
            batch = restricted_load((folder / member).read_bytes())
            data, batch_labels = batch[b"data"], batch[b"labels"]
        except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as e:
            raise UserError(f"{folder / member}: not a CIFAR-10 batch ({e}); delete {folder} to extract it again")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
            raise UserError(f"{folder / member}: unexpected data {getattr(data, 'shape', None)}; delete {folder}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R (1024), G, B planes of a 32x32 image
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _load_stacked_mnist(split: str, data_dir):
    """Stacked MNIST (Metz et al. 2017, Unrolled GAN §3.3; VEEGAN; PacGAN): three MNIST digits drawn at random as the
    R, G and B channels, so there are 10^3 = 1,000 modes; the label is the mode 100*a + 10*b + c. The draw is fixed
    (not --seed) so that every run sees the same dataset."""
    digits, digit_labels = _load_idx_pair("mnist", split, data_dir)
    rng = np.random.default_rng(2017 if split == "train" else 2018)
    picks = rng.integers(0, len(digits), size=(STACKED_MNIST_SIZE[split], 3))
    images = digits[picks, 0]  # N x 3 x 28 x 28
    labels = digit_labels[picks] @ np.array([100, 10, 1])
    return np.ascontiguousarray(images), labels


def _folder_images(root: Path):
    """(relative path, file) for every file under root, sorted, and how many files were skipped as non-images."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, len(files) - len(images)


def _load_folder(root: Path, image_size: int, cache_dirs):
    """Any tree of images, each resized (shorter side) and centre-cropped to image_size with Pillow. Labels are the
    first-level subfolder names when every image lies in one. The decoded array is cached as one .npz, keyed by the
    file list, sizes and modification times, so a second run skips decoding."""
    if not root.is_dir():
        raise UserError(f"--dataset folder:{root}: no such directory")
    files, skipped = _folder_images(root)
    key = hashlib.sha256(json.dumps([str(root.resolve()), image_size] + [
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()).hexdigest()[:16]
    for cache_dir in cache_dirs:
        cached = Path(cache_dir) / f"folder-{key}.npz"
        if cached.is_file():
            with np.load(cached, allow_pickle=False) as z:
                names = [str(n) for n in z["class_names"]]
                return z["images"], (z["labels"] if names else None), names
    decoded, kept, unreadable = [], [], 0
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                decoded.append(im.copy())
                kept.append(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            unreadable += 1
    if not decoded:
        raise UserError(f"--dataset folder:{root}: no readable images found "
                        f"({skipped + unreadable} other files; looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    grey = all(im.mode in ("1", "L", "I", "I;16", "F") for im in decoded)
    array = np.stack([_resize_crop(im.convert("L" if grey else "RGB"), image_size) for im in decoded])
    array = array[:, None] if grey else array.transpose(0, 3, 1, 2)  # N x C x H x W
    top = [p.relative_to(root).parts for p in kept]
    names = sorted({parts[0] for parts in top}) if all(len(parts) > 1 for parts in top) else []
    labels = np.array([names.index(parts[0]) for parts in top], dtype=np.int64) if names else None
    if get_rank() == 0:
        print(f"folder {root}: {len(decoded)} images, {skipped + unreadable} files skipped "
              f"({skipped} not images, {unreadable} unreadable)", file=sys.stderr)
    for cache_dir in cache_dirs:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(cache_dir) / f"folder-{key}.npz", lambda f: np.savez(
                f, images=array, labels=labels if labels is not None else np.zeros(0, np.int64),
                class_names=np.array(names, dtype=str)))
            break
        except OSError:
            continue  # a read-only data dir: try the next place
    return array, labels, names


def _resize_crop(im: Image.Image, size: int) -> np.ndarray:
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bring uint8 N x C x h x w images to size x size, once at load time. 28 px digits going to 32 px are padded
    with black (the LeNet convention: no interpolation blur); any other change is an antialiased bilinear resize."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h == w and h < size <= h + 4:
        before = (size - h) // 2
        return F.pad(images, (before, size - h - before, before, size - h - before))
    chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
              .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(4096)]
    return torch.cat(chunks)


def load_image_dataset(name: str, data_dir, image_size: int, split: str = "train", cache_dir=None) -> ImageData:
    """Load `name` ('fashion-mnist', 'mnist', 'cifar10', 'stacked-mnist' or 'folder:PATH') as uint8 N x C x H x W at
    image_size. Under torchrun, rank 0 downloads first while the others wait."""
    try:
        check_image_dataset(name)
    except ValueError as e:
        raise UserError(str(e))
    with rank_zero_first():
        if name in ("fashion-mnist", "mnist"):
            (images, labels), num_classes = _load_idx_pair(name, split, data_dir), 10
        elif name == "cifar10":
            (images, labels), num_classes = _load_cifar10(split, data_dir), 10
        elif name == "stacked-mnist":
            (images, labels), num_classes = _load_stacked_mnist(split, data_dir), 1000
        else:
            caches = [Path(data_dir) / "folder-cache"] + ([Path(cache_dir)] if cache_dir else [])
            images, labels, class_names = _load_folder(Path(name[len("folder:"):]), image_size, caches)
            num_classes = len(class_names)
    tensor = resize_images(torch.from_numpy(np.ascontiguousarray(images)), image_size)
    label_tensor = torch.from_numpy(labels) if labels is not None else None
    return ImageData(tensor, label_tensor, num_classes if labels is not None else 0, name)


def epoch_permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: drawn from (seed, epoch) alone, so (epoch, index) is a batcher's whole state."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Batches:
    """Minibatches of the rows of one or more tensors of equal length (images and labels, or token rows), by a
    random permutation per epoch, kept on the device when they fit there (no host transfer per batch).

    The permutation of epoch e is drawn from a generator seeded by (seed, e), so the position (epoch, batch index) is
    the whole state: a resumed run sees exactly the batches the uninterrupted run would have. Under torchrun each
    rank takes its own slice of every global batch. Partial last batches are dropped (BatchNorm dislikes tiny ones).
    `next()` returns one batch per tensor, None where a tensor is None (an unlabelled dataset's labels)."""

    def __init__(self, tensors: tuple, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, what: str = "rows"):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        count = len(tensors[0])
        self.steps_per_epoch = count // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"{count} {what} are fewer than one batch of {batch_size * world_size}; lower "
                            f"--batch-size")
        size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        on_device = device.type != "cuda" or size < 0.25 * torch.cuda.mem_get_info(device)[0]
        self.storage, self.device = (device if on_device else torch.device("cpu")), device
        self.tensors = [t.to(self.storage) if t is not None else None for t in tensors]
        self.epoch, self.index, self._order = 0, 0, None

    def next(self) -> tuple:
        if self.index == self.steps_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_permutation(len(self.tensors[0]), self.seed, self.epoch).to(self.storage)
        start = (self.index * self.world_size + self.rank) * self.batch_size
        idx = self._order[start:start + self.batch_size]
        self.index += 1
        return tuple(t[idx].to(self.device, non_blocking=True) if t is not None else None for t in self.tensors)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = state["epoch"], state["index"], None


# ---------------------------------------------------------------------------------------------------------------
# Text datasets, the SeqGAN oracle, BLEU
# ---------------------------------------------------------------------------------------------------------------

# Where each text dataset comes from: file names as the sources publish them, in <data-dir>/<folder>/. A dataset's
# splits are one unit, one preprocessing: a folder that holds some of them and not the others is refused, never
# completed from another source.
TEXYGEN = "https://raw.githubusercontent.com/geek-ai/Texygen/3104e22ac75f3cc2070da2bf5e2da6d2bef149ad/data/"
SEQGAN = "https://raw.githubusercontent.com/LantaoYu/SeqGAN/"
SCRATCHGAN = "https://storage.googleapis.com/deepmind-scratchgan-data/"
SCRATCHGAN_SMALL = ("https://raw.githubusercontent.com/SCAuFish/ScratchGan-/9b1978b71799522f7a89d789154a5fbac3bb439c/"
                    "scratchgan/small_data/")
TEXT_SOURCES = {
    # the COCO-captions split of Texygen, RelGAN and TextGAN (byte-identical files in all three)
    "coco": {"folder": "coco-captions", "files": {
        "train": [("image_coco.txt", TEXYGEN + "image_coco.txt",
                   "2c0fd1f0f43aac6a9dc3926a535516ccf395de535e15ac1fd17cd569420736f5")],
        "test": [("test_coco.txt", TEXYGEN + "testdata/test_coco.txt",
                  "72e25c9fb4d2cd43182ac602c92f6ffc377762147f9709572943b0b09174bcae")]}},
    # EMNLP2017 WMT News as ScratchGAN preprocessed it (JSON lists of {"s": sentence, "t": titles}), with the valid
    # split it evaluates on; DeepMind's bucket publishes no checksums, so the sha256 of a download is printed
    "emnlp2017": {"folder": "emnlp2017-news", "files": {
        split: [(f"{split}.json", SCRATCHGAN + f"{split}.json", None)] for split in ("train", "valid", "test")}},
    # the same preprocessing with a 12,500-sentence training subset (small_data/ of a fork of the official code,
    # sha256 pinned) and the full valid and test splits: a reduced run, which its name says
    "emnlp2017-small": {"folder": "emnlp2017-news", "files": {
        "train": [("small_data/train.json", SCRATCHGAN_SMALL + "train.json",
                   "c16734a86ddffe2cdb206205212dfe84d39df1ebe5a36158b04f1114504b8640")],
        "valid": [("valid.json", SCRATCHGAN_SMALL + "valid.json",
                   "c7146d0a9d1e0fd05a1ef206b6c799b3fad24a134ce3cde2e68ace1fbfee959b")],
        "test": [("test.json", SCRATCHGAN_SMALL + "test.json",
                  "c9b20e6483b36d5998df19af9e228551e1d1209bb6598aa5a6d9ed88938cd331")]}},
    # the same corpus as Texygen, RelGAN and LeakGAN preprocessed it, one sentence per line (emnlp_news.txt's sha256
    # is not published: its git blob is 538653e5f946b6f76e2b729c5aaa7507152354a3)
    "emnlp2017-texygen": {"folder": "emnlp2017-news", "files": {
        "train": [("emnlp_news.txt", TEXYGEN + "emnlp_news.txt", None)],
        "test": [("test_emnlp.txt", TEXYGEN + "testdata/test_emnlp.txt",
                  "03c646d08f766f4140443db4419b1f0ee292bc0db514208873e9f2e166b95bd2")]}},
    # SeqGAN's Chinese quatrains (16,394 poems, characters separated by spaces); one file, so a held-out split is cut
    "poems": {"folder": "chinese-poems", "files": {
        "all": [("shi.txt", TEXYGEN + "shi.txt",
                 "ac03c5fbb07776f0e43cb1ccfc74732f5313ab3d832df81c8e0db327df35e666")]}},
    # SeqGAN's oracle: its parameters (a list of 15 float32 arrays, pickled, or our .npz of them: the first found)
    "oracle": {"folder": "seqgan-oracle", "files": {
        "params": [("target_params.npz", None, None),
                   ("target_params_py3.pkl", SEQGAN + "e2b52fb6309851b14765290e8a972ccac09f1bec/save/"
                    "target_params_py3.pkl", "5ac794a695dd6e0eb2bb689f3dfda55e4e0053e8c0399e6242630a95f1e60e8a")],
        # real_data.txt (MLE_SeqGAN/save/ at commit 4152436) is used when present; else the oracle draws afresh
        "train": [("real_data.txt", None, None)]}},
}
TEXT_DATASETS = ("oracle", "coco", "emnlp2017", "emnlp2017-small", "emnlp2017-texygen", "poems", "file:PATH")
SCRATCHGAN_JSON = ("emnlp2017", "emnlp2017-small")  # ScratchGAN's reader.py: 52 tokens, a vocabulary of 20,000
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# the oracle's arrays in the order of the pickled list (SeqGAN target_lstm.py), with their shapes
ORACLE_KEYS = ("g_embeddings", "Wi", "Ui", "bi", "Wf", "Uf", "bf", "Wog", "Uog", "bog", "Wc", "Uc", "bc", "Wo", "bo")
ORACLE_VOCAB, ORACLE_DIM, ORACLE_LENGTH = 5000, 32, 20
HELD_OUT_FRACTION = 0.1  # test share cut from a source that has no test split (poems, file:PATH)


def check_text_dataset(name: str) -> None:
    """Raise ValueError (an argparse error from parse_args) for an unknown text dataset name."""
    known = name in TEXT_DATASETS and name != "file:PATH"
    if not (known or (name.startswith("file:") and len(name) > len("file:"))):
        raise ValueError(f"--dataset {name!r} is not one of {', '.join(TEXT_DATASETS)}")


def find_or_download_text(dataset: str, part: str, data_dir) -> Path:
    """The first file of TEXT_SOURCES[dataset][part] present in <data-dir>/<folder>/, else the first downloadable."""
    source = TEXT_SOURCES[dataset]
    folder = Path(data_dir) / source["folder"]
    candidates = source["files"][part]
    for filename, _, _ in candidates:
        if (folder / filename).is_file():
            return folder / filename
    if get_rank() != 0:
        raise UserError(f"{folder} has no {part} file; rank 0 should have downloaded it")
    names = " or ".join(name for name, _, _ in candidates)
    failures = []
    for filename, url, sha256 in candidates:
        if url is None:
            continue
        try:
            return download([url], folder / filename, sha256)
        except UserError as e:
            failures.append(str(e))
    raise UserError(f"{folder} has no {names} and downloading failed ({'; '.join(failures)[:300]}); "
                    f"put the file there or pass --data-dir")


def text_unit(dataset: str, data_dir) -> dict:
    """{split: path} for every split of `dataset`, all found in its folder or all downloaded. A folder holding only
    some of them is refused: the missing split must come from the same preprocessing (where to get it is said)."""
    folder = Path(data_dir) / TEXT_SOURCES[dataset]["folder"]
    files = {split: entries[0] for split, entries in TEXT_SOURCES[dataset]["files"].items()}
    present = [split for split, (name, _, _) in files.items() if (folder / name).is_file()]
    if present and len(present) < len(files):
        split, (name, url, _) = next((s, f) for s, f in files.items() if s not in present)
        have = ", ".join(files[s][0] for s in present)
        raise UserError(f"{folder} holds {have} of {dataset} but not {name}, its {split} split; get it from {url} "
                        f"(the splits of one preprocessing are never mixed with another's)")
    return {split: find_or_download_text(dataset, split, data_dir) for split in files}


def read_lines(path) -> list:
    """Non-empty lines of a UTF-8 text file, with trailing whitespace (the sources' padding spaces) stripped."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it or pass another file")
    lines = [line.rstrip() for line in text.split("\n")]
    return [line for line in lines if line]


def _read_scratchgan_json(path) -> list:
    try:
        records = json.loads(Path(path).read_bytes().decode("utf-8"))
        return [r["s"].strip() for r in records if r["s"].strip()]
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path} is not ScratchGAN's JSON (a list of {{\"s\": sentence}}): {e}; delete it to "
                        f"download it again")


@dataclasses.dataclass
class Vocabulary:
    """Token <-> id. Ids 0-3 are PAD, BOS, EOS, UNK when `specials` (real text); the oracle's vocabulary is just the
    ids 0..4999 as strings, with no specials: its token 0 is both the start input and an ordinary token."""
    tokens: list
    specials: bool = True

    def __post_init__(self):
        self.index = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def build(cls, sentences: list, max_size: int = 0) -> "Vocabulary":
        """From tokenised sentences: the most frequent tokens first (ties alphabetical), capped at max_size ids in
        all (0: no cap); the rest become UNK."""
        counts = collections.Counter(token for sentence in sentences for token in sentence)
        ranked = sorted(counts, key=lambda token: (-counts[token], token))
        specials = [PAD, BOS, EOS, UNK]
        ranked = [t for t in ranked if t not in specials]
        if max_size:
            ranked = ranked[:max(0, max_size - len(specials))]
        return cls(specials + ranked)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list) -> list:
        if not self.specials:
            return [self.index[t] for t in tokens]
        unk = self.index[UNK]
        return [self.index.get(t, unk) for t in tokens]

    def decode(self, ids) -> list:
        """Ids to tokens, up to the first EOS (or PAD), for real text; every id for the oracle."""
        out = []
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if self.specials and i in (0, 2):  # PAD, EOS end the sentence
                break
            if not (self.specials and i == 1):
                out.append(self.tokens[i])
        return out


@dataclasses.dataclass
class TextData:
    train: torch.Tensor  # int64, N x T token ids: a sentence, then EOS, then PAD (real text); T tokens (oracle)
    test: torch.Tensor  # int64, M x T, the held-out split, same layout
    vocab: Vocabulary
    start_token: int  # the generator's first input: BOS for real text, token 0 for the oracle (SeqGAN)
    name: str
    test_sentences: list  # the held-out split as token lists, before vocabulary capping (BLEU references)
    oracle: typing.Optional["SeqGANOracle"] = None
    valid: typing.Optional[torch.Tensor] = None  # a validation split, where the source has one (emnlp2017)
    valid_sentences: typing.Optional[list] = None

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def scored(self, tokens: torch.Tensor) -> torch.Tensor:
        """The targets an NLL over held-out real text counts: the words and EOS, not the PAD after EOS, nor <unk>,
        which stands for every word the training split lacks: the model was never trained to emit it there, so
        counting it would add the out-of-vocabulary rate to the NLL. Every token of the oracle counts."""
        if not self.vocab.specials:
            return torch.ones_like(tokens, dtype=torch.bool)
        return (tokens != self.vocab.index[PAD]) & (tokens != self.vocab.index[UNK])

    def oov_rate(self, tokens: torch.Tensor) -> float:
        """The share of the tokens before PAD (words and EOS) that are <unk>: what NLL-test leaves out."""
        if not self.vocab.specials:
            return 0.0
        return ((tokens == self.vocab.index[UNK]).sum() / (tokens != self.vocab.index[PAD]).sum()).item()


def tokenize_line(line: str, lower: bool = False) -> list:
    """Whitespace tokens. The sources come tokenised (words and punctuation, or one Chinese character per token)."""
    return (line.lower() if lower else line).split()


def encode_sentences(sentences: list, vocab: Vocabulary, max_len: int) -> torch.Tensor:
    """N x max_len ids: each sentence's ids, EOS, then PAD. Sentences must fit (max_len - 1 tokens at most)."""
    out = torch.zeros(len(sentences), max_len, dtype=torch.int64)  # PAD = 0
    for row, sentence in enumerate(sentences):
        ids = vocab.encode(sentence) + [vocab.index[EOS]]
        out[row, :len(ids)] = torch.tensor(ids)
    return out


def _held_out_split(sentences: list) -> tuple:
    """A fixed split (the same for every seed, so test numbers compare across runs): HELD_OUT_FRACTION as test."""
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(20170204)).tolist()
    count = max(1, round(HELD_OUT_FRACTION * len(sentences)))
    return [sentences[i] for i in order[count:]], [sentences[i] for i in order[:count]]


def load_text_dataset(name: str, data_dir, max_len: int = 0, vocab_size: int = 0, lower: bool = False,
                      oracle: str = "paper", seed: int = 0, device="cpu") -> TextData:
    """Load 'oracle', 'coco', 'emnlp2017'(-small), 'emnlp2017-texygen', 'poems' or 'file:PATH'. Real text: whitespace
    tokens, a vocabulary from the training split capped at vocab_size, sentences of up to max_len - 1 tokens plus
    EOS (0: room for the longest sentence of any split; longer ones are dropped, and the count is printed). 'oracle'
    ignores those and uses `oracle` ('paper' or 'random'), seeded by `seed` when random. Under torchrun, rank 0
    downloads first while the others wait."""
    try:
        check_text_dataset(name)
    except ValueError as e:
        raise UserError(str(e))
    with rank_zero_first():
        if name == "oracle":
            return _oracle_dataset(oracle, data_dir, seed, device)
        if name.startswith("file:"):
            path = Path(name[len("file:"):])
            if not path.is_file():
                raise UserError(f"{path}: no such file; --dataset file:PATH needs a text file, one sentence per line")
            splits = dict(zip(("train", "test"), _held_out_split(read_lines(path))))
        elif name == "poems":
            splits = dict(zip(("train", "test"), _held_out_split(read_lines(text_unit("poems", data_dir)["all"]))))
        else:
            splits = {split: _read_scratchgan_json(path) if path.suffix == ".json" else read_lines(path)
                      for split, path in text_unit(name, data_dir).items()}
    if not all(splits.values()):
        raise UserError(f"{name}: no sentences to train or test on; check the files in {data_dir}")
    tokens = {split: [tokenize_line(line, lower) for line in lines] for split, lines in splits.items()}
    max_len = max_len or 1 + max(len(s) for sentences in tokens.values() for s in sentences)
    kept = {split: [s for s in sentences if len(s) < max_len] for split, sentences in tokens.items()}
    dropped = sum(len(tokens[split]) - len(kept[split]) for split in tokens)
    if dropped and get_rank() == 0:
        print(f"{name}: dropped {dropped} sentences longer than {max_len - 1} tokens (--max-len)", file=sys.stderr)
    if not all(kept.values()):
        raise UserError(f"{name}: no sentence fits in {max_len - 1} tokens; raise --max-len")
    vocab = Vocabulary.build(kept["train"], vocab_size)
    encoded = {split: encode_sentences(sentences, vocab, max_len) for split, sentences in kept.items()}
    return TextData(encoded["train"], encoded["test"], vocab, vocab.index[BOS], name, kept["test"],
                    valid=encoded.get("valid"), valid_sentences=kept.get("valid"))


def write_text_samples(path, lines: list) -> None:
    """One sample per line, UTF-8, atomically."""
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def sample_lines(data: TextData, samples: torch.Tensor) -> list:
    """Samples (N, T) as lines of text: the token ids for the oracle (as SeqGAN's files), sentences for real text."""
    if data.oracle is not None:
        return [" ".join(str(t) for t in row) for row in samples.tolist()]
    return [" ".join(data.vocab.decode(row)) for row in samples.cpu()]


def cdf_dtype(device: torch.device) -> torch.dtype:
    """float64 on a CPU; float32 on a GPU (MPS has no float64), which moves a class's probability by ~1e-7 at most."""
    return torch.float64 if device.type == "cpu" else torch.float32


def inverse_cdf_sample(logits: torch.Tensor, generator: typing.Optional[torch.Generator] = None,
                       uniform: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    """One draw per row of softmax(logits) (n, V) -> (n,), by inverting the CDF: exact, and several times faster
    than torch.multinomial over thousands of classes on a CPU. The CDF is summed in cdf_dtype. `uniform` (n, 1) in
    [0, 1) supplies the draws instead of `generator`."""
    cdf = torch.softmax(logits.float(), -1).to(cdf_dtype(logits.device)).cumsum_(-1)
    if uniform is None:
        uniform = torch.rand(len(cdf), 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(1).clamp_(max=logits.shape[-1] - 1)


class SeqGANOracle:
    """SeqGAN's synthetic-data oracle ("target LSTM", Yu et al. 2017 §Synthetic Data Experiments): a fixed LSTM that
    defines the true distribution of 20-token sequences over 5,000 tokens. Row vectors, as in target_lstm.py:

        i = σ(x·Wi + h·Ui + bi)      f = σ(x·Wf + h·Uf + bf)      o = σ(x·Wog + h·Uog + bog)
        c~ = tanh(x·Wc + h·Uc + bc)  c = f·c + i·c~               h = o·tanh(c)
        logits = h·Wo + bo

    with h = c = 0 at the start, the embedding of token 0 as the first input, and each drawn token's embedding as the
    next input. Token 0 is also an ordinary token. float32 as in the original; NLLs are summed in float64 on the
    CPU."""

    def __init__(self, params: dict, device="cpu", dtype=torch.float32):
        missing = [k for k in ORACLE_KEYS if k not in params]
        if missing:
            raise UserError(f"oracle parameters lack {', '.join(missing)}; use the paper's target_params or "
                            f"--oracle random")
        self.p = {k: torch.as_tensor(np.asarray(params[k])).to(dtype).to(device) for k in ORACLE_KEYS}
        vocab, dim = self.p["g_embeddings"].shape
        if self.p["Wo"].shape != (dim, vocab) or self.p["Wi"].shape != (dim, dim):
            raise UserError(f"oracle parameters have inconsistent shapes (embeddings {tuple((vocab, dim))}, "
                            f"Wo {tuple(self.p['Wo'].shape)}); use the paper's target_params or --oracle random")
        self.vocab_size, self.dim, self.seq_len, self.start_token = vocab, dim, ORACLE_LENGTH, 0
        self.device = torch.device(device)

    def to(self, device) -> "SeqGANOracle":
        return SeqGANOracle({k: v.cpu() for k, v in self.p.items()}, device, self.p["Wi"].dtype)

    @classmethod
    def random(cls, seed: int, vocab: int = ORACLE_VOCAB, dim: int = ORACLE_DIM, device="cpu") -> "SeqGANOracle":
        """Parameters drawn from N(0, 1), as the paper initialised its oracle."""
        generator = torch.Generator().manual_seed(seed)
        shapes = {"g_embeddings": (vocab, dim), "Wo": (dim, vocab), "bo": (vocab,)}
        params = {k: torch.randn(shapes.get(k, (dim,) if k.startswith("b") else (dim, dim)), generator=generator,
                                 dtype=torch.float64) for k in ORACLE_KEYS}
        return cls(params, device)

    def _cell(self, x, h, c):
        p = self.p
        i = torch.sigmoid(x @ p["Wi"] + h @ p["Ui"] + p["bi"])
        f = torch.sigmoid(x @ p["Wf"] + h @ p["Uf"] + p["bf"])
        o = torch.sigmoid(x @ p["Wog"] + h @ p["Uog"] + p["bog"])
        c_tilde = torch.tanh(x @ p["Wc"] + h @ p["Uc"] + p["bc"])
        c = f * c + i * c_tilde
        h = o * torch.tanh(c)
        return h, c, h @ p["Wo"] + p["bo"]

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """Per-sequence mean NLL in nats per token, teacher-forced (SeqGAN's target_loss averages these). Rows are
        independent, so `batch_size` changes the speed and float32 rounding only: 128 rows of 5,000 logits stay in a
        CPU's cache, about 3x faster than 2,048."""
        out = []
        for chunk in tokens.to(self.device).split(batch_size):
            batch, length = chunk.shape
            h = c = torch.zeros(batch, self.dim, dtype=self.p["Wi"].dtype, device=self.device)
            x = self.p["g_embeddings"][torch.full((batch,), self.start_token, device=self.device)]
            total = torch.zeros(batch, dtype=torch.float64)
            for t in range(length):
                h, c, logits = self._cell(x, h, c)
                total -= to_host_float64(torch.log_softmax(logits, -1).gather(1, chunk[:, t:t + 1]).squeeze(1))
                x = self.p["g_embeddings"][chunk[:, t]]
            out.append(total / length)
        return torch.cat(out)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator, batch_size: int = 2048, block: int = 128) -> torch.Tensor:
        """count x 20 token ids drawn from the oracle with `generator` (on the oracle's device). The uniforms are drawn
        per batch of `batch_size` sequences, step by step, in the order one pass over the batch would draw them, then
        used by blocks of `block` rows that stay in cache (as in nll, 3x faster): the sequences depend on the seed
        and `batch_size`, not on `block`, so the datasets drawn before blocks existed are drawn again."""
        out = []
        for start in range(0, count, batch_size):
            batch = min(batch_size, count - start)
            uniforms = torch.cat([torch.rand(batch, 1, generator=generator, dtype=cdf_dtype(self.device),
                                             device=self.device) for _ in range(self.seq_len)], 1)
            for rows in uniforms.split(block):
                h = c = torch.zeros(len(rows), self.dim, dtype=self.p["Wi"].dtype, device=self.device)
                x = self.p["g_embeddings"][torch.full((len(rows),), self.start_token, device=self.device)]
                tokens = []
                for t in range(self.seq_len):
                    h, c, logits = self._cell(x, h, c)
                    tokens.append(inverse_cdf_sample(logits, uniform=rows[:, t:t + 1]))
                    x = self.p["g_embeddings"][tokens[-1]]
                out.append(torch.stack(tokens, 1))
        return torch.cat(out)


def load_oracle_params(data_dir) -> dict:
    """The paper's oracle: target_params.npz (named arrays), else SeqGAN's pickle, found or downloaded, read with the
    restricted unpickler (numpy arrays only; never a plain pickle.load on downloaded bytes) and cached as .npz."""
    folder = Path(data_dir) / TEXT_SOURCES["oracle"]["folder"]
    try:
        path = find_or_download_text("oracle", "params", data_dir)
    except UserError as e:
        raise UserError(f"SeqGAN's oracle parameters are neither in {folder} nor downloadable ({str(e)[:200]}); "
                        f"put target_params.npz there, or train against a fresh oracle with --oracle random")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        arrays = restricted_load(path.read_bytes(), encoding="latin1")
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a valid SeqGAN oracle parameter file ({str(e)[:120]}); delete it to "
                        f"download it again, or use --oracle random")
    if not (isinstance(arrays, list) and len(arrays) == len(ORACLE_KEYS)
            and all(isinstance(a, np.ndarray) for a in arrays)):
        raise UserError(f"{path} does not hold SeqGAN's list of {len(ORACLE_KEYS)} arrays; delete it to download "
                        f"it again, or use --oracle random")
    params = dict(zip(ORACLE_KEYS, arrays))
    if get_rank() == 0:
        try:
            atomic_write(folder / "target_params.npz", lambda f: np.savez(f, **params))
        except OSError:
            pass  # a read-only data folder: the pickle is read again next time
    return params


def read_token_ids(path, vocab_size: int, length: int) -> torch.Tensor:
    """A file of integer token ids, one sequence of `length` ids per line (SeqGAN's real_data.txt)."""
    rows = []
    for number, line in enumerate(read_lines(path), 1):
        try:
            ids = [int(v) for v in line.split()]
        except ValueError:
            raise UserError(f"{path}:{number}: not integer token ids; the file is damaged, delete it")
        if len(ids) != length or min(ids) < 0 or max(ids) >= vocab_size:
            raise UserError(f"{path}:{number}: expected {length} ids in [0, {vocab_size}); the file is damaged, "
                            f"delete it")
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int64)


ORACLE_SEQUENCES = 9_984  # SeqGAN drew 156 batches of 64 from the oracle as its training set


def _oracle_dataset(kind: str, data_dir, seed: int, device) -> TextData:
    """Training sequences: for the paper's oracle, the 9,984 the authors drew (real_data.txt) when present; otherwise
    9,984 fresh draws. The test split (NLL-test) is another 9,984 draws from a seed the training set never uses.
    Both are drawn on the CPU, so that a run on any device is scored on the same sequences; then the oracle moves to
    the device, where it scores samples (NLL-oracle)."""
    if kind == "paper":
        oracle = SeqGANOracle(load_oracle_params(data_dir))
        folder = Path(data_dir) / TEXT_SOURCES["oracle"]["folder"]
        real = folder / "real_data.txt"
        train = read_token_ids(real, oracle.vocab_size, oracle.seq_len) if real.is_file() else None
        stream = 0
    elif kind == "random":
        oracle, train, stream = SeqGANOracle.random(seed), None, seed
    else:
        raise UserError(f"--oracle {kind!r} is not one of paper, random")
    draw = torch.Generator()
    if train is None:
        train = oracle.sample(ORACLE_SEQUENCES, draw.manual_seed(stream * 2 + 88))
    test = oracle.sample(ORACLE_SEQUENCES, draw.manual_seed(stream * 2 + 89))
    vocab = Vocabulary([str(i) for i in range(oracle.vocab_size)], specials=False)
    return TextData(train, test, vocab, oracle.start_token, f"oracle-{kind}", [vocab.decode(s) for s in test],
                    oracle.to(device))


def _ngram_counts(tokens: list, n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: list, references: list, max_n: int = 4, exclude_self: bool = False) -> dict:
    """Mean sentence BLEU-n for n = 2..max_n of each hypothesis against the whole reference set (Texygen's protocol,
    Zhu et al. 2018): clipped n-gram precisions p_1..p_n with uniform weights, a zero count smoothed to 0.1 / total
    (Chen & Cherry 2014 method 1, as nltk's method1), brevity penalty against the closest reference length, and 0 when
    no unigram matches. Returns {n: score}.

    exclude_self=True is self-BLEU: `references` must be `hypotheses` itself, and hypothesis i is scored against all
    the others but never against itself. Texygen's self-BLEU counted each hypothesis in its own references, so a
    unique sentence scored 1.0 against itself and the metric was inflated (geek-ai/Texygen issues 27 and 46)."""
    if exclude_self and len(references) != len(hypotheses):
        raise ValueError("self-BLEU scores a set against itself: pass the same list twice")
    if not hypotheses or len(references) < 1 + exclude_self:
        raise ValueError("BLEU needs hypotheses and at least one reference (two sentences for self-BLEU)")
    # for every n-gram: its highest count in one reference, which reference has it, and the highest in any other
    best = [None] + [{} for _ in range(max_n)]
    for r, reference in enumerate(references):
        for n in range(1, max_n + 1):
            table = best[n]
            for gram, count in _ngram_counts(reference, n).items():
                top, owner, second = table.get(gram, (0, -1, 0))
                if count > top:
                    table[gram] = (count, r, top)
                elif count > second:
                    table[gram] = (top, owner, count)
    lengths = collections.Counter(len(r) for r in references)
    totals = {n: 0.0 for n in range(2, max_n + 1)}
    for h, hypothesis in enumerate(hypotheses):
        own = h if exclude_self else -1
        log_precisions = []
        for n in range(1, max_n + 1):
            counts = _ngram_counts(hypothesis, n)
            matched = 0
            for gram, count in counts.items():
                top, owner, second = best[n].get(gram, (0, -1, 0))
                matched += min(count, second if owner == own else top)
            total = max(1, sum(counts.values()))
            if n == 1 and matched == 0:
                break  # no unigram in common: BLEU is 0 at every order
            log_precisions.append(math.log((matched or 0.1) / total))
        if len(log_precisions) < max_n:
            continue
        available = lengths - collections.Counter([len(hypothesis)] if exclude_self else [])
        closest = min(available, key=lambda length: (abs(length - len(hypothesis)), length))
        c = len(hypothesis)
        brevity = 1.0 if c > closest else (math.exp(1 - closest / c) if c else 0.0)
        for n in totals:
            totals[n] += brevity * math.exp(sum(log_precisions[:n]) / n)
    return {n: total / len(hypotheses) for n, total in totals.items()}


def parse_temperatures(text: str) -> list:
    """--eval-temperatures "0.8,1,1.2" -> [0.8, 1.0, 1.2] ("" -> []): each T divides G's logits before the softmax,
    which traces a model's quality/diversity curve (Caccia et al. 2020, §4)."""
    try:
        values = [float(v) for v in text.split(",")] if text else []
    except ValueError:
        values = [0.0]
    if not all(v > 0 for v in values):
        raise ValueError(f"--eval-temperatures must be comma-separated positive numbers, got {text!r}")
    return values


def temperature_sweep(evaluate_at, temperatures: list, out: Path, data: TextData, num_samples: int) -> dict:
    """The final evaluation again at each T: evaluate_at(T) -> (metrics "eval/...", samples). Returns the metrics
    keyed eval_T<T>/... and writes the first num_samples samples to samples_T<T>.txt (the names evaluate.py reads)."""
    metrics = {}
    for temperature in temperatures:
        tempered, samples = evaluate_at(temperature)
        metrics.update({k.replace("eval/", f"eval_T{temperature:g}/"): v for k, v in tempered.items()})
        write_text_samples(Path(out) / f"samples_T{temperature:g}.txt", sample_lines(data, samples[:num_samples]))
    return metrics


def text_sample_metrics(sentences: list, data: TextData, bleu_samples: int, self_bleu_samples: int) -> dict:
    """What the text models report on real text from their decoded samples (token lists): the share of test
    tokens that are <unk> (what NLL-test leaves out), BLEU-2..5 of the first bleu_samples against the whole test
    split, self-BLEU-2..5 of the first self_bleu_samples against each other, and the mean length in tokens."""
    metrics = {"eval/oov_rate": data.oov_rate(data.test)}
    for n, score in bleu(sentences[:bleu_samples], data.test_sentences, max_n=5).items():
        metrics[f"eval/bleu{n}"] = score
    own = sentences[:self_bleu_samples]
    for n, score in bleu(own, own, max_n=5, exclude_self=True).items():
        metrics[f"eval/self_bleu{n}"] = score
    metrics["eval/mean_length"] = sum(len(s) for s in sentences) / max(len(sentences), 1)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Metrics logger, image grids, loss plots
# ---------------------------------------------------------------------------------------------------------------

def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLogger:
    """Writes metrics.jsonl (one JSON object per logged step) and one progress line per log step.

    `update` adds a step's metrics to running sums kept on the device (no synchronisation per step); `log` turns
    them into means over the interval, in one transfer. On resume, lines past the checkpoint's step (written after
    it by the interrupted run) are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, out: Path, total_steps: int, enabled: bool = True, start_step: int = 0, console_keys=()):
        self.path = Path(out) / "metrics.jsonl"
        self.total_steps, self.enabled, self.console_keys = total_steps, enabled, tuple(console_keys)
        self._sums, self._counts = {}, {}
        self._last_time, self._last_step = time.time(), start_step
        if enabled and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short when the previous run was killed mid-write
                    continue
            atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def update(self, metrics: dict) -> None:
        for key, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1  # per key: steps may log different metrics

    def log(self, step: int, extra: typing.Optional[dict] = None) -> dict:
        """Means since the last call, plus `extra`, as a metrics line; returns them (on every rank)."""
        keys = list(self._sums)
        means = []
        if keys:
            device = next((v.device for v in self._sums.values() if torch.is_tensor(v)), torch.device("cpu"))
            sums = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float32, device=device) for k in keys])
            counts = torch.tensor([self._counts[k] for k in keys], dtype=torch.float32, device=device)
            means = (sums / counts).tolist()
        now = time.time()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        record = {"step": step, **{k: round(v, 6) for k, v in zip(keys, means)}, **(extra or {})}
        record["time/steps_per_s"] = round(rate, 3)
        self._sums, self._counts, self._last_time, self._last_step = {}, {}, now, step
        if self.enabled:
            self._append(record)
            eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
            shown = [k for k in self.console_keys if k in record] or [k for k in keys]
            metrics = " ".join(f"{k} {record[k]:.4g}" for k in shown)
            print(f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%) | "
                  f"{rate:.2f} steps/s | ETA {_format_duration(eta) if math.isfinite(eta) else '?'} | {metrics}",
                  flush=True)
        return record

    def log_eval(self, step: int, metrics: dict) -> None:
        """The final evaluation line of a run."""
        record = {"step": step, "final": True, **{k: (round(v, 6) if isinstance(v, float) else v)
                                                  for k, v in metrics.items()}}
        if self.enabled:
            self._append(record)
            print("eval | " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in metrics.items()), flush=True)

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)


@torch.no_grad()
def nearest_neighbour_distances(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor, device,
                                seed: int, count: int = 2000) -> dict:
    """What can be measured of uint8 samples without a pretrained network: mean distances (RMS per pixel on the
    [0, 1] scale, at 32x32 at most) from `count` test images to their nearest sample (far above the same distance to
    as many training images: missing modes), to those training images, and from `count` samples to the training
    images (near 0: G copies them). The test and training images are random subsets drawn from `seed`."""
    order = lambda n, s: torch.randperm(n, generator=torch.Generator().manual_seed(s))  # noqa: E731

    def pixels(images):
        images = images.to(device).float() / 255
        return (F.interpolate(images, size=(32, 32), mode="area") if images.shape[-1] > 32 else images).flatten(1)

    def mean_nearest_distance(queries, keys):
        nearest = torch.cat([torch.cdist(q, keys).min(dim=1).values for q in queries.split(500)])
        return (nearest / math.sqrt(keys.shape[1])).mean().item()

    fakes = pixels(samples)
    test_images = pixels(test[order(len(test), seed)[:count].to(test.device)])
    train_pool = pixels(train[order(len(train), seed + 1)[:len(samples)].to(train.device)])
    return {"eval/nn_test_to_fake": mean_nearest_distance(test_images, fakes),
            "eval/nn_test_to_train": mean_nearest_distance(test_images, train_pool),
            "eval/nn_fake_to_train": mean_nearest_distance(fakes[:count], train_pool)}


def image_grid(images: torch.Tensor, nrow: typing.Optional[int] = None, padding: int = 2) -> Image.Image:
    """uint8 N x C x H x W (C = 1 grey, 3 RGB; other counts are shown as their channel mean) -> one PIL image."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        raise TypeError("image_grid takes uint8 images; convert with to_uint8 first")
    n, c, h, w = images.shape
    if c not in (1, 3):
        images, c = images.float().mean(1, keepdim=True).round().to(torch.uint8), 1
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if c == 1 else array, mode="L" if c == 1 else "RGB")


def save_image_grid(images: torch.Tensor, path, nrow: typing.Optional[int] = None, padding: int = 2) -> None:
    grid = image_grid(images, nrow, padding)
    atomic_write(path, lambda f: grid.save(f, format="PNG"))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (a tanh output) to uint8 0..255."""
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_samples_npz(path, images: torch.Tensor, labels: typing.Optional[torch.Tensor] = None) -> None:
    """The cross-model sample file: `images` uint8 N x C x H x W, plus `labels` when the samples are conditional."""
    arrays = {"images": images.cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, count: int = 5):
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / count))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if span / (step * m) <= count)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_metrics(metrics_path, png_path, prefixes=("loss/",), title: str = "", x_key: str = "step") -> None:
    """Draw every metric whose name starts with one of `prefixes` against `x_key` (the step, or another number every
    line carries, such as an epoch), with Pillow only."""
    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    series = {}
    for row in rows:
        if row.get("final"):
            continue
        for key, value in row.items():
            if key.startswith(tuple(prefixes)) and isinstance(value, (int, float)) and math.isfinite(value) \
                    and x_key in row:
                series.setdefault(key, []).append((row[x_key], float(value)))
    plot_series(series, png_path, title, x_label=x_key)


def plot_series(series: dict, png_path, title: str = "", x_label: str = "step", y_label: str = "") -> None:
    """{name: [(x, y), ...]} as one line per name (a dot where a name has one point), with Pillow only."""
    series = {k: v for k, v in series.items() if v}
    width, height, left, right, top, bottom = 900, 480, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 12), title or "", fill="black", font=font)
    if not series:
        draw.text((width // 2 - 60, height // 2), "no data yet", fill="black", font=font)
        atomic_write(png_path, lambda f: image.save(f, format="PNG"))
        return
    points = [p for values in series.values() for p in values]
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_pad = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad

    def to_pixel(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in _nice_ticks(y_lo, y_hi):
        _, py = to_pixel(x_lo, y)
        draw.line([left - 4, py, width - right, py], fill=(230, 230, 230))
        draw.text((5, py - 6), f"{y:.3g}", fill="black", font=font)
    for x in _nice_ticks(x_lo, x_hi):
        px, _ = to_pixel(x, y_lo)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 12, height - bottom + 8), f"{x:g}", fill="black", font=font)
    draw.text((width // 2 - 10, height - 20), x_label, fill="black", font=font)
    draw.text((5, top - 16), y_label, fill="black", font=font)
    for i, (key, values) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        else:
            x, y = pixels[0]
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.line([width - right - 210, top + 12 + 14 * i, width - right - 190, top + 12 + 14 * i], fill=colour,
                  width=3)
        draw.text((width - right - 185, top + 6 + 14 * i), key[:30], fill="black", font=font)
    atomic_write(png_path, lambda f: image.save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: full training state, written atomically, loaded with weights_only=True
# ---------------------------------------------------------------------------------------------------------------

def checkpoint_path(path) -> Path:
    """A checkpoint file, or the run folder that holds checkpoint.pt."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # The generators take their state as a CPU ByteTensor, and a checkpoint loaded with map_location=cuda holds it
    # on the GPU, hence .cpu().
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].cpu().numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([generator_state.cpu() for generator_state in state["cuda"]])


def save_checkpoint(path, state: dict) -> None:
    """Write `state` plus every rank's RNG state, atomically (the previous checkpoint survives a crash mid-write).
    Collective under torchrun: every rank must call it; rank 0 writes."""
    states = [rng_state()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
    if get_rank() == 0:
        atomic_write(path, lambda f: torch.save({**state, "rng": states}, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; pass a checkpoint.pt or the run folder that holds one")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                        f"resume from an earlier one or start afresh")


def restore_rng(checkpoint: dict, rank: int = 0, fallback_seed: int = 0) -> None:
    """Restore this rank's RNG state. A rank the checkpoint has no state for (the job grew) seeds afresh."""
    states = checkpoint["rng"]
    if rank < len(states):
        set_rng_state(states[rank])
    else:
        seed_everything(fallback_seed + rank)


def state_dicts(parts: dict) -> dict:
    """{name: part.state_dict()} for the networks, optimisers and other stateful parts of a model (None stays None:
    a trick that is off)."""
    return {name: None if part is None else part.state_dict() for name, part in parts.items()}


def load_state_dicts(parts: dict, state: dict) -> None:
    """The inverse of state_dicts; a part that is on in the run but off in the checkpoint, or the reverse, is a
    ValueError (resume turns it into the one-line 'does not fit' error)."""
    for name, part in parts.items():
        if (part is None) != (state[name] is None):
            raise ValueError(f"{name} is {'off' if part is None else 'on'} here but not in the checkpoint")
        if part is not None:
            part.load_state_dict(state[name])


def resume(args, run: Run, load_state) -> dict:
    """--resume: load the checkpoint onto the device, hand it to load_state(checkpoint) (the model's own state
    dicts), restore this rank's RNG and return it. A checkpoint of another architecture is a one-line error."""
    checkpoint = load_checkpoint(args.resume, map_location=run.device)
    try:
        load_state(checkpoint)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{args.resume} does not fit this model ({str(e).splitlines()[0][:120]}); resume with the "
                        f"flags and dataset it was trained with")
    restore_rng(checkpoint, run.rank, args.seed)
    return checkpoint


class Checkpoints:
    """A run's checkpoint.pt and the ways a run ends early. `save` refuses non-finite weights, so that a run that
    diverged keeps its last good checkpoint, which `diverged` (a one-line error) names; `stop` is Ctrl-C: save,
    print the resume command, exit with 130."""

    def __init__(self, run: Run, script: str, advice: str, saved_step: typing.Optional[int] = None):
        self.path, self.script, self.advice, self.saved_step = run.out / "checkpoint.pt", script, advice, saved_step

    def save(self, step: int, state: dict, modules=()) -> None:
        """Collective under torchrun: every rank calls it (their RNG states are gathered); rank 0 writes."""
        if not all(torch.isfinite(p).all() for module in modules for p in module.parameters()):
            raise self.diverged(step, "non-finite weights")
        save_checkpoint(self.path, {"step": step, **state})
        self.saved_step = step

    def diverged(self, step: int, reason: str) -> UserError:
        last = f"the last good checkpoint is {self.path} (step {self.saved_step}); resume from it" \
            if self.saved_step is not None and self.path.exists() else "no checkpoint was written yet; start again"
        return UserError(f"training diverged at step {step} ({reason}); {last} with {self.advice}")

    def check_losses(self, record: dict, step: int) -> None:
        if not all(math.isfinite(v) for k, v in record.items() if k.startswith("loss/") and isinstance(v, float)):
            raise self.diverged(step, "a loss is not finite")

    def stop(self, step: int, state: dict, modules=()) -> typing.NoReturn:
        self.save(step, state, modules)
        if get_rank() == 0:
            print(f"stopped at step {step}; checkpoint in {self.path}; continue with python {self.script} --resume "
                  f"{self.path.parent}", flush=True)
        sys.exit(130)
