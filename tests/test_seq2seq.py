"""The 对句 encoder-decoder: pair data, model, training through the shared loop, decoding rules, eval, CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from poetgen.checkpoint.format import checkpoint_kind, read_model, seq2seq_shapes
from poetgen.checkpoint.torch_io import load_checkpoint, load_model, save_checkpoint
from poetgen.cli.app import app
from poetgen.data.dataset import load_dataset
from poetgen.data.corpus import PAIR_SEP
from poetgen.data.dataset import ACROSS, MIDDLE, REVERSED
from poetgen.data.prepare import PrepareOptions, couplets, line_pairs, prepare
from poetgen.data.vocab import Vocab
from poetgen.errors import CheckpointError, SampleError
from poetgen.evaluation.couplets import bleu4, evaluate_couplets
from poetgen.generation.couplet import CoupletOptions, answer_lines, tone_of
from poetgen.model.config import Seq2SeqConfig
from poetgen.model.seq2seq import Seq2Seq
from poetgen.poetry.prosody import rhyme_book
from poetgen.training.config import TrainConfig
from poetgen.training.loop import train

runner = CliRunner()
# The toy task: each character through a fixed table (天 -> 地 ...), lines of 5 with a comma or none.
SOURCE = "天地山水风雨花月日云春秋江河"
TABLE = dict(zip(SOURCE, "地天水山雨风月花云日秋春河江"))


def toy_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        first = "".join(rng.choice(SOURCE) for _ in range(rng.choice((4, 5))))
        pairs.append((first, "".join(TABLE[c] for c in first)))
    return pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A pair dataset of the toy task (TSV through prepare --pairs), and a model trained on it by the loop."""
    root = tmp_path_factory.mktemp("toy")
    (root / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in toy_pairs(600, 1)), encoding="utf-8")
    prepare([str(root / "pairs.tsv")], root / "data", PrepareOptions(pairs=True, val_fraction=0.05))
    dataset = load_dataset(root / "data")
    config = TrainConfig(cell="gru", layers=1, hidden=48, embed=24, dropout=0.0, batch_size=32, max_steps=200,
                         lr=1e-2, warmup_steps=10, eval_every=100, sample_every=0, device="cpu", threads=1)
    result = train(config, dataset, root / "run")
    return root, dataset, result


def test_toy_task_learned_exactly_through_the_training_loop(toy):
    root, dataset, result = toy
    assert result.status == "completed" and result.step == 200
    model, ckpt = load_model(result.best_checkpoint)
    assert ckpt.model_config.kind == "seq2seq" and ckpt.dataset_meta["kind"] == "pairs"
    held_out = [ckpt.vocab.decode(f.tolist()) for f, _, _ in dataset.pair_lines("val")]
    assert len(held_out) >= 20
    answers = answer_lines(model, ckpt.vocab, held_out, CoupletOptions(temperature=0.0))
    assert [a[0].text for a in answers] == ["".join(TABLE[c] for c in f) for f in held_out]
    report = evaluate_couplets(model, ckpt, beam=2)
    assert report.exact_match == 1.0 and report.bleu4 == pytest.approx(100.0)
    assert report.nats_per_char < 0.05 and report.rates.same_length_rate == 1.0
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["type"] == "eval"] == [100, 200]


def test_dataset_records_pairs_split_by_document(toy):
    _, dataset, _ = toy
    assert dataset.meta["kind"] == "pairs" and dataset.is_pairs
    train = {(dataset.vocab.decode(a.tolist()), dataset.vocab.decode(b.tolist())) for a, b, _ in
             dataset.pair_lines("train")}
    val = {(dataset.vocab.decode(a.tolist()), dataset.vocab.decode(b.tolist())) for a, b, _ in
           dataset.pair_lines("val")}
    assert not train & val and all(TABLE[x] == y for a, b in train | val for x, y in zip(a, b))


def test_poem_couplets_and_middle_flags():
    lushi = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
    found = couplets(lushi)
    assert [(a, b) for a, b, _ in found][:2] == [("国破山河在", "城春草木深"), ("感时花溅泪", "恨别鸟惊心")]
    assert [m for _, _, m in found] == [False, True, True, False]
    assert [m for _, _, m in couplets("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")] == [False, False]
    assert couplets("长短不齐句，短句。") == []  # unequal lines are no couplet


LUSHI = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"


def test_augmented_pairs_reversed_and_across_couplets():
    plain = line_pairs(LUSHI)
    both = line_pairs(LUSHI, ("reversed", "across"))
    assert both[:4] == plain and [f for _, _, f in plain] == [0, MIDDLE, MIDDLE, 0]
    extra = both[4:]
    assert [(a, b) for a, b, f in extra if f == REVERSED][:2] == [("城春草木深", "国破山河在"), ("恨别鸟惊心", "感时花溅泪")]
    assert [(a, b) for a, b, f in extra if f == ACROSS] == [
        ("城春草木深", "感时花溅泪"), ("恨别鸟惊心", "烽火连三月"), ("家书抵万金", "白头搔更短")]
    assert len(extra) == 4 + 3
    # across needs two kept couplets in a row of one line length; a user pair gets nothing extra
    broken = "白日依山尽，黄河入海流。欲穷千里目，更上一层。远上寒山石，白云生处有。"
    assert [(a, b) for a, b, f in line_pairs(broken, ("across",)) if f == ACROSS] == []
    # a user pair is one couplet: reversed applies, across cannot
    assert line_pairs(f"天地{PAIR_SEP}地天", ("reversed", "across")) == [("天地", "地天", 0), ("地天", "天地", REVERSED)]


def test_prepare_augment_adds_training_pairs_only(tmp_path):
    poems = []
    rng = random.Random(3)
    for i in range(60):  # distinct poems of two couplets: 5-character lines from the toy alphabet
        lines = ["".join(rng.choice(SOURCE) for _ in range(5)) for _ in range(4)]
        poems.append({"title": f"p{i}", "author": "a",
                      "paragraphs": [f"{lines[0]}，{lines[1]}。", f"{lines[2]}，{lines[3]}。"]})
    src = tmp_path / "src"
    src.mkdir()
    (src / "poet.tang.0.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    plain = prepare([str(src)], tmp_path / "plain", PrepareOptions(pairs=True, val_fraction=0.2))
    more = prepare([str(src)], tmp_path / "more", PrepareOptions(pairs=True, val_fraction=0.2,
                                                                       augment=("reversed", "across")))
    a, b = plain.counts, more.counts
    assert b["val_pairs"] == a["val_pairs"] > 0 and b["val_tokens"] == a["val_tokens"]
    assert b["train_reversed_pairs"] == a["train_pairs"] and b["train_across_pairs"] == a["train_pairs"] // 2
    assert b["train_pairs"] == a["train_pairs"] * 2 + a["train_pairs"] // 2
    data = load_dataset(tmp_path / "more")
    assert not any(f & (REVERSED | ACROSS) for _, _, f in data.pair_lines("val"))
    # preset auto weighs the text, not its repetitions: the augmented dataset counts what the plain one holds
    plain_data = load_dataset(tmp_path / "plain")
    assert data.auto_tokens == plain_data.auto_tokens == len(plain_data.train) < len(data.train)
    assert json.loads((tmp_path / "more" / "meta.json").read_text())["options"]["augment"] == ["reversed", "across"]
    r = runner.invoke(app, ["prepare", str(src), "--augment", "reversed", "-o", str(tmp_path / "x"), "-q"])
    assert r.exit_code == 1 and "needs --pairs" in r.output
    r = runner.invoke(app, ["prepare", str(src), "--pairs", "--augment", "sideways", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown --augment 'sideways'" in r.output


def test_resume_of_a_pair_run_is_exact(toy, tmp_path):
    _, dataset, _ = toy
    config = TrainConfig(cell="lstm", layers=2, hidden=16, embed=8, dropout=0.2, batch_size=16, max_steps=12,
                         eval_every=6, sample_every=0, device="cpu", threads=1)
    whole = train(config, dataset, tmp_path / "whole")
    half = TrainConfig(**{**config.to_dict(), "max_steps": 6})
    train(half, dataset, tmp_path / "parts")
    resumed = train(config, dataset, tmp_path / "parts", resume=load_checkpoint(tmp_path / "parts" / "last.ckpt"))
    a, b = load_checkpoint(whole.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert resumed.step == 12
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name
    assert whole.last_val_loss == resumed.last_val_loss


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("attention", ["dot", "additive"])
def test_checkpoint_shapes_are_the_models(cell, attention):
    for head in ({"head": "full"}, {"head": "adaptive", "cutoffs": (4, 9)}):
        config = Seq2SeqConfig(13, cell=cell, layers=2, hidden=8, embed=5, attention=attention, **head)
        real = {k: tuple(v.shape) for k, v in Seq2Seq(config).state_dict().items()}
        assert seq2seq_shapes(config) == real


def test_adaptive_head_scores_and_loss_agree():
    """The adaptive head's scores are log-probabilities (each row sums to 1), forward's loss is their cross-entropy,
    and a decoding step gives the same numbers as the teacher-forced pass; head auto picks it for a large vocabulary
    as CharRNN's does."""
    from poetgen.model.config import AUTO_HEAD_MIN_VOCAB

    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(40, hidden=16, embed=8, layers=1, head="adaptive", cutoffs=(10, 25))).eval()
    src, tgt = torch.randint(2, 40, (3, 5)), torch.randint(2, 40, (3, 5))
    from poetgen.data.pairs import teacher_inputs

    with torch.no_grad():
        scores, _ = model(src, teacher_inputs(tgt))
        loss, _ = model(src, teacher_inputs(tgt), tgt)
        values, keys, state = model.encode(src)
        first, _, _ = model.step(torch.zeros(3, dtype=torch.long), state, values, keys)
    assert torch.allclose(scores.exp().sum(-1), torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(loss, -scores.gather(2, tgt[..., None]).mean(), atol=1e-6)
    assert torch.allclose(first, scores[:, 0], atol=1e-5)
    assert Seq2SeqConfig(AUTO_HEAD_MIN_VOCAB, head="auto").head == "adaptive"
    assert Seq2SeqConfig(AUTO_HEAD_MIN_VOCAB - 1, head="auto").head == "full"


def _crafted(tmp_path, model_config: dict):
    """A checkpoint whose header claims ``model_config`` over the weights of a small real model."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    vocab = Vocab(["<eot>", "<unk>", *SOURCE])
    model = Seq2Seq(Seq2SeqConfig(len(vocab), hidden=8, embed=4, layers=1))
    good = save_checkpoint(tmp_path / "good.ckpt", model, vocab)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    data = json.loads(meta["data"])
    data["model_config"] = {**data["model_config"], **model_config}
    bad = tmp_path / "bad.ckpt"
    save_file(load_file(str(good)), str(bad), {**meta, "data": json.dumps(data)})
    return good, bad


@pytest.mark.parametrize("claim, message", [
    ({"layers": 10**8}, "weights do not match"),
    ({"hidden": 16}, "weights do not match"),
    ({"attention": "additive"}, "weights do not match"),
    ({"kind": "transformer"}, "unknown model kind"),
    ({"cell": "rnn"}, "gru or lstm"),
    ({"head": "adaptive", "cutoffs": [3]}, "weights do not match"),
    ({"tie_weights": True}, "tie-weights"),
])
def test_crafted_checkpoint_refused(tmp_path, claim, message):
    good, bad = _crafted(tmp_path, claim)
    assert checkpoint_kind(good) == "seq2seq"
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_numpy_reader_says_it_does_not_run_the_encoder_decoder(tmp_path):
    good, _ = _crafted(tmp_path, {})
    with pytest.raises(CheckpointError, match="encoder-decoder"):
        read_model(good)


@pytest.mark.parametrize("name, content, message", [
    ("odd.tsv", "天地\t山水\n风雨\t花月\t日\n", "odd.tsv: line 2: expected 2 tab-separated fields"),
    ("one.tsv", "天地\t山水\n\n风雨花月\n", "one.tsv: line 3: expected 2 tab-separated fields"),
    ("len.tsv", "天地山\t水风\n", "len.tsv: line 1: the first line has 3 characters and the answering line 2"),
    ("empty.tsv", "天地\t \n", "empty.tsv: line 1: the answering line is empty"),
    ("three.jsonl", '["天地", "山水"]\n["天", "地", "山"]\n', "three.jsonl: line 2: a pair has 2 text fields"),
    ("len.jsonl", '{"first": "天地", "second": "山"}\n', "len.jsonl: line 1: the first line has 2 characters"),
])
def test_bad_pair_files_end_in_error_with_the_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    r = runner.invoke(app, ["prepare", str(tmp_path / name), "--pairs", "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and message in r.output
    assert not (tmp_path / "out").exists()


def test_tsv_needs_pairs(tmp_path):
    (tmp_path / "p.tsv").write_text("天地\t山水\n", encoding="utf-8")
    r = runner.invoke(app, ["prepare", str(tmp_path / "p.tsv"), "--format", "tsv", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "add --pairs" in r.output


# --- decoding rules -----------------------------------------------------------------------------------------------

WIDE = "天地山水风雨花月日云春秋江河白日依尽黄入海流欲穷千里目更上一层楼床前明光疑是霜举头望低思故乡人来去"


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(3)
    vocab = Vocab(["<eot>", "<unk>", "，", "。", *dict.fromkeys(WIDE)])
    return Seq2Seq(Seq2SeqConfig(len(vocab), hidden=16, embed=8, layers=1)).eval(), vocab


@pytest.mark.parametrize("options", [
    CoupletOptions(temperature=0.0),
    CoupletOptions(temperature=1.5, num_samples=8, seed=1),
    CoupletOptions(temperature=1.0, top_k=3, top_p=0.9, num_samples=4, seed=2),
    CoupletOptions(beam=6, num_samples=6),
    CoupletOptions(temperature=1.5, num_samples=8, seed=1, tones=True),
    CoupletOptions(beam=5, num_samples=5, tones=True),
])
def test_answers_keep_length_punctuation_and_never_repeat_in_place(random_model, options):
    model, vocab = random_model
    rng = random.Random(7)
    han = list(dict.fromkeys(WIDE))
    firsts = ["".join(rng.choice(han) for _ in range(rng.choice((5, 7)))) for _ in range(20)]
    firsts += ["白日，依山尽", "天地人，山水"]
    book = rhyme_book("pingshui")
    for first, group in zip(firsts, answer_lines(model, vocab, firsts, options)):
        assert len(group) == options.num_samples
        if options.beam:
            assert [a.logprob for a in group] == sorted((a.logprob for a in group), reverse=True)
        for a in group:
            assert len(a.text) == len(first)
            assert all((x == y) == (x in "，。") for x, y in zip(first, a.text)), (first, a.text)
            assert all(y not in "，。" for x, y in zip(first, a.text) if x not in "，。")
            if options.tones:
                for pos in [p for p in (2, 4, 6) if p < len(first)] + [len(first)]:
                    t = tone_of(first[pos - 1], book)
                    want = {"平": "仄", "仄": "平"}.get(t, "平" if pos == len(first) else None)
                    if want and first[pos - 1] not in "，。":
                        assert tone_of(a.text[pos - 1], book) == want, (first, a.text, pos)


def test_beam_is_deterministic_and_sampling_follows_the_seed(random_model):
    model, vocab = random_model
    runs = [answer_lines(model, vocab, ["白日依山尽"], o)[0] for o in
            (CoupletOptions(beam=4, num_samples=4), CoupletOptions(beam=4, num_samples=4),
             CoupletOptions(temperature=1.0, seed=5, num_samples=3), CoupletOptions(temperature=1.0, seed=5,
                                                                                    num_samples=3))]
    assert [a.text for a in runs[0]] == [a.text for a in runs[1]]
    assert [a.text for a in runs[2]] == [a.text for a in runs[3]]
    assert len({a.text for a in runs[0]}) == 4


def test_unknown_characters_and_bad_options_are_sample_errors(random_model):
    model, vocab = random_model
    with pytest.raises(SampleError, match="not in the model's vocabulary"):
        answer_lines(model, vocab, ["白日依山龘"])
    with pytest.raises(SampleError, match="more answers than"):
        answer_lines(model, vocab, ["白日依山尽"], CoupletOptions(beam=2, num_samples=3))


# --- eval and the CLI ---------------------------------------------------------------------------------------------


def test_bleu4_agrees_with_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["黄河入海流", "更上一层楼", "低头思故乡", "明月照高楼"]
    refs = ["黄河入海流", "更上一层台", "低头思故园", "清风拂远楼"]
    ours = bleu4(hyps, refs)
    theirs = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score
    assert ours == pytest.approx(theirs, abs=1e-6) and 0 < ours < 100


def test_cli_sample_answers_and_beam_lists_scores(toy, tmp_path):
    root, _, result = toy
    ckpt = str(result.best_checkpoint)
    r = runner.invoke(app, ["sample", "-c", ckpt, "--prime", "天地山水风", "-t", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "地天水山雨\n"
    (tmp_path / "primes.txt").write_text("春秋\n江河日月\n", encoding="utf-8")
    r = runner.invoke(app, ["sample", "-c", ckpt, "--primes-file", str(tmp_path / "primes.txt"), "--beam", "3", "-n",
                            "2", "--json", "-q"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["prime"], x["rank"]) for x in records] == [("春秋", 0), ("春秋", 1), ("江河日月", 0), ("江河日月", 1)]
    assert records[0]["text"] == "秋春" and records[2]["text"] == "河江云花"
    assert records[0]["mean_logprob"] >= records[1]["mean_logprob"]
    r = runner.invoke(app, ["sample", "-c", ckpt, "--prime", "天地", "--form", "五绝"])
    assert r.exit_code == 2 and "--form: not for an encoder-decoder" in r.output


def test_cli_eval_figures_and_attention_png(toy, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, result = toy
    png = tmp_path / "attention.png"
    r = runner.invoke(app, ["eval", str(result.best_checkpoint), "--beam", "2", "--plot-attention", str(png),
                            "--prime", "天地山水风", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["couplets"][0]
    assert report["exact_match"] == 1.0 and report["rates"]["same_length_rate"] == 1.0
    assert report["decoding"] == "beam 2"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pair_run_under_torchrun_resumes(toy, tmp_path):
    """Two processes (poetgen train --nproc 2) train and resume a pair run through the same loop."""
    import subprocess
    import sys

    _, dataset, _ = toy
    base = [sys.executable, "-m", "poetgen", "train", "--nproc", "2", "--runs-dir", str(tmp_path), "--device", "cpu"]
    first = subprocess.run([*base, str(dataset.path), "--name", "ddp", "--cell", "gru", "--hidden", "16", "--embed",
                            "8", "--batch-size", "8", "--max-steps", "4", "--eval-every", "2", "-q"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([*base, "--resume", str(tmp_path / "ddp"), "--max-steps", "6", "-q"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.ckpt")
    assert ckpt.train_state["step"] == 6 and ckpt.train_state["world_size"] == 2
    assert ckpt.model_config.kind == "seq2seq"
