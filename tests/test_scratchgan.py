"""scratchgan.py: Sonnet's LSTM, the generator's skip connections and tied embeddings, D's position signal, masks,
dense rewards, discounting, the baseline, both losses, sampling; runs through main() and the command line, exact
resume, and one-line errors."""

import math
import types

import numpy as np
import pytest
import torch

import common
import scratchgan as S
import conftest
from conftest import assert_same, metrics_lines, training_lines

TINY = dict(device="cpu", batch_size=8, steps=6, g_hidden=8, d_hidden=8, emb_dim=8, lr_g=1e-3, lr_d=1e-3,
            eval_every=3, eval_samples=32, final_samples=64, num_samples=20, bleu_samples=20, self_bleu_samples=10,
            log_every=2, checkpoint_every=0)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_norm", [False, True])
def test_lstm_cell_is_sonnets_with_gates_i_j_f_o_and_forget_bias_one(layer_norm):
    torch.manual_seed(0)
    cell = S.SonnetLSTMCell(3, 2, layer_norm)
    if layer_norm:
        with torch.no_grad():
            cell.norm.weight.uniform_(0.5, 1.5)
            cell.norm.bias.uniform_(-0.5, 0.5)
    x, h, c = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2)
    new_h, new_c = cell(x @ cell.w_input, (h, c))
    W = torch.cat([cell.w_input, cell.w_hidden]).detach().numpy()
    for row in range(4):  # one sequence at a time, by numpy
        pre = np.concatenate([x[row].numpy(), h[row].numpy()]) @ W
        if layer_norm:
            pre = (pre - pre.mean()) / np.sqrt(pre.var() + 1e-5) * cell.norm.weight.detach().numpy() + \
                cell.norm.bias.detach().numpy()
        pre = pre + cell.bias.detach().numpy()
        i, j, f, o = pre[0:2], pre[2:4], pre[4:6], pre[6:8]
        cell_ref = sigmoid(f + 1.0) * c[row].numpy() + sigmoid(i) * np.tanh(j)
        np.testing.assert_allclose(new_c[row].detach().numpy(), cell_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_h[row].detach().numpy(), np.tanh(cell_ref) * sigmoid(o), rtol=1e-5,
                                   atol=1e-6)


def test_generator_has_skip_connections_and_tied_embeddings():
    """Layer 2 reads [x; h1], the output is [h1; h2], and logits = ([h1; h2] P_out^T) E^T + b with E the input
    table: computed by hand from the cells."""
    torch.manual_seed(0)
    G = S.Generator(7, emb_dim=3, hidden=4, layers=2)
    tokens = torch.tensor([1, 5])
    state = G.initial_state(2, "cpu")
    output, _ = G.step(G.embedding.table(), tokens, state)
    logits = G.logits(output, G.embedding.table())
    E = G.embedding.trainable
    x = E[tokens] @ G.in_proj
    h1, _ = G.cells[0](x @ G.cells[0].w_input, state[0])
    h2, _ = G.cells[1](torch.cat([x, h1], 1) @ G.cells[1].w_input, state[1])
    expected = torch.cat([h1, h2], 1) @ G.out_proj.t() @ E.t() + G.out_bias
    torch.testing.assert_close(logits, expected)
    # tied means trained from both ends: token 6 is no input here, so its row's gradient is the output side's alone,
    # d(logit_6)/d(E_6) = the output vector, summed over the batch
    logits[:, 6].sum().backward()
    torch.testing.assert_close(E.grad[6], output.detach().sum(0))
    assert G.embedding.trainable.shape == (7, 3) and G.out_proj.shape == (3, 8)
    assert S.Generator(7, 3, 4, layers=1).out_proj is None  # one layer: in_proj is reused, as the official code


def test_position_signal_is_the_official_cosines():
    """cos(pi (t / period_k + shift_k)), periods geometric from 2 to T, shifts linear from 0 to 2."""
    T, P = 52, 8
    periods = 2.0 * (T / 2.0) ** (np.arange(P) / (P - 1))
    shifts = 2.0 * np.arange(P) / (P - 1)
    expected = np.cos(np.pi * (np.arange(T)[:, None] / periods[None] + shifts[None]))
    np.testing.assert_allclose(S.position_signal(T, P).numpy(), expected, atol=1e-5)


def test_d_drops_whole_words_sees_only_the_prefix_and_is_zero_after_the_end():
    torch.manual_seed(0)
    D = S.Discriminator(9, seq_len=6, emb_dim=4, hidden=5, dropout=0.5)
    seen = []
    D.input.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    tokens = torch.tensor([[3, 4, 3, 3, 2, 0]])
    mask = S.sequence_mask(tokens, end_token=2)
    logits = D(tokens, mask)
    words = seen[0][0, :, :4]  # the embedding part of D's input at each position
    assert torch.equal(words[0], words[2]) and torch.equal(words[0], words[3])  # one mask per word, not per place
    assert (words == 0).any()  # and dropout did drop something
    torch.testing.assert_close(seen[0][0, :, 4:], S.position_signal(6))  # then the 8 position features
    assert logits[0, 5] == 0 and logits[0, 4] != 0  # the end token itself is judged, after it nothing
    D.eval()
    changed = tokens.clone()
    changed[0, 3] = 7
    a, b = D(tokens, torch.ones_like(mask)), D(changed, torch.ones_like(mask))
    assert torch.equal(a[0, :3], b[0, :3]) and not torch.equal(a[0, 3:], b[0, 3:])  # D_t sees x_1..x_t only


def test_d_scores_each_step_from_the_lstm_output_h():
    """D_t = w · h_t + b from the LSTM's output h_t (discriminator_nets.py), not its cell state c_t."""
    torch.manual_seed(0)
    D = S.Discriminator(9, seq_len=5, emb_dim=4, hidden=6, dropout=0.0).eval()
    states = []
    D.cell.register_forward_hook(lambda module, inputs, output: states.append(output))
    tokens = torch.tensor([[3, 4, 5, 6, 7]])
    logits = D(tokens, torch.ones_like(tokens, dtype=torch.bool))
    hs = torch.stack([h for h, _ in states], 1)  # (1, T, H)
    torch.testing.assert_close(logits, D.output(hs).squeeze(2))


def test_d_l2_is_half_the_squared_norm_of_every_variable():
    torch.manual_seed(0)
    D = S.Discriminator(9, 6, 4, 5)
    expected = sum(float((p.detach().double() ** 2).sum()) for p in D.parameters()) / 2
    assert {name.split(".")[0] for name, _ in D.named_parameters()} == {"embedding", "input", "cell", "output"}
    assert any("norm" in name for name, _ in D.named_parameters())  # layer norm's gain and bias are regularised too
    assert math.isclose(D.l2_penalty().item(), expected, rel_tol=1e-5)


def test_truncated_normal_redraws_beyond_two_standard_deviations_of_its_own_scale():
    """TF's truncated_normal_initializer cuts at 2 std, not at +-2: for the small stds of Sonnet's layers
    (1/sqrt(n_in)) a cut at +-2 would cut nothing."""
    weights = S.truncated_normal_(torch.empty(100_000), 0.1)
    assert weights.abs().max() <= 0.2 and weights.abs().max() > 0.199
    # N(0, 1) cut to [-2, 2] has std sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)) = 0.8796
    assert weights.std().item() == pytest.approx(0.08796, rel=0.01)


@pytest.mark.parametrize("shape, fans", [((30, 50), (30, 50)), ((40,), (1, 40))])
def test_glorot_uniform_bound_is_sqrt_6_over_the_two_fans(shape, fans):
    """tf.get_variable's default: U(-a, a), a = sqrt(6 / (fan_in + fan_out)); a bias of shape [V] has fans 1, V."""
    bound = math.sqrt(6 / sum(fans))
    weights = torch.cat([S.glorot_uniform_(torch.empty(shape)).flatten() for _ in range(200)])
    assert weights.abs().max() <= bound and weights.abs().max() > 0.99 * bound
    assert weights.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # U(-a, a) has std a / sqrt(3)


def test_the_best_checkpoint_is_selected_on_validation_never_on_test():
    """Selecting best.pt on the test split would leak it into the reported result."""
    data = lambda oracle, valid: types.SimpleNamespace(oracle=oracle, valid=valid)  # noqa: E731
    assert S.selection_metric(data(None, [[1, 2]])) == "eval/nll_valid"
    assert S.selection_metric(data(object(), None)) == "eval/nll_oracle"
    assert S.selection_metric(data(None, None)) is None


def test_glove_rows_follow_the_vocabulary_and_missing_words_are_random(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("2 3\ncat 0.1 0.2 0.3\nsea -1 0 1\n")
    vocab = common.Vocabulary.build([["sea", "cat", "dog"]])
    table = S.read_glove(str(path), vocab, seed=0)
    assert table.shape == (len(vocab), 3)
    torch.testing.assert_close(table[vocab.index["cat"]], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(table[vocab.index["sea"]], torch.tensor([-1.0, 0.0, 1.0]))
    assert table[vocab.index["dog"]].abs().sum() > 0
    G = S.Generator(len(vocab), emb_dim=2, hidden=4, glove=table)
    assert G.embedding.table().shape == (len(vocab), 5) and G.embedding.glove.requires_grad  # trained, as the code
    bad = tmp_path / "bad.txt"
    bad.write_text("cat 0.1 0.2\n")
    with pytest.raises(common.UserError, match="not a GloVe text file"):
        S.read_glove(str(bad), vocab, 0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling, rewards, losses
# ---------------------------------------------------------------------------------------------------------------

def constant_generator(bias, vocab=5) -> S.Generator:
    """A generator whose logits are `bias` at every step (its output projection is zero)."""
    torch.manual_seed(0)
    G = S.Generator(vocab, 3, 4)
    with torch.no_grad():
        G.out_proj.zero_()
        G.out_bias.copy_(torch.tensor(bias))
    return G


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_draws_from_the_tempered_softmax_with_its_log_probs(temperature):
    bias = [1.0, 0.0, -1.0, 2.0, 0.5]
    G = constant_generator(bias)
    tokens, log_probs, mask = S.sample(G, 20_000, 3, start_token=0, end_token=None, temperature=temperature,
                                       rng=torch.Generator().manual_seed(1))
    probs = torch.softmax(torch.tensor(bias) / temperature, 0)
    frequencies = torch.bincount(tokens.flatten(), minlength=5).float() / tokens.numel()
    assert torch.allclose(frequencies, probs, atol=0.01) and mask.all()
    torch.testing.assert_close(log_probs, probs.log()[tokens])


def test_samples_log_probs_are_the_teacher_forced_likelihood_from_the_start_token():
    """One generator, two paths: the log-probabilities `sample` returns are those that teacher forcing (NLL-test,
    --mle) gives the same sequences, both fed the layout's start token first (EOS for real text, in the part
    the official reader gives PAD); the first step is checked against G.step from that token by hand."""
    torch.manual_seed(0)
    G = S.Generator(9, emb_dim=4, hidden=5)
    tokens, log_probs, mask = S.sample(G, 64, 6, start_token=2, end_token=2, rng=torch.Generator().manual_seed(0))
    table = G.embedding.table()
    forced = torch.log_softmax(G.logits(G.teacher_forced(tokens, 2), table), -1)
    forced = forced.gather(2, tokens[..., None]).squeeze(2)
    torch.testing.assert_close(log_probs, forced * mask)
    first, _ = G.step(table, torch.full((64,), 2), G.initial_state(64, "cpu"))
    first = torch.log_softmax(G.logits(first, table), -1).gather(1, tokens[:, :1]).squeeze(1)
    torch.testing.assert_close(log_probs[:, 0], first)


def test_a_sample_ends_at_its_first_end_token_which_counts():
    G = constant_generator([0.0, 0.0, 3.0, 0.0, 0.0])  # the end token 2 is likely at every step
    tokens, log_probs, mask = S.sample(G, 200, 6, start_token=2, end_token=2, rng=torch.Generator().manual_seed(0))
    for row, m, lp in zip(tokens.tolist(), mask.tolist(), log_probs):
        first = row.index(2) if 2 in row else 5
        assert m == [t <= first for t in range(6)]
        assert all(t == 0 for t in row[first + 1:]) and (lp[first + 1:] == 0).all() and (lp[:first + 1] < 0).all()
    assert torch.equal(S.sequence_mask(torch.tensor([[4, 2, 2, 1]]), 2), torch.tensor([[True, True, False, False]]))


def test_rewards_are_two_sigma_minus_one_dense_or_only_at_the_last_token():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    dense = S.rewards_from_logits(logits, mask, dense=True)
    expected = torch.tensor([[2 * sigmoid(0.5) - 1, 2 * sigmoid(-1.0) - 1, 2 * sigmoid(2.0) - 1, 0.0],
                             [2 * sigmoid(1.0) - 1, 2 * sigmoid(3.0) - 1, 0.0, 0.0]], dtype=torch.float32)
    torch.testing.assert_close(dense, expected)
    sparse = S.rewards_from_logits(logits, mask, dense=False)
    torch.testing.assert_close(sparse, torch.tensor([[0, 0, 0, 0], [0, expected[1, 1], 0, 0]]))


@pytest.mark.parametrize("gamma", [0.23, 0.0, 1.0])
def test_discounted_returns_match_the_double_sum(gamma):
    rewards = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros_like(rewards)
    for b in range(3):
        for t in range(7):
            expected[b, t] = sum(gamma ** (s - t) * rewards[b, s] for s in range(t, 7))
    torch.testing.assert_close(S.discounted_returns(rewards, gamma), expected)


def test_reinforce_loss_uses_the_baseline_updated_by_this_batch():
    args = S.Args(preset="cpu", discount=0.5, baseline_decay=0.25)
    baseline = S.MovingBaseline(0.25, "cpu")
    baseline.value = torch.tensor(0.4)
    d_logits = torch.tensor([[1.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    log_probs = torch.tensor([[-0.5, -1.5, 0.0]], requires_grad=True)
    loss, metrics = S.reinforce_loss(d_logits, log_probs, mask, args, baseline)
    r = [2 * sigmoid(1.0) - 1, 2 * sigmoid(-2.0) - 1, 0.0]
    R = [r[0] + 0.5 * r[1], r[1], 0.0]
    b = 0.25 * 0.4 + 0.75 * sum(R) / 3  # updated before use, over all positions
    assert math.isclose(baseline.value.item(), b, rel_tol=1e-6)
    loss.backward()
    np.testing.assert_allclose(log_probs.grad[0].numpy(), [-(R[t] - b) / 3 for t in range(3)], rtol=1e-5)
    assert math.isclose(loss.item(), -sum((R[t] - b) * log_probs[0, t].item() for t in range(3)) / 3, rel_tol=1e-5)


def test_baseline_over_tokens_leaves_the_positions_after_the_end_out():
    args = S.Args(preset="cpu", discount=0.5, baseline_decay=0.25, baseline_over="tokens")
    baseline = S.MovingBaseline(0.25, "cpu")
    baseline.value = torch.tensor(0.4)
    d_logits = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    log_probs = torch.tensor([[-0.5, -1.5, 0.0], [-0.2, 0.0, 0.0]], requires_grad=True)
    S.reinforce_loss(d_logits, log_probs, mask, args, baseline)
    r = [2 * sigmoid(1.0) - 1, 2 * sigmoid(-2.0) - 1]
    live = [r[0] + 0.5 * r[1], r[1], 2 * sigmoid(3.0) - 1]  # the three generated tokens' returns
    assert math.isclose(baseline.value.item(), 0.25 * 0.4 + 0.75 * sum(live) / 3, rel_tol=1e-6)


def test_reinforce_moves_probability_to_the_rewarded_token():
    """A one-step bandit: D rewards token 3 only; a few REINFORCE steps raise its probability."""
    torch.manual_seed(0)
    G = S.Generator(5, 3, 4, layers=1)
    opt = torch.optim.Adam(G.parameters(), lr=0.05)
    args = S.Args(preset="cpu", discount=0.23)
    baseline = S.MovingBaseline(0.08, "cpu")
    def p_rewarded() -> float:
        table = G.embedding.table()
        output, _ = G.step(table, torch.zeros(1, dtype=torch.long), G.initial_state(1, "cpu"))
        return torch.softmax(G.logits(output, table), -1)[0, 3].item()

    start = p_rewarded()
    for _ in range(40):
        tokens, log_probs, mask = S.sample(G, 64, 1, 0, None)
        d_logits = torch.where(tokens == 3, 4.0, -4.0)
        loss, _ = S.reinforce_loss(d_logits, log_probs, mask, args, baseline)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = p_rewarded()
    assert end > 0.9 and end > start + 0.5


class TokenJudge(torch.nn.Module):
    """A stand-in D that calls token 3 real and every other token fake, at every step."""

    def forward(self, tokens, mask):
        return torch.where(tokens == 3, 4.0, -4.0) * mask


def test_the_generator_step_follows_ds_rewards():
    torch.manual_seed(0)
    vocab = common.Vocabulary([str(i) for i in range(5)], specials=False)
    data = common.TextData(torch.zeros(8, 2, dtype=torch.long), torch.zeros(8, 2, dtype=torch.long), vocab, 0, "toy",
                           [])
    args = S.Args(**{**TINY, "dataset": "oracle", "batch_size": 64, "lr_g": 0.02})
    gan = S.build_scratchgan(args, data, torch.device("cpu"))
    gan.discriminator = TokenJudge()
    layout = S.token_layout(data)
    for _ in range(60):
        metrics = S.generator_step(gan, layout, args)
    tokens, _, _ = S.sample(gan.generator, 2000, 2, 0, None)
    assert (tokens == 3).float().mean() > 0.8 and metrics["reward/mean"] > 0.5


def test_d_loss_is_half_real_half_fake_cross_entropy_plus_l2():
    real, fake = torch.tensor([[2.0, -1.0], [0.5, 0.0]]), torch.tensor([[-3.0, 1.0], [0.0, 0.0]])
    ones = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = S.discriminator_loss(real, fake, ones, ones, torch.tensor(10.0), 0.01)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * sum(softplus(-x) for x in real.flatten().tolist()) / 4 + \
        0.5 * sum(softplus(x) for x in fake.flatten().tolist()) / 4 + 0.01 * 10.0
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(metrics["d/real"].item(), sum(sigmoid(x) for x in real.flatten().tolist()) / 4, rel_tol=1e-6)


def test_mle_loss_counts_the_end_token_but_not_the_pad_after_it():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[3, 2, 0, 0], [1, 4, 5, 2]])
    mask = S.sequence_mask(tokens, 2)
    loss, _ = S.mle_loss(logits, tokens, mask)
    terms = [-torch.log_softmax(logits[b, t], -1)[tokens[b, t]].item() for b in range(2) for t in range(4)
             if (b, t) not in ((0, 2), (0, 3))]
    assert math.isclose(loss.item(), sum(terms) / 6, rel_tol=1e-5)


def test_d_learns_to_tell_real_from_generated():
    torch.manual_seed(0)
    args = S.Args(**{**TINY, "dataset": "oracle"})
    vocab = common.Vocabulary([str(i) for i in range(6)], specials=False)
    data = common.TextData(torch.full((64, 5), 4), torch.full((8, 5), 4), vocab, 0, "toy", [])
    gan = S.build_scratchgan(S.Args(**{**TINY, "dataset": "oracle", "lr_d": 1e-2}), data, torch.device("cpu"))
    layout = S.token_layout(data)
    metrics = [S.discriminator_step(gan, data.train[:8], layout, args) for _ in range(30)]
    assert metrics[-1]["d/real"] - metrics[-1]["d/fake"] > 0.5 > metrics[0]["d/real"] - metrics[0]["d/fake"]


def test_the_d_step_masks_each_batch_by_its_own_end_tokens():
    """D's real and fake logits are zeroed after each batch's own first end token: the real rows end at step 2,
    the untrained G's samples wherever they drew EOS."""
    torch.manual_seed(0)
    vocab = common.Vocabulary([common.PAD, common.BOS, common.EOS, common.UNK, "a", "b"])
    real = torch.tensor([[4, 2, 0, 0, 0, 0]] * 8)
    data = common.TextData(real, real, vocab, vocab.index[common.BOS], "toy", [])
    args = S.Args(**{**TINY, "dataset": "oracle"})
    gan = S.build_scratchgan(args, data, torch.device("cpu"))
    layout = S.token_layout(data)
    calls, forward = [], gan.discriminator.forward

    def recording_forward(tokens, mask):
        calls.append((tokens, mask))
        return forward(tokens, mask)

    gan.discriminator.forward = recording_forward
    S.discriminator_step(gan, real, layout, args)
    (real_seen, real_mask), (fake, fake_mask) = calls
    assert torch.equal(real_seen, real) and torch.equal(real_mask, real_mask[:1].expand(8, -1))
    assert real_mask[0].tolist() == [True, True, False, False, False, False]
    assert torch.equal(fake_mask, S.sequence_mask(fake, layout.end)) and not torch.equal(fake_mask, real_mask)


def test_nll_test_counts_words_and_eos_but_neither_pad_nor_unk():
    G = constant_generator([0.0, 1.0, 2.0, 3.0, 4.0])
    vocab = common.Vocabulary([common.PAD, common.BOS, common.EOS, common.UNK, "w"])
    tokens = torch.tensor([[4, 3, 2, 0]])  # w <unk> <eos> <pad>
    data = common.TextData(tokens, tokens, vocab, 1, "toy", [])
    log_p = torch.log_softmax(torch.arange(5.0), 0)
    expected = -(log_p[4] + log_p[2]).item() / 2
    assert math.isclose(S.sequence_nll(G, tokens, data.scored(tokens), 2), expected, rel_tol=1e-5)


def test_presets_fill_only_the_flags_left_unset_and_help_states_them():
    assert S.Args().batch_size == 512 and S.Args().lr_d == 9.38e-3 and S.Args().steps == 200_000
    args = S.Args(preset="cpu", batch_size=32)
    assert args.batch_size == 32 and args.g_hidden == S.PRESETS["cpu"]["g_hidden"]
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
    assert keys >= {"eval/nll_oracle", "eval/nll_test", "loss/g", "loss/d", "reward/mean", "reward/baseline",
                    "reward/return", "d/real", "d/fake"}
    assert lines[0]["step"] == 0 and "eval/nll_oracle" in lines[0]
    final = lines[-1]
    assert final["final"] and final["eval/samples"] == 64 and math.isfinite(final["eval/nll_oracle"])
    samples = (out / "samples.txt").read_text().splitlines()
    assert len(samples) == 20 and all(len(line.split()) == 20 for line in samples)


def test_best_pt_holds_the_generator_of_the_best_evaluation(small_oracle, tmp_path):
    """best.pt is the checkpoint of the evaluation with the lowest NLL-oracle (step 0's untrained G included), and
    its weights reproduce that figure; the whole split and the resumed split agree on it."""
    flags = {**TINY, "dataset": "oracle", "oracle": "random", "steps": 8, "eval_every": 2, "lr_g": 3e-2}
    out = tmp_path / "run"
    S.main(S.Args(**flags, out=str(out)))
    lines = metrics_lines(out)
    evaluations = [(r["eval/nll_oracle"], r["step"]) for r in lines if "eval/nll_oracle" in r and not r.get("final")]
    assert [step for _, step in evaluations] == [0, 2, 4, 6, 8]
    value, step = min(evaluations)
    final = lines[-1]
    assert final["best/step"] == step and final["best/nll_oracle"] == pytest.approx(value, rel=1e-6)
    kept = common.load_checkpoint(out / "best.pt")
    assert kept["step"] == step and kept["best"]["step"] == step and kept["best"]["metric"] == "eval/nll_oracle"
    assert kept["best"]["value"] == pytest.approx(value, rel=1e-6)
    args = S.Args(**flags)
    data = S.load_data(args, torch.device("cpu"))
    gan = S.build_scratchgan(args, data, torch.device("cpu"))
    common.load_state_dicts(vars(gan), kept["scratchgan"])
    again = S.evaluate(gan, data, S.token_layout(data), args, args.eval_samples, args.seed * 1_000_003 + 17 + step)
    assert again[0]["eval/nll_oracle"] == kept["best"]["value"]
    # stopped after the best, off the --eval-every grid: the evaluation at the stop does not compete
    S.main(S.Args(**flags, out=str(tmp_path / "split"), max_steps=step + 1 if step < 8 else 3))
    S.main(S.Args(**flags, out=str(tmp_path / "split"), resume=str(tmp_path / "split")))
    assert metrics_lines(tmp_path / "split")[-1]["best/step"] == step


def test_no_best_pt_without_a_validation_split(corpus, tmp_path, capsys):
    out = tmp_path / "text"
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(out)}))
    assert not (out / "best.pt").exists() and "best/step" not in metrics_lines(out)[-1]
    assert "no validation split, so no best.pt" in capsys.readouterr().out


def test_a_text_run_reports_bleu_per_temperature_and_decodes_sentences(corpus, tmp_path):
    out = tmp_path / "text"
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(out), "eval_temperatures": "0.5,2"}))
    final = metrics_lines(out)[-1]
    for prefix in ("eval", "eval_T0.5", "eval_T2"):
        assert all(0 <= final[f"{prefix}/{kind}{n}"] <= 1 for kind in ("bleu", "self_bleu") for n in (2, 3, 4, 5))
        assert final[f"{prefix}/oov_rate"] == 0 and final[f"{prefix}/nll_test"] > 0
    assert final["eval_T0.5/nll_test"] != final["eval_T2/nll_test"]
    words = set(corpus.read_text().split()) | {common.UNK}
    for name in ("samples.txt", "samples_T0.5.txt", "samples_T2.txt"):
        sentences = (out / name).read_text().splitlines()
        assert len(sentences) == 20 and all(set(s.split()) <= words for s in sentences)


def test_mle_trains_the_same_generator_without_d(corpus, tmp_path):
    out = tmp_path / "mle"
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(out), "mle": True, "steps": 40,
                     "eval_every": 40, "lr_g": 1e-2}))
    lines = metrics_lines(out)
    keys = set().union(*lines)
    assert "loss/g_mle" in keys and "loss/d" not in keys and "loss/g" not in keys
    assert lines[-1]["eval/nll_test"] < lines[0]["eval/nll_test"] - 0.5
    assert common.load_checkpoint(out)["scratchgan"]["discriminator"] is None


def test_resume_equals_an_uninterrupted_run(small_oracle, tmp_path):
    flags = {**TINY, "dataset": "oracle", "oracle": "random", "deterministic": True, "steps": 7}
    S.main(S.Args(**flags, out=str(tmp_path / "whole")))
    for cap in (3, 0):
        S.main(S.Args(**flags, out=str(tmp_path / "split"), max_steps=cap,
                      resume=str(tmp_path / "split") if cap != 3 else ""))
    whole, split = common.load_checkpoint(tmp_path / "whole"), common.load_checkpoint(tmp_path / "split")
    assert whole["step"] == split["step"] == 7
    assert_same(whole["scratchgan"], split["scratchgan"], "scratchgan")
    assert_same(whole["rng"][0]["torch"], split["rng"][0]["torch"], "rng")
    assert training_lines(metrics_lines(tmp_path / "whole")) == training_lines(metrics_lines(tmp_path / "split"))


def test_benchmark_times_both_presets_and_writes_nothing(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(S.PRESETS, "paper", {**S.PRESETS["paper"], "batch_size": 32, "g_hidden": 16})  # fast here
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(tmp_path / "bench"), "benchmark": True,
                     "benchmark_steps": 1}))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("benchmark |")]
    precisions = ["float32"] + (["bf16 (--amp)"] if common.bf16_supported(torch.device("cpu")) else [])
    per_config = 1 + len(precisions)
    headers = lines[::per_config]
    assert len(lines) == 3 * per_config and "this run" in headers[0] and "paper preset" in headers[1]
    assert "cpu preset" in headers[2] and "batch 32, G 2x16" in headers[1] and "batch 128, G 2x128" in headers[2]
    for at, header in enumerate(headers):
        label = header.split(" | ")[1].split(" --mle")[0]
        for line, precision in zip(lines[at * per_config + 1:(at + 1) * per_config], precisions):
            assert line.startswith(f"benchmark | {label}, {precision}: ") and "steps/s" in line
            assert "G sampling" in line and "D update" in line and "steps ~" in line and "GFLOP per step" in line
    assert not (tmp_path / "bench").exists()


def test_benchmark_counts_the_flops_of_one_training_step_only(corpus, tmp_path, monkeypatch):
    """The GFLOP per step divide the timed step (the D update and the G update, each sampling once), not the extra
    sampling pass the benchmark times on its own: counting that would overstate GFLOP/s."""
    monkeypatch.setitem(S.PRESETS, "paper", {**S.PRESETS["paper"], "batch_size": 32, "g_hidden": 16})
    samplings_counted, counting = [], [False]
    real_sample, real_count = S.sample, common.count_flops

    def sample(*args, **kwargs):
        samplings_counted[-1] += counting[0]
        return real_sample(*args, **kwargs)

    def count_flops(fn):
        samplings_counted.append(0)
        counting[0] = True
        try:
            return real_count(fn)
        finally:
            counting[0] = False

    monkeypatch.setattr(S, "sample", sample)
    monkeypatch.setattr(common, "count_flops", count_flops)
    S.main(S.Args(**{**TINY, "dataset": f"file:{corpus}", "out": str(tmp_path / "bench"), "benchmark": True,
                     "benchmark_steps": 1}))
    assert samplings_counted == [2, 2, 2]  # this run, the paper preset, the cpu preset


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--discount", "1.5"], "--discount must be in [0, 1]"),
    (["--eval-temperatures", "0.8,x"], "comma-separated positive numbers"),
    (["--eval-temperatures", "0"], "comma-separated positive numbers"),
    (["--dataset", "wiki"], "is not one of"),
    (["--epochs", "3"], "--steps"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_flag_values(flags, message, capsys):
    code, err = conftest.run_cli(S.main, S.Args, flags, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_data_is_one_line(tmp_path, capsys):
    base = ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    (tmp_path / "empty" / "emnlp2017-news").mkdir(parents=True)
    (tmp_path / "empty" / "emnlp2017-news" / "valid.json").write_text("[]")
    for flags, message in [([], "not train.json"), (["--dataset", f"file:{tmp_path / 'none.txt'}"], "no such file"),
                           (["--resume", str(tmp_path / "nothing")], "no checkpoint at"),
                           (["--dataset", "coco", "--glove", str(tmp_path / "none.txt")], "cannot read")]:
        if "coco" in flags and not (conftest.shared_data() / "coco-captions").is_dir():
            continue
        code, err = conftest.run_cli(S.main, S.Args, base + flags + (["--data-dir", str(conftest.shared_data())]
                                                                     if "coco" in flags else []), capsys)
        assert code in (1, 2) and message in err and len(err.strip().splitlines()) == 1, (flags, err)
