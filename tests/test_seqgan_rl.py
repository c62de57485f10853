"""seqgan_rl.py: rollouts, rewards, REINFORCE, the zero-gradient point, D's shapes, MLE; runs through main() and the
command line, exact resume across phases, and one-line errors."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import seqgan_rl as S
import conftest
from conftest import ROOT, assert_same, metrics_lines, shared_data, training_lines

SMALL_COUNTS = ",".join(["2"] * 12)  # two filters per paper width
TINY = dict(device="cpu", batch_size=8, emb_dim=8, hidden_dim=8, d_emb_dim=8, d_filter_counts=SMALL_COUNTS,
            pretrain_epochs=1, d_pretrain_rounds=1, d_epochs=1, d_samples=16, rounds=2, rollouts=2, d_rounds=1,
            eval_every=1, eval_samples=32, final_samples=64, num_samples=20, bleu_samples=20, self_bleu_samples=10,
            log_every=4, checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


def peaked_generator(vocab=11, token=5, seed=0) -> S.Generator:
    """A generator that draws `token` at every step (its output layer ignores the state)."""
    torch.manual_seed(seed)
    G = S.Generator(vocab, 4, 4)
    with torch.no_grad():
        G.Wo.zero_()
        G.bo.fill_(-50.0)
        G.bo[token] = 50.0
    return G


# ---------------------------------------------------------------------------------------------------------------
# Rollouts and rewards
# ---------------------------------------------------------------------------------------------------------------

def test_rollouts_keep_their_prefix_and_run_as_one_batched_lockstep():
    torch.manual_seed(0)
    G = S.Generator(11, 4, 6)
    batch, length, n = 3, 7, 4
    samples = S.generate(G, batch, length, start_token=0)
    calls = []
    cell = G.cell
    G.cell = lambda x, h, c, x_proj=None: calls.append(len(h)) or cell(x, h, c, x_proj)
    rollouts = S.monte_carlo_rollouts(G, samples, 0, n)
    assert rollouts.shape == (length - 1, batch, n, length) and rollouts.dtype == torch.int64
    for g in range(1, length):  # every completion of Y_1:g starts with exactly Y_1:g and has T tokens
        assert torch.equal(rollouts[g - 1, :, :, :g], samples[:, None, :g].expand(-1, n, -1))
    assert rollouts.min() >= 0 and rollouts.max() < 11
    assert not torch.equal(rollouts[0, :, 0], rollouts[0, :, 1])  # the completions are random draws
    # one teacher-forced pass over the B samples (T steps), then one batched LSTM step per lockstep step over the
    # rows still drawing: B·N·(T-2-k), never one call per rollout or per sample
    assert calls == [batch] * length + [batch * n * (length - 2 - k) for k in range(length - 2)]


def test_rollouts_follow_the_policy_and_rewards_average_d_over_completions():
    G = peaked_generator(token=5)
    samples = torch.tensor([[1, 2, 3, 4, 6, 7], [5, 5, 1, 5, 5, 5]])
    rollouts = S.monte_carlo_rollouts(G, samples, 0, 3)
    for g in range(1, 6):
        assert (rollouts[g - 1, :, :, g:] == 5).all()  # the policy always draws 5

    class FractionOfFives:  # a stand-in discriminator: D(Y) = share of 5s in Y
        def prob_real(self, tokens, amp=False):
            return (tokens == 5).float().mean(1)

    rewards = S.rollout_rewards(G, FractionOfFives(), samples, 0, num_rollouts=3)
    expected = torch.tensor([[((samples[b, :g] == 5).sum().item() + 6 - g) / 6 for g in range(1, 6)] +
                             [(samples[b] == 5).float().mean().item()] for b in range(2)])
    assert rewards.shape == (2, 6) and torch.allclose(rewards, expected)


def sharp_generator(vocab=6, seed=0) -> S.Generator:
    """A small generator with large weights: its next-token distribution depends strongly on the prefix."""
    torch.manual_seed(seed)
    G = S.Generator(vocab, 4, 5)
    with torch.no_grad():
        for p in G.parameters():
            p.mul_(25)
    return G


def test_each_rollout_continues_from_the_state_after_its_own_prefix():
    """The first token a rollout draws after Y_1:g must follow softmax(logits) of G's state after exactly Y_1:g
    (a state one token early or late, or the start state, gives another distribution): compared over 6,000
    rollouts per prefix with the distribution computed here from G's equations, token by token."""
    G = sharp_generator()
    sample = torch.tensor([[3, 1, 4, 1, 5]])
    n = 6000
    rollouts = S.monte_carlo_rollouts(G, sample, 0, n, torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, c = G.initial_state(1, "cpu")
        x = G.embedding(torch.tensor([0]))
        for g in range(1, 5):
            h, c = G.cell(x, h, c)  # the state after the input of position g (0-based g - 1)
            x = G.embedding(sample[:, g - 1])
            h_next, _ = G.cell(x, h, c)  # ... after Y_1:g: it predicts token g (0-based)
            expected = torch.softmax(G.logits(h_next), -1)[0]
            drawn = torch.bincount(rollouts[g - 1, 0, :, g], minlength=6).float() / n
            tolerance = 4 * torch.sqrt(expected * (1 - expected) / n) + 1e-3
            assert (drawn - expected).abs().le(tolerance).all(), (g, drawn, expected)
            if g > 1:
                assert (drawn - previous).abs().max() > 0.1  # the prefixes lead to different distributions
            previous = expected


def test_rewards_are_scored_by_d_in_eval_mode_without_dropout():
    torch.manual_seed(0)
    D = S.Discriminator(20, 6, 8, widths=[1, 2], counts=[8, 8], dropout=0.5)
    tokens = torch.randint(20, (32, 6))
    D.train()
    first, second = D.prob_real(tokens), D.prob_real(tokens)
    assert torch.equal(first, second) and D.training  # no dropout noise in the rewards, and D left training
    with torch.no_grad():
        D.eval()
        assert torch.allclose(first, torch.softmax(D(tokens), -1)[:, 1])
        D.train()
        assert not torch.allclose(first, torch.softmax(D(tokens), -1)[:, 1])  # dropout would have moved them


def test_the_highway_layer_gates_transform_against_carry():
    """Srivastava et al. 2015: y = T(c) * relu(W_H c + b_H) + (1 - T(c)) * c with the transform gate T. With the
    gate's bias at +30, D's features are the transform; at -30, the max-pooled features pass unchanged."""
    torch.manual_seed(0)
    D = S.Discriminator(15, 5, 4, widths=[1, 2], counts=[3, 3], dropout=0.0).eval()
    tokens = torch.randint(15, (4, 5))
    with torch.no_grad():
        x = D.embedding(tokens).transpose(1, 2)
        pooled = torch.cat([torch.relu(conv(x)).amax(dim=2) for conv in D.convs], dim=1)
        transformed = torch.relu(pooled @ D.highway_transform.weight.T + D.highway_transform.bias)
        for bias, features in ((30.0, transformed), (-30.0, pooled)):
            D.highway_gate.bias.fill_(bias)
            expected = features @ D.output.weight.T + D.output.bias
            assert torch.allclose(D(tokens), expected, atol=1e-5), bias


def test_max_pooled_features_match_the_papers_relu_then_max_in_value_and_gradient():
    """D pools max-then-ReLU for speed; Yu et al. (Kim 2014) apply ReLU at every position, then max over time. The
    two must give the same logits and the same gradients for every D parameter, the embedding included."""
    torch.manual_seed(0)
    D = S.Discriminator(30, 9, 6, widths=[1, 3, 9], counts=[5, 4, 3], dropout=0.0)
    tokens = torch.randint(30, (16, 9))

    def paper_logits():
        x = D.embedding(tokens).transpose(1, 2)
        c = torch.cat([torch.relu(conv(x)).amax(dim=2) for conv in D.convs], dim=1)
        tau = torch.sigmoid(D.highway_gate(c))
        return D.output(tau * torch.relu(D.highway_transform(c)) + (1 - tau) * c)

    def gradients(logits):
        D.zero_grad(set_to_none=True)
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return {name: p.grad.clone() for name, p in D.named_parameters()}

    expected, got = paper_logits(), D(tokens)
    assert torch.allclose(got, expected, atol=1e-6)
    reference, ours = gradients(expected), gradients(got)
    for name in reference:
        assert torch.allclose(ours[name], reference[name], atol=1e-6), name
    assert reference["convs.0.weight"].abs().sum() > 0 and reference["embedding.weight"].abs().sum() > 0


def test_d_learns_to_tell_the_data_from_generated_sequences():
    """discriminator_set labels real sequences 1 and G's samples 0, and discriminator_step fits D to that: after a
    few epochs D gives the real sequences (all 1s) a high P(real) and G's (all 5s) a low one."""
    args = S.Args(**{**TINY, "d_samples": 64, "lr_d": 1e-2})
    torch.manual_seed(0)
    gan = S.build_seqgan(args, 11, 6, torch.device("cpu"))
    gan.generator = peaked_generator(token=5)
    real = torch.ones(64, 6, dtype=torch.long)
    for _ in range(5):
        rows = S.discriminator_set(gan, real, 0, args)
        assert rows.shape == (128, 7) and rows[:64, -1].eq(1).all() and rows[64:, -1].eq(0).all()
        for batch in rows[torch.randperm(128)].split(16):
            S.discriminator_step(gan, batch, args)
    assert gan.discriminator.prob_real(real).min() > 0.9
    assert gan.discriminator.prob_real(torch.full((64, 6), 5)).max() < 0.1


def test_each_d_round_takes_a_fresh_random_subset_of_a_larger_training_set():
    """With more training sequences than --d-samples, each round's real half is a random subset drawn afresh, so
    that D sees all of the data over the rounds, not always its first rows."""
    args = S.Args(**{**TINY, "d_samples": 10})
    torch.manual_seed(0)
    gan = S.build_seqgan(args, 11, 6, torch.device("cpu"))
    train = torch.stack([torch.tensor([i // 11 % 11, i % 11, 0, 0, 0, 0]) for i in range(100)])  # distinct rows
    rounds = [S.discriminator_set(gan, train, 0, args)[:10, :-1] for _ in range(2)]
    rows = {tuple(r) for r in train.tolist()}
    for real in rounds:
        assert len({tuple(r) for r in real.tolist()}) == 10 and {tuple(r) for r in real.tolist()} <= rows
    assert not torch.equal(rounds[0], train[:10]) and not torch.equal(rounds[0], rounds[1])


def test_a_d_round_draws_its_data_once_and_batches_it_in_an_order_seeded_by_the_round(monkeypatch):
    """Each D round's set is drawn at its first step and dropped after its last, and its batch order depends on the
    round's number: two rounds over the same rows do not see them in the same order."""
    draws = []
    rows = torch.arange(40).view(20, 2)
    monkeypatch.setattr(S, "discriminator_set", lambda *a: draws.append(1) or rows)
    d_round = S.DiscriminatorRound(S.Args(**{**TINY, "batch_size": 4}), torch.device("cpu"))
    orders = []
    for number in (0, 1):
        steps = [S.Position("adversarial", "d", {}, False, False, d_set=number, ends_d_set=last)
                 for last in (False, False, True)]
        orders.append(torch.cat([d_round.next(None, None, 0, where) for where in steps]))
        assert len(draws) == number + 1 and d_round.state_dict() is None  # drawn once, dropped at the round's end
    assert len(set(orders[0][:, 0].tolist())) == 12 and not torch.equal(orders[0], orders[1])


def test_nll_test_counts_words_and_eos_but_neither_pad_nor_unk():
    vocab = common.Vocabulary.build([["a", "b", "c"]])
    unk, pad, eos = vocab.index[common.UNK], vocab.index[common.PAD], vocab.index[common.EOS]
    a, b = vocab.index["a"], vocab.index["b"]
    tokens = torch.tensor([[a, unk, b, eos, pad, pad], [b, b, eos, pad, pad, pad]])
    data = common.TextData(tokens, tokens, vocab, vocab.index[common.BOS], "toy", [])
    assert data.scored(tokens).tolist() == [[1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert data.oov_rate(tokens) == pytest.approx(1 / 7)  # one <unk> among the 7 tokens before PAD
    torch.manual_seed(0)
    G = S.Generator(len(vocab), 4, 4)
    log_probs = G.token_log_probs(tokens, vocab.index[common.BOS]).detach()  # checked against the oracle's LSTM
    expected = -(log_probs[0, [0, 2, 3]].sum() + log_probs[1, :3].sum()) / 6
    assert S.sequence_nll(G, tokens, data.scored(tokens), vocab.index[common.BOS]) == pytest.approx(expected.item())
    oracle_like = common.TextData(tokens, tokens, common.Vocabulary([str(i) for i in range(7)], specials=False), 0,
                                  "ids", [])
    assert oracle_like.scored(tokens).all() and oracle_like.oov_rate(tokens) == 0.0


def test_reward_baseline_is_a_bias_corrected_running_mean_per_position():
    """After n updates the baseline is the average of the batches' mean rewards per position, batch i weighted by
    decay^(n-i): a moving average whose zero start is divided out, so its first value is the first batch's mean."""
    decay, batches = 0.9, [torch.rand(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    baseline = S.RewardBaseline(3, decay, "cpu")
    assert baseline.value() is None
    for n in range(1, len(batches) + 1):
        baseline.update(batches[n - 1])
        weights = [decay ** (n - i) for i in range(1, n + 1)]
        expected = sum(w * b.mean(0) for w, b in zip(weights, batches)) / sum(weights)
        torch.testing.assert_close(baseline.value(), expected)


def test_the_roll_out_copy_follows_g_with_delay_r():
    """--rollout-update R (the official rollout.update_params): after each G step, theta_roll <- R theta_roll +
    (1 - R) theta_G, with theta_G the updated generator."""
    torch.manual_seed(0)
    args = S.Args(**{**TINY, "dataset": "oracle", "rollout_update": 0.8})
    gan = S.build_seqgan(args, 7, 20, torch.device("cpu"))
    before = [p.detach().clone() for p in gan.rollout.parameters()]
    S.policy_gradient_step(gan, 20, 0, args, {})
    assert any(not torch.equal(old, p) for old, p in zip(before, gan.generator.parameters()))  # G has moved
    for old, p_roll, p in zip(before, gan.rollout.parameters(), gan.generator.parameters()):
        torch.testing.assert_close(p_roll, 0.8 * old + 0.2 * p.detach())


def test_reinforce_on_a_bandit_moves_probability_to_the_rewarded_action():
    """A categorical policy over 4 actions, reward 1 for action 2 only: ascending the policy-gradient loss of the
    file moves the probability there, with or without a baseline, and the baseline lowers the gradient's variance."""
    torch.manual_seed(0)

    def gradient(logits, baseline=None, batch=64, floor=0.0):
        actions = torch.distributions.Categorical(logits=logits).sample((batch,))
        rewards = floor + (1 - floor) * (actions == 2).float()[:, None]  # (B, T = 1)
        log_probs = torch.log_softmax(logits, -1)[actions][:, None]
        loss, metrics = S.policy_gradient_loss(log_probs, rewards, baseline)
        (grad,) = torch.autograd.grad(loss, logits)
        return grad, metrics

    for use_baseline in (False, True):
        logits = torch.zeros(4, requires_grad=True)
        baseline = S.RewardBaseline(1, 0.9, "cpu")
        for _ in range(60):
            grad, metrics = gradient(logits, baseline.value() if use_baseline else None)
            assert metrics["loss/g_pg"].shape == () and 0 <= metrics["reward/mean"] <= 1
            baseline.update(torch.tensor([[metrics["reward/mean"].item()]]))
            with torch.no_grad():
                logits -= 0.05 * grad
        assert torch.softmax(logits, -1)[2] > 0.9, use_baseline

    # rewards that are all positive, as D's probabilities are: 0.5, or 1 for action 2; E[R] = 0.625 under the
    # uniform policy. Subtracting it leaves the mean gradient and cuts its variance (about 13x in theory)
    logits = torch.zeros(4, requires_grad=True)
    plain = torch.stack([gradient(logits, floor=0.5)[0] for _ in range(300)])
    centred = torch.stack([gradient(logits, torch.tensor([0.625]), floor=0.5)[0] for _ in range(300)])
    assert torch.allclose(plain.mean(0), centred.mean(0), atol=4 * plain.std(0).max().item() / math.sqrt(300))
    assert centred.var(0).sum() < 0.25 * plain.var(0).sum()


def test_sampled_tokens_carry_no_gradient_to_the_generator():
    torch.manual_seed(0)
    G = S.Generator(30, 8, 8)
    D = S.Discriminator(30, 6, 8, widths=[1, 2, 3], counts=[4, 4, 4])
    norms = S.sampled_token_gradients(G, D, count=16, seq_len=6, start_token=0)
    assert norms["multinomial"] == 0.0 and norms["argmax"] == 0.0  # autograd finds no path: sampling cuts it
    assert norms["policy_gradient"] > 0 and norms["soft_relaxation"] > 0  # REINFORCE, or a relaxation, do reach G


# ---------------------------------------------------------------------------------------------------------------
# Networks and losses
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len", [1, 5, 20, 37])
def test_discriminator_keeps_every_width_up_to_the_sequence_length(seq_len):
    widths = [int(w) for w in S.PAPER_FILTER_WIDTHS.split(",")]
    D = S.Discriminator(50, seq_len, 8, widths, [3] * len(widths))
    assert D.widths == [w for w in widths if w <= seq_len]
    logits = D(torch.randint(50, (4, seq_len)))
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    assert D.highway_gate.in_features == 3 * len(D.widths)


def test_discriminator_with_only_too_wide_filters_is_a_user_error():
    with pytest.raises(common.UserError, match="wider than the 3-token sequences"):
        S.Discriminator(10, 3, 4, widths=[5, 6], counts=[2, 2])


def test_discriminator_loss_adds_l2_of_the_output_layer():
    torch.manual_seed(0)
    D = S.Discriminator(20, 8, 4, widths=[1, 2], counts=[3, 3])
    penalty = D.l2_penalty()
    assert penalty.item() == pytest.approx(0.5 * (D.output.weight.pow(2).sum() + D.output.bias.pow(2).sum()).item())
    logits, labels = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    loss, metrics = S.discriminator_loss(logits, labels, penalty, 0.2)
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(cross_entropy.item() + 0.2 * penalty.item())
    assert metrics["d/acc"].item() == pytest.approx(2 / 3)  # row 3 is a tie, argmax picks "fake"
    assert metrics["d/fake"].item() == pytest.approx(torch.sigmoid(torch.tensor(-3.0)).item())
    assert metrics["d/real"].item() == pytest.approx((torch.sigmoid(torch.tensor(3.0)) + 0.5).item() / 2)


def test_generator_matches_the_oracle_equations():
    """With the oracle's parameters copied in, G's teacher-forced NLL equals the oracle's own (same LSTM, same order
    of gates in the fused matrices)."""
    oracle = common.SeqGANOracle.random(3, vocab=40, dim=6)
    G = S.Generator(40, 6, 6)
    p = oracle.p
    with torch.no_grad():
        G.embedding.weight.copy_(p["g_embeddings"])
        G.W.copy_(torch.cat([p["Wi"], p["Wf"], p["Wog"], p["Wc"]], 1))
        G.U.copy_(torch.cat([p["Ui"], p["Uf"], p["Uog"], p["Uc"]], 1))
        G.b.copy_(torch.cat([p["bi"], p["bf"], p["bog"], p["bc"]]))
        G.Wo.copy_(p["Wo"])
        G.bo.copy_(p["bo"])
    tokens = oracle.sample(50, torch.Generator().manual_seed(0))
    everything = torch.ones_like(tokens, dtype=torch.bool)
    assert S.sequence_nll(G, tokens, everything, 0) == pytest.approx(oracle.nll(tokens).mean().item(), rel=1e-5)
    assert -G.token_log_probs(tokens, 0).mean().item() == pytest.approx(oracle.nll(tokens).mean().item(), rel=1e-5)


def test_mle_pretraining_lowers_the_nll_of_held_out_sequences():
    oracle = common.SeqGANOracle.random(1, vocab=12, dim=4)
    train, test = (oracle.sample(256, torch.Generator().manual_seed(s)) for s in (0, 1))
    torch.manual_seed(0)
    args = S.Args(**{**TINY, "lr_g": 0.05})
    gan = S.build_seqgan(args, 12, 20, torch.device("cpu"))
    before = S.sequence_nll(gan.generator, test, torch.ones_like(test, dtype=torch.bool), 0)
    for step in range(40):
        metrics = S.mle_step(gan, train[step % 8 * 32:(step % 8 + 1) * 32], 0, args)
    after = S.sequence_nll(gan.generator, test, torch.ones_like(test, dtype=torch.bool), 0)
    assert after < before - 0.2 and metrics["loss/g_mle"].item() < before
    assert after > oracle.nll(test).mean().item() - 0.05  # it cannot beat the oracle's own entropy


def test_sampling_draws_from_the_softmax():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).expand(20000, 3)
    drawn = common.inverse_cdf_sample(logits, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=3).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.015)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generation_and_nll_test_use_the_tempered_softmax(temperature):
    """With Wo = 0, G's logits are its bias at every step: tokens are i.i.d. from softmax(bo / T), and the NLL of
    any sequence is the mean of -log softmax(bo / T) over its tokens."""
    torch.manual_seed(0)
    G = S.Generator(3, 4, 4)
    bias = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    with torch.no_grad():
        G.Wo.zero_()
        G.bo.copy_(bias)
    tempered = torch.softmax(bias / temperature, 0)
    drawn = S.generate(G, 10_000, 2, 0, torch.Generator().manual_seed(0), temperature=temperature)
    assert torch.allclose(torch.bincount(drawn.flatten(), minlength=3) / drawn.numel(), tempered, atol=0.015)
    tokens = torch.tensor([[1, 2, 0], [2, 2, 1]])
    expected = -torch.log(tempered)[tokens].mean().item()
    everything = torch.ones_like(tokens, dtype=torch.bool)
    assert S.sequence_nll(G, tokens, everything, 0, temperature) == pytest.approx(expected, rel=1e-6)


def test_schedule_places_every_step_in_its_phase():
    args = S.Args(**{**TINY, "pretrain_epochs": 2, "d_pretrain_rounds": 3, "rounds": 4, "d_rounds": 2,
                     "d_epochs": 2})
    schedule = S.Schedule(args, g_steps_per_epoch=5, d_steps_per_epoch=3)
    assert schedule.phases == [("mle", 10), ("d_pretrain", 18), ("adversarial", 4 * (1 + 2 * 6))]
    assert schedule.locate(9) == ("mle", 9) and schedule.locate(10) == ("d_pretrain", 0)
    assert schedule.locate(28) == ("adversarial", 0) and schedule.locate(schedule.total) == ("done", 0)
    only = S.Schedule(S.Args(**{**TINY, "pretrain_epochs": 2, "rounds": 4, "mle_only": True}), 5, 3)
    assert only.phases == [("mle", 10), ("mle_more", 4)]  # as many G updates as the adversarial phase


def test_presets_fill_only_the_flags_left_unset():
    paper, cpu = S.Args(), S.Args(preset="cpu", rollouts=16)
    assert (paper.rollouts, paper.pretrain_epochs, paper.d_rounds, paper.d_epochs) == (16, 120, 5, 3)
    assert paper.d_filter_counts == S.PAPER_FILTER_COUNTS and paper.d_samples == 9_984 and paper.rounds == 200
    assert cpu.rollouts == 16 and cpu.d_rounds == S.PRESETS["cpu"]["d_rounds"]
    conftest.assert_help_states_presets(S)


# ---------------------------------------------------------------------------------------------------------------
# Runs through main()
# ---------------------------------------------------------------------------------------------------------------

def test_an_oracle_run_writes_every_output(small_oracle, tmp_path):
    out = tmp_path / "run"
    S.main(S.Args(**{**TINY, "dataset": "oracle", "oracle": "random", "out": str(out)}))
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "samples.txt",
                                              "loss.png"}
    lines = metrics_lines(out)
    keys = set().union(*lines)
    assert keys >= {"eval/nll_oracle", "eval/nll_test", "loss/g_mle", "loss/g_pg", "reward/mean", "loss/d",
                    "d/acc", "d/real", "d/fake", "time/rollout", "time/d_score", "time/g_step", "time/d_train"}
    assert lines[0]["step"] == 0 and "eval/nll_oracle" in lines[0]  # the untrained generator
    final = lines[-1]
    assert final["final"] and final["eval/nll_oracle_samples"] == 64 and math.isfinite(final["eval/nll_oracle"])
    samples = (out / "samples.txt").read_text().splitlines()
    assert len(samples) == 20 and all(len(line.split()) == 20 for line in samples)
    assert all(0 <= int(t) < 5000 for line in samples for t in line.split())
    checkpoint = common.load_checkpoint(out)
    assert checkpoint["phase"] == "done" and checkpoint["step"] == 8 + 4 + 2 * (1 + 4)


def test_a_text_run_reports_bleu_and_decodes_sentences(corpus, tmp_path, capsys):
    out = tmp_path / "text"
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(out), "baseline": True,
                     "eval_temperatures": "0.5,2"}))
    assert "D filters wider than the" in capsys.readouterr().out
    final = metrics_lines(out)[-1]
    assert final["eval/bleu_hypotheses"] == 20 and final["eval/bleu_references"] == 30
    assert final["eval/self_bleu_samples"] == 10 and final["eval/oov_rate"] == 0  # every test word was in training
    for prefix in ("eval", "eval_T0.5", "eval_T2"):  # each --eval-temperatures T gets the same metrics
        assert all(0 <= final[f"{prefix}/{kind}{n}"] <= 1 for kind in ("bleu", "self_bleu") for n in (2, 3, 4, 5))
    assert len({final["eval/nll_test"], final["eval_T0.5/nll_test"], final["eval_T2/nll_test"]}) == 3
    words = set(corpus.read_text().split()) | {common.UNK}
    for name in ("samples.txt", "samples_T0.5.txt", "samples_T2.txt"):
        sentences = (out / name).read_text().splitlines()
        assert len(sentences) == 20 and all(set(s.split()) <= words for s in sentences)  # no <pad>, <bos>, <eos>
    assert "reward/baseline" in set().union(*metrics_lines(out))


def test_mle_only_makes_as_many_generator_steps_without_d(small_oracle, tmp_path):
    out = tmp_path / "mle"
    S.main(S.Args(**{**TINY, "dataset": "oracle", "oracle": "random", "out": str(out), "mle_only": True,
                     "rounds": 3}))
    keys = set().union(*metrics_lines(out))
    assert "loss/g_mle" in keys and "loss/g_pg" not in keys and "loss/d" not in keys
    assert common.load_checkpoint(out)["step"] == 8 + 3


def test_resume_equals_an_uninterrupted_run(small_oracle, tmp_path):
    """A run cut at steps 12 (inside MLE), 22 (inside a D pre-training round, its samples drawn) and 28 (inside the
    D training of an adversarial round) and resumed each time ends bit for bit where the uninterrupted run does:
    both networks, the roll-out copy, three optimisers, the baseline, data positions and RNG."""
    flags = {**TINY, "dataset": "oracle", "oracle": "random", "deterministic": True, "pretrain_epochs": 2,
             "d_pretrain_rounds": 2, "rounds": 3, "baseline": True, "rollout_update": 0.8, "log_every": 2}
    S.main(S.Args(**flags, out=str(tmp_path / "whole")))
    for cap in (12, 22, 28, 0):
        S.main(S.Args(**flags, out=str(tmp_path / "split"), max_steps=cap,
                      resume=str(tmp_path / "split") if cap != 12 else ""))
    whole, split = common.load_checkpoint(tmp_path / "whole"), common.load_checkpoint(tmp_path / "split")
    assert whole["step"] == split["step"] == 16 + 8 + 15

    assert_same(whole["seqgan"], split["seqgan"], "seqgan")
    assert whole["seqgan"]["baseline"]["updates"] == 3 and whole["seqgan"]["rollout"] is not None
    assert_same(whole["mle_batches"], split["mle_batches"], "mle_batches")
    assert_same(whole["rng"][0]["torch"], split["rng"][0]["torch"], "rng")
    whole_lines, split_lines = metrics_lines(tmp_path / "whole"), metrics_lines(tmp_path / "split")
    assert training_lines(whole_lines) == training_lines(split_lines)
    assert [r["step"] for r in split_lines if r.get("final")] == [12, 22, 28, 39]
    assert whole_lines[-1] == split_lines[-1]


def test_resuming_with_other_phase_lengths_is_a_user_error(small_oracle, tmp_path, capsys):
    flags = {**TINY, "dataset": "oracle", "oracle": "random", "out": str(tmp_path / "run")}
    S.main(S.Args(**flags, max_steps=10))
    with pytest.raises(common.UserError, match="phase lengths"):
        S.main(S.Args(**{**flags, "pretrain_epochs": 3}, resume=str(tmp_path / "run")))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_oracle, tmp_path, monkeypatch):
    flags = {**TINY, "dataset": "oracle", "oracle": "random", "out": str(tmp_path / "run")}
    S.main(S.Args(**flags, max_steps=4))
    good = common.load_checkpoint(tmp_path / "run")["seqgan"]["generator"]
    nan_loss = lambda logits, tokens: (logits.sum() * float("nan"), {"loss/g_mle": torch.tensor(float("nan"))})
    monkeypatch.setattr(S, "mle_loss", nan_loss)
    with pytest.raises(common.UserError, match="diverged at step 8 .*the last good checkpoint is"):
        S.main(S.Args(**flags, resume=str(tmp_path / "run")))
    kept = common.load_checkpoint(tmp_path / "run")
    assert kept["step"] == 4 and torch.equal(kept["seqgan"]["generator"]["Wo"], good["Wo"])


def test_benchmark_prints_rates_and_writes_nothing(corpus, tmp_path, capsys):
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(tmp_path / "bench"), "benchmark": True,
                     "benchmark_steps": 2}))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("benchmark |")]
    precisions = ["float32"] + (["bf16 (--amp)"] if common.bf16_supported(torch.device("cpu")) else [])
    assert len(lines) == 1 + len(precisions)
    for line, precision in zip(lines[1:], precisions):
        assert line.startswith(f"benchmark | {precision}: MLE") and "D " in line and "adversarial G step" in line
        assert "negatives" in line
        assert "rollouts" in line and "estimated run" in line and "GFLOP per D step" in line
    assert not (tmp_path / "bench").exists()


@pytest.mark.skipif(not (shared_data() / "coco-captions" / "test_coco.txt").is_file(), reason="COCO not present")
def test_real_text_smoke_run(tmp_path):
    out = tmp_path / "coco"
    S.main(S.Args(**{**TINY, "dataset": "coco", "data_dir": str(shared_data()), "out": str(out), "max_steps": 2,
                     "num_samples": 10}))
    final = metrics_lines(out)[-1]
    assert final["eval/bleu_references"] > 9000 and 0 <= final["eval/bleu2"] <= 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

def run_cli(flags, capsys):
    return conftest.run_cli(S.main, S.Args, flags, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--rollouts", "0"], "--rollouts must be at least 1"),
    (["--dataset", "wiki"], "is not one of"),
    (["--d-filter-widths", "1,2", "--d-filter-counts", "3"], "one count per width"),
    (["--d-filter-counts", "3,x"], "comma-separated positive integers"),
    (["--rollout-update", "1.0"], "must be in [0, 1)"),
    (["--mle-only", "--baseline"], "does not use"),
    (["--epochs", "3"], "--pretrain-epochs"),
    (["--dataset", "coco", "--oracle", "random"], "only applies to --dataset oracle"),
    (["--preset", "gpu"], "invalid choice"),
    (["--eval-temperatures", "0.8,x"], "comma-separated positive numbers"),
    (["--eval-temperatures", "-1"], "comma-separated positive numbers"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = run_cli(flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_data_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(common.TEXT_SOURCES["oracle"]["files"], "params", [("target_params.npz", None, None)])
    base = ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    for flags, message in [([], "--oracle random"),
                           (["--dataset", f"file:{tmp_path / 'none.txt'}"], "no such file"),
                           (["--resume", str(tmp_path / "nothing")], "no checkpoint at")]:
        code, err = run_cli(base + flags, capsys)
        assert code in (1, 2) and message in err and len(err.strip().splitlines()) == 1, (flags, err)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def cli(*args):
    return [sys.executable, str(ROOT / "seqgan_rl.py"), *args]


def tiny_flags(**overrides):
    flags = {**TINY, **overrides}
    return [part for key, value in flags.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def test_command_line_errors_help_and_ctrl_c_then_resume(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env_run = lambda argv: subprocess.run(cli(*argv), capture_output=True, text=True, timeout=120,  # noqa: E731
                                          env=env)
    for argv, code in ([["--rollouts", "0"], 2], [["--dataset", f"file:{tmp_path / 'none.txt'}", "--out",
                                                    str(tmp_path / "x")], 1]):
        result = env_run(argv)
        assert result.returncode == code and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    helps = env_run(["--help"])
    assert helps.returncode == 0 and "Yu" in helps.stdout and "--rollout-update" in helps.stdout

    out = tmp_path / "cli"
    process = subprocess.Popen(cli(*tiny_flags(dataset=f"file:{corpus}", out=out, rounds=10_000, log_every=1)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = process.stdout.readline()
        if line.startswith("step 3/"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert "checkpoint in" in stdout and "--resume" in stdout
    step = common.load_checkpoint(out)["step"]
    assert step >= 3
    result = env_run(["--resume", str(out), "--max-steps", str(step + 2)])
    assert result.returncode == 0, result.stderr
    assert common.load_checkpoint(out)["step"] == step + 2 and (out / "samples.txt").is_file()

