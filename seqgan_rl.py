"""SeqGAN: a text GAN whose generator is trained by policy gradient.

Yu, Zhang, Wang, Yu, "SeqGAN: Sequence Generative Adversarial Nets with Policy Gradient", AAAI 2017, arXiv:1609.05473.

A GAN needs D's verdict to flow back into G. For text it cannot: G's output is a sequence of *sampled* tokens, and
sampling is not differentiable, so D(Y) has zero gradient with respect to G's parameters (`sampled_token_gradients`
below shows it). SeqGAN treats G as a stochastic policy G_theta(y_t | Y_1:t-1) in an MDP whose state is the prefix and
whose action is the next token, with D's probability that a *complete* sequence is real as the reward. It maximises
J(theta) = E[R_T | s_0, theta] (eq. 1) by the likelihood-ratio (REINFORCE) gradient

    grad J ~= sum_t E_{y_t ~ G}[ grad log G_theta(y_t | Y_1:t-1) * Q(Y_1:t-1, y_t) ]                        (7)

and scores unfinished prefixes by Monte-Carlo search: N rollouts complete Y_1:t with the roll-out policy G_beta,

    Q(Y_1:t-1, y_t) = 1/N sum_n D(Y^n_1:T),  Y^n in MC^{G_beta}(Y_1:t; N)   for t < T;  D(Y_1:T) for t = T     (4)

D is a CNN classifier trained on real against generated sequences (eq. 5). Algorithm 1: pre-train G by maximum
likelihood (MLE), pre-train D on G's samples, then alternate one policy-gradient step of G (eq. 8) with rounds of
D training on fresh samples. Here the loss of the G step is  -sum_{b,t} log G(y_t | Y_1:t-1) * (Q - baseline),
summed over batch and time as in the official code; the baseline is 0 unless --baseline.

The roll-out policy G_beta. The paper sets beta <- theta after every round (Algorithm 1), so the rollouts use the
current generator: that is the default here (--rollout-update 0). The official code builds a "delayed copy" with
update rate 0.8, but its roll-out graph reads the live generator's weights (tf.identity of the same variables), so by
most readings that copy has no effect. --rollout-update R > 0 gives a real delayed copy: a separate network, copied
from G when the adversarial phase starts, updated theta_roll <- R theta_roll + (1 - R) theta_G after each G step.

Settings: the official code (LantaoYu/SeqGAN), each value beside its flag in `Args`; the paper's protocol is
Algorithm 1 with 120 MLE epochs, 50 D pre-training rounds and 200 adversarial rounds of [1 G step with N = 16
rollouts per prefix, then 5 x (fresh samples, 3 D epochs)]. `--preset cpu` is a documented reduction (PRESETS).

All N (T-1) rollouts of a batch are one batched computation: G runs once over the 64 samples to get its state after
every prefix, each state is copied N times, and all completions are drawn in lockstep, with rows ordered by prefix
length so that the rows still drawing at step k are a leading slice: T(T-1)/2 row-steps per rollout instead of
T(T-1). D then scores all completed sequences in a few large batches.

Data (common.load_text_dataset): `oracle` is the paper's synthetic benchmark, 9,984 sequences of 20 tokens drawn from
a fixed random LSTM (the paper's own, or --oracle random); NLL-oracle (§4, per token) scores G's samples under the
oracle, NLL-test scores held-out oracle samples under G (NLL-oracle rewards mode collapse, NLL-test exposes it).
Real text (`poems`, `coco`, `emnlp2017`, `file:PATH`) is tokenised at whitespace (poems: one character per token),
padded with PAD after EOS, started from BOS; G samples seq_len tokens and a sample ends at its first EOS or PAD.
NLL-test there counts the words and EOS of the test sentences, not PAD and not <unk> (common.TextData.scored).

Run it:
    python seqgan_rl.py                                  # the paper's oracle and protocol (~17 h on 2 CPU cores)
    python seqgan_rl.py --preset cpu                     # the reduced protocol for 2 CPU cores
    python seqgan_rl.py --mle-only                       # Table 1's MLE row: same G steps, by maximum likelihood
    python seqgan_rl.py --dataset poems --max-len 25     # Chinese quatrains, BLEU against the held-out poems
    python seqgan_rl.py --dataset coco --device cuda     # COCO captions, BLEU-2..5 and self-BLEU
    python seqgan_rl.py --benchmark                      # steps/s of each part and the estimated time of a run
    python seqgan_rl.py --resume runs/<folder>           # continue an interrupted run

Results: README, "seqgan_rl.py on the paper's oracle" and the real-text table after it.
"""

import copy
import dataclasses
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PAPER_FILTER_WIDTHS = "1,2,3,4,5,6,7,8,9,10,15,20"  # SeqGAN Table 5 / sequence_gan.py dis_filter_sizes
PAPER_FILTER_COUNTS = "100,200,200,200,200,100,100,100,100,100,160,160"  # dis_num_filters

# What --preset sets, for every flag left at its sentinel default (-1, or "" for the filter counts); a flag given on
# the command line wins. "paper" is the official code. "cpu" shows SeqGAN beating MLE on NLL-oracle within 30
# minutes on 2 CPU cores, where the paper's protocol takes most of a day, nearly all of it the 4,680 D steps of the
# 7M-parameter D per adversarial round: D gets a quarter of the filters (its highway layer shrinks 16x), one D round
# of 2 epochs over 2 x 2,048 sequences per G step, 20 pre-training rounds, 8 rollouts, 60 MLE epochs (the official
# log is at 9.10 there, 9.07 after 120) and 50 rounds (README, "seqgan_rl.py on the paper's oracle", says why 50).
PRESETS = {
    "paper": dict(pretrain_epochs=120, d_pretrain_rounds=50, d_epochs=3, d_samples=9984, d_rounds=5, rollouts=16,
                  rounds=200, eval_every=5, d_filter_counts=PAPER_FILTER_COUNTS),
    "cpu": dict(pretrain_epochs=60, d_pretrain_rounds=20, d_epochs=2, d_samples=2048, d_rounds=1, rollouts=8,
                rounds=50, eval_every=5, d_filter_counts="25,50,50,50,50,25,25,25,25,25,40,40"),
}
LOGIT_CHUNK = 2 ** 20  # logits materialised at once when sampling or scoring: ~200 rows of a 5,000-token vocabulary
SCORE_BATCH = 1024  # sequences per D call when scoring rollouts and evaluating (no gradient)
SAMPLE_LINES = 100  # samples per samples_<step>.txt


@dataclasses.dataclass
class Args(common.RunArgs):
    dataset: str = "oracle"
    # oracle (the paper's synthetic data) | poems | coco | emnlp2017 (ScratchGAN's JSON) | emnlp2017-texygen | file:PATH
    oracle: typing.Literal["paper", "random"] = "paper"  # paper: SeqGAN's oracle; random: N(0,1) weights from --seed
    preset: typing.Literal["paper", "cpu"] = "paper"  # values of the flags marked "preset" (see PRESETS in the file)
    batch_size: int = 64  # sequences per G and D batch (official code: 64)
    epochs: int = 1  # not used: the phases have their own lengths (--pretrain-epochs, --d-pretrain-rounds, --rounds)
    log_every: int = 100  # optimiser steps (G and D) between metrics lines; one is also written after every epoch/round
    sample_every: int = 0  # steps between samples_<step>.txt files of 100 samples (0: only samples.txt at the end)
    checkpoint_every: int = 2000  # optimiser steps between checkpoint writes (always at the end and on Ctrl-C)
    max_len: int = 0  # real text: tokens per sequence including EOS; longer sentences are dropped (0: the longest)
    vocab_size: int = 0  # real text: cap on the vocabulary, PAD/BOS/EOS/UNK included (0: every training token)
    lower: bool = False  # real text: lower-case before tokenising
    emb_dim: int = 32  # G's token embedding size (official code: 32)
    hidden_dim: int = 32  # G's LSTM state size (official code: 32)
    lr_g: float = 0.01  # Adam learning rate of G, for MLE and for the policy-gradient step (official code: 0.01)
    grad_clip: float = 5.0  # clip G's gradient to this global norm (official code: 5.0)
    pretrain_epochs: int = -1  # MLE pre-training epochs (default from --preset: paper 120, the official code; cpu 60)
    d_emb_dim: int = 64  # D's token embedding size (official code: 64)
    d_filter_widths: str = PAPER_FILTER_WIDTHS  # D's filter widths (Yu et al. Table 5); widths > seq len are dropped
    d_filter_counts: str = ""
    # D's filters per width (default from --preset: paper 100,200,200,200,200,100,100,100,100,100,160,160, Yu et al.
    # Table 5; cpu 25,50,50,50,50,25,25,25,25,25,40,40)
    d_dropout: float = 0.25  # dropout before D's output layer (official code: keep probability 0.75)
    d_l2: float = 0.2  # weight of sum(w^2)/2 over D's output layer, weight and bias (official code: l2_reg_lambda 0.2)
    lr_d: float = 1e-4  # Adam learning rate of D (official code: 1e-4)
    d_pretrain_rounds: int = -1  # D pre-training rounds, each on fresh samples (default: paper 50; cpu 20)
    d_epochs: int = -1  # D epochs over each round's real + generated set (Algorithm 1's k; default: paper 3; cpu 2)
    d_samples: int = -1  # generated (and as many real) sequences per D round (default: paper 9984; cpu 2048)
    rounds: int = -1  # adversarial rounds: one G step, then D rounds (default: paper 200; cpu 50; official script 800)
    rollouts: int = -1  # Monte-Carlo rollouts N per prefix (Yu et al. eq. 4; default: paper 16, official code; cpu 8)
    d_rounds: int = -1  # D rounds of fresh samples after each G step (Algorithm 1's d-steps; default: paper 5; cpu 1)
    rollout_update: float = 0.0
    # roll-out policy: 0 uses the current G (the paper's beta <- theta); R > 0 keeps a separate copy updated
    # theta_roll <- R theta_roll + (1 - R) theta_G after each G step (what the official code's 0.8 appears to intend)
    baseline: bool = False  # subtract a running mean of the reward per position from Q (the paper uses none)
    baseline_decay: float = 0.9  # decay of that running mean (bias-corrected exponential average)
    mle_only: bool = False  # Table 1's MLE row: after pre-training, --rounds more MLE steps instead of SeqGAN rounds
    eval_every: int = -1  # evaluate every this many MLE epochs and adversarial rounds (default: paper 5; cpu 5)
    eval_samples: int = 9_984  # oracle: G samples scored by the oracle at each evaluation (official code: 9,984)
    final_samples: int = 100_000  # oracle: G samples for the final NLL-oracle (Yu et al. §4: 100,000)
    num_samples: int = 10_000  # samples written to samples.txt (token ids for the oracle, sentences for text)
    bleu_samples: int = 1_000  # real text: generated sentences scored by BLEU-2..5 against the whole test split
    self_bleu_samples: int = 500  # real text: generated sentences scored by self-BLEU-2..5 against each other
    eval_temperatures: str = ""  # e.g. 0.8,1.0,1.2: final metrics and samples with G's logits divided by each T

    def __post_init__(self):
        super().__post_init__()
        common.check_text_dataset(self.dataset)
        if self.epochs != 1:
            raise ValueError("--epochs does not apply to seqgan_rl.py; use --pretrain-epochs and --rounds")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) in (-1, ""):
                setattr(self, name, value)
        common.check_ranges(self, at_least_1=("emb_dim", "hidden_dim", "d_emb_dim", "d_epochs", "d_samples", "rollouts",
                                              "eval_every", "eval_samples", "final_samples", "bleu_samples"),
                            at_least_0=("pretrain_epochs", "d_pretrain_rounds", "rounds", "d_rounds", "num_samples",
                                        "max_len", "vocab_size", "d_l2"), positive=("lr_g", "lr_d", "grad_clip"),
                            fraction=("d_dropout", "rollout_update", "baseline_decay"))
        if self.self_bleu_samples < 2:
            raise ValueError(f"--self-bleu-samples must be at least 2, got {self.self_bleu_samples}")
        if self.max_len == 1:
            raise ValueError("--max-len must leave room for a token and EOS (2 or more), or be 0 for the longest")
        widths, counts = self.filter_widths(), self.filter_counts()
        if len(widths) != len(counts):
            raise ValueError(f"--d-filter-widths has {len(widths)} entries and --d-filter-counts {len(counts)}; "
                             f"give one count per width")
        if self.mle_only and (self.baseline or self.rollout_update):
            raise ValueError("--baseline and --rollout-update shape the policy gradient, which --mle-only does not "
                             "use")
        if self.oracle == "random" and self.dataset != "oracle":
            raise ValueError("--oracle random only applies to --dataset oracle")
        self.temperatures()

    def temperatures(self) -> list:
        return common.parse_temperatures(self.eval_temperatures)

    def _int_list(self, name: str) -> list:
        text = getattr(self, name)
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be comma-separated positive integers, got {text!r}")
        return values

    def filter_widths(self) -> list:
        return self._int_list("d_filter_widths")

    def filter_counts(self) -> list:
        return self._int_list("d_filter_counts")


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------

class Generator(nn.Module):
    """The policy G_theta(y_t | Y_1:t-1): an LSTM with the oracle's equations (row vectors, as in the official code),

        [i, f, o, c~] = [σ, σ, σ, tanh](x·W + h·U + b)    c = f·c + i·c~    h = o·tanh(c)    logits = h·Wo + bo

    with the four gates' weights side by side in W (E, 4H), U (H, 4H), b (4H), h = c = 0 at the start and the start
    token's embedding as the first input (Yu et al. §3, the generative model). Every weight ~ N(0, 0.1), the
    official init_matrix."""

    def __init__(self, vocab_size: int, emb_dim: int = 32, hidden_dim: int = 32):
        super().__init__()
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.W = nn.Parameter(torch.empty(emb_dim, 4 * hidden_dim))
        self.U = nn.Parameter(torch.empty(hidden_dim, 4 * hidden_dim))
        self.b = nn.Parameter(torch.empty(4 * hidden_dim))
        self.Wo = nn.Parameter(torch.empty(hidden_dim, vocab_size))
        self.bo = nn.Parameter(torch.empty(vocab_size))
        for p in self.parameters():
            nn.init.normal_(p, 0.0, 0.1)

    def initial_state(self, batch: int, device) -> tuple:
        zeros = torch.zeros(batch, self.hidden_dim, device=device)
        return zeros, zeros

    def cell(self, x_emb: torch.Tensor, h: torch.Tensor, c: torch.Tensor, x_proj=None) -> tuple:
        """One LSTM step: (B, E) input embedding, (B, H) state -> (B, H) new state. x_proj = x·W if precomputed."""
        gates = (x_emb @ self.W if x_proj is None else x_proj) + h @ self.U + self.b  # (B, 4H)
        i, f, o, c_tilde = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(c_tilde)
        return torch.sigmoid(o) * torch.tanh(c), c

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.Wo + self.bo  # (..., V)

    def teacher_forced(self, tokens: torch.Tensor, start_token: int) -> tuple:
        """Run over given sequences (B, T): returns the states h, c (B, T, H) after inputs start, y_1, ..., y_T-1;
        h[:, t] is the state that predicts y_t+1 (0-based: tokens[:, t]), so logits(h) scores the whole sequence."""
        batch, length = tokens.shape
        inputs = torch.cat([torch.full((batch, 1), start_token, dtype=tokens.dtype, device=tokens.device),
                            tokens[:, :-1]], dim=1)  # (B, T): start, y_1..y_T-1
        x_proj = self.embedding(inputs) @ self.W  # (B, T, 4H), all input projections at once
        h, c = self.initial_state(batch, tokens.device)
        hs, cs = [], []
        for t in range(length):
            h, c = self.cell(None, h, c, x_proj[:, t])
            hs.append(h)
            cs.append(c)
        return torch.stack(hs, 1), torch.stack(cs, 1)

    def token_log_probs(self, tokens: torch.Tensor, start_token: int) -> torch.Tensor:
        """log G(y_t | Y_1:t-1) of every token of (B, T) sequences -> (B, T), with gradient."""
        h, _ = self.teacher_forced(tokens, start_token)
        return torch.log_softmax(self.logits(h).float(), -1).gather(2, tokens[..., None]).squeeze(2)


class Discriminator(nn.Module):
    """A CNN sentence classifier (Yu et al. §3 and Table 5, after Kim 2014 and Zhang & LeCun 2015): token embeddings
    (B, T, E) -> for each width l, filters over l consecutive embeddings, ReLU, max over the T - l + 1 positions ->
    concatenation (B, F) -> one highway layer (Srivastava et al. 2015), tau = σ(W_T c + b_T), c <- tau·relu(W_H c +
    b_H) + (1 - tau)·c -> dropout -> 2 logits (fake, real). Widths longer than the sequences are dropped."""

    def __init__(self, vocab_size: int, seq_len: int, emb_dim: int = 64, widths=(1, 2, 3), counts=(100, 200, 200),
                 dropout: float = 0.25):
        super().__init__()
        kept = [(w, n) for w, n in zip(widths, counts) if w <= seq_len]
        if not kept:
            raise common.UserError(f"every D filter is wider than the {seq_len}-token sequences; add narrower "
                                   f"--d-filter-widths")
        self.widths = [w for w, _ in kept]
        features = sum(n for _, n in kept)
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.convs = nn.ModuleList(nn.Conv1d(emb_dim, n, w) for w, n in kept)
        self.highway_transform = nn.Linear(features, features)
        self.highway_gate = nn.Linear(features, features)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(features, 2)
        # the official code's initialisation: embeddings ~ U(-1, 1); filters and output ~ N(0, 0.1) truncated at two
        # standard deviations with biases 0.1; the highway layer has TF's default, Glorot uniform, biases included
        nn.init.uniform_(self.embedding.weight, -1.0, 1.0)
        for layer in [*self.convs, self.output]:
            nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
            nn.init.constant_(layer.bias, 0.1)
        for layer in (self.highway_transform, self.highway_gate):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.uniform_(layer.bias, -math.sqrt(3 / features), math.sqrt(3 / features))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embedding(tokens))

    def classify(self, embedded: torch.Tensor) -> torch.Tensor:
        """(B, T, E) embeddings -> (B, 2) logits for (fake, real)."""
        x = embedded.transpose(1, 2)  # (B, E, T): Conv1d slides along T
        # max over time, then ReLU: ReLU is monotone, so this is the paper's relu-then-max in value and gradient,
        # on T times fewer elements; max's gradient goes to one position (as the official code's tf.nn.max_pool
        # does) where amax's splits ties and costs an elementwise pass over (B, F, T): the paper-sized D step ran
        # 1.06-1.11x as fast under --amp on 2 CPU cores, float32 about even (README, "float32 and bf16")
        c = F.relu(torch.cat([conv(x).max(dim=2).values for conv in self.convs], dim=1))  # (B, F) features
        tau = torch.sigmoid(self.highway_gate(c))  # the transform gate, no extra bias (official code: bias 0)
        c = tau * F.relu(self.highway_transform(c)) + (1 - tau) * c
        return self.output(self.dropout(c))

    def l2_penalty(self) -> torch.Tensor:
        """tf.nn.l2_loss of the output layer's weight and bias: sum(w^2) / 2 (the official code regularises both)."""
        return (self.output.weight.pow(2).sum() + self.output.bias.pow(2).sum()) / 2

    @torch.no_grad()
    def prob_real(self, tokens: torch.Tensor, amp: bool = False) -> torch.Tensor:
        """D(Y) = P(real) for (N, T) sequences, in eval mode (no dropout, as the official rollout scores), batched."""
        was_training = self.training
        self.eval()
        with common.autocast(tokens.device, amp):
            probs = torch.cat([torch.softmax(self(part).float(), -1)[:, 1] for part in tokens.split(SCORE_BATCH)])
        self.train(was_training)
        return probs


# ---------------------------------------------------------------------------------------------------------------
# Sampling and Monte-Carlo rollouts
# ---------------------------------------------------------------------------------------------------------------

def sample_next(policy: Generator, h: torch.Tensor, rng: typing.Optional[torch.Generator] = None,
                temperature: float = 1.0) -> torch.Tensor:
    """y ~ softmax((h·Wo + bo) / temperature) for every row of h (n, H), in chunks of rows so that the n x V logits
    never exist at once (memory, not a loop over samples: each chunk is one batched draw)."""
    rows = max(1, LOGIT_CHUNK // policy.vocab_size)  # divided in float32: under --amp the logits are bf16
    return torch.cat([common.inverse_cdf_sample(policy.logits(part).float() / temperature, rng)
                      for part in h.split(rows)])


@torch.no_grad()
def generate(policy: Generator, count: int, seq_len: int, start_token: int,
             rng: typing.Optional[torch.Generator] = None, chunk: int = 4096, temperature: float = 1.0) -> torch.Tensor:
    """count sequences of seq_len tokens sampled from the policy, its logits divided by temperature -> (count, T)
    int64 (fixed length, as SeqGAN)."""
    device = policy.Wo.device
    out = []
    for start in range(0, count, chunk):
        batch = min(chunk, count - start)
        h, c = policy.initial_state(batch, device)
        x = policy.embedding(torch.full((batch,), start_token, dtype=torch.long, device=device))
        tokens = []
        for _ in range(seq_len):
            h, c = policy.cell(x, h, c)
            y = sample_next(policy, h, rng, temperature)
            tokens.append(y)
            x = policy.embedding(y)
        out.append(torch.stack(tokens, 1))
    return torch.cat(out) if out else torch.zeros(0, seq_len, dtype=torch.long, device=device)


@torch.no_grad()
def monte_carlo_rollouts(policy: Generator, samples: torch.Tensor, start_token: int, num_rollouts: int,
                         rng: typing.Optional[torch.Generator] = None) -> torch.Tensor:
    """MC^{G_beta}(Y_1:g; N) for every prefix length g = 1..T-1 of every sample (Yu et al. eq. 3), all at once:
    (B, T) samples -> (T-1, B, N, T) completed sequences, rollouts[g-1, b, n, :g] == samples[b, :g].

    One teacher-forced pass gives the state after every prefix; each is copied N times. Rows are ordered by prefix
    length g, then sample, then rollout. A prefix of length g needs T - g draws, so at lockstep step k the rows still
    drawing are those with g <= T-1-k: the first B·N·(T-1-k) rows. Every step is one batched LSTM step and one batched
    draw over that slice; the loop runs over the T-1 steps only."""
    batch, length = samples.shape
    n = num_rollouts
    h_all, c_all = policy.teacher_forced(samples, start_token)  # (B, T, H); h_all[:, g] predicts token g (0-based)
    per_prefix = batch * n  # rows per prefix length

    def rows(states):  # (B, T, H) -> states after prefixes g = 1..T-1, as (T-1)·B·N rows ordered (g, b, n)
        return states[:, 1:].transpose(0, 1)[:, :, None].expand(-1, -1, n, -1).reshape(-1, states.shape[-1])

    h, c = rows(h_all), rows(c_all)
    prefix_len = torch.arange(1, length, device=samples.device).repeat_interleave(per_prefix)  # (rows,)
    tokens = samples[None, :, None].expand(length - 1, -1, n, -1).reshape(-1, length).clone()  # prefixes kept
    for k in range(length - 1):
        active = per_prefix * (length - 1 - k)  # rows with g <= T-1-k still draw their token g + k
        y = sample_next(policy, h[:active], rng)
        tokens[:active].scatter_(1, (prefix_len[:active] + k)[:, None], y[:, None])
        still = per_prefix * (length - 2 - k)  # rows that draw again at step k + 1
        if still:
            h, c = policy.cell(policy.embedding(y[:still]), h[:still], c[:still])
    return tokens.view(length - 1, batch, n, length)


@torch.no_grad()
def rollout_rewards(policy: Generator, discriminator: Discriminator, samples: torch.Tensor, start_token: int,
                    num_rollouts: int, amp: bool = False, timings: typing.Optional[dict] = None) -> torch.Tensor:
    """Q(Y_1:t-1, y_t) of Yu et al. eq. 4 for every token of (B, T) samples -> (B, T): the mean of D(real) over the
    N completions of Y_1:t for t < T, and D of the whole sequence for t = T."""
    batch, length = samples.shape
    clock = common.Clock(samples.device)
    rollouts = monte_carlo_rollouts(policy, samples, start_token, num_rollouts)
    rollout_time = clock()
    scores = discriminator.prob_real(torch.cat([rollouts.reshape(-1, length), samples]), amp)  # one pass over all
    q = scores[:-batch].view(length - 1, batch, num_rollouts).mean(2).t()  # (B, T-1)
    if timings is not None:
        timings["time/rollout"] = timings.get("time/rollout", 0.0) + rollout_time
        timings["time/d_score"] = timings.get("time/d_score", 0.0) + clock()
    return torch.cat([q, scores[-batch:, None]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Losses: pure functions, in float32
# ---------------------------------------------------------------------------------------------------------------

def mle_loss(logits: torch.Tensor, tokens: torch.Tensor):
    """Maximum likelihood (teacher forcing) on logits (B, T, V) of tokens (B, T): the mean over batch and time of
    -log G(y_t | Y_1:t-1), every position counted, PAD after EOS included, so that G learns to pad as the data do
    (the official pretrain_loss)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    return loss, {"loss/g_mle": loss.detach()}


def policy_gradient_loss(log_probs: torch.Tensor, rewards: torch.Tensor,
                         baseline: typing.Optional[torch.Tensor] = None):
    """The REINFORCE surrogate of Yu et al. eqs. 7-8: its gradient is -sum_t grad log G(y_t | Y_1:t-1) · Q.
    log_probs, rewards: (B, T); summed over batch and time as in the official code (its g_loss). A baseline b (T,)
    turns Q into the advantage Q - b: the expected gradient is unchanged (E[grad log G] = 0), its variance falls.
    Without one, every reward is positive (D's probability), so every sampled token is pushed up, each by its own
    amount, and the signal is the small difference between those pushes: the variance of REINFORCE."""
    rewards = rewards.detach().float()
    advantage = rewards if baseline is None else rewards - baseline
    loss = -(log_probs.float() * advantage).sum()
    metrics = {"loss/g_pg": loss.detach(), "reward/mean": rewards.mean(), "reward/final": rewards[:, -1].mean()}
    if baseline is not None:
        metrics["reward/baseline"] = baseline.mean()
    return loss, metrics


def discriminator_loss(logits: torch.Tensor, labels: torch.Tensor, l2_penalty: torch.Tensor, l2_weight: float):
    """Yu et al. eq. 5 as a 2-class softmax cross-entropy (the official code's form; label 1 = real) plus
    l2_weight · sum(w^2)/2 over the output layer."""
    logits = logits.float()
    cross_entropy = F.cross_entropy(logits, labels)
    loss = cross_entropy + l2_weight * l2_penalty
    with torch.no_grad():
        p_real = torch.softmax(logits, -1)[:, 1]
        real = labels.float()
        metrics = {"loss/d": loss.detach(), "loss/d_ce": cross_entropy.detach(),
                   "d/acc": (logits.argmax(1) == labels).float().mean(),
                   "d/real": (p_real * real).sum() / real.sum().clamp(min=1),
                   "d/fake": (p_real * (1 - real)).sum() / (1 - real).sum().clamp(min=1)}
    return loss, metrics


def sampled_token_gradients(policy: Generator, discriminator: Discriminator, count: int, seq_len: int,
                            start_token: int) -> dict:
    """The lecture's point, measured: norms of the gradient of mean D(real) with respect to G's parameters when D
    judges G's samples. For sequences drawn by multinomial sampling or by argmax the tokens are integers made by a
    non-differentiable choice, so autograd finds no path from D back to G: every gradient is None (norm 0), however
    D is built. Two contrasts that do reach G: the REINFORCE surrogate log G(Y) · D(Y), which SeqGAN uses, and a soft
    relaxation that feeds D the expected embedding softmax(logits) · E (Gumbel-softmax GANs; not SeqGAN)."""
    parameters = list(policy.parameters())
    device = policy.Wo.device

    def norm(output: torch.Tensor) -> float:
        grads = torch.autograd.grad(output, parameters, allow_unused=True, retain_graph=True)
        present = [g for g in grads if g is not None]
        return torch.sqrt(sum(g.pow(2).sum() for g in present)).item() if present else 0.0

    results = {}
    with torch.enable_grad():
        for choice in ("multinomial", "argmax"):
            h, c = policy.initial_state(count, device)
            x = policy.embedding(torch.full((count,), start_token, dtype=torch.long, device=device))
            tokens = []
            for _ in range(seq_len):  # the sampling loop runs with gradients on: the logits carry G's graph
                h, c = policy.cell(x, h, c)
                probs = torch.softmax(policy.logits(h), -1)
                y = torch.multinomial(probs, 1).squeeze(1) if choice == "multinomial" else probs.argmax(1)
                tokens.append(y)
                x = policy.embedding(y)
            sequences = torch.stack(tokens, 1)
            assert not sequences.requires_grad  # integers: the graph ends here
            results[choice] = norm(torch.softmax(discriminator(sequences), -1)[:, 1].mean())
        reward = torch.softmax(discriminator(sequences), -1)[:, 1].detach()
        log_probs = policy.token_log_probs(sequences, start_token)
        results["policy_gradient"] = norm((log_probs.sum(1) * reward).mean())
        h, _ = policy.teacher_forced(sequences, start_token)
        soft_embedding = torch.softmax(policy.logits(h), -1) @ discriminator.embedding.weight  # (B, T, E)
        results["soft_relaxation"] = norm(torch.softmax(discriminator.classify(soft_embedding), -1)[:, 1].mean())
    return results


# ---------------------------------------------------------------------------------------------------------------
# Training state and steps
# ---------------------------------------------------------------------------------------------------------------

class RewardBaseline:
    """Running mean of the reward at each position t (T,), bias-corrected like Adam's moments."""

    def __init__(self, length: int, decay: float, device):
        self.decay, self.mean, self.updates = decay, torch.zeros(length, device=device), 0

    def value(self) -> typing.Optional[torch.Tensor]:
        return self.mean / (1 - self.decay ** self.updates) if self.updates else None

    def update(self, rewards: torch.Tensor) -> None:
        self.mean.mul_(self.decay).add_(rewards.float().mean(0), alpha=1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"mean": self.mean, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.updates = state["mean"].to(self.mean.device), state["updates"]


@dataclasses.dataclass
class SeqGAN:
    generator: Generator
    discriminator: Discriminator
    rollout: typing.Optional[Generator]  # the delayed roll-out copy (--rollout-update > 0), else None
    opt_mle: torch.optim.Optimizer  # two Adams for G, as in the official code (pretrain_opt and g_opt)
    opt_pg: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    baseline: typing.Optional[RewardBaseline]

    def rollout_policy(self) -> Generator:
        return self.rollout if self.rollout is not None else self.generator


def build_seqgan(args: Args, vocab_size: int, seq_len: int, device: torch.device) -> SeqGAN:
    generator = Generator(vocab_size, args.emb_dim, args.hidden_dim).to(device)
    discriminator = Discriminator(vocab_size, seq_len, args.d_emb_dim, args.filter_widths(), args.filter_counts(),
                                  args.d_dropout).to(device)
    rollout = copy.deepcopy(generator).requires_grad_(False) if args.rollout_update else None
    adam = lambda params, lr: common.adam(params, lr=lr)  # noqa: E731 (TF's Adam: betas 0.9, 0.999)
    return SeqGAN(generator, discriminator, rollout, adam(generator.parameters(), args.lr_g),
                  adam(generator.parameters(), args.lr_g), adam(discriminator.parameters(), args.lr_d),
                  RewardBaseline(seq_len, args.baseline_decay, device) if args.baseline else None)


def mle_step(gan: SeqGAN, tokens: torch.Tensor, start_token: int, args: Args) -> dict:
    G = gan.generator
    h, _ = G.teacher_forced(tokens, start_token)
    loss, metrics = mle_loss(G.logits(h), tokens)
    gan.opt_mle.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad/g"] = nn.utils.clip_grad_norm_(G.parameters(), args.grad_clip)  # the norm before clipping
    gan.opt_mle.step()
    return metrics


def policy_gradient_step(gan: SeqGAN, seq_len: int, start_token: int, args: Args, timings: dict) -> dict:
    """One G update of Algorithm 1: sample a batch, score every token by Monte-Carlo search (eq. 4), ascend eq. 7."""
    G = gan.generator
    clock = common.Clock(G.Wo.device)
    samples = generate(G, args.batch_size, seq_len, start_token)
    timings["time/rollout"] = timings.get("time/rollout", 0.0) + clock()
    rewards = rollout_rewards(gan.rollout_policy(), gan.discriminator, samples, start_token, args.rollouts, args.amp,
                              timings)
    clock()
    baseline = gan.baseline.value() if gan.baseline is not None else None
    loss, metrics = policy_gradient_loss(G.token_log_probs(samples, start_token), rewards, baseline)
    gan.opt_pg.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad/g"] = nn.utils.clip_grad_norm_(G.parameters(), args.grad_clip)
    gan.opt_pg.step()
    if gan.baseline is not None:
        gan.baseline.update(rewards)
    if gan.rollout is not None:
        with torch.no_grad():  # theta_roll <- R theta_roll + (1 - R) theta_G
            for p_roll, p in zip(gan.rollout.parameters(), G.parameters()):
                p_roll.lerp_(p, 1 - args.rollout_update)
    timings["time/g_step"] = timings.get("time/g_step", 0.0) + clock()
    return metrics


def discriminator_set(gan: SeqGAN, train: torch.Tensor, start_token: int, args: Args) -> torch.Tensor:
    """One D round's data: n real sequences (a random subset of the training set when it is larger) and n fresh
    samples of G, with the label (1 real, 0 generated) as an extra last column: (2n, T+1)."""
    n = min(args.d_samples, len(train))
    real = train[torch.randperm(len(train), device=train.device)[:n]]
    fake = generate(gan.generator, n, train.shape[1], start_token)
    labels = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)]).to(train)
    return torch.cat([torch.cat([real, fake]), labels], dim=1)


class DiscriminatorRound:
    """The data of the current D round, drawn at its first step (discriminator_set) and batched in an order seeded
    by the round's number; kept in a checkpoint taken inside the round, so that a resumed run trains on the same."""

    def __init__(self, args: Args, device: torch.device):
        self.args, self.device, self.rows, self.batches = args, device, None, None

    def next(self, gan: SeqGAN, train: torch.Tensor, start_token: int, where: "Position") -> torch.Tensor:
        if self.rows is None:
            self.rows = discriminator_set(gan, train, start_token, self.args)
            self.batches = common.Batches((self.rows,), self.args.batch_size, self.args.seed * 100_003 + where.d_set,
                                          self.device)
        (batch,) = self.batches.next()
        if where.ends_d_set:
            self.rows, self.batches = None, None
        return batch

    def state_dict(self) -> typing.Optional[dict]:
        return None if self.rows is None else {"rows": self.rows, "seed": self.batches.seed,
                                               "batches": self.batches.state_dict()}

    def load_state_dict(self, state: typing.Optional[dict]) -> None:
        if state is not None:
            self.rows = state["rows"].to(self.device)
            self.batches = common.Batches((self.rows,), self.args.batch_size, state["seed"], self.device)
            self.batches.load_state_dict(state["batches"])


def discriminator_step(gan: SeqGAN, rows: torch.Tensor, args: Args) -> dict:
    tokens, labels = rows[:, :-1], rows[:, -1]
    D = gan.discriminator
    with common.autocast(tokens.device, args.amp):
        logits = D(tokens)
    loss, metrics = discriminator_loss(logits, labels, D.l2_penalty(), args.d_l2)
    gan.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    gan.opt_d.step()
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sequence_nll(policy: Generator, tokens: torch.Tensor, scored: torch.Tensor, start_token: int,
                 temperature: float = 1.0) -> float:
    """G's mean NLL per token (nats) of held-out sequences (B, T), teacher-forced, over the targets where `scored`
    (B, T) is True (TextData.scored: for real text not PAD, not <unk>; for the oracle every position), under
    softmax(logits / temperature)."""
    total, count = 0.0, int(scored.sum())
    rows = max(1, LOGIT_CHUNK // policy.vocab_size)
    for chunk, mask in zip(tokens.split(SCORE_BATCH), scored.split(SCORE_BATCH)):
        chunk, mask = chunk.to(policy.Wo.device), mask.to(policy.Wo.device)
        h, _ = policy.teacher_forced(chunk, start_token)  # the LSTM over many sequences, then logits a slice at a time
        for h_part, y_part, m_part in zip(h.flatten(0, 1).split(rows), chunk.flatten().split(rows),
                                          mask.flatten().split(rows)):
            nll = F.cross_entropy(policy.logits(h_part).float() / temperature, y_part, reduction="none")
            total += common.to_host_float64(nll * m_part).sum().item()
    return total / max(count, 1)


def evaluate(gan: SeqGAN, data: common.TextData, args: Args, count: int, seed: int,
             temperature: float = 1.0) -> tuple:
    """NLL-oracle (oracle), NLL-test (<unk> and PAD not counted), and for real text the share of test tokens that
    are <unk>, BLEU-2..5 against the test split and self-BLEU-2..5, on `count` fresh samples drawn with their own
    generator (the training RNG is untouched), G's logits divided by temperature. Returns (metrics, samples)."""
    G = gan.generator
    rng = torch.Generator(device=G.Wo.device).manual_seed(seed)
    samples = generate(G, count, data.seq_len, data.start_token, rng, temperature=temperature)
    metrics = {}
    if data.oracle is not None:
        metrics["eval/nll_oracle"] = data.oracle.nll(samples).mean().item()  # Yu et al. §4, per token
    metrics["eval/nll_test"] = sequence_nll(G, data.test, data.scored(data.test), data.start_token, temperature)
    if data.oracle is None:
        metrics.update(common.text_sample_metrics([data.vocab.decode(s) for s in samples.cpu()], data,
                                                  args.bleu_samples, args.self_bleu_samples))
    return metrics, samples


# ---------------------------------------------------------------------------------------------------------------
# The schedule: phases of optimiser steps, so that a step number says exactly where a run is
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Position:
    """What one step of the run is (Schedule.at)."""

    phase: str
    kind: str  # "mle", "pg" (G's policy-gradient step) or "d"
    unit: dict  # the epoch, D round or adversarial round the step belongs to, as the metrics line names it
    ends_unit: bool  # the last step of its epoch, D round or adversarial round: a metrics line follows
    evaluate: bool  # evaluate after this step
    d_set: int = 0  # D steps: the number of the D round, which seeds the order of its data
    ends_d_set: bool = False  # D steps: the last step on this D round's data
    first_round: bool = False  # the adversarial phase's first G step (a delayed roll-out copy starts as G)


class Schedule:
    """Every optimiser step of the run, G or D, in order:
        mle          pretrain_epochs x (steps per epoch) MLE steps
        d_pretrain   d_pretrain_rounds x [fresh samples, d_epochs x (steps per D epoch)] D steps   (not --mle-only)
        adversarial  rounds x [1 G step, then d_rounds x (fresh samples, d_epochs D epochs)]
        mle_more     --mle-only: rounds x 1 MLE step, the same number of G updates as the adversarial phase
    so that a step number says exactly where a run is: locate(step) gives its phase and its position inside it,
    at(step) what the step does. Evaluations follow the official code: every eval_every MLE epochs and the last,
    and right after the G step of rounds 0, eval_every, ... and the last."""

    def __init__(self, args: Args, g_steps_per_epoch: int, d_steps_per_epoch: int):
        self.args, self.g_steps_per_epoch, self.d_steps_per_epoch = args, g_steps_per_epoch, d_steps_per_epoch
        self.d_round = args.d_epochs * d_steps_per_epoch  # D steps per D round
        self.round = 1 if args.mle_only else 1 + args.d_rounds * self.d_round  # steps per adversarial round
        self.phases = [("mle", args.pretrain_epochs * g_steps_per_epoch)]
        if args.mle_only:
            self.phases.append(("mle_more", args.rounds))
        else:
            self.phases += [("d_pretrain", args.d_pretrain_rounds * self.d_round),
                            ("adversarial", args.rounds * self.round)]
        self.total = sum(length for _, length in self.phases)

    def locate(self, step: int) -> tuple:
        for name, length in self.phases:
            if step < length:
                return name, step
            step -= length
        return "done", step

    def state(self, step: int) -> dict:
        phase, position = self.locate(step)
        return {"phase": phase, "position": position}

    def at(self, step: int) -> Position:
        args, (phase, position) = self.args, self.locate(step)
        if phase == "mle":
            epoch, index = divmod(position + 1, self.g_steps_per_epoch)
            return Position(phase, "mle", {"epoch": epoch} if index == 0 else {}, index == 0,
                            index == 0 and (epoch % args.eval_every == 0 or epoch == args.pretrain_epochs))
        if phase == "mle_more":  # one MLE step stands for one adversarial round, evaluated on the same rounds
            return Position(phase, "mle", {"round": position + 1}, False,
                            position % args.eval_every == 0 or position == args.rounds - 1)
        if phase == "d_pretrain":
            d_round, inside = divmod(position, self.d_round)
            last = inside + 1 == self.d_round
            return Position(phase, "d", {"d_round": d_round + 1}, last, False, d_round, last)
        adv_round, inside = divmod(position, self.round)
        unit, ends = {"round": adv_round + 1}, (position + 1) % self.round == 0
        if inside == 0:
            return Position(phase, "pg", unit, ends, adv_round % args.eval_every == 0 or adv_round == args.rounds - 1,
                            first_round=adv_round == 0)
        d_round, inside = divmod(inside - 1, self.d_round)
        return Position(phase, "d", unit, ends, False, args.d_pretrain_rounds + adv_round * args.d_rounds + d_round,
                        inside + 1 == self.d_round)

    def curve_x(self, step: int) -> float:
        """The paper's x-axis (Fig. 2): MLE epochs, then pre-training epochs + adversarial rounds."""
        phase, position = self.locate(step)
        if phase == "mle":
            return position / self.g_steps_per_epoch
        done = step - self.phases[0][1]
        if not self.args.mle_only:
            done -= self.phases[1][1]
        return self.args.pretrain_epochs + max(0, done) / self.round

    def check_resume(self, checkpoint: dict, path: str) -> None:
        """A checkpoint continues only with the phase lengths it was trained with (--rounds may grow)."""
        step, saved = checkpoint["step"], {"phase": checkpoint["phase"], "position": checkpoint["position"]}
        extended = saved["phase"] == "done" and self.locate(step)[0] == self.phases[-1][0]
        if self.state(step) != saved and not extended:
            raise common.UserError(f"{path} stopped in phase {saved['phase']} at position {saved['position']}, but "
                                   f"with these flags step {step} falls in {self.locate(step)[0]}; resume with the "
                                   f"phase lengths it was trained with (only --rounds may grow)")

    def describe(self, phase: str) -> str:
        args = self.args
        return {"mle": f"MLE pre-training: {args.pretrain_epochs} epochs x {self.g_steps_per_epoch} steps",
                "d_pretrain": f"D pre-training: {args.d_pretrain_rounds} rounds x (fresh samples, {args.d_epochs} "
                              f"epochs x {self.d_steps_per_epoch} steps)",
                "adversarial": f"adversarial training: {args.rounds} rounds x (1 G step with {args.rollouts} "
                               f"rollouts per prefix, {args.d_rounds} x {args.d_epochs} D epochs)",
                "mle_more": f"MLE continued (--mle-only): {args.rounds} steps"}.get(phase, phase)


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------

def benchmark(gan: SeqGAN, data: common.TextData, args: Args, run: common.Run, schedule: Schedule,
              mle_batches: common.Batches, train: torch.Tensor) -> None:
    """Steps/s of MLE, D and adversarial G steps on the configured sizes, in float32 and under --amp side by side,
    and the time of a whole run estimated from them; D's step (most of a run) also as GFLOP/s against the machine's
    matmul rate. Writes nothing (the networks train on, in memory)."""
    device, start, length = run.device, data.start_token, data.seq_len
    clock = common.Clock(device)

    def seconds_per_call(fn, calls: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        clock()
        for _ in range(calls):
            fn()
        return clock() / calls

    d_batches = common.Batches((discriminator_set(gan, train, start, args),), args.batch_size, args.seed, device)
    saved, args.amp = args.amp, False
    d_flops = common.count_flops(lambda: discriminator_step(gan, d_batches.next()[0], args))
    args.amp = saved

    def measure() -> dict:
        # the steady-state cost of a round's negatives: the first draw above also pays for the allocator's first
        # touch of its buffers (3x the time on 2 CPU cores), which a run pays once, not once per round
        negatives = seconds_per_call(lambda: discriminator_set(gan, train, start, args), 2, warmup=1)
        d_step = seconds_per_call(lambda: discriminator_step(gan, d_batches.next()[0], args), args.benchmark_steps)
        mle = seconds_per_call(lambda: mle_step(gan, mle_batches.next()[0], start, args), args.benchmark_steps)
        calls, timings = max(1, args.benchmark_steps // 10), {}
        policy_gradient_step(gan, length, start, args, {})  # warm-up
        g_round = seconds_per_call(lambda: policy_gradient_step(gan, length, start, args, timings), calls, warmup=0)
        split = {k: v / calls for k, v in timings.items()}
        clock()
        evaluate(gan, data, args, args.eval_samples if data.oracle is not None else
                 max(args.bleu_samples, args.self_bleu_samples), args.seed)
        evaluation = clock()
        d_round = negatives + schedule.d_round * d_step
        evals = args.pretrain_epochs // args.eval_every + 1 + math.ceil(args.rounds / args.eval_every) + 1
        final_scale = args.final_samples / args.eval_samples if data.oracle is not None else 1
        estimate = {"MLE": schedule.phases[0][1] * mle,
                    "D pre-training": 0 if args.mle_only else args.d_pretrain_rounds * d_round,
                    "adversarial": args.rounds * (mle if args.mle_only else g_round + args.d_rounds * d_round),
                    "evaluation": (evals + final_scale) * evaluation}
        minutes = lambda seconds: f"{seconds / 60:.1f} min"  # noqa: E731
        text = (f"MLE {1 / mle:.1f} steps/s | drawing a D round's {min(args.d_samples, len(train)):,} negatives "
                f"{negatives:.2f} s | D {1 / d_step:.1f} steps/s, one D epoch "
                f"({schedule.d_steps_per_epoch} steps) {schedule.d_steps_per_epoch * d_step:.1f} s | adversarial G "
                f"step {1 / g_round:.3f} steps/s ({g_round:.2f} s: rollouts {split.get('time/rollout', 0):.2f} s, "
                f"D scoring {split.get('time/d_score', 0):.2f} s, G update {split.get('time/g_step', 0):.2f} s; "
                f"{args.rollouts} rollouts) | one evaluation {evaluation:.2f} s | estimated run: " +
                ", ".join(f"{k} {minutes(v)}" for k, v in estimate.items()) +
                f", total {minutes(sum(estimate.values()))}")
        return {"d_rate": 1 / d_step, "text": text}

    results = common.benchmark_precisions(measure, args, device, rounds=1)
    if run.is_main:
        print(f"benchmark | {device.type}, {torch.get_num_threads()} threads | {data.name}, vocab {len(data.vocab)}, "
              f"T {length}, batch {args.batch_size} | D {sum(p.numel() for p in gan.discriminator.parameters()):,} "
              f"params, G {sum(p.numel() for p in gan.generator.parameters()):,}")
        for line in common.precision_lines(results, "d_rate", d_flops, device, lambda result: result["text"]):
            print(f"benchmark | {line.replace(' GFLOP per step', ' GFLOP per D step')}")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    with common.session(args, "seqgan_rl") as run:
        train(args, run)


def train(args: Args, run: common.Run) -> None:
    device = run.device
    if run.world_size > 1:
        raise common.UserError("seqgan_rl.py runs in one process; start it with python, not torchrun")
    data = common.load_text_dataset(args.dataset, args.data_dir, args.max_len, args.vocab_size, args.lower,
                                    args.oracle, args.seed, device)
    length, start = data.seq_len, data.start_token
    train_tokens = data.train.to(device)
    gan = build_seqgan(args, len(data.vocab), length, device)
    common.maybe_compile(gan.discriminator, args.compile)  # G's Python loop over time is left eager
    mle_batches = common.Batches((data.train,), args.batch_size, args.seed, device, what="sequences")
    d_steps_per_epoch = 2 * min(args.d_samples, len(data.train)) // args.batch_size
    if d_steps_per_epoch == 0:
        raise common.UserError(f"a D round of {2 * min(args.d_samples, len(data.train))} sequences is less than one "
                               f"batch of {args.batch_size}; raise --d-samples or lower --batch-size")
    schedule = Schedule(args, mle_batches.steps_per_epoch, d_steps_per_epoch)
    total_steps = min(schedule.total, args.max_steps or schedule.total)
    if args.benchmark:
        return benchmark(gan, data, args, run, schedule, mle_batches, train_tokens)

    d_round = DiscriminatorRound(args, device)

    def load_state(checkpoint):
        common.load_state_dicts(vars(gan), checkpoint["seqgan"])
        mle_batches.load_state_dict(checkpoint["mle_batches"])
        schedule.check_resume(checkpoint, args.resume)
        d_round.load_state_dict(checkpoint["d_set"])

    step = common.resume(args, run, load_state)["step"] if args.resume else 0
    checkpoints = common.Checkpoints(run, "seqgan_rl.py", "a lower --lr-g or --baseline", step if args.resume else None)
    state = lambda: {**schedule.state(step), "args": dataclasses.asdict(args),  # noqa: E731
                     "seqgan": common.state_dicts(vars(gan)), "mle_batches": mle_batches.state_dict(),
                     "d_set": d_round.state_dict()}
    networks = [gan.generator, gan.discriminator]
    logger = common.MetricsLogger(run.out, total_steps, run.is_main, start_step=step, console_keys=(
        "loss/g_mle", "loss/g_pg", "reward/mean", "loss/d", "d/acc", "eval/nll_oracle", "eval/nll_test",
        "eval/bleu2"))
    sizes = [sum(p.numel() for p in net.parameters()) for net in networks]
    logger.print(f"seqgan_rl | {data.name}: {len(data.train):,} train / {len(data.test):,} test sequences of "
                 f"{length} tokens, vocab {len(data.vocab):,} | G {sizes[0]:,} params, D {sizes[1]:,} params "
                 f"(widths {gan.discriminator.widths}) | {device} | {total_steps:,} of {schedule.total:,} steps | "
                 f"out {run.out}")
    if len(gan.discriminator.widths) < len(args.filter_widths()):
        logger.print(f"note: D filters wider than the {length}-token sequences are dropped")

    def log_line(extra: typing.Optional[dict] = None, evaluation: bool = False) -> None:
        if evaluation:
            count = args.eval_samples if data.oracle is not None else max(args.bleu_samples, args.self_bleu_samples)
            extra = {**evaluate(gan, data, args, count, args.seed * 1_000_003 + 17 + step)[0], **(extra or {})}
        phase = schedule.locate(step - 1)[0] if step else "start"  # the phase of the step just taken
        record = logger.log(step, {**(extra or {}), "phase": phase, "curve_x": schedule.curve_x(step)})
        checkpoints.check_losses(record, step)

    if step == 0 and total_steps > 0:
        log_line(evaluation=True)  # the untrained generator: Table 1's "random" row
    timings, current_phase = {}, None
    with common.StopRequest() as stop:
        while step < total_steps:
            where = schedule.at(step)
            if where.phase != current_phase:
                logger.print(f"phase {schedule.describe(where.phase)} (from step {step})")
                current_phase = where.phase
            if where.kind == "mle":
                logger.update(mle_step(gan, mle_batches.next()[0], start, args))
            elif where.kind == "pg":
                if where.first_round and gan.rollout is not None:
                    gan.rollout.load_state_dict(gan.generator.state_dict())  # the delayed copy starts as G
                timings = {}
                logger.update(policy_gradient_step(gan, length, start, args, timings))
            else:
                clock = common.Clock(device)
                logger.update(discriminator_step(gan, d_round.next(gan, train_tokens, start, where), args))
                timings["time/d_train"] = timings.get("time/d_train", 0.0) + clock()
            step += 1
            extra = dict(where.unit)
            if where.phase == "adversarial" and where.ends_unit:
                extra.update({k: round(v, 4) for k, v in timings.items()})
            if where.evaluate or where.ends_unit or step % args.log_every == 0 or step == total_steps:
                log_line(extra, evaluation=where.evaluate)
            if args.sample_every and step % args.sample_every == 0 and run.is_main:
                rng = torch.Generator(device=device).manual_seed(args.seed + 3)
                common.write_text_samples(run.out / f"samples_{step}.txt", common.sample_lines(
                    data, generate(gan.generator, SAMPLE_LINES, length, start, rng)))
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, state(), networks)
            if stop(device):
                checkpoints.stop(step, state(), networks)

    checkpoints.save(step, state(), networks)
    write_results(gan, data, args, run, logger, step)


def write_results(gan: SeqGAN, data: common.TextData, args: Args, run: common.Run, logger: common.MetricsLogger,
                  step: int) -> None:
    """samples.txt, the final evaluation (100,000 samples on the oracle, as Yu et al. §4), then at each
    --eval-temperatures T its metrics (keys eval_T<T>/...) and samples_T<T>.txt, as scratchgan.py; loss.png. The
    final generator is the one the last evaluation scored: D rounds after the last G step leave G as is."""
    count = args.final_samples if data.oracle is not None else \
        max(args.num_samples, args.bleu_samples, args.self_bleu_samples)
    metrics, samples = evaluate(gan, data, args, count, args.seed + 5)
    common.write_text_samples(run.out / "samples.txt", common.sample_lines(data, samples[:args.num_samples]))
    if data.oracle is not None:
        metrics["eval/nll_oracle_samples"] = count
    else:
        metrics.update({"eval/bleu_hypotheses": min(args.bleu_samples, count),
                        "eval/bleu_references": len(data.test_sentences),
                        "eval/self_bleu_samples": min(args.self_bleu_samples, count)})
    metrics.update(common.temperature_sweep(lambda t: evaluate(gan, data, args, count, args.seed + 5, t),
                                            args.temperatures(), run.out, data, args.num_samples))
    logger.log_eval(step, metrics)
    common.plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png", ("eval/nll",),
                        f"seqgan_rl {data.name}{' --mle-only' if args.mle_only else ''} (x: epochs, then + rounds)",
                        x_key="curve_x")
    logger.print(f"done: {run.out} (samples.txt, loss.png, metrics.jsonl, checkpoint.pt)")


if __name__ == "__main__":
    common.run_cli(main, Args)
