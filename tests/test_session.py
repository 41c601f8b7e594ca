"""poetgen.training.session: precision auto's choice (bf16 where the CPU has it and a step of the run's own model is
BF16_MIN_GAIN faster) and the preset it picks by the speed of the precision that will run."""

from __future__ import annotations

import torch

import poetgen.model.devices as devices
import poetgen.training.loop as loop
from poetgen.data.dataset import load_dataset
from poetgen.training.config import BF16_MIN_GAIN, BF16_MIN_HIDDEN, PRESETS, QUICK_BELOW, auto_preset
from poetgen.training.loop import PrecisionProbe, precision_probe
from poetgen.training.session import TrainRequest

torch.set_num_threads(1)

TINY = {"layers": 1, "hidden": 128, "embed": 16, "batch_size": 4, "seq_len": 16, "device": "cpu"}


def fake_machine(monkeypatch, *, native: bool, gain: float, speeds: dict[str, float] | None = None) -> list:
    """A CPU with or without native bf16 whose run-size probe measures ``gain`` and whose preset probe measures
    ``speeds`` per precision; -> the list of calls made to the probes."""
    calls: list = []
    monkeypatch.setattr(devices, "cpu_bf16_native", lambda: native)

    def probe(config, dataset, model_options=None, seconds=3.0, vocab_size=None, id_map=None):
        calls.append(("precision_probe", config.hidden) if vocab_size is None else
                     ("precision_probe", config.hidden, vocab_size, id_map is not None))
        return PrecisionProbe(fp32=1000.0, bf16=1000.0 * gain, trials=3)

    def speed(device="auto", threads=None, seconds=0.6, max_steps=12, precision="fp32"):
        calls.append(("machine_speed", precision))
        return (speeds or {}).get(precision, 1.0)

    monkeypatch.setattr(loop, "precision_probe", probe)
    monkeypatch.setattr(loop, "machine_speed", speed)
    return calls


def test_auto_takes_bf16_when_native_and_fast_enough(monkeypatch, tiny_dataset, tmp_path):
    calls = fake_machine(monkeypatch, native=True, gain=BF16_MIN_GAIN + 0.01)
    setup, _ = TrainRequest(str(tiny_dataset), overrides=TINY, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "bf16"
    assert calls == [("precision_probe", 128)]  # no time budget: the preset does not depend on speed
    assert len(setup.notes) == 1 and setup.notes[0].startswith("Precision auto: bf16")
    assert "1.31x" in setup.notes[0] and "1,310 against 1,000 chars/s" in setup.notes[0]


def test_auto_keeps_fp32_below_the_gain(monkeypatch, tiny_dataset, tmp_path):
    fake_machine(monkeypatch, native=True, gain=BF16_MIN_GAIN - 0.01)
    setup, _ = TrainRequest(str(tiny_dataset), overrides=TINY, runs_dir=tmp_path).setup(probe=True)
    assert setup.config.precision == "fp32"
    assert "Precision auto: fp32" in setup.notes[0] and "1.29x" in setup.notes[0]


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
    also when the run's own size overrules the preset probe's (small model) verdict."""
    from helpers import make_dataset

    docs = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 40] * 600  # over AUTO_MIN_TOKENS characters
    data = make_dataset(tmp_path / "big", docs, docs[:2])
    budget = QUICK_BELOW / 2
    speeds = {"fp32": 1.0, "bf16": 20.0}
    assert auto_preset(budget, 10**6, speeds["fp32"]) == "quick" and auto_preset(budget, 10**6, 20.0) == "small"
    overrides = {"max_time": budget, "device": "cpu"}

    calls = fake_machine(monkeypatch, native=True, gain=2.0, speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides=overrides, runs_dir=tmp_path).setup(probe=True)
    assert (setup.config.precision, speed) == ("bf16", 20.0)
    assert setup.config.hidden == PRESETS["small"].get("hidden", 384)
    assert calls[:2] == [("machine_speed", "fp32"), ("machine_speed", "bf16")]

    # the small probe favours bf16, the run's size does not: fp32 runs, so the preset is fp32's (quick)
    calls = fake_machine(monkeypatch, native=True, gain=1.1, speeds=speeds)
    setup, speed = TrainRequest(str(data), overrides=overrides, runs_dir=tmp_path).setup(probe=True)
    assert (setup.config.precision, speed) == ("fp32", 1.0)
    assert setup.config.hidden == PRESETS["quick"]["hidden"]
    # the run's own model changed with the preset: probed again, and the note is about the model that trains
    assert [c[1] for c in calls if c[0] == "precision_probe"] == [384, PRESETS["quick"]["hidden"]]
    assert f"LSTM 2×{PRESETS['quick']['hidden']}" in setup.notes[0]

    # --precision bf16 forced: the preset is picked by bf16's speed, and fp32 is not even measured
    calls = fake_machine(monkeypatch, native=True, gain=1.1, speeds=speeds)
    request = TrainRequest(str(data), overrides={**overrides, "precision": "bf16"}, runs_dir=tmp_path)
    setup, speed = request.setup(probe=True)
    assert (setup.config.precision, speed, setup.config.hidden) == ("bf16", 20.0, 384)
    assert calls == [("machine_speed", "bf16")]


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


def test_precision_probe_measures_both_and_leaves_the_run_alone(tiny_dataset):
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
