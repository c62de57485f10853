"""The text side of common.py: datasets and tokenisation, the SeqGAN oracle, BLEU and self-BLEU."""

import hashlib
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import common
from conftest import shared_data


def tiny_oracle_params(vocab=7, dim=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"g_embeddings": (vocab, dim), "Wo": (dim, vocab), "bo": (vocab,)}
    return {k: rng.standard_normal(shapes.get(k, (dim,) if k.startswith("b") else (dim, dim))).astype(np.float32)
            for k in common.ORACLE_KEYS}


def reference_nll(params: dict, sequence: list) -> float:
    """SeqGAN's target-LSTM equations, written out again in numpy float64, one token at a time."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h = c = np.zeros(p["Wi"].shape[0])
    x, total = p["g_embeddings"][0], 0.0
    for token in sequence:
        i = sigmoid(x @ p["Wi"] + h @ p["Ui"] + p["bi"])
        f = sigmoid(x @ p["Wf"] + h @ p["Uf"] + p["bf"])
        o = sigmoid(x @ p["Wog"] + h @ p["Uog"] + p["bog"])
        c = f * c + i * np.tanh(x @ p["Wc"] + h @ p["Uc"] + p["bc"])
        h = o * np.tanh(c)
        logits = h @ p["Wo"] + p["bo"]
        total -= logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        x = p["g_embeddings"][token]
    return total / len(sequence)


# ---- the oracle -------------------------------------------------------------------------------------------------

def test_oracle_first_step_by_hand():
    # one hidden unit, two tokens: emb = [[1], [-1]], Wi = Wc = 1, every other input weight and bias 0, Wo = [[1, -1]]
    params = {k: np.zeros((1, 1), np.float32) for k in common.ORACLE_KEYS}
    params.update(g_embeddings=np.array([[1.0], [-1.0]], np.float32), Wi=np.ones((1, 1), np.float32),
                  Wc=np.ones((1, 1), np.float32), Wo=np.array([[1.0, -1.0]], np.float32),
                  bi=np.zeros(1, np.float32), bf=np.zeros(1, np.float32), bog=np.zeros(1, np.float32),
                  bc=np.zeros(1, np.float32), bo=np.zeros(2, np.float32))
    oracle = common.SeqGANOracle(params)
    # step 1 from x = emb[0] = 1, h = c = 0: i = σ(1), o = σ(0) = 1/2, c = σ(1)·tanh(1), h = tanh(c) / 2,
    # logits = (h, -h), so p(token 0) = σ(2h)
    c = 1 / (1 + math.exp(-1)) * math.tanh(1)
    h = 0.5 * math.tanh(c)
    expected = -math.log(1 / (1 + math.exp(-2 * h)))
    got = oracle.nll(torch.tensor([[0]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(reference_nll(params, [0]), rel=1e-6)


def test_oracle_nll_matches_the_equations_over_whole_sequences():
    params = tiny_oracle_params()
    oracle = common.SeqGANOracle(params)
    sequences = torch.randint(7, (5, 20), generator=torch.Generator().manual_seed(0))
    expected = [reference_nll(params, s.tolist()) for s in sequences]
    assert oracle.nll(sequences).tolist() == pytest.approx(expected, rel=1e-5)


def test_oracle_samples_score_its_entropy_and_other_tokens_score_worse():
    oracle = common.SeqGANOracle(tiny_oracle_params(vocab=50, dim=8, seed=3))
    samples = oracle.sample(4000, torch.Generator().manual_seed(1))
    assert samples.shape == (4000, 20) and samples.min() >= 0 and samples.max() < 50
    # the oracle's per-token entropy along its own sample paths: E[-log p(y_t | y_<t)] = E[H(p(. | y_<t))]
    p = oracle.p
    h = c = torch.zeros(len(samples), 8)
    x, entropy = p["g_embeddings"][torch.zeros(len(samples), dtype=torch.long)], 0.0
    for t in range(20):
        h, c, logits = oracle._cell(x, h, c)
        log_probs = torch.log_softmax(logits.double(), -1)
        entropy += -(log_probs.exp() * log_probs).sum(-1).mean().item() / 20
        x = p["g_embeddings"][samples[:, t]]
    nll = oracle.nll(samples)
    assert nll.mean().item() == pytest.approx(entropy, abs=4 * nll.std().item() / math.sqrt(len(samples)))
    uniform = torch.randint(50, (4000, 20), generator=torch.Generator().manual_seed(2))
    assert oracle.nll(uniform).mean().item() > entropy + 0.5  # cross-entropy exceeds entropy
    # a flat oracle (zero output layer) gives every sequence log(vocab) nats per token
    flat = dict(tiny_oracle_params(vocab=50, dim=8), Wo=np.zeros((8, 50), np.float32), bo=np.zeros(50, np.float32))
    assert common.SeqGANOracle(flat).nll(uniform).mean().item() == pytest.approx(math.log(50), rel=1e-6)


def test_oracle_draws_do_not_depend_on_its_cache_blocks():
    """Datasets drawn from a seed stay the same sequences whatever block size the oracle computes in: the same as one
    pass over each batch, drawing one uniform per row per step and inverting the CDF."""
    oracle = common.SeqGANOracle(tiny_oracle_params(vocab=50, dim=8, seed=3))
    generator = torch.Generator().manual_seed(4)
    expected = []
    for batch in (32, 18):  # 50 sequences in batches of 32
        h = c = torch.zeros(batch, 8)
        x, tokens = oracle.p["g_embeddings"][torch.zeros(batch, dtype=torch.long)], []
        for _ in range(20):
            h, c, logits = oracle._cell(x, h, c)
            u = torch.rand(batch, 1, generator=generator, dtype=torch.float64)
            cdf = torch.softmax(logits, -1).double().cumsum(-1)
            tokens.append((cdf < u * cdf[:, -1:]).sum(-1))  # the first class whose CDF reaches u
            x = oracle.p["g_embeddings"][tokens[-1]]
        expected.append(torch.stack(tokens, 1))
    expected = torch.cat(expected)
    for block in (32, 7, 1):
        assert torch.equal(oracle.sample(50, torch.Generator().manual_seed(4), batch_size=32, block=block), expected)
    assert oracle.nll(expected, batch_size=3).tolist() == pytest.approx(oracle.nll(expected, batch_size=50).tolist(),
                                                                       rel=1e-6)


def test_random_oracle_is_drawn_from_the_seed():
    a, b, c = (common.SeqGANOracle.random(seed, vocab=20, dim=4) for seed in (0, 0, 1))
    assert torch.equal(a.p["Wi"], b.p["Wi"]) and not torch.equal(a.p["Wi"], c.p["Wi"])
    assert a.p["Wo"].shape == (4, 20) and abs(a.p["g_embeddings"].std().item() - 1) < 0.3


def write_pickle(folder, payload: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "target_params_py3.pkl").write_bytes(payload)


def test_oracle_pickle_is_read_with_numpy_only_and_cached_as_npz(tmp_path):
    params = tiny_oracle_params()
    write_pickle(tmp_path / "seqgan-oracle", pickle.dumps([params[k] for k in common.ORACLE_KEYS], protocol=2))
    loaded = common.load_oracle_params(tmp_path)
    assert all(np.array_equal(loaded[k], params[k]) for k in common.ORACLE_KEYS)
    cached = tmp_path / "seqgan-oracle" / "target_params.npz"
    assert cached.is_file()
    with np.load(cached, allow_pickle=False) as archive:
        assert np.array_equal(archive["Wo"], params["Wo"])
    assert all(np.array_equal(common.load_oracle_params(tmp_path)[k], params[k]) for k in common.ORACLE_KEYS)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_oracle_pickle_that_calls_anything_else_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pickle(tmp_path / "seqgan-oracle", pickle.dumps([_Exploit()]))
    with pytest.raises(common.UserError, match="--oracle random"):
        common.load_oracle_params(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_oracle_pickle_is_downloaded_with_its_checksum(http_server, tmp_path, monkeypatch):
    served, url = http_server
    params = tiny_oracle_params()
    payload = pickle.dumps([params[k] for k in common.ORACLE_KEYS], protocol=4)
    (served / "target_params_py3.pkl").write_bytes(payload)
    entry = [("target_params.npz", None, None),
             ("target_params_py3.pkl", url + "target_params_py3.pkl", hashlib.sha256(payload).hexdigest())]
    monkeypatch.setitem(common.TEXT_SOURCES["oracle"]["files"], "params", entry)
    loaded = common.load_oracle_params(tmp_path / "data")
    assert np.array_equal(loaded["bo"], params["bo"])
    assert (tmp_path / "data" / "seqgan-oracle" / "target_params.npz").is_file()


def test_oracle_that_cannot_be_found_or_downloaded_suggests_random(http_server, tmp_path, monkeypatch):
    served, url = http_server  # serves nothing: 404
    entry = [("target_params.npz", None, None), ("target_params_py3.pkl", url + "missing.pkl", "0" * 64)]
    monkeypatch.setitem(common.TEXT_SOURCES["oracle"]["files"], "params", entry)
    with pytest.raises(common.UserError, match="neither in .* nor downloadable.*--oracle random"):
        common.load_text_dataset("oracle", tmp_path, oracle="paper")


def test_damaged_oracle_files_are_one_line_errors(tmp_path):
    folder = tmp_path / "seqgan-oracle"
    folder.mkdir()
    (folder / "target_params.npz").write_bytes(b"not a zip file")
    with pytest.raises(common.UserError, match="not a valid SeqGAN oracle"):
        common.load_oracle_params(tmp_path)
    np.savez(folder / "target_params.npz", **tiny_oracle_params(vocab=ORACLE_VOCAB_FOR_TESTS, dim=4))
    (folder / "real_data.txt").write_text("1 2 3\n")
    with pytest.raises(common.UserError, match="real_data.txt:1: expected 20 ids"):
        common.load_text_dataset("oracle", tmp_path, oracle="paper")


def test_token_id_files_accept_the_last_id_of_the_vocabulary_and_nothing_beyond(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("0 4 2\n4 4 4\n")
    assert common.read_token_ids(path, 5, 3).tolist() == [[0, 4, 2], [4, 4, 4]]
    path.write_text("0 4 2\n4 5 4\n")
    with pytest.raises(common.UserError, match=r"ids.txt:2: expected 3 ids in \[0, 5\)"):
        common.read_token_ids(path, 5, 3)


ORACLE_VOCAB_FOR_TESTS = 30


def test_oracle_dataset_from_a_random_oracle(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "ORACLE_SEQUENCES", 256)  # SeqGAN's 9,984 take a while on 2 cores
    data = common.load_text_dataset("oracle", tmp_path, oracle="random", seed=4)
    assert data.train.shape == data.test.shape == (256, 20)
    assert data.start_token == 0 and len(data.vocab) == 5000 and data.vocab.tokens[17] == "17"
    assert not torch.equal(data.train[:100], data.test[:100])  # different draws
    again = common.load_text_dataset("oracle", tmp_path, oracle="random", seed=4)
    assert torch.equal(data.train, again.train) and torch.equal(data.oracle.p["Wc"], again.oracle.p["Wc"])
    with pytest.raises(common.UserError, match="--oracle 'paper-ish' is not one of paper, random"):
        common.load_text_dataset("oracle", tmp_path, oracle="paper-ish")


@pytest.mark.skipif(not (shared_data() / "seqgan-oracle" / "target_params.npz").is_file(),
                    reason="SeqGAN's oracle parameters are not in the shared data folder")
def test_paper_oracle_scores_its_own_data_as_published(monkeypatch):
    monkeypatch.setattr(common, "ORACLE_SEQUENCES", 2000)  # fresh test draws; the training set is the authors' 9,984
    data = common.load_text_dataset("oracle", shared_data(), oracle="paper")
    assert data.train.shape == (9984, 20) and data.name == "oracle-paper"
    # the oracle's NLL of the authors' real_data.txt, from a float64 re-implementation (seqgan-oracle/SOURCE.md)
    assert data.oracle.nll(data.train).mean().item() == pytest.approx(5.761, abs=0.001)
    assert data.oracle.nll(data.test).mean().item() == pytest.approx(5.761, abs=0.05)  # fresh draws, same entropy


# ---- text datasets and tokenisation ------------------------------------------------------------------------------

def test_tokenizer_and_vocabulary_round_trip():
    sentences = [common.tokenize_line(line) for line in ["the cat sat", "the dog sat", "a cat ran"]]
    vocab = common.Vocabulary.build(sentences)
    assert vocab.tokens[:4] == [common.PAD, common.BOS, common.EOS, common.UNK]
    assert vocab.tokens[4:7] == ["cat", "sat", "the"]  # most frequent first, ties alphabetical
    for sentence in sentences:
        assert vocab.decode(vocab.encode(sentence)) == sentence
    assert vocab.decode(vocab.encode(["the", "zebra"])) == ["the", common.UNK]
    ids = common.encode_sentences(sentences[:1], vocab, 6)[0]
    assert ids.tolist() == vocab.encode(sentences[0]) + [2, 0, 0]  # EOS, then PAD
    assert vocab.decode(ids) == sentences[0]
    assert vocab.decode([1] + ids.tolist()) == sentences[0]  # a leading BOS is not text
    capped = common.Vocabulary.build(sentences, max_size=6)
    assert capped.tokens[4:] == ["cat", "sat"] and capped.encode(["dog"]) == [3]
    assert common.tokenize_line("The Cat", lower=True) == ["the", "cat"]


def test_scored_targets_are_the_words_and_eos_not_pad_nor_unk():
    """NLL-test counts what the model was trained to emit: words and EOS; <unk> and the PAD after EOS are left
    out, and oov_rate is the share of <unk> among the tokens before PAD. Every oracle token counts, 0 included."""
    vocab = common.Vocabulary.build([["a", "b"]])
    tokens = common.encode_sentences([["a", "zebra", "b"], ["b"]], vocab, 5)  # a <unk> b EOS PAD / b EOS PAD...
    data = common.TextData(tokens, tokens, vocab, vocab.index[common.BOS], "toy", [])
    assert data.scored(tokens).tolist() == [[True, False, True, True, False], [True, True, False, False, False]]
    assert data.oov_rate(tokens) == pytest.approx(1 / 6)
    oracle_vocab = common.Vocabulary([str(i) for i in range(3)], specials=False)
    ids = torch.tensor([[0, 2, 1, 0]])
    oracle_data = common.TextData(ids, ids, oracle_vocab, 0, "oracle-toy", [])
    assert oracle_data.scored(ids).all() and oracle_data.oov_rate(ids) == 0


def test_file_dataset_split_is_fixed_and_sentences_are_encoded(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"word{i % 7} and word{i % 5} ok" + " " * (i % 3) for i in range(200)]
    lines += ["", "one two three four five six"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = common.load_text_dataset(f"file:{path}", tmp_path)
    assert len(data.train) + len(data.test) == 201 and len(data.test) == 20  # the blank line is skipped
    assert data.seq_len == 7 and data.start_token == data.vocab.index[common.BOS]
    train_text = {" ".join(data.vocab.decode(row)) for row in data.train}
    test_text = {" ".join(s) for s in data.test_sentences}
    assert train_text | test_text <= {line.rstrip() for line in lines if line}  # padding spaces stripped
    again = common.load_text_dataset(f"file:{path}", tmp_path, seed=9)
    assert torch.equal(data.test, again.test)  # the split does not depend on the run's seed
    short = common.load_text_dataset(f"file:{path}", tmp_path, max_len=5)
    assert short.seq_len == 5 and len(short.train) + len(short.test) == 200  # the 6-token line is dropped


def test_bad_text_data_gives_one_line_errors(tmp_path):
    with pytest.raises(common.UserError, match="no such file"):
        common.load_text_dataset(f"file:{tmp_path / 'nope.txt'}", tmp_path)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(common.UserError, match="not UTF-8"):
        common.load_text_dataset(f"file:{binary}", tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(common.UserError, match="no sentences"):
        common.load_text_dataset(f"file:{empty}", tmp_path)
    with pytest.raises(common.UserError, match="is not one of oracle, coco"):
        common.load_text_dataset("shakespeare", tmp_path)
    with pytest.raises(ValueError):
        common.check_text_dataset("file:")


def write_json(path, sentences):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"s": sentence, "t": ["a title"]} for sentence in sentences]))


def test_emnlp2017_is_scratchgans_json_unit_with_a_valid_split(http_server, tmp_path, monkeypatch, capsys):
    served, url = http_server
    write_json(served / "train.json", ["the market fell", "shares rose again"])
    write_json(served / "valid.json", ["the market rose"])
    write_json(served / "test.json", ["shares fell", "the dollar rose"])
    monkeypatch.setitem(common.TEXT_SOURCES["emnlp2017"], "files", {
        split: [(f"{split}.json", url + f"{split}.json", None)] for split in ("train", "valid", "test")})
    data = common.load_text_dataset("emnlp2017", tmp_path)  # nothing there: all three are downloaded
    assert "the source publishes none" in capsys.readouterr().err
    assert [data.vocab.decode(row) for row in data.train] == [["the", "market", "fell"], ["shares", "rose", "again"]]
    assert data.valid_sentences == [["the", "market", "rose"]] and data.valid.shape == (1, data.seq_len)
    assert data.test_sentences == [["shares", "fell"], ["the", "dollar", "rose"]]
    (tmp_path / "emnlp2017-news" / "train.json").write_text('{"not": "a list"}')
    with pytest.raises(common.UserError, match="not ScratchGAN's JSON"):
        common.load_text_dataset("emnlp2017", tmp_path)


@pytest.mark.parametrize("dataset, present, missing", [
    ("emnlp2017", ["valid.json", "test.json"], "train.json"),
    ("emnlp2017-small", ["valid.json", "test.json"], "small_data/train.json"),
    ("emnlp2017-texygen", ["test_emnlp.txt"], "emnlp_news.txt"),
    ("coco", ["image_coco.txt"], "test_coco.txt"),
])
def test_a_folder_with_part_of_a_preprocessing_is_refused(dataset, present, missing, tmp_path, monkeypatch):
    """Texygen's test split beside ScratchGAN's files (or the reverse) must never make one dataset: the missing
    file is named, with where to get it, and nothing is downloaded to complete the folder."""
    monkeypatch.setattr(common, "download", lambda *a, **k: pytest.fail("must not download"))
    folder = tmp_path / common.TEXT_SOURCES[dataset]["folder"]
    folder.mkdir(parents=True)
    for name in present:
        if name.endswith(".json"):
            write_json(folder / name, ["a sentence"])
        else:
            (folder / name).write_text("a sentence\n")
    with pytest.raises(common.UserError) as info:
        common.load_text_dataset(dataset, tmp_path)
    message = str(info.value)
    url = {name: url for entries in common.TEXT_SOURCES[dataset]["files"].values() for name, url, _ in entries}
    assert f"but not {missing}" in message and url[missing] in message and "\n" not in message


@pytest.mark.skipif(not (shared_data() / "emnlp2017-news" / "valid.json").is_file(),
                    reason="EMNLP2017 News is not in the shared data folder")
def test_the_shared_emnlp_folder_holds_no_complete_unit_and_its_json_parses(tmp_path):
    for dataset in ("emnlp2017", "emnlp2017-texygen"):  # ScratchGAN's train.json and Texygen's are absent
        with pytest.raises(common.UserError, match="but not"):
            common.load_text_dataset(dataset, shared_data())
    # the fork's 12,500-sentence training subset with the full valid/test splits is there, as emnlp2017-small
    data = common.load_text_dataset("emnlp2017-small", shared_data(), max_len=52, vocab_size=20_000)
    assert len(data.train) == 12_500 and len(data.valid) == len(data.test) == 10_000
    assert data.seq_len == 52 and data.valid_sentences[0] != data.test_sentences[0]
    folder = shared_data() / "emnlp2017-news"  # the files are the ones whose sha256 a download checks
    for entries in common.TEXT_SOURCES["emnlp2017-small"]["files"].values():
        (name, _, sha256), = entries
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha256


@pytest.mark.skipif(not (shared_data() / "coco-captions" / "image_coco.txt").is_file(),
                    reason="COCO captions are not in the shared data folder")
def test_real_text_datasets_load():
    coco = common.load_text_dataset("coco", shared_data())
    assert coco.train.shape == (10_000, 36) and len(coco.test_sentences) == 10_000
    assert coco.vocab.decode(coco.train[0]) == "a bicycle replica with a clock as the front wheel.".split()
    poems = common.load_text_dataset("poems", shared_data())
    assert len(poems.train) + len(poems.test) == 16_394 and poems.seq_len == 25  # 24 characters + EOS
    assert all(len(s) == 24 for s in poems.test_sentences[:50])


# ---- BLEU ---------------------------------------------------------------------------------------------------------

def words(*sentences):
    return [s.split() for s in sentences]


def test_bleu_on_hand_computed_cases():
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0 -> smoothed 0.1/3; same length, so no brevity penalty
    scores = common.bleu(words("the cat sat on the mat"), words("the cat is on the mat"), max_n=4)
    assert scores[2] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert scores[3] == pytest.approx(0.5)
    assert scores[4] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    # brevity penalty: 2 words against a 6-word reference, exp(1 - 6/2)
    assert common.bleu(words("the cat"), words("the cat sat on the mat"), 2)[2] == pytest.approx(math.exp(-2))
    # clipping takes each n-gram's highest count in any one reference; the closest length (3) sets the penalty
    scores = common.bleu(words("the the the the"), words("the cat", "the the dog"), 2)
    assert scores[2] == pytest.approx(math.sqrt(2 / 4 * 1 / 3))
    assert common.bleu(words("x y"), words("a b c"), 3) == {2: 0.0, 3: 0.0}  # no unigram in common
    # the mean over hypotheses
    mean = common.bleu(words("the cat", "x y"), words("the cat"), 2)[2]
    assert mean == pytest.approx(0.5)


def test_text_sample_metrics_score_against_the_test_split_and_never_a_sample_against_itself():
    """Sample 1 is a test sentence, sample 2 shares no word with anything: BLEU 0.5 against the test split (1 and
    0), self-BLEU 0 (neither shares a bigram with the other), whatever they would score against themselves."""
    vocab = common.Vocabulary.build([["a", "b", "c"]])
    test = common.encode_sentences([["a", "b", "c"], ["a", "q"]], vocab, 5)  # "q" is out of vocabulary
    train = common.encode_sentences([["a", "b", "c"]], vocab, 5)
    data = common.TextData(train, test, vocab, vocab.index[common.BOS], "toy", [["a", "b", "c"]])
    metrics = common.text_sample_metrics(words("a b c", "x y z"), data, bleu_samples=2, self_bleu_samples=2)
    assert metrics["eval/bleu2"] == pytest.approx(0.5) and metrics["eval/self_bleu2"] == 0.0
    assert metrics["eval/oov_rate"] == pytest.approx(1 / 7) and metrics["eval/mean_length"] == 3
    only_first = common.text_sample_metrics(words("a b c", "x y z"), data, bleu_samples=1, self_bleu_samples=2)
    assert only_first["eval/bleu2"] == pytest.approx(1.0)  # the first bleu_samples sentences, no more


def test_eval_temperatures_parse_every_value_and_refuse_bad_ones():
    assert common.parse_temperatures("0.8,1,1.2") == [0.8, 1.0, 1.2]
    assert common.parse_temperatures("") == []
    for bad in ("0.8,0", "1,-2", "1,warm"):
        with pytest.raises(ValueError, match="--eval-temperatures"):
            common.parse_temperatures(bad)


def test_sample_lines_are_token_ids_for_the_oracle_and_sentences_for_text():
    vocab = common.Vocabulary.build([["a", "b"]])
    tokens = common.encode_sentences([["b", "a"]], vocab, 4)
    data = common.TextData(tokens, tokens, vocab, vocab.index[common.BOS], "toy", [])
    assert common.sample_lines(data, tokens) == ["b a"]
    ids = common.Vocabulary([str(i) for i in range(5)], specials=False)
    oracle = common.TextData(tokens, tokens, ids, 0, "oracle", [], oracle=object())
    assert common.sample_lines(oracle, torch.tensor([[0, 4, 2]])) == ["0 4 2"]


def test_a_temperature_sweep_renames_the_metrics_and_writes_num_samples_samples_per_temperature(tmp_path):
    ids = common.Vocabulary([str(i) for i in range(5)], specials=False)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    oracle = common.TextData(tokens, tokens, ids, 0, "oracle", [], oracle=object())
    evaluate_at = lambda t: ({"eval/nll": 10 * t}, torch.full((6, 3), int(4 * t)))  # noqa: E731
    metrics = common.temperature_sweep(evaluate_at, [0.5, 1.0], tmp_path, oracle, num_samples=4)
    assert metrics == {"eval_T0.5/nll": 5.0, "eval_T1/nll": 10.0}
    assert (tmp_path / "samples_T0.5.txt").read_text().splitlines() == ["2 2 2"] * 4
    assert (tmp_path / "samples_T1.txt").read_text().splitlines() == ["4 4 4"] * 4


def test_self_bleu_never_counts_a_sample_in_its_own_references():
    samples = words("a b c", "a b c", "x y z")
    assert common.bleu(samples, samples, 3, exclude_self=True) == pytest.approx({2: 2 / 3, 3: 2 / 3})
    # Texygen's bug, scoring each sample against a set that holds itself, gives 1.0 for every sample
    assert common.bleu(samples, samples, 3) == pytest.approx({2: 1.0, 3: 1.0})
    distinct = words("a b c d", "e f g h", "i j k l")
    assert common.bleu(distinct, distinct, 2, exclude_self=True)[2] == 0.0
    with pytest.raises(ValueError):
        common.bleu(samples, samples[:2], 2, exclude_self=True)
