"""ScratchGAN: a language GAN trained from random initialisation, without maximum-likelihood pre-training.

de Masson d'Autume, Rosca, Rae, Mohamed, "Training Language GANs from Scratch", NeurIPS 2019, arXiv:1905.09922.
Official code: deepmind-research/scratchgan (TF1 + Sonnet). Where the code and the paper differ, this file follows
the code and says so; each piece names the file and function it reproduces.

SeqGAN (seqgan_rl.py) needs MLE pre-training because its generator G gets one reward per sequence, from a D that
judges whole sentences, estimated by costly Monte-Carlo rollouts. ScratchGAN trains G by REINFORCE from the first
step and makes that work with four things (the paper's abstract names them; the details are the code's):
  - dense rewards: D is recurrent and scores every prefix, D_t = D(x_1..x_t), so each token gets its own reward
        r_t = 2 σ(D_t) - 1                                                          (losses.py, reinforce_loss)
  - discounting: G's return from step t is R_t = Σ_{s>=t} γ^{s-t} r_s with γ = 0.23, so a token is credited mostly
    for the prefixes it completes, and the variance of the estimate falls
  - a baseline: b, an exponential moving average (decay 0.08) of the mean return, updated before it is used; the
    loss is mean_{b,t} -stopgrad(R_t - b) · log p(x_t | x_<t)   (no entropy term, no clipping)
  - large batches (512) and a regularised D: L2 on every D weight, dropout on its whole embedding matrix, layer
    normalisation inside its LSTM, and 8 fixed position features.
One D update then one G update per step, each on a fresh batch of G's samples (experiment.py, train).

Sequences end at their first end token, and the end token itself, the decision to stop, is part of the likelihood
and of the reward; everything after it is PAD and is neither rewarded nor scored. The official reader appends PAD
(id 0) as the end token and feeds it as G's first input; here the project's vocabulary has a separate EOS (followed
by PAD), which plays both roles. The SeqGAN oracle (`--dataset oracle`) has no end token: its token 0 is an ordinary
token and every sequence has exactly 20, so there nothing is masked and G runs 20 steps from token 0 (as SeqGAN).

Run it:
    python scratchgan.py                                  # EMNLP2017 News, the official configuration (a GPU)
    python scratchgan.py --preset cpu --dataset coco      # the reduced configuration (does not train text yet: README)
    python scratchgan.py --preset cpu --dataset coco --mle   # the same generator trained by maximum likelihood
    python scratchgan.py --preset cpu --dataset oracle    # the SeqGAN oracle: NLL-oracle and NLL-test
    python scratchgan.py --dataset emnlp2017-small        # EMNLP2017 with a 12,500-sentence training subset
    python scratchgan.py --eval-temperatures 0.8,1.0,1.2  # final metrics and samples at several temperatures
    python scratchgan.py --benchmark                      # time of each part of a step, estimated run times
    python scratchgan.py --resume runs/<folder>           # continue an interrupted run

Results: README, "scratchgan.py".
"""

import dataclasses
import math
import typing

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# What --preset sets for every flag left at its sentinel -1; a flag given on the command line wins. "paper" is
# experiment.py's flags. "cpu" keeps the method and shrinks the networks, the batch and the run for 2 CPU cores;
# its values are untuned: they train G from scratch on the oracle, not yet on real text (README, "scratchgan.py").
PRESETS = {
    "paper": dict(batch_size=512, steps=200_000, g_hidden=512, d_hidden=512, lr_g=9.59e-5, lr_d=9.38e-3,
                  eval_every=1_000),
    "cpu": dict(batch_size=128, steps=2_000, g_hidden=128, d_hidden=128, lr_g=1e-3, lr_d=1e-3, eval_every=250),
}
GLOVE_STD = 0.3836  # the standard deviation of GloVe's entries; words GloVe lacks are drawn from N(0, it) (utils.py)
POSITION_FEATURES = 8  # D's fixed position signal (discriminator_nets.py, position_dim)
SCORE_BATCH = 1024  # sequences per call when sampling or scoring without gradient
LOGIT_CHUNK = 2 ** 22  # logits made at once when scoring: ~700 rows of a 6,000-token vocabulary
SAMPLE_LINES = 100  # samples per samples_<step>.txt


@dataclasses.dataclass
class Args(common.RunArgs):
    dataset: str = "emnlp2017"
    # emnlp2017 (ScratchGAN's JSON) | emnlp2017-small (its 12,500-sentence training subset) | coco | poems |
    # emnlp2017-texygen | oracle (SeqGAN's) | file:PATH
    oracle: typing.Literal["paper", "random"] = "paper"  # paper: SeqGAN's oracle; random: N(0,1) weights from --seed
    preset: typing.Literal["paper", "cpu"] = "paper"  # values of the flags marked "preset" (PRESETS in the file)
    batch_size: int = -1  # sequences per D and per G batch (default from --preset: paper 512, the official; cpu 128)
    steps: int = -1  # training steps, each one D then one G update (default: paper 200000; cpu 2000)
    epochs: int = 1  # not used: the length of a run is --steps
    log_every: int = 100  # steps between metrics lines
    sample_every: int = 0  # steps between samples_<step>.txt files of 100 samples (0: only at the end)
    checkpoint_every: int = 1000  # steps between checkpoint writes (official export_every 1000)
    max_len: int = 0  # real text: tokens per sequence including EOS (0: 52 for emnlp2017*, as reader.py; else longest)
    vocab_size: int = 0  # real text: cap on the vocabulary, specials included (0: 20000 for emnlp2017*, else all)
    lower: bool = False  # real text: lower-case before tokenising (the official reader does not)
    emb_dim: int = 64  # trainable embedding size of G and of D (official trainable_embedding_size 64)
    glove: str = ""  # a GloVe text file (first line '<count> <dim>'); concatenated to both embeddings (official)
    g_hidden: int = -1  # units of each of G's 2 LSTM layers (default: paper 512; cpu 128)
    g_layers: int = 2  # G's LSTM layers (official num_layers_gen 2)
    d_hidden: int = -1  # units of D's LSTM and its input layer (default: paper 512; cpu 128)
    lr_g: float = -1.0  # Adam learning rate of G (default: paper 9.59e-05, the official; cpu 0.001)
    lr_d: float = -1.0  # Adam learning rate of D (default: paper 0.00938, the official; cpu 0.001)
    beta1: float = 0.5  # Adam beta1 of G and D (official gen_beta1, disc_beta1; beta2 0.999, TF's default)
    discount: float = 0.23  # gamma in R_t = sum_s gamma^(s-t) r_s (official gamma 0.23)
    dense_rewards: bool = True  # a reward at every step; --no-dense-rewards: only D's verdict at the last token
    baseline: bool = True  # subtract the moving-average baseline from the return (--no-baseline: plain REINFORCE)
    baseline_decay: float = 0.08  # b <- decay b + (1 - decay) mean(R) (official baseline_decay 0.08)
    baseline_over: typing.Literal["all", "tokens"] = "all"
    # the positions mean(R) averages: all (the code: every position, the R = 0 after the end token included) or
    # tokens (only those up to and including the end token; not in the paper): with "all", short samples pull b
    # towards 0, so every sampled token of a batch that D rejects gets a negative advantage (README, scratchgan.py)
    d_l2: float = 1e-6  # weight of sum(v^2)/2 over every D variable (official l2_disc 1e-6)
    d_dropout: float = 0.1  # dropout on D's whole embedding matrix, each word masked alike (official disc_dropout)
    d_layer_norm: bool = True  # layer normalisation of D's LSTM gates (official layer_norm_disc)
    mle: bool = False  # train the same G by maximum likelihood for the same steps (the paper's baseline); no D
    eval_every: int = -1  # steps between evaluations (default: paper 1000, the official export_every; cpu 250)
    eval_samples: int = 9_984  # oracle: G samples scored by the oracle at each evaluation (as seqgan_rl.py)
    final_samples: int = 100_000  # oracle: samples for the final NLL-oracle (Yu et al. §4, as seqgan_rl.py)
    num_samples: int = 10_000  # samples written to samples.txt (official num_examples_for_eval 10000)
    bleu_samples: int = 1_000  # real text: sentences scored by BLEU-2..5 against the test split (as seqgan_rl.py)
    self_bleu_samples: int = 500  # real text: sentences scored by self-BLEU-2..5 (as seqgan_rl.py)
    eval_temperatures: str = ""  # e.g. 0.8,1.0,1.2: final metrics and samples with G's logits divided by each T

    def __post_init__(self):
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == -1:
                setattr(self, name, value)
        super().__post_init__()
        common.check_text_dataset(self.dataset)
        if self.epochs != 1:
            raise ValueError("--epochs does not apply to scratchgan.py; use --steps")
        common.check_ranges(self, at_least_1=("batch_size", "emb_dim", "g_hidden", "g_layers", "d_hidden",
                                              "eval_every", "eval_samples", "final_samples", "bleu_samples"),
                            at_least_0=("steps", "num_samples", "max_len", "vocab_size", "d_l2"),
                            positive=("lr_g", "lr_d"), fraction=("beta1", "baseline_decay", "d_dropout"))
        if not 0 <= self.discount <= 1:
            raise ValueError(f"--discount must be in [0, 1], got {self.discount}")
        if self.self_bleu_samples < 2:
            raise ValueError(f"--self-bleu-samples must be at least 2, got {self.self_bleu_samples}")
        if self.max_len == 1:
            raise ValueError("--max-len must leave room for a token and EOS (2 or more), or be 0")
        if self.oracle == "random" and self.dataset != "oracle":
            raise ValueError("--oracle random only applies to --dataset oracle")
        self.temperatures()

    def temperatures(self) -> list:
        return common.parse_temperatures(self.eval_temperatures)


# ---------------------------------------------------------------------------------------------------------------
# Networks (generators.py, discriminator_nets.py, Sonnet 1's LSTM)
# ---------------------------------------------------------------------------------------------------------------

def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """TF's truncated_normal_initializer: N(0, std^2), redrawn outside two standard deviations."""
    return nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)


def glorot_uniform_(tensor: torch.Tensor) -> torch.Tensor:
    """tf.get_variable's default initializer, for the official code's bare variables (embeddings, projections,
    G's output bias, shape [1, V]): U(-a, a), a = sqrt(6 / (fan_in + fan_out)) over the first two dimensions."""
    fan_in, fan_out = (1, tensor.shape[0]) if tensor.dim() == 1 else tensor.shape[:2]
    bound = math.sqrt(6 / (fan_in + fan_out))
    return nn.init.uniform_(tensor, -bound, bound)


def sonnet_linear(n_in: int, n_out: int) -> nn.Linear:
    """snt.Linear: weights ~ truncated N(0, 1/n_in), bias 0 (Sonnet's create_linear_initializer)."""
    layer = nn.Linear(n_in, n_out)
    truncated_normal_(layer.weight, 1 / math.sqrt(n_in))
    nn.init.zeros_(layer.bias)
    return layer


class SonnetLSTMCell(nn.Module):
    """Sonnet 1's snt.LSTM (gated_rnn.py, LSTM._build), which nn.LSTM cannot express once layer norm is on:

        gates = LN([x; h] · W) + b   (LN only with layer_norm: one LayerNorm over all 4H pre-activations)
        i, j, f, o = split(gates)    c = σ(f + 1) · c + σ(i) · tanh(j)    h = tanh(c) · σ(o)

    W and b are drawn from truncated N(0, 1/(in + H)), the bias too (Sonnet's default for both); forget bias 1.
    W is kept as its input and hidden halves so that a caller can project every input step at once."""

    def __init__(self, input_size: int, hidden_size: int, layer_norm: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        std = 1 / math.sqrt(input_size + hidden_size)
        self.w_input = nn.Parameter(truncated_normal_(torch.empty(input_size, 4 * hidden_size), std))
        self.w_hidden = nn.Parameter(truncated_normal_(torch.empty(hidden_size, 4 * hidden_size), std))
        self.bias = nn.Parameter(truncated_normal_(torch.empty(4 * hidden_size), std))
        self.norm = nn.LayerNorm(4 * hidden_size, eps=1e-5) if layer_norm else None  # Sonnet's LayerNorm eps

    def initial_state(self, batch: int, device) -> tuple:
        zeros = torch.zeros(batch, self.hidden_size, device=device)
        return zeros, zeros

    def forward(self, x_proj: torch.Tensor, state: tuple) -> tuple:
        """x_proj = x · W_input (B, 4H), state (h, c) -> new (h, c)."""
        h, c = state
        gates = x_proj + h @ self.w_hidden
        if self.norm is not None:
            gates = self.norm(gates)
        i, j, f, o = (gates + self.bias).chunk(4, dim=1)
        c = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(j)
        return torch.tanh(c) * torch.sigmoid(o), c


class Embedding(nn.Module):
    """A trainable table of emb_dim columns, after 300 GloVe columns when given (utils.py,
    make_partially_trainable_embeddings). The official comment calls the GloVe part frozen, but tf.get_variable
    makes it trainable, and so it trains here too. Without GloVe the table is Glorot-uniform (tf.get_variable's
    default); with it, N(0, GLOVE_STD) like the GloVe part."""

    def __init__(self, vocab_size: int, emb_dim: int, glove: typing.Optional[torch.Tensor] = None):
        super().__init__()
        self.trainable = nn.Parameter(torch.empty(vocab_size, emb_dim))
        if glove is None:
            glorot_uniform_(self.trainable)
            self.glove = None
        else:
            nn.init.normal_(self.trainable, 0.0, GLOVE_STD)
            self.glove = nn.Parameter(glove.clone())

    @property
    def dim(self) -> int:
        return self.trainable.shape[1] + (0 if self.glove is None else self.glove.shape[1])

    def table(self) -> torch.Tensor:
        return self.trainable if self.glove is None else torch.cat([self.glove, self.trainable], 1)  # (V, E)


class Generator(nn.Module):
    """generators.py, LSTMGen: the previous token's embedding through a bias-free projection into a stack of LSTMs
    with Sonnet's skip connections (snt.DeepRNN: layer k > 1 sees [x; h_k-1], the output is [h_1; ...; h_K]); the
    output projected back to the embedding size and scored against the same embedding table (tied input and output
    embeddings), plus a bias:  logits = ([h_1; h_2] · P_out^T) · E^T + b."""

    def __init__(self, vocab_size: int, emb_dim: int = 64, hidden: int = 512, layers: int = 2,
                 glove: typing.Optional[torch.Tensor] = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = Embedding(vocab_size, emb_dim, glove)
        self.in_proj = nn.Parameter(glorot_uniform_(torch.empty(self.embedding.dim, hidden)))
        self.cells = nn.ModuleList(SonnetLSTMCell(hidden if k == 0 else 2 * hidden, hidden) for k in range(layers))
        # one layer: the official code reuses in_proj as the output projection (the sizes agree)
        self.out_proj = nn.Parameter(glorot_uniform_(torch.empty(self.embedding.dim, layers * hidden))) \
            if layers > 1 else None
        self.out_bias = nn.Parameter(glorot_uniform_(torch.empty(vocab_size)))

    def initial_state(self, batch: int, device) -> list:
        return [cell.initial_state(batch, device) for cell in self.cells]

    def step(self, table: torch.Tensor, tokens: torch.Tensor, state: list) -> tuple:
        """One step from (B,) input tokens and the per-layer states -> (B, E) output in embedding space, new
        states; logits(output, table) scores it."""
        x = table[tokens] @ self.in_proj  # (B, H)
        outputs, new_state, inputs = [], [], x
        for k, (cell, layer_state) in enumerate(zip(self.cells, state)):
            if k > 0:
                inputs = torch.cat([x, outputs[-1]], 1)  # Sonnet's skip connection: [x; h_k-1]
            h, c = cell(inputs @ cell.w_input, layer_state)
            outputs.append(h)
            new_state.append((h, c))
        out_proj = self.in_proj if self.out_proj is None else self.out_proj
        return torch.cat(outputs, 1) @ out_proj.t(), new_state  # (B, E)

    def logits(self, output: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return output @ table.t() + self.out_bias  # (..., V): scored against the input embeddings (tied)

    def teacher_forced(self, tokens: torch.Tensor, start_token: int) -> torch.Tensor:
        """(B, T) sequences -> (B, T, E) outputs before each token given the ones before it (start, x_1..x_T-1)."""
        table = self.embedding.table()
        state = self.initial_state(len(tokens), tokens.device)
        inputs = torch.cat([torch.full_like(tokens[:, :1], start_token), tokens[:, :-1]], 1)
        outputs = []
        for t in range(tokens.shape[1]):
            output, state = self.step(table, inputs[:, t], state)
            outputs.append(output)
        return torch.stack(outputs, 1)


def position_signal(length: int, features: int = POSITION_FEATURES) -> torch.Tensor:
    """utils.py, get_position_signal: cos(π (t / p_k + s_k)) for t = 0..T-1 with periods p_k spaced evenly in log
    from 2 to T and shifts s_k evenly from 0 to 2 -> (T, features): the code's formula, as computed, not its
    docstring's (frequencies "linearly spaced", the longest period "half the maximum length")."""
    periods = torch.exp(torch.linspace(math.log(2.0), math.log(float(length)), features))
    shifts = torch.linspace(0.0, 2.0, features)
    t = torch.arange(length, dtype=torch.float32)[:, None]
    return torch.cos(math.pi * (t / periods[None, :] + shifts[None, :]))


class Discriminator(nn.Module):
    """discriminator_nets.py, LSTMEmbedDiscNet: its own embedding (nothing shared with G) with dropout applied to
    the whole (V, E) matrix, so that every occurrence of a word in the batch is dropped alike; 8 fixed position
    features appended; a linear layer to H; one LSTM (layer-normalised); a logit D_t at every step, zeroed after
    the end token. D_t sees only x_1..x_t, so it judges each prefix."""

    def __init__(self, vocab_size: int, seq_len: int, emb_dim: int = 64, hidden: int = 512, dropout: float = 0.1,
                 layer_norm: bool = True, glove: typing.Optional[torch.Tensor] = None):
        super().__init__()
        self.embedding = Embedding(vocab_size, emb_dim, glove)
        self.dropout = dropout
        self.input = sonnet_linear(self.embedding.dim + POSITION_FEATURES, hidden)
        self.cell = SonnetLSTMCell(hidden, hidden, layer_norm)
        self.output = sonnet_linear(hidden, 1)
        self.register_buffer("positions", position_signal(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens, (B, T) mask of the positions up to and including the end token -> (B, T) logits."""
        table = F.dropout(self.embedding.table(), self.dropout, self.training)  # (V, E), one mask per call
        batch, length = tokens.shape
        x = torch.cat([table[tokens], self.positions[None, :length].expand(batch, -1, -1)], 2)  # (B, T, E + 8)
        x_proj = self.input(x) @ self.cell.w_input  # (B, T, 4H): every step's input projection at once
        state, hs = self.cell.initial_state(batch, tokens.device), []
        for t in range(length):
            state = self.cell(x_proj[:, t], state)
            hs.append(state[0])
        return self.output(torch.stack(hs, 1)).squeeze(2) * mask  # (B, T)

    def l2_penalty(self) -> torch.Tensor:
        """Σ_v ½‖v‖² over every D variable, as tf.nn.l2_loss over disc.get_all_variables()."""
        return sum(p.pow(2).sum() for p in self.parameters()) / 2


def read_glove(path: str, vocab: common.Vocabulary, seed: int) -> torch.Tensor:
    """(V, dim) rows of a GloVe text file in the vocabulary's order; a word the file lacks gets N(0, GLOVE_STD)
    (utils.py, _get_embedding_initializer), drawn from `seed`."""
    lines = common.read_lines(path)
    try:
        count, dim = (int(v) for v in lines[0].split())
        vectors = {}
        for line in lines[1:]:
            word, *values = line.split(" ")
            if len(values) != dim:
                raise ValueError(f"{word!r} has {len(values)} values, not {dim}")
            vectors[word] = [float(v) for v in values]
    except (ValueError, IndexError) as e:
        raise common.UserError(f"{path} is not a GloVe text file with a '<count> <dim>' first line ({e})")
    table = torch.randn(len(vocab), dim, generator=torch.Generator().manual_seed(seed)) * GLOVE_STD
    for i, token in enumerate(vocab.tokens):
        if token in vectors:
            table[i] = torch.tensor(vectors[token])
    return table


# ---------------------------------------------------------------------------------------------------------------
# Sampling, rewards and losses (losses.py): pure functions, in float32
# ---------------------------------------------------------------------------------------------------------------

def sample(generator: Generator, count: int, length: int, start_token: int, end_token: typing.Optional[int],
           temperature: float = 1.0, rng: typing.Optional[torch.Generator] = None) -> tuple:
    """count sequences drawn from G, one step per token for the whole batch at once (generators.py, _build) ->
    (tokens, log_probs, mask), each (count, T). x_t ~ softmax(logits / temperature), log_probs = log p(x_t | x_<t)
    of that tempered distribution, with gradient if the caller has it on. mask is True up to and including the
    first end token; tokens after it are PAD (0) and their log-probabilities 0 (utils.py, get_mask_past_symbol)."""
    table = generator.embedding.table()
    device = table.device
    state = generator.initial_state(count, device)
    previous = torch.full((count,), start_token, dtype=torch.long, device=device)
    tokens, log_probs = [], []
    for _ in range(length):
        output, state = generator.step(table, previous, state)
        scaled = torch.log_softmax(generator.logits(output, table).float() / temperature, -1)
        previous = common.inverse_cdf_sample(scaled.detach(), rng)
        tokens.append(previous)
        log_probs.append(scaled.gather(1, previous[:, None]).squeeze(1))
    tokens, log_probs = torch.stack(tokens, 1), torch.stack(log_probs, 1)
    mask = sequence_mask(tokens, end_token)
    return tokens * mask, log_probs * mask, mask


def sequence_mask(tokens: torch.Tensor, end_token: typing.Optional[int]) -> torch.Tensor:
    """True up to and including the first end token of each row (every position when there is no end token)."""
    if end_token is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    ended_before = (tokens == end_token).long().cumsum(1) - (tokens == end_token).long()  # ends strictly before t
    return ended_before == 0


def rewards_from_logits(d_logits: torch.Tensor, mask: torch.Tensor, dense: bool = True) -> torch.Tensor:
    """r_t = 2 σ(D_t) - 1 in [-1, 1] at every step (losses.py: "MaskGAN uses log(D), but this is more stable
    empirically"); 0 after the end, where D's logit is masked to 0. Sparse (dense=False; the official code has no
    such switch, so this is this file's reading of the ablation): only the last token of each sequence is rewarded,
    with D's verdict on the whole sequence."""
    rewards = (2 * torch.sigmoid(d_logits.float()) - 1) * mask
    if dense:
        return rewards
    last = mask.long().sum(1, keepdim=True) - 1  # (B, 1) index of the end token (or of the last step)
    return torch.zeros_like(rewards).scatter(1, last, rewards.gather(1, last))


def discounted_returns(rewards: torch.Tensor, discount: float) -> torch.Tensor:
    """R_t = Σ_{s>=t} γ^{s-t} r_s for (B, T) rewards, as one (T, T) matrix product: R = r · Γ, Γ[s, t] =
    γ^{s-t} for s >= t, else 0."""
    t = torch.arange(rewards.shape[1], device=rewards.device)
    lag = (t[:, None] - t[None, :]).float()  # s - t
    gamma = torch.where(lag >= 0, discount ** lag.clamp(min=0), torch.zeros_like(lag))
    return rewards @ gamma


class MovingBaseline:
    """b <- decay · b + (1 - decay) · mean(R), starting from 0 (losses.py, the ewma_reward variable). The mean is
    over every batch and time position, the masked ones (R = 0) included, as in the code; with a `mask` (from
    --baseline-over tokens), over the generated tokens only."""

    def __init__(self, decay: float, device):
        self.decay, self.value = decay, torch.zeros((), device=device)

    def update(self, returns: torch.Tensor, mask: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
        returns = returns.detach()
        mean = returns.mean() if mask is None else (returns * mask).sum() / mask.sum().clamp(min=1)
        self.value = self.decay * self.value + (1 - self.decay) * mean
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"].to(self.value.device)


def reinforce_loss(d_logits: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor, args: Args,
                   baseline: typing.Optional[MovingBaseline]):
    """G's loss (losses.py, reinforce_loss): mean over batch and time of -stopgrad(R_t - b) · log p(x_t | x_<t),
    with b updated by this batch's returns before it is used. Its gradient is REINFORCE's with the advantage
    R_t - b as the weight of each token's log-probability."""
    rewards = rewards_from_logits(d_logits, mask, args.dense_rewards)
    returns = discounted_returns(rewards, args.discount)
    over = mask if args.baseline_over == "tokens" else None
    b = baseline.update(returns, over) if baseline is not None else torch.zeros((), device=returns.device)
    loss = -((returns - b).detach() * log_probs.float()).mean()
    metrics = {"loss/g": loss.detach(), "reward/mean": (rewards.sum() / mask.sum()).detach(),
               "reward/return": returns.mean().detach(), "reward/baseline": b.detach(),
               "g/length": mask.float().sum(1).mean()}
    return loss, metrics


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_mask: torch.Tensor,
                       fake_mask: torch.Tensor, l2_penalty: torch.Tensor, l2_weight: float):
    """D's loss (experiment.py, train): ½ CE(D_t(real), 1) + ½ CE(D_t(fake), 0), a sigmoid cross-entropy at every
    step, averaged over batch and time, every position counted (a masked logit 0 adds the constant log 2 and no
    gradient, as in the code), plus l2_weight · Σ ½‖v‖²."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    ce_real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    ce_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    loss = 0.5 * ce_real + 0.5 * ce_fake + l2_weight * l2_penalty
    with torch.no_grad():  # mean P(real) over the positions up to the end token
        metrics = {"loss/d": loss.detach(), "d/real": (torch.sigmoid(real_logits) * real_mask).sum() / real_mask.sum(),
                   "d/fake": (torch.sigmoid(fake_logits) * fake_mask).sum() / fake_mask.sum()}
    return loss, metrics


def mle_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """The baseline: the mean over the tokens up to and including the end token of -log p(x_t | x_<t), teacher
    forced (PAD after the end is not part of the likelihood, as in G's samples)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view_as(tokens)
    loss = (nll * mask).sum() / mask.sum()
    return loss, {"loss/g_mle": loss.detach()}


# ---------------------------------------------------------------------------------------------------------------
# Training state and steps
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ScratchGAN:
    generator: Generator
    discriminator: typing.Optional[Discriminator]  # None with --mle
    opt_g: torch.optim.Optimizer
    opt_d: typing.Optional[torch.optim.Optimizer]
    baseline: typing.Optional[MovingBaseline]


@dataclasses.dataclass
class Tokens:
    """Where sequences start and end: G's first input, and the token that ends a sequence (None for the oracle)."""
    start: int
    end: typing.Optional[int]
    length: int


def token_layout(data: common.TextData) -> Tokens:
    if not data.vocab.specials:  # the oracle: token 0 starts every sequence and nothing ends one early
        return Tokens(data.start_token, None, data.seq_len)
    eos = data.vocab.index[common.EOS]
    return Tokens(eos, eos, data.seq_len)


def build_scratchgan(args: Args, data: common.TextData, device: torch.device) -> ScratchGAN:
    vocab = len(data.vocab)
    glove = read_glove(args.glove, data.vocab, args.seed) if args.glove else None
    G = Generator(vocab, args.emb_dim, args.g_hidden, args.g_layers, glove).to(device)
    adam = lambda params, lr: common.adam(params, lr=lr, betas=(args.beta1, 0.999), eps=1e-8)  # noqa: E731
    if args.mle:
        return ScratchGAN(G, None, adam(G.parameters(), args.lr_g), None, None)
    D = Discriminator(vocab, data.seq_len, args.emb_dim, args.d_hidden, args.d_dropout, args.d_layer_norm,
                      glove).to(device)
    return ScratchGAN(G, D, adam(G.parameters(), args.lr_g), adam(D.parameters(), args.lr_d),
                      MovingBaseline(args.baseline_decay, device) if args.baseline else None)


def discriminator_step(gan: ScratchGAN, real: torch.Tensor, layout: Tokens, args: Args) -> dict:
    """One D update on a real batch and a fresh batch of G's samples (no gradient into G)."""
    D = gan.discriminator
    with torch.no_grad(), common.autocast(real.device, args.amp):
        fake, _, fake_mask = sample(gan.generator, len(real), layout.length, layout.start, layout.end)
    real_mask = sequence_mask(real, layout.end)
    with common.autocast(real.device, args.amp):
        real_logits, fake_logits = D(real, real_mask), D(fake, fake_mask)  # two calls, two dropout masks
    loss, metrics = discriminator_loss(real_logits, fake_logits, real_mask, fake_mask, D.l2_penalty(), args.d_l2)
    gan.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    gan.opt_d.step()
    return metrics


def generator_step(gan: ScratchGAN, layout: Tokens, args: Args) -> dict:
    """One G update: a fresh batch sampled with gradient, scored by D at every step, REINFORCE. D scores in
    training mode (dropout on) as the official code does: its D graph has is_training=True throughout."""
    G = gan.generator
    with common.autocast(G.out_bias.device, args.amp):
        fake, log_probs, mask = sample(G, args.batch_size, layout.length, layout.start, layout.end)
        with torch.no_grad():
            d_logits = gan.discriminator(fake, mask)
    loss, metrics = reinforce_loss(d_logits, log_probs, mask, args, gan.baseline)
    gan.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    gan.opt_g.step()
    return metrics


def mle_step(gan: ScratchGAN, real: torch.Tensor, layout: Tokens, args: Args) -> dict:
    G = gan.generator
    with common.autocast(real.device, args.amp):
        logits = G.logits(G.teacher_forced(real, layout.start), G.embedding.table())
    loss, metrics = mle_loss(logits, real, sequence_mask(real, layout.end))
    gan.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    gan.opt_g.step()
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the metrics seqgan_rl.py reports, on the same data, so that the two files compare
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sequence_nll(generator: Generator, tokens: torch.Tensor, scored: torch.Tensor, start_token: int,
                 temperature: float = 1.0) -> float:
    """G's mean NLL per token (nats) of held-out sequences (B, T), teacher forced, over the targets where `scored`
    is True (TextData.scored: words and EOS for real text, not PAD, not <unk>; every token of the oracle). The
    logits are made a slice of rows at a time, so that N x T x V never exists at once."""
    total, device = 0.0, generator.out_bias.device
    table, rows = generator.embedding.table(), max(1, LOGIT_CHUNK // generator.vocab_size)
    for chunk, mask in zip(tokens.split(SCORE_BATCH), scored.split(SCORE_BATCH)):
        chunk, mask = chunk.to(device), mask.to(device)
        outputs = generator.teacher_forced(chunk, start_token).flatten(0, 1)  # (B·T, E)
        for out_part, y_part, m_part in zip(outputs.split(rows), chunk.flatten().split(rows),
                                            mask.flatten().split(rows)):
            logits = generator.logits(out_part, table).float() / temperature
            total += common.to_host_float64(F.cross_entropy(logits, y_part, reduction="none") * m_part).sum().item()
    return total / max(int(scored.sum()), 1)


@torch.no_grad()
def generate(generator: Generator, count: int, layout: Tokens, temperature: float = 1.0,
             rng: typing.Optional[torch.Generator] = None) -> torch.Tensor:
    """count samples in batches of SCORE_BATCH -> (count, T) tokens."""
    out = [sample(generator, min(SCORE_BATCH, count - start), layout.length, layout.start, layout.end, temperature,
                  rng)[0] for start in range(0, count, SCORE_BATCH)]
    return torch.cat(out) if out else torch.zeros(0, layout.length, dtype=torch.long)


def evaluate(gan: ScratchGAN, data: common.TextData, layout: Tokens, args: Args, count: int, seed: int,
             temperature: float = 1.0) -> tuple:
    """NLL-oracle (oracle) and NLL-test (and NLL-valid where the source has a valid split); for real text the share
    of test tokens that are <unk>, BLEU-2..5 against the test split and self-BLEU-2..5 of `count` fresh samples
    drawn with their own generator (the training RNG is untouched). Returns (metrics, samples)."""
    G = gan.generator
    with common.exact_float32():
        rng = torch.Generator(device=G.out_bias.device).manual_seed(seed)
        samples = generate(G, count, layout, temperature, rng)
        metrics = {"eval/nll_test": sequence_nll(G, data.test, data.scored(data.test), layout.start, temperature)}
        if data.valid is not None:
            metrics["eval/nll_valid"] = sequence_nll(G, data.valid, data.scored(data.valid), layout.start,
                                                     temperature)
    if data.oracle is not None:
        metrics["eval/nll_oracle"] = data.oracle.nll(samples).mean().item()  # Yu et al. §4, per token
        return metrics, samples
    metrics.update(common.text_sample_metrics([data.vocab.decode(s) for s in samples.cpu()], data,
                                              args.bleu_samples, args.self_bleu_samples))
    return metrics, samples


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------

def benchmark(data: common.TextData, args: Args, run: common.Run) -> None:
    """Seconds per step with this run's flags and with each preset's (the flags --preset sets reset to it), in
    float32 and under --amp side by side, split into a separate sampling pass of G, the D update (its own sampling
    included) and the G update (sampling with gradient, D's scores, backward), the step's GFLOP/s against the
    machine's matmul rate, and the time of --steps steps estimated from them. Writes nothing."""
    device, layout = run.device, token_layout(data)
    clock = common.Clock(device)
    configs = {"this run": args}
    for preset in PRESETS:
        config = dataclasses.replace(args, preset=preset, **{k: -1 for k in PRESETS[preset]})
        if config != args:
            configs[f"{preset} preset"] = config

    def one_step(gan, config, timings, counted: bool, sampling_pass: bool = True) -> None:
        real = data.train[torch.randint(len(data.train), (config.batch_size,))].to(device)
        clock()
        if config.mle:
            mle_step(gan, real, layout, config)
            timings["g_step"] += clock() * counted
            return
        if sampling_pass:  # timed on its own to show sampling's share; not part of a training step
            with torch.no_grad():
                sample(gan.generator, config.batch_size, layout.length, layout.start, layout.end)
            timings["sample"] += clock() * counted
        discriminator_step(gan, real, layout, config)
        timings["d_step"] += clock() * counted
        generator_step(gan, layout, config)
        timings["g_step"] += clock() * counted

    for label, config in configs.items():
        gan = build_scratchgan(config, data, device)
        steps = max(1, args.benchmark_steps // (10 if config.batch_size * config.g_hidden > 2 ** 16 and
                                                 device.type == "cpu" else 1))  # the paper's size is slow on a CPU
        saved, config.amp = config.amp, False
        flops = common.count_flops(lambda: one_step(gan, config, {"sample": 0, "d_step": 0, "g_step": 0}, False,
                                                    sampling_pass=False))  # a training step's work, as timed
        config.amp = saved

        def measure() -> dict:
            timings = {"sample": 0.0, "d_step": 0.0, "g_step": 0.0}
            for index in range(steps + 1):  # the first step warms up and is not counted
                one_step(gan, config, timings, index > 0)
            per_step = {k: v / steps for k, v in timings.items()}
            step_time = per_step["d_step"] + per_step["g_step"]
            tokens = config.batch_size * layout.length * (1 if config.mle else 2)  # sampled (MLE: teacher-forced)
            return {"rate": 1 / step_time,
                    "text": f"{1 / step_time:.2f} steps/s, {tokens / step_time:,.0f} tokens/s | per step: G sampling "
                            f"{per_step['sample']:.3f} s, D update {per_step['d_step']:.3f} s (its sampling included), "
                            f"G update {per_step['g_step']:.3f} s | {config.steps:,} steps ~ "
                            f"{config.steps * step_time / 3600:.2f} h without evaluations ({steps} timed steps)"}

        results = common.benchmark_precisions(measure, config, device, rounds=1)
        if run.is_main:
            sizes = [sum(p.numel() for p in net.parameters()) for net in (gan.generator, gan.discriminator) if net]
            print(f"benchmark | {label}{' --mle' if config.mle else ''} | {device.type}, {torch.get_num_threads()} "
                  f"threads | {data.name}, vocab {len(data.vocab):,}, T {layout.length}, batch {config.batch_size}, "
                  f"G {config.g_layers}x{config.g_hidden} ({sizes[0]:,} params)" +
                  (f", D {config.d_hidden} ({sizes[1]:,} params)" if len(sizes) > 1 else ""))
            for line in common.precision_lines(results, "rate", flops, device, lambda result: result["text"]):
                print(f"benchmark | {label}, {line}")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    with common.session(args, "scratchgan") as run:
        train(args, run)


def load_data(args: Args, device: torch.device) -> common.TextData:
    emnlp = args.dataset in common.SCRATCHGAN_JSON
    return common.load_text_dataset(args.dataset, args.data_dir, args.max_len or (52 if emnlp else 0),
                                    args.vocab_size or (20_000 if emnlp else 0), args.lower, args.oracle, args.seed,
                                    device)


def selection_metric(data: common.TextData) -> typing.Optional[str]:
    """The validation metric by which the best checkpoint is kept (lower is better): G's NLL on the validation
    split where the source has one (emnlp2017: valid.json, on which the paper evaluates), NLL-oracle on the oracle
    (fresh samples, no held-out data involved). The official train() keeps no best checkpoint (it exports one every
    1,000 steps for a separate evaluation job); other real text has no validation split, and selecting on the test
    split would leak it into the result, so none is kept there."""
    if data.oracle is not None:
        return "eval/nll_oracle"
    return "eval/nll_valid" if data.valid is not None else None


def train(args: Args, run: common.Run) -> None:
    device = run.device
    if run.world_size > 1:
        raise common.UserError("scratchgan.py runs in one process; start it with python, not torchrun")
    data = load_data(args, device)
    if args.benchmark:
        return benchmark(data, args, run)
    layout = token_layout(data)
    gan = build_scratchgan(args, data, device)
    if gan.discriminator is not None:
        common.maybe_compile(gan.discriminator, args.compile)  # G's sampling loop is left eager
    batches = common.Batches((data.train,), args.batch_size, args.seed, device, what="sequences")
    total_steps = min(args.steps, args.max_steps or args.steps)

    selection = selection_metric(data)
    best = {"metric": selection, "value": math.inf, "step": None}  # best.pt: the best evaluation so far

    def load_state(checkpoint):
        common.load_state_dicts(vars(gan), checkpoint["scratchgan"])
        batches.load_state_dict(checkpoint["batches"])
        best.update(checkpoint.get("best", {}))

    step = common.resume(args, run, load_state)["step"] if args.resume else 0
    checkpoints = common.Checkpoints(run, "scratchgan.py", "a lower --lr-g or --lr-d", step if args.resume else None)
    state = lambda: {"args": dataclasses.asdict(args), "scratchgan": common.state_dicts(vars(gan)),  # noqa: E731
                     "batches": batches.state_dict(), "best": dict(best)}
    networks = [net for net in (gan.generator, gan.discriminator) if net is not None]
    logger = common.MetricsLogger(run.out, total_steps, run.is_main, start_step=step, console_keys=(
        "loss/g", "loss/g_mle", "reward/mean", "reward/baseline", "loss/d", "d/real", "d/fake", "eval/nll_oracle",
        "eval/nll_test", "eval/bleu2"))
    sizes = ", ".join(f"{name} {sum(p.numel() for p in net.parameters()):,} params"
                      for name, net in zip("GD", networks))
    logger.print(f"scratchgan{' --mle' if args.mle else ''} | {data.name}: {len(data.train):,} train / "
                 f"{len(data.test):,} test sequences of {layout.length} tokens, vocab {len(data.vocab):,} | {sizes} | "
                 f"{device} | {total_steps:,} of {args.steps:,} steps, batch {args.batch_size} | out {run.out} | " +
                 (f"best.pt kept by {selection.removeprefix('eval/')}" if selection else
                  "no validation split, so no best.pt (selecting on the test split would leak it)"))

    def evaluation(at: int) -> dict:
        count = args.eval_samples if data.oracle is not None else max(args.bleu_samples, args.self_bleu_samples)
        metrics = evaluate(gan, data, layout, args, count, args.seed * 1_000_003 + 17 + at)[0]
        # only the evaluations of the --eval-every grid (step 0's untrained G included: a GAN can get worse) and of
        # the last step compete, so that a run stopped and resumed elsewhere keeps the same best.pt
        on_grid = at % args.eval_every == 0 or at == args.steps
        if selection and on_grid and metrics[selection] < best["value"]:
            best.update(value=metrics[selection], step=at)
            if run.is_main:
                common.save_checkpoint(run.out / "best.pt", {"step": at, **state()})
        return metrics

    if step == 0 and total_steps > 0:
        logger.log(0, evaluation(0))  # the untrained generator
    with common.StopRequest() as stop:
        while step < total_steps:
            (real,) = batches.next()
            if args.mle:
                logger.update(mle_step(gan, real, layout, args))
            else:
                logger.update(discriminator_step(gan, real, layout, args))
                logger.update(generator_step(gan, layout, args))
            step += 1
            evaluate_now = step % args.eval_every == 0 or step == total_steps
            if evaluate_now or step % args.log_every == 0:
                record = logger.log(step, evaluation(step) if evaluate_now else None)
                checkpoints.check_losses(record, step)
            if args.sample_every and step % args.sample_every == 0 and run.is_main:
                rng = torch.Generator(device=device).manual_seed(args.seed + 3)
                samples = generate(gan.generator, SAMPLE_LINES, layout, 1.0, rng)
                common.write_text_samples(run.out / f"samples_{step}.txt", common.sample_lines(data, samples))
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, state(), networks)
            if stop(device):
                checkpoints.stop(step, state(), networks)
    checkpoints.save(step, state(), networks)
    write_results(gan, data, layout, args, run, logger, step, best)


def write_results(gan: ScratchGAN, data: common.TextData, layout: Tokens, args: Args, run: common.Run,
                  logger: common.MetricsLogger, step: int, best: dict) -> None:
    """samples.txt and the final evaluation at temperature 1 (100,000 samples on the oracle, as seqgan_rl.py), then
    at each --eval-temperatures T: its metrics (keys eval_T<T>/...) and samples_T<T>.txt; loss.png."""
    count = args.final_samples if data.oracle is not None else \
        max(args.num_samples, args.bleu_samples, args.self_bleu_samples)
    metrics, samples = evaluate(gan, data, layout, args, count, args.seed + 5)
    common.write_text_samples(run.out / "samples.txt", common.sample_lines(data, samples[:args.num_samples]))
    metrics["eval/samples"] = count
    metrics.update(common.temperature_sweep(lambda t: evaluate(gan, data, layout, args, count, args.seed + 5, t),
                                            args.temperatures(), run.out, data, args.num_samples))
    if best["step"] is not None:
        metrics["best/step"], metrics[f"best/{best['metric'].removeprefix('eval/')}"] = best["step"], best["value"]
    logger.log_eval(step, metrics)
    common.plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png", ("loss/", "reward/"),
                        f"scratchgan {data.name}{' --mle' if args.mle else ''}")
    kept = f", best.pt (step {best['step']:,}: {best['metric'].removeprefix('eval/')} {best['value']:.3f})" \
        if best["step"] is not None else ""
    logger.print(f"done: {run.out} (samples.txt, loss.png, metrics.jsonl, checkpoint.pt{kept})")


if __name__ == "__main__":
    common.run_cli(main, Args)
