"""poetgen.training.session: precision auto's choice (bf16 where the CPU has it and a step of the run's own model is
BF16_MIN_GAIN faster) and the preset it picks by the speed of the precision that will run."""

from __future__ import annotations

import pytest
import torch

import poetgen.model.devices as devices
import poetgen.training.loop as loop
from poetgen.data.dataset import load_dataset
from poetgen.training.config import AUTO_CURVES, BF16_MIN_GAIN, BF16_MIN_HIDDEN, PRESETS, PROBE_SHARE, \
    REFERENCE_STEPS_PER_SEC, TrainConfig, auto_preset
from poetgen.training.loop import PrecisionProbe, precision_probe
from poetgen.training.session import TrainRequest

torch.set_num_threads(1)

TINY = {"layers": 1, "hidden": 128, "embed": 16, "batch_size": 4, "seq_len": 16, "device": "cpu"}


HIDDEN = {p: TrainConfig(**PRESETS[p]).hidden for p in AUTO_CURVES}  # a probed model's preset, by its width


def fake_machine(monkeypatch, *, native: bool, gain, speeds: dict | None = None) -> list:
    """A CPU with or without native bf16 whose run-size probe measures ``gain`` (a number, or one per probe in turn)
    and whose step probe measures ``speeds`` per precision (a multiple of the reference machine's, or {preset: steps
    a second}; a model of no preset's width: the reference's `short`); -> the list of calls made to the probes."""
    calls: list = []
    gains = iter(gain) if isinstance(gain, (list, tuple)) else None
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: native)

    def probe(config, dataset, model_options=None, seconds=3.0, vocab_size=None, id_map=None):
        calls.append(("precision_probe", config.hidden) if vocab_size is None else
                     ("precision_probe", config.hidden, vocab_size, id_map is not None))
        return PrecisionProbe(fp32=1000.0, bf16=1000.0 * (next(gains) if gains else gain), trials=3)

    def speed(config, device="auto", threads=None, seconds=0.6, max_steps=12, precision="fp32"):
        preset = next((p for p, h in HIDDEN.items() if h == config.hidden), None)
        calls.append(("step_speed", precision, preset or config.hidden))
        found = (speeds or {}).get(precision, 1.0)
        if isinstance(found, dict):
            return found[preset]
        return found * REFERENCE_STEPS_PER_SEC[preset or "short"]

    monkeypatch.setattr(loop, "precision_probe", probe)
    monkeypatch.setattr(loop, "step_speed", speed)
    return calls


def same(speed: dict, expected: dict) -> bool:
    """auto's {preset: (steps a second, precision)} against ``expected``, the rates to rounding."""
    return speed.keys() == expected.keys() and all(
        speed[p][1] == expected[p][1] and speed[p][0] == pytest.approx(expected[p][0]) for p in expected)


def big_dataset(tmp_path):
    from helpers import make_dataset

    docs = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 40] * 600  # over AUTO_MIN_TOKENS characters
    return make_dataset(tmp_path / "big", docs, docs[:2])


def test_auto_takes_bf16_when_native_and_fast_enough(monkeypatch, tiny_dataset, tmp_path):
    calls = fake_machine(monkeypatch, native=True, gain=BF16_MIN_GAIN + 0.01)
    setup, _ = TrainRequest(str(tiny_dataset), overrides=TINY, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "bf16"
    assert calls == [("precision_probe", 128)]  # no time budget: the preset does not depend on speed
    assert len(setup.notes) == 1 and setup.notes[0].startswith("Precision auto: bf16")
    gain = BF16_MIN_GAIN + 0.01
    assert f"{gain:.2f}x" in setup.notes[0] and f"{1000 * gain:,.0f} against 1,000 chars/s" in setup.notes[0]


def test_auto_keeps_fp32_below_the_gain(monkeypatch, tiny_dataset, tmp_path):
    fake_machine(monkeypatch, native=True, gain=BF16_MIN_GAIN - 0.01)
    setup, _ = TrainRequest(str(tiny_dataset), overrides=TINY, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "fp32"
    assert "Precision auto: fp32" in setup.notes[0] and f"{BF16_MIN_GAIN - 0.01:.2f}x" in setup.notes[0]


def test_no_probe_without_native_bf16_or_with_a_precision_given(monkeypatch, tiny_dataset, tmp_path):
    calls = fake_machine(monkeypatch, native=False, gain=3.0)
    setup, _ = TrainRequest(str(tiny_dataset), overrides=TINY, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "auto" and not setup.notes and not calls  # auto is fp32 on such a CPU
    calls = fake_machine(monkeypatch, native=True, gain=3.0)
    for forced in ("fp32", "bf16"):
        request = TrainRequest(str(tiny_dataset), overrides={**TINY, "precision": forced}, runs_dir=tmp_path)
        setup, _ = request.setup(probe=True)
        assert setup.config.precision == forced and not setup.notes
    assert not calls
    setup, _ = TrainRequest(str(tiny_dataset), overrides={**TINY, "hidden": BF16_MIN_HIDDEN - 1},
                            runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "auto" and not calls  # too narrow for bf16 to pay: not even probed
    # several processes (probe=False): nothing measured, auto stays auto (fp32 on the CPU)
    setup, _ = TrainRequest(str(tiny_dataset), overrides=TINY, runs_dir=tmp_path).setup(probe=False)
    assert setup.config.precision == "auto" and not calls


def test_the_preset_follows_the_speed_of_the_precision_that_runs(monkeypatch, tmp_path):
    """A budget that is `quick` at fp32's speed and `small` at bf16's: the preset must follow the final precision,
    also when the run's own size overrules the preset probe's verdict."""
    data = big_dataset(tmp_path)
    budget = 50.0
    speeds = {"fp32": 1.0, "bf16": 20.0}
    at = {name: (lambda p, f=f: PROBE_SHARE * f * REFERENCE_STEPS_PER_SEC[p]) for name, f in speeds.items()}
    assert auto_preset(budget, 10**6, at["fp32"]) == "quick" and auto_preset(budget, 10**6, at["bf16"]) == "small"
    overrides = {"max_time": budget, "device": "cpu"}

    calls = fake_machine(monkeypatch, native=True, gain=2.0, speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides=overrides, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "bf16" and same(speed, {p: (at["bf16"](p), "bf16") for p in AUTO_CURVES})
    assert setup.config.hidden == HIDDEN["small"]
    assert calls[:6] == [("step_speed", prec, p) for p in AUTO_CURVES for prec in ("fp32", "bf16")]

    # the preset probe favours bf16, the run's size does not: fp32 runs, so the preset is fp32's (quick)
    calls = fake_machine(monkeypatch, native=True, gain=1.05, speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides=overrides, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "fp32" and same(speed, {p: (at["fp32"](p), "fp32") for p in AUTO_CURVES})
    assert setup.config.hidden == HIDDEN["quick"]
    # the run's own model changed with the preset: probed again, and the note is about the model that trains
    assert [c[1] for c in calls if c[0] == "precision_probe"] == [HIDDEN["small"], HIDDEN["quick"]]
    assert f"LSTM 2×{HIDDEN['quick']}" in setup.notes[0] and "kept" not in setup.notes[0]

    # --precision bf16 forced: the preset is picked by bf16's speed, and fp32 is not even measured
    calls = fake_machine(monkeypatch, native=True, gain=1.05, speeds=speeds)
    request = TrainRequest(str(data), overrides={**overrides, "precision": "bf16"}, runs_dir=tmp_path)
    setup, speed = request.setup(probe=True)
    assert (setup.config.precision, setup.config.hidden) == ("bf16", HIDDEN["small"])
    assert calls == [("step_speed", "bf16", p) for p in AUTO_CURVES]


def test_each_preset_is_weighed_in_its_own_precision(monkeypatch, tmp_path):
    """bf16 speeds the wider model more (AMX: 2x256 1.1x, 2x384 1.7x): at 128 s `short` wins at fp32's speeds, but
    `small` in bf16 buys enough steps to win, and auto takes it, in bf16; the stderr note gives every preset's
    figures."""
    from poetgen.training.session import auto_note

    data = big_dataset(tmp_path)
    speeds = {"fp32": {"quick": 20.0, "short": 8.0, "small": 2.6}, "bf16": {"quick": 19.0, "short": 8.7, "small": 4.5}}
    assert auto_preset(128, 10**6, lambda p: PROBE_SHARE * speeds["fp32"][p]) == "short"
    fake_machine(monkeypatch, native=True, gain=1.5, speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides={"max_time": 128.0, "device": "cpu"},
                                runs_dir=tmp_path).setup(probe=True)
    chosen = {"quick": "fp32", "short": "fp32", "small": "bf16"}  # short's 1.09x is not bf16's 1.1x
    assert same(speed, {p: (PROBE_SHARE * speeds[prec][p], prec) for p, prec in chosen.items()})
    assert (setup.config.hidden, setup.config.precision) == (HIDDEN["small"], "bf16")
    note = auto_note(128.0, 10**6, speed)
    assert note.startswith("Preset auto: small for 128 s") and "small 518 bf16 1.5" in note
    assert "short 922 fp32 1.6" in note


def test_a_run_probe_that_favours_bf16_picks_again_at_bf16_s_speed(monkeypatch, tmp_path):
    """The preset probes find bf16 not worth it (1.05x), the run's own model (its vocabulary, its head) finds it is
    (1.5x): bf16 runs, so the chosen preset and the wider ones are weighed again at bf16's speed."""
    data = big_dataset(tmp_path)
    speeds = {"fp32": {"quick": 20.0, "short": 8.0, "small": 2.6}, "bf16": {"quick": 19.0, "short": 8.4, "small": 2.73}}
    assert auto_preset(128, 10**6, lambda p: PROBE_SHARE * speeds["fp32"][p]) == "short"
    calls = fake_machine(monkeypatch, native=True, gain=1.5, speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides={"max_time": 128.0, "device": "cpu"},
                                runs_dir=tmp_path).setup(probe=True)
    assert (setup.config.hidden, setup.config.precision) == (HIDDEN["short"], "bf16")
    assert same(speed, {"quick": (PROBE_SHARE * 20.0, "fp32"), "short": (PROBE_SHARE * 8.4, "bf16"),
                        "small": (PROBE_SHARE * 2.73, "bf16")})
    assert [c for c in calls if c[0] == "precision_probe"] == [("precision_probe", HIDDEN["short"])]  # same model


def test_probes_that_disagree_back_and_forth_keep_preset_and_precision_together(monkeypatch, tmp_path):
    """Gains near the threshold: small's run probe says fp32, short's says bf16, small's again fp32 ... After two
    picks auto stops, trains the preset it chose in the precision it chose it at, and says so."""
    data = big_dataset(tmp_path)
    speeds = {"fp32": {"quick": 20.0, "short": 8.0, "small": 2.6}, "bf16": {"quick": 19.0, "short": 8.7, "small": 4.5}}
    fake_machine(monkeypatch, native=True, gain=[1.05, 1.5, 1.05, 1.5], speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides={"max_time": 128.0, "device": "cpu"},
                                runs_dir=tmp_path).setup(probe=True)
    preset = next(p for p, h in HIDDEN.items() if h == setup.config.hidden)
    assert speed[preset][1] == setup.config.precision  # the preset was chosen at the speed of what trains
    assert "is kept: preset auto chose this model" in setup.notes[0]


def test_the_flags_shape_the_probed_models(monkeypatch, tmp_path):
    """--hidden 200: every preset would train a 2x200, so that is what each probe times (and bf16 is weighed)."""
    data = big_dataset(tmp_path)
    calls = fake_machine(monkeypatch, native=True, gain=1.5, speeds={"fp32": 1.0, "bf16": 2.0})
    setup, _ = TrainRequest(str(data), overrides={"max_time": 128.0, "device": "cpu", "hidden": 200},
                            runs_dir=tmp_path).setup(probe=True)
    assert setup.config.hidden == 200
    assert {c[2] for c in calls if c[0] == "step_speed"} == {200}


def test_fine_tuning_probes_the_model_that_trains(monkeypatch, tmp_path):
    """--init-from: the probe builds the source's model (its vocabulary, the data mapped into it), not one of the
    new data's vocabulary (which, with the source's adaptive cutoffs, could not even be built)."""
    from helpers import make_dataset
    from poetgen.training.loop import train
    from poetgen.training.config import TrainConfig

    big = make_dataset(tmp_path / "big", ["床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽"] * 20)
    source = train(TrainConfig(**{**TINY, "max_steps": 1, "eval_every": 1, "sample_every": 0}), load_dataset(big),
                   tmp_path / "src").last_checkpoint
    small = make_dataset(tmp_path / "small", ["床前明月光，举头望明月。"] * 20)  # fewer symbols than the source
    calls = fake_machine(monkeypatch, native=True, gain=2.0)
    request = TrainRequest(str(small), overrides={"device": "cpu"}, init_from=str(source), runs_dir=tmp_path,
                           map_unknown=True)
    setup, _ = request.setup(probe=True)
    vocab = len(setup.init_from.vocab)
    assert vocab > len(load_dataset(small).vocab)
    assert calls == [("precision_probe", 128, vocab, True)] and setup.config.precision == "bf16"


def test_precision_probe_measures_both_and_leaves_the_run_alone(tiny_dataset, cpu_bf16_lstm):
    from poetgen.training.config import TrainConfig

    ds = load_dataset(tiny_dataset)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    threads = torch.get_num_threads()
    found = precision_probe(TrainConfig(**{**TINY, "hidden": 32}, threads=1), ds, seconds=0.5)
    assert torch.equal(torch.rand(3), expected)  # the run's random stream is untouched
    assert torch.get_num_threads() == threads
    assert found.fp32 > 0 and found.bf16 > 0 and 1 <= found.trials <= 3
