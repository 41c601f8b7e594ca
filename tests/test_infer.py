"""The numpy runtime (poetgen.model.runtime) against the torch CharRNN, its checkpoint reader against
poetgen.checkpoint.torch_io's, the BLAS thread tuner, and `poetgen sample` on the CPU without torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from poetgen.model import config as model_config
from poetgen.checkpoint.torch_io import load_checkpoint, save_checkpoint
from poetgen.errors import CheckpointError, ConfigError
from poetgen.generation.engines import load_runtime
from poetgen.generation.threads import ThreadTuner, blas_threads
from poetgen.model.runtime import Runtime
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.poetry.forms import check_constrained
from poetgen.data.vocab import Vocab

TEXT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(cell="lstm", layers=2, tie=False, V=29, H=12, E=7, **head) -> CharRNN:
    """A CharRNN with weights far from their init (so that every gate and bias matters)."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(V, cell=cell, layers=layers, hidden=H, embed=H if tie else E, tie_weights=tie,
                                **head)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.4)
    return model


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _against_torch(model: CharRNN, table: bool) -> float:
    """Largest |log-prob difference| over a 6-symbol prefix and 5 carried steps, 3 rows."""
    rt = Runtime.from_state(model.config, model.state_dict())
    rt.use_table(table)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)[0].log_softmax(-1).numpy()  # (3, 11, V)
    worst = np.abs(_log_softmax(rt.prefix(ids[:, :6].tolist())) - ref[:, 5]).max()
    for t in range(6, 11):
        worst = max(worst, np.abs(_log_softmax(rt.step(ids[:, t].numpy())) - ref[:, t]).max())
    return float(worst)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers, tie", [(1, False), (3, False), (2, True)])
@pytest.mark.parametrize("table", [False, True])
def test_scores_equal_torch(cell, layers, tie, table):
    assert _against_torch(_model(cell, layers, tie), table) < 1e-4


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_adaptive_head_equals_torch(cell):
    model = _model(cell, 2, V=40, head="adaptive", cutoffs=(10, 25))
    assert _against_torch(model, table=False) < 1e-4


def test_hidden_state_equals_torch():
    model = _model("lstm", 2)
    ids = torch.tensor([[0, 3, 4, 5, 9]])
    rt = Runtime.from_state(model.config, model.state_dict())
    rt.prefix(ids.tolist())
    with torch.no_grad():
        h, c = model(ids)[1]
    got_h, got_c = rt.hidden()
    assert np.abs(got_h - h.numpy()).max() < 1e-5 and np.abs(got_c - c.numpy()).max() < 1e-5


def test_prefixes_of_several_lengths_come_back_in_order():
    model = _model("gru", 2)
    prefixes = [[0, 5, 6, 7], [0], [0, 8, 9], [0, 5, 6, 7], [0, 2]]
    rt = Runtime.from_state(model.config, model.state_dict())
    together = rt.prefix(prefixes).copy()
    after = rt.step(np.array([3, 3, 4, 4, 5])).copy()
    for i, p in enumerate(prefixes):
        alone = Runtime.from_state(model.config, model.state_dict())
        assert np.abs(alone.prefix([p])[0] - together[i]).max() < 1e-5
        assert np.abs(alone.step(np.array([[3, 3, 4, 4, 5][i]]))[0] - after[i]).max() < 1e-5


def test_select_keeps_repeats_and_drops_rows():
    model = _model("lstm", 2)
    rt = Runtime.from_state(model.config, model.state_dict())
    rt.prefix([[0, 4], [0, 6, 7]])
    rt.select(np.array([1, 0, 1]))  # rows: prefix 1, prefix 0, prefix 1
    assert rt.batch == 3
    s = rt.step(np.array([2, 2, 5])).copy()
    assert np.abs(s[0] - s[2]).max() > 1e-3  # same state, different inputs
    rt.select(np.array([2]))  # only the third row goes on
    last = rt.step(np.array([9]))[0].copy()
    with torch.no_grad():
        expected = model(torch.tensor([[0, 6, 7, 5, 9]]))[0][0, -1].numpy()
    assert np.abs(last - expected).max() < 1e-4


def test_table_can_be_switched_on_mid_stream():
    model = _model("lstm", 1)
    rt = Runtime.from_state(model.config, model.state_dict())
    rt.prefix([[0, 1, 2]])
    rt.use_table(True)
    s = rt.step(np.array([3]))[0].copy()
    with torch.no_grad():
        expected = model(torch.tensor([[0, 1, 2, 3]]))[0][0, -1].numpy()
    assert np.abs(s - expected).max() < 1e-4



@pytest.mark.parametrize("cell, head", [("lstm", {}), ("gru", {}), ("rnn", {}), ("lstm", {"head": "adaptive"}),
                                        ("gru", {"tie": True})])
def test_int8_rows_give_the_runtime_of_their_float32_weights_bit_for_bit(cell, head):
    """A compact file's int8 matrices, scaled by the Runtime as it lays them out (the start-up path of `poetgen
    sample`), give exactly the weights, states and scores of the same matrices dequantized first: same samples."""
    from poetgen.checkpoint.compact import quantize_rows
    from poetgen.model.runtime import Int8Rows

    if head.get("head") == "adaptive":
        model = _model(cell, 2, V=40, H=16, head="adaptive", cutoffs=(10, 25))
    else:
        model = _model(cell, 2, H=16, **head)
    dense, rows = {}, {}
    for name, w in model.state_dict().items():
        w = w.numpy()
        if w.ndim == 2:
            q, scale = quantize_rows(w)
            dense[name], rows[name] = q.astype(np.float32) * scale[:, None], Int8Rows(q, scale)
        else:
            dense[name] = rows[name] = w
    if model.config.tie_weights:  # one array under two names, as the readers give it
        dense["head.weight"], rows["head.weight"] = dense["embedding.weight"], rows["embedding.weight"]
    a, b = Runtime(model.config, dense), Runtime(model.config, rows)
    for x, y in zip([a.embedding, *a._w], [b.embedding, *b._w]):
        assert x.dtype == y.dtype == np.float32 and x.tobytes() == y.tobytes()
    prefixes = [[0, 5, 6, 7], [0, 2], [0, 8, 9, 1]]
    assert a.prefix(prefixes).tobytes() == b.prefix(prefixes).tobytes()  # one-row groups: BLAS's vector path
    for t in range(3):
        tokens = np.array([3 + t, 4, 9 - t])
        assert a.step(tokens).tobytes() == b.step(tokens).tobytes()
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a.hidden(), b.hidden()))


# --- loading ----------------------------------------------------------------------------------------------------


def _vocab() -> Vocab:
    return Vocab.from_counts(Counter(TEXT))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint as training writes it: optimizer state, RNG states, tied weights."""
    torch.manual_seed(0)
    vocab = _vocab()
    model = CharRNN(ModelConfig(len(vocab), cell="lstm", layers=2, hidden=16, embed=16, tie_weights=True))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, len(vocab), (2, 5)))[0].sum().backward()
    opt.step()
    path = tmp_path_factory.mktemp("ck") / "run" / "best.ckpt"
    save_checkpoint(path, model, vocab, optimizer=opt, train_state={"step": 1},
                    dataset_meta={"name": "x", "path": "p", "fingerprint": "f"})
    return path, model.eval(), vocab


def test_load_runtime_equals_the_model(saved):
    path, model, vocab = saved
    rt = load_runtime(path.parent)  # a run directory is resolved like load_checkpoint does
    assert rt.path == path and rt.vocab == vocab and rt.config.to_dict() == model.config.to_dict()
    ids = [[0, *vocab.encode("床前明月")]]
    with torch.no_grad():
        ref = model(torch.tensor(ids))[0][0, -1].numpy()
    assert np.abs(rt.prefix(ids)[0] - ref).max() < 1e-4


def _outcome(fn, path):
    try:
        fn(path)
    except CheckpointError as e:
        return str(e)
    return "ok"


def test_every_foreign_file_gets_the_same_refusal(saved, tmp_path):
    """Both readers refuse each bad file with the same message, and nothing from it runs."""
    from test_foreign_files import foreign_files

    blob = saved[0].read_bytes()
    marker = tmp_path / "marker"
    files = foreign_files(blob, marker)
    for name, data in files.items():
        p = tmp_path / f"{name}.ckpt"
        p.write_bytes(data)
        numpy_says = _outcome(load_runtime, p)
        assert numpy_says != "ok", name
        assert numpy_says == _outcome(load_checkpoint, p), name
    assert not marker.exists()
    assert _outcome(load_runtime, tmp_path / "absent.ckpt").startswith("checkpoint not found")


def _with_data(blob: bytes, change) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    data = change(json.loads(header["__metadata__"]["data"]))
    header["__metadata__"]["data"] = json.dumps(data, ensure_ascii=False)
    raw = json.dumps(header, ensure_ascii=False).encode()
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


@pytest.mark.parametrize("change", [
    {"dropout": 1.5}, {"dropout": "x"}, {"layers": 0}, {"layers": 2**40}, {"hidden": 17}, {"cell": "pickle"},
    {"tie_weights": 1}, {"vocab_size": 3}, {"extra_key": 1}, {"embed": True},
])
def test_damaged_model_config_gets_the_same_refusal(saved, tmp_path, change):
    blob = saved[0].read_bytes()
    p = tmp_path / "bad.ckpt"
    p.write_bytes(_with_data(blob, lambda d: {**d, "model_config": {**d["model_config"], **change}}))
    numpy_says = _outcome(load_runtime, p)
    assert numpy_says != "ok" and numpy_says == _outcome(load_checkpoint, p)


@pytest.mark.parametrize("change", [
    {"aliases": {"head.weight": "nothing"}}, {"dataset_meta": {"path": 3}}, {"train_state": [1]},
    {"rng_python": [1, 2]}, {"vocab": {"symbols": ["a"]}},
])
def test_damaged_metadata_gets_the_same_refusal(saved, tmp_path, change):
    blob = saved[0].read_bytes()
    p = tmp_path / "bad.ckpt"
    p.write_bytes(_with_data(blob, lambda d: {**d, **change}))
    numpy_says = _outcome(load_runtime, p)
    assert numpy_says != "ok" and numpy_says == _outcome(load_checkpoint, p)


CONFIGS = [
    {"vocab_size": 10}, {"vocab_size": 10, "cell": "gru", "layers": 3, "hidden": 8, "embed": 8, "tie_weights": True},
    {"vocab_size": 1}, {"vocab_size": 10, "cell": "transformer"}, {"vocab_size": 10, "dropout": 1.0},
    {"vocab_size": 10, "tie_weights": True}, {"vocab_size": 10, "layers": True}, {"vocab_size": "10"},
    {"cell": "lstm"}, {"vocab_size": 10, "bogus": 1}, [1, 2],
    {"vocab_size": 9000, "head": "auto"}, {"vocab_size": 100, "head": "adaptive", "cutoffs": [10, 50]},
    {"vocab_size": 100, "head": "adaptive", "cutoffs": [50, 10]}, {"vocab_size": 100, "cutoffs": [5]},
    {"vocab_size": 100, "head": "adaptive", "div_value": 0.5}, {"vocab_size": 100, "head": "softmax"},
]


VALID = (0, 1, 11, 12)  # indices of CONFIGS that describe a model; the others must be refused


def test_model_reexports_the_torch_free_config():
    """One definition: the torch model and the numpy runtime read the same ModelConfig class."""
    from poetgen.model import rnn as model

    assert model.ModelConfig is model_config.ModelConfig
    assert model.auto_cutoffs is model_config.auto_cutoffs


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[json.dumps(c, ensure_ascii=False) for c in CONFIGS])
def test_torch_free_model_config_accepts_and_refuses(i):
    d = CONFIGS[i]
    if i in VALID:
        config = model_config.ModelConfig.from_dict(d)
        assert config.to_dict()["vocab_size"] == d["vocab_size"]
        assert model_config.ModelConfig.from_dict(config.to_dict()) == config  # what a checkpoint stores reloads
    else:
        with pytest.raises(ConfigError):
            model_config.ModelConfig.from_dict(d)


def test_blas_threads_are_restored():
    from poetgen.generation.threads import _openblas

    found = _openblas()
    if found is None:
        pytest.skip("numpy's BLAS here is not OpenBLAS")
    before = found[1]()
    with blas_threads(1):
        assert found[1]() == 1
    assert found[1]() == before


class FakeClock:
    """time.perf_counter for ThreadTuner: each step advances it by cost(threads) seconds per row."""

    def __init__(self, monkeypatch, cost):
        import time

        self.now, self.cost = 0.0, cost
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)

    def run(self, tuner: ThreadTuner, steps: int, rows: int = 64, start: int = 0) -> list[int]:
        """-> the thread count each step ran on."""
        used = []
        for i in range(start, start + steps):
            tuner.tick(rows)
            used.append(tuner.current)
            self.now += self.cost(tuner.current, i) * rows
        return used


def test_thread_tuner_moves_to_the_faster_count_and_stays(monkeypatch):
    clock = FakeClock(monkeypatch, lambda n, i: 1e-5 / n)  # two threads twice as fast
    with ThreadTuner((1, 2), trial=4, every=32, warmup=0) as tuner:
        used = clock.run(tuner, 200)
    assert used[:4] == [1] * 4  # one thread first, while its own time is measured
    assert used[4:40] == [2] * 36
    # and now and then one thread is tried again (it loses), then back to two
    assert tuner.switches >= 3 and used.count(1) < 20 and used[-1] == 2


def test_thread_tuner_keeps_one_thread_and_backs_off_when_more_lose(monkeypatch):
    clock = FakeClock(monkeypatch, lambda n, i: 1e-5 * n)  # two threads twice as slow
    with ThreadTuner((1, 2), trial=4, every=32, warmup=0) as tuner:
        used = clock.run(tuner, 5000)
    assert tuner.current == 1 and used.count(1) > 0.98 * len(used)
    # lost trials double the wait: 32, 64, ... up to 64 x 32 steps, so few trials over 5,000 steps
    trials = tuner.switches // 2
    assert 3 <= trials <= 9, trials


def test_thread_tuner_cuts_a_stalled_trial_short(monkeypatch):
    # one thread 10 us per row; two threads stall (10x slower) on every step
    clock = FakeClock(monkeypatch, lambda n, i: 1e-5 if n == 1 else 1e-4)
    with ThreadTuner((1, 2), trial=4, every=32, warmup=0) as tuner:
        used = clock.run(tuner, 40)
    first_two = used.index(2)
    # the step after the switch is not counted, the next one stalls: back to one thread after two steps on two
    assert used[first_two : first_two + 3] == [2, 2, 1]


def test_thread_tuner_leaves_a_count_that_turns_slow(monkeypatch):
    # two threads win while the machine is idle, then lose 4x from step 300 on (another process took a core)
    clock = FakeClock(monkeypatch, lambda n, i: (5e-6 if i < 300 else 4e-5) if n == 2 else 1e-5)
    with ThreadTuner((1, 2), trial=4, every=32, warmup=0) as tuner:
        used = clock.run(tuner, 400)
    assert used[250:300].count(2) > 40
    # the moving average crossed 1.5x one thread's figure within a few steps; later trials of two lose at once
    assert set(used[306:330]) == {1} and used[306:].count(2) <= 6


def test_thread_tuner_tries_nothing_else_before_its_warmup(monkeypatch):
    """A short call stays on one thread even where two would win: a trial costs steps it could not win back
    (`poetgen sample -n 4` with the shipped model is 0.13 s of steps). A longer one tries after WARMUP seconds."""
    from poetgen.generation.threads import WARMUP

    step = 1e-3 * 64  # one thread: 64 ms per 64-row step; two threads twice as fast
    clock = FakeClock(monkeypatch, lambda n, i: 1e-3 / n)
    short = int(WARMUP / step)  # steps that, with the uncounted first one, stay under WARMUP
    with ThreadTuner((1, 2)) as tuner:
        assert clock.run(tuner, short) == [1] * short and tuner.switches == 0
    with ThreadTuner((1, 2)) as tuner:
        used = clock.run(tuner, short + 20)
    first = used.index(2)
    # the first tick measures nothing, the second counts no step (threads start): counted steps before the switch
    assert (first - 2) * step < WARMUP <= (first - 1) * step
    assert used[first:] == [2] * (len(used) - first)


def test_thread_tuner_with_a_key_carries_what_it_learned_to_the_next_call(monkeypatch):
    """A server's many short calls of like steps: each alone stays under WARMUP, together they reach it, the other
    count is tried, and once it has won the next calls start on it (no first-step penalty, no re-trial)."""
    from poetgen.generation.threads import WARMUP, forget

    forget()
    step = 1e-4 * 64
    clock = FakeClock(monkeypatch, lambda n, i: 1e-4 / n)  # two threads twice as fast
    short = int(WARMUP / step) // 4  # a call of about a quarter of WARMUP
    starts, switched_in = [], None
    for call in range(12):
        with ThreadTuner((1, 2), key="lstm 256x2, 64 rows") as tuner:
            starts.append(tuner.current)
            used = clock.run(tuner, short)
        if switched_in is None and 2 in used:
            switched_in = call
    assert switched_in is not None and 3 <= switched_in <= 5, starts
    assert starts[: switched_in + 1] == [1] * (switched_in + 1)
    assert starts[switched_in + 1 :] == [2] * (11 - switched_in)
    # without a key the same calls never try: each call starts from nothing
    for _ in range(6):
        with ThreadTuner((1, 2)) as tuner:
            assert clock.run(tuner, short) == [1] * short
    forget()


def test_thread_tuner_keys_are_apart_and_a_cut_off_trial_resumes(monkeypatch):
    from poetgen.generation.threads import _LEARNED, forget

    forget()
    clock = FakeClock(monkeypatch, lambda n, i: 1e-5 / n)
    with ThreadTuner((1, 2), warmup=0, key="a") as tuner:
        used = clock.run(tuner, 6)  # the trial starts at the fifth tick and is still running at the end
    assert used[-1] == 2 and tuner.incumbent == 1
    with ThreadTuner((1, 2), warmup=0, key="b") as other:
        assert other.current == 1 and clock.run(other, 3) == [1, 1, 1]  # key b learned nothing from a
    with ThreadTuner((1, 2), warmup=0, key="a") as tuner:
        start = tuner.current
        used = clock.run(tuner, 8)
    assert start == 1 and used[1] == 2, used  # the trial is taken up again at once ...
    assert tuner.incumbent == 2 and used[-1] == 2  # ... and wins
    assert len(_LEARNED) == 2
    with ThreadTuner((3,), key="a") as fixed:  # one choice: nothing recalled, nothing kept
        assert fixed.current == 3
    assert len(_LEARNED) == 2
    forget()
    assert not _LEARNED


def test_sampling_key_tells_models_and_batch_sizes_apart():
    from poetgen.generation.threads import sampling_key

    class Engine:
        cell, L, H, V = "lstm", 2, 256, 65

    class Wider(Engine):
        H = 512

    assert sampling_key(Engine(), 64) == sampling_key(Engine(), 100)  # within a factor of two
    assert sampling_key(Engine(), 64) != sampling_key(Engine(), 32)
    assert sampling_key(Engine(), 1) != sampling_key(Engine(), 2)
    assert sampling_key(Engine(), 64) != sampling_key(Wider(), 64)
    assert sampling_key(object(), 64) is None  # sizes unknown: nothing to key by, nothing kept


def test_generate_keeps_the_thread_verdict_between_calls(saved):
    """generate keys its tuner by the model and the batch: after a call, the process holds what it learned."""
    from poetgen.generation.threads import _LEARNED, forget, sampling_key

    forget()
    from poetgen.generation.sample import SampleOptions, generate

    path, _, vocab = saved
    runtime = load_runtime(path)
    generate(runtime, vocab, [""], SampleOptions(num_samples=16, length=20, seed=1))
    generate(runtime, vocab, [""], SampleOptions(num_samples=1, length=20, seed=1))
    from poetgen.generation.threads import _openblas, usable_cores

    if _openblas() is None or usable_cores() < 2:
        assert not _LEARNED  # one choice: nothing to learn
    else:
        assert {sampling_key(runtime, 16), sampling_key(runtime, 1)} == {key[0] for key in _LEARNED}
    forget()


def test_thread_tuner_with_one_choice_never_switches(monkeypatch):
    clock = FakeClock(monkeypatch, lambda n, i: 1e-5)
    with ThreadTuner((3,)) as tuner:
        assert set(clock.run(tuner, 100)) == {3}
    assert tuner.switches == 0


def test_thread_tuner_restores_the_blas_threads(monkeypatch):
    from poetgen.generation.threads import _openblas

    found = _openblas()
    if found is None:
        pytest.skip("numpy's BLAS here is not OpenBLAS")
    before = found[1]()
    clock = FakeClock(monkeypatch, lambda n, i: 1e-5 / n)
    with ThreadTuner((1, 2), warmup=0) as tuner:
        clock.run(tuner, 50)
        assert found[1]() == tuner.current == 2
    assert found[1]() == before


# --- the command, as a process ------------------------------------------------------------------------------------


def test_sample_process_on_cpu_never_imports_torch(saved, tmp_path):
    """`poetgen sample` on the CPU: poems out, and torch never in sys.modules (it alone takes seconds to import)."""
    path = saved[0]
    script = (
        "import sys\n"
        "from poetgen.cli.app import app\n"
        "try:\n"
        f"    app(['sample', '-c', {str(path)!r}, '--form', '五绝', '-n', '4', '--seed', '1', '--device', sys.argv[1]])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('TORCH', any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'EXIT', code,"
        " file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    from poetgen.generation.engines import torch_gpu_build

    for device in ("cpu",) if torch_gpu_build() else ("cpu", "auto"):
        r = subprocess.run([sys.executable, "-c", script, device], capture_output=True, text=True, env=env,
                           timeout=120, encoding="utf-8")
        assert "TORCH False EXIT 0" in r.stderr, r.stderr
        poems = r.stdout.rstrip("\n").split("\n\n")
        assert len(poems) == 4
        for poem in poems:
            assert check_constrained(poem.replace("\n", ""), 4, 5) == [], poem
    again = subprocess.run([sys.executable, "-c", script, "cpu"], capture_output=True, text=True, env=env,
                           timeout=120, encoding="utf-8")
    assert again.stdout == r.stdout  # same seed, same poems
    assert re.search(r"Checkpoint: .*best\.ckpt", again.stderr)


def test_sample_threads_through_the_cli(saved):
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    runner = CliRunner()
    args = ["sample", "-c", str(saved[0]), "--form", "五绝", "-n", "3", "--seed", "4", "-q"]
    one, two = runner.invoke(app, [*args, "--threads", "1"]), runner.invoke(app, [*args, "--threads", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert len(one.stdout.rstrip("\n").split("\n\n")) == 3


# --- sample_step: its fast paths against the plain formulation ------------------------------------------------


def _plain_draw(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sample._draw as first written: the two levels over a zero-padded copy (B > 1 rows, V > 4 blocks)."""
    from poetgen.generation.sample import BLOCK, _pick

    B, V = weights.shape
    nb = -(-V // BLOCK)
    padded = np.zeros((B, nb * BLOCK), dtype=weights.dtype)
    padded[:, :V] = weights
    blocks = padded.reshape(B, nb, BLOCK)
    block_cdf = np.cumsum(blocks.sum(axis=2), axis=1)
    r = rng.random(B)
    block = _pick(block_cdf, r)
    rows = np.arange(B)
    below = np.where(block > 0, block_cdf[rows, block - 1], 0.0)
    frac = np.clip(((1.0 - r) * block_cdf[:, -1] - below) / (block_cdf[rows, block] - below), 0.0, 1.0)
    return block * BLOCK + _pick(np.cumsum(blocks[rows, block], axis=1), 1.0 - frac)


def _plain_step(scores, temperature, top_k, top_p, penalty, rng, allowed, seen):
    """sample_step as first written: new arrays at every stage, masks by np.where."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    s = scores
    if seen is not None:
        s = s - np.where(seen, np.float32(np.log(penalty)), np.float32(0))
    if allowed is not None:
        s = np.where(allowed, s, np.float32(-np.inf))
    if temperature == 0:
        token = s.argmax(axis=1)
    else:
        if temperature != 1:
            s = (s - s.max(axis=1, keepdims=True)) / np.float32(temperature)
        V = s.shape[1]
        if top_k < V:
            s = np.where(s < np.partition(s, V - top_k, axis=1)[:, V - top_k, None], np.float32(-np.inf), s)
        if top_p is not None:
            order = np.argsort(-s, axis=1, kind="stable")
            ranked = np.take_along_axis(s, order, axis=1)
            probs = np.exp(ranked - ranked[:, :1])
            probs /= probs.sum(axis=1, keepdims=True)
            ranked[(np.cumsum(probs, axis=1) - probs) >= top_p] = -np.inf
            s = np.empty_like(ranked)
            np.put_along_axis(s, order, ranked, axis=1)
        token = _plain_draw(np.exp(s - s.max(axis=1, keepdims=True)), rng)
    return token, shifted[np.arange(len(token)), token] - log_norm


def test_sample_step_draws_what_the_plain_formulation_draws_to_the_bit():
    """sample_step's shortcuts (arrays reused and written in place, the mask written over the weights, the row
    maxima not subtracted twice, the draw without a padded copy) change no draw and no log-probability: over 300
    random steps of many rows, with every knob, both give the same ids and the same float32 numbers."""
    from poetgen.generation.sample import SampleOptions, _generator, sample_step

    rng = np.random.default_rng(0)
    for case in range(300):
        B, V = int(rng.choice([2, 7, 64])), int(rng.choice([300, 1000, 8798]))
        scores = (rng.standard_normal((B, V)) * rng.choice([0.5, 3, 20, 60])).astype(np.float32)
        scores[:, :2] = 0.0 if case % 3 else -np.inf
        allowed = rng.random((B, V)) < rng.choice([0.01, 0.5, 0.99]) if case % 4 else None
        if allowed is not None:
            allowed[np.arange(B), rng.integers(2, V, size=B)] = True
        seen = rng.random((B, V)) < 0.1 if case % 5 == 0 else None
        penalty = 1.3 if seen is not None else 1.0
        temperature = float(rng.choice([0, 0.3, 0.8, 1.0, 2.5]))
        top_k = int(rng.choice([V, V, 3, V // 2]))
        top_p = float(rng.choice([0.5, 0.9])) if case % 7 == 0 else None
        o = SampleOptions(temperature=temperature, top_p=top_p, repetition_penalty=penalty)
        given = scores.copy()
        got = sample_step(given, o, top_k, _generator(case), allowed, seen)
        want = _plain_step(scores, temperature, top_k, top_p, penalty, _generator(case), allowed, seen)
        assert np.array_equal(given, scores)  # the caller's scores are left as they were
        assert np.array_equal(got[0], want[0]), case
        assert got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1]), case
