"""Precision on every device: no float64 tensor is ever made on an accelerator (MPS has no float64, so one would
crash an Apple-silicon run), and every likelihood is evaluated in float32 whatever --amp says.

The accelerator is played by PyTorch's meta device, which computes shapes and dtypes without data: a dispatch mode
fails the test on any operation whose result is a float64 tensor off the CPU. The one sanctioned way to float64,
common.to_host_float64, copies to the CPU, which a meta tensor cannot do, so it is replaced by random values of
the right shape on the CPU: the test then follows the real code path past it."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
import dcgan
import flow
import glo
import scratchgan
import seqgan_rl
import vae

META = torch.device("meta")


class NoFloat64OffTheCPU(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                raise AssertionError(f"{func} made a float64 tensor on {t.device}")
        return out


@pytest.fixture()
def accelerator(monkeypatch):
    real, generator = common.to_host_float64, torch.Generator().manual_seed(0)

    def stand_in(t):  # a meta tensor holds no data: random values of its shape (a square one invertible)
        if not t.is_meta:
            return real(t)
        values = torch.rand(t.shape, dtype=torch.float64, generator=generator)
        return values + torch.eye(t.shape[0], dtype=torch.float64) if t.ndim == 2 and t.shape[0] == t.shape[1] \
            else values

    monkeypatch.setattr(common, "to_host_float64", stand_in)
    with NoFloat64OffTheCPU():
        yield META


def test_the_guard_catches_float64_on_the_device(accelerator):
    with pytest.raises(AssertionError, match="float64 tensor on meta"):
        torch.ones(3, device=accelerator).double()
    with pytest.raises(AssertionError, match="float64 tensor on meta"):
        torch.zeros(3, dtype=torch.float64, device=accelerator)
    torch.ones(3, device=accelerator).sum()  # float32 on the device, float64 on the CPU: both fine
    torch.ones(3, dtype=torch.float64).sum()


def test_the_float64_helper_copies_to_the_host():
    t = torch.ones(3, requires_grad=True)
    host = common.to_host_float64(t * 2)
    assert host.device.type == "cpu" and host.dtype == torch.float64 and not host.requires_grad
    with NoFloat64OffTheCPU(), pytest.raises(NotImplementedError):  # a copy out of the device, which meta cannot
        common.to_host_float64(torch.ones(3, device=META))  # make (a conversion on the device would fail the guard)


def test_flow_inverse_sampling_and_bits_per_dim(accelerator):
    glow = flow.Glow(1, 8, levels=2, steps_per_level=2, width=8).to(accelerator)
    images = flow.sample(glow, 6, 0.7, 8, torch.Generator(), batch=4)  # the 1x1 convolutions invert in float64
    assert images.shape == (6, 1, 8, 8) and images.device == accelerator
    args = flow.Args(eval_batch=4, device="cpu")
    bpd = flow.evaluate_bpd(glow, torch.zeros(6, 1, 8, 8, dtype=torch.uint8), args, torch.Generator())
    assert math.isfinite(bpd)


def test_vae_importance_weighted_evaluation(accelerator):
    model = vae.VAE("mlp", "bernoulli", 1, 4, z_dim=3, hidden=8).to(accelerator)
    x = torch.zeros(5, 1, 4, 4, device=accelerator)
    bounds, elbos, means = vae.importance_weighted_bounds(model, x, k=12, rows=20, generator=torch.Generator())
    assert bounds.shape == elbos.shape == (5,) and bounds.device.type == "cpu"
    assert vae.active_units(means) >= 0


def test_glo_gaussian_fit_and_draws(accelerator):
    codes = torch.randn(50, 4).to(accelerator)
    mean, _, factor = glo.fit_gaussian(codes)  # covariance and Cholesky factor in float64, on the CPU
    drawn = glo.gaussian_codes(mean, factor, torch.randn(7, 4).to(accelerator))
    assert drawn.shape == (7, 4) and drawn.dtype == torch.float32 and drawn.device == accelerator


def test_seqgan_sampling_nll_and_the_oracle(accelerator, monkeypatch):
    G = seqgan_rl.Generator(30, 4, 4).to(accelerator)
    samples = seqgan_rl.generate(G, 9, 6, 0, torch.Generator())  # inverse-CDF draws: float32 off the CPU
    assert samples.shape == (9, 6) and samples.device == accelerator
    assert math.isfinite(seqgan_rl.sequence_nll(G, samples, torch.ones(9, 6, dtype=torch.bool), 0))
    monkeypatch.setattr(common, "ORACLE_SEQUENCES", 16)
    data = common.load_text_dataset("oracle", "unused", oracle="random", seed=1, device=accelerator)
    assert data.train.device.type == "cpu" and data.oracle.device == accelerator  # splits drawn on the CPU
    assert data.oracle.nll(data.test[:4].to(accelerator)).shape == (4,)
    assert data.oracle.sample(3, torch.Generator()).device == accelerator


def test_scratchgan_steps_sampling_and_nll(accelerator):
    vocab = common.Vocabulary([common.PAD, common.BOS, common.EOS, common.UNK, "a", "b"])
    tokens = torch.tensor([[4, 5, 2, 0]] * 4)
    data = common.TextData(tokens, tokens, vocab, 1, "toy", [])
    args = scratchgan.Args(dataset="coco", preset="cpu", batch_size=4, g_hidden=4, d_hidden=4, emb_dim=4,
                           device="cpu")
    gan = scratchgan.build_scratchgan(args, data, accelerator)
    layout = scratchgan.token_layout(data)
    assert scratchgan.discriminator_step(gan, tokens.to(accelerator), layout, args)["loss/d"].device == accelerator
    assert scratchgan.generator_step(gan, layout, args)["loss/g"].device == accelerator
    samples = scratchgan.generate(gan.generator, 5, layout, 0.8, torch.Generator())
    assert samples.shape == (5, 4) and samples.device == accelerator
    assert math.isfinite(scratchgan.sequence_nll(gan.generator, tokens, data.scored(tokens), layout.start))


def test_dcgan_training_step_and_sampling(accelerator):
    args = dcgan.Args(image_size=16, batch_size=4, g_width=4, d_width=4, z_dim=8, z_dist="normal", truncation=0.5,
                      device="cpu")
    gan = dcgan.build_gan(args, 1, 0, accelerator)
    images = torch.zeros(4, 1, 16, 16, dtype=torch.uint8, device=accelerator)
    metrics = dcgan.train_step(gan, args, lambda: (images, None), 0, 10, accelerator)
    assert metrics["loss/d"].device == accelerator
    z = dcgan.sample_z(args, 3, accelerator, truncation=args.truncation)
    assert dcgan.generate(gan.generator, z, None).shape == (3, 1, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# --amp: likelihoods in float32
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture()
def cpu_autocast(monkeypatch):
    """--amp's bf16 autocast on the CPU, forced even where common.autocast would refuse it (a CPU without bf16
    instructions emulates it), so that these tests mean the same on every machine."""
    monkeypatch.setattr(common, "autocast", lambda device, enabled: torch.autocast("cpu", dtype=torch.bfloat16)
                        if enabled else torch.autocast("cpu", enabled=False))


def test_vae_evaluation_ignores_amp(cpu_autocast):
    torch.manual_seed(0)
    model = vae.VAE("mlp", "bernoulli", 1, 8, z_dim=4, hidden=16)
    x = (torch.rand(6, 1, 8, 8) > 0.5).float()
    mu, logvar = model.encode(x)
    in_bf16 = vae.log_importance_weights(model, x, mu, logvar, 5, torch.Generator().manual_seed(0), amp=True)
    in_f32 = vae.log_importance_weights(model, x, mu, logvar, 5, torch.Generator().manual_seed(0), amp=False)
    assert not torch.equal(in_bf16, in_f32)  # the patched autocast really runs the decoder in bf16
    results = [vae.evaluate(model, x, 50, vae.Args(amp=amp, device="cpu")) for amp in (True, False)]
    assert results[0] == results[1]


def test_flow_evaluation_ignores_amp_and_training_keeps_it(cpu_autocast):
    torch.manual_seed(0)
    glow = flow.Glow(1, 8, 2, 2, 8)
    glow.initialise(torch.rand(32, 1, 8, 8) - 0.5)
    for m in glow.modules():  # couplings that are not the identity
        if isinstance(m, flow.ZeroConv2d):
            torch.nn.init.normal_(m.weight, 0, 0.1)
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    results = []
    for amp in (True, False):
        glow.set_amp(amp)
        results.append(flow.evaluate_bpd(glow, images, flow.Args(amp=amp, eval_batch=4, device="cpu"),
                                         torch.Generator().manual_seed(0)))
        assert all(m.amp == amp for m in glow.modules() if isinstance(m, flow.Coupling))  # restored afterwards
    assert results[0] == results[1]
    glow.set_amp(True)
    bf16, _ = flow.flow_loss(glow, images, 8, torch.Generator().manual_seed(0))
    glow.set_amp(False)
    f32, _ = flow.flow_loss(glow, images, 8, torch.Generator().manual_seed(0))
    assert bf16.item() != f32.item() and abs(bf16.item() - f32.item()) < 0.05  # training does use bf16


def test_oracle_and_nll_test_stay_float32():
    oracle = common.SeqGANOracle.random(0, vocab=20, dim=4)
    assert all(v.dtype == torch.float32 for v in oracle.p.values())
    assert oracle.nll(torch.zeros(2, 20, dtype=torch.long)).dtype == torch.float64  # summed in float64, on the CPU
    assert np.isfinite(oracle.nll(torch.zeros(2, 20, dtype=torch.long)).numpy()).all()


def oracle_data(length: int = 6, vocab: int = 12) -> common.TextData:
    oracle = common.SeqGANOracle.random(0, vocab=vocab, dim=4)
    sequences = torch.randint(vocab, (40, length), generator=torch.Generator().manual_seed(1))
    return common.TextData(sequences[:32], sequences[32:], common.Vocabulary([str(i) for i in range(vocab)],
                                                                                  specials=False),
                           0, "oracle", [], oracle=oracle)


@pytest.mark.parametrize("model", ["seqgan_rl", "scratchgan"])
def test_text_evaluation_ignores_amp(cpu_autocast, model):
    """NLL-oracle and NLL-test, and the samples they come from, are the same numbers with and without --amp; the
    same evaluation inside the bf16 region gives other numbers, so the equality means it stays outside."""
    torch.manual_seed(0)
    data = oracle_data()
    if model == "seqgan_rl":
        args = seqgan_rl.Args(device="cpu", emb_dim=8, hidden_dim=8, d_emb_dim=8, d_filter_counts=",".join(["2"] * 12))
        gan = seqgan_rl.build_seqgan(args, len(data.vocab), data.seq_len, torch.device("cpu"))
        evaluate = lambda: seqgan_rl.evaluate(gan, data, args, 64, seed=3)  # noqa: E731
    else:
        args = scratchgan.Args(device="cpu", dataset="oracle", g_hidden=8, d_hidden=8, emb_dim=8)
        gan = scratchgan.build_scratchgan(args, data, torch.device("cpu"))
        evaluate = lambda: scratchgan.evaluate(gan, data, scratchgan.token_layout(data), args, 64, seed=3)  # noqa
    results = []
    for amp in (True, False):
        args.amp = amp
        metrics, samples = evaluate()
        results.append(({k: v for k, v in metrics.items() if k.startswith("eval/nll")}, samples))
    assert set(results[0][0]) >= {"eval/nll_oracle", "eval/nll_test"}
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    with common.autocast(torch.device("cpu"), True):
        inside = evaluate()[0]
    assert inside["eval/nll_test"] != results[1][0]["eval/nll_test"]


# ---------------------------------------------------------------------------------------------------------------
# --amp on the CPU: bf16 where the processor has it, float32 with a notice where not
# ---------------------------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("model", ["dcgan", "vae", "flow", "glo", "seqgan_rl", "scratchgan"])
def test_every_model_trains_a_few_steps_with_amp_on_the_cpu(model, tiny_data_dir, corpus, tmp_path, capsys):
    import test_dcgan, test_flow, test_glo, test_scratchgan, test_seqgan_rl, test_vae
    module, out = {"dcgan": dcgan, "vae": vae, "flow": flow, "glo": glo, "seqgan_rl": seqgan_rl,
                   "scratchgan": scratchgan}[model], tmp_path / "run"
    if model in ("seqgan_rl", "scratchgan"):
        tiny = (test_seqgan_rl if model == "seqgan_rl" else test_scratchgan).TINY
        args = module.Args(**{**tiny, "dataset": f"file:{corpus}", "out": str(out), "amp": True})
    else:
        tests = {"dcgan": test_dcgan, "vae": test_vae, "flow": test_flow, "glo": test_glo}[model]
        args = tests.tiny_args(tiny_data_dir, out, amp=True)
    module.main(args)
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["amp"] == common.bf16_supported(CPU)  # what ran, recorded
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final.get("final") and all(math.isfinite(v) for v in final.values() if isinstance(v, float))
    notice = "--amp needs bf16 arithmetic" in capsys.readouterr().err
    assert notice != common.bf16_supported(CPU)


def test_amp_without_bf16_falls_back_to_float32_with_one_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "bf16_supported", lambda device: False)
    args = dcgan.Args(device="cpu", amp=True, out=str(tmp_path / "run"))
    common.setup(args, "dcgan")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--amp needs bf16 arithmetic" in err[0] and "running in float32" in err[0]
    assert args.amp is False and json.loads((tmp_path / "run" / "config.json").read_text())["args"]["amp"] is False
    with common.autocast(CPU, args.amp):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_autocast_runs_products_in_bf16_on_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setattr(common, "bf16_supported", lambda device: True)
    with common.autocast(CPU, True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with common.autocast(CPU, False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_benchmark_alternates_precisions_keeps_the_fastest_round_and_restores_amp(monkeypatch):
    monkeypatch.setattr(common, "bf16_supported", lambda device: True)
    args, seen, rates = dcgan.Args(amp=False), [], iter([1.0, 4.0, 3.0, 2.0])

    def measure():
        seen.append(args.amp)
        return {"rate": next(rates), "round": len(seen)}

    results = common.benchmark_precisions(measure, args, CPU, rounds=2)
    assert seen == [False, True, False, True] and args.amp is False
    assert results == {"float32": {"rate": 3.0, "round": 3}, "bf16": {"rate": 4.0, "round": 2}}
    monkeypatch.setattr(common, "_MATMUL_RATES", {("cpu", "float32", 2048): 100.0, ("cpu", "bf16", 2048): 400.0})
    lines = common.precision_lines(results, "rate", 10 ** 10, CPU, lambda r: f"round {r['round']}")
    assert lines[0].startswith("float32: round 3") and "10.0 GFLOP per step, 30 GFLOP/s = 30% of" in lines[0]
    assert lines[1].startswith("bf16 (--amp): round 2") and "40 GFLOP/s = 10% of" in lines[1]
    assert lines[1].endswith("1.33x float32")
    monkeypatch.setattr(common, "bf16_supported", lambda device: False)
    assert list(common.benchmark_precisions(lambda: {"rate": 1.0}, args, CPU)) == ["float32"]


def test_flops_counted_for_a_known_product():
    a, b = torch.ones(8, 16), torch.ones(16, 4)
    assert common.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
