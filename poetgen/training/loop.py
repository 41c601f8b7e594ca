"""The training loop: truncated backpropagation through time over contiguous streams (see poetgen.data.batches).

Each step feeds the next window of --seq-len characters of --batch-size parallel streams; the hidden state of
each stream is carried from window to window and detached (gradients stop at the window edge), and reset at each
epoch start, where the streams wrap. One step consumes one batch, so the data position is a function of the step
alone: epoch = step // batches, window = step % batches. A checkpoint saves the step, the carried hidden state,
the RNG states and the optimizer, so a resumed run repeats an unbroken one exactly.

Several processes (torchrun; poetgen.training.distributed): with N ranks and --batch-size B, rank r trains streams
r·B … r·B+B-1 of N·B, the model is wrapped in DistributedDataParallel, and the ranks keep in step with one small
all-reduce per step (the loss, for logging and the NaN check, and the stop votes), plus a broadcast of rank 0's
clock when --max-time is set, so they never disagree about the step count. Only rank 0 locks the run directory and
writes metrics, checkpoints and progress. A checkpoint stores world_size, the hidden state of all ranks gathered
in stream order ((L, N·B, H), the layout of a single process with batch N·B) and each rank's RNG state; on resume
every rank reads its own rows and RNG state from the file. Resuming with another N is refused.

What is trained is a task (poetgen.training.tasks): the language model over streams described above (LMTask), or
the 对句 encoder-decoder over the pairs of a pair dataset (PairTask: batches of pairs, nothing carried between
steps); the dataset's kind chooses. Everything else here is the same for both.

Progress is reported through a TrainCallbacks object (on rank 0 only); nothing here prints.
"""

from __future__ import annotations

import json
import math
import random
import signal
import statistics
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from poetgen import __version__
from poetgen.checkpoint.torch_io import BEST, LAST, Checkpoint, restore_rng, save_checkpoint
from poetgen.training.config import DEFAULT_EPOCHS, DEFAULT_MIN_STEPS, MODEL_FIELDS, TrainConfig
from poetgen.data.dataset import Dataset
from poetgen.model.devices import autocast, autocast_dtype, resolve_device
from poetgen.training.distributed import Local, context, mark_reported, rank_seed, restore_rank_rng, rng_tensors
from poetgen.errors import PoetgenError, TrainingError
from poetgen.model.config import REGULARISERS
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.model.seq2seq import build_model
from poetgen.training.runs import METRICS, rewind_metrics, run_lock
from poetgen.training.tasks import task_class
from poetgen.data.batches import vocab_map
from poetgen.data.vocab import Vocab
from poetgen.evaluation.scoring import cross_entropy, pair_cross_entropy
from poetgen.evaluation.units import LN2


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class TrainCallbacks:
    """Override what you need; the CLI renders progress from these, tests record from them."""

    def on_start(self, info: dict) -> None: ...
    def on_step(self, info: dict) -> None: ...
    def on_eval(self, info: dict) -> None: ...
    def on_sample(self, step: int, text: str) -> None: ...
    def on_checkpoint(self, path: Path, kind: str) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # completed | early_stopped | time_limit | interrupted
    step: int
    epoch: float
    train_loss: float | None  # smoothed
    last_val_loss: float | None
    best_val_loss: float | None
    elapsed: float
    tokens_seen: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    signal: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("run_dir", "last_checkpoint", "best_checkpoint"):
            d[k] = str(d[k]) if d[k] is not None else None
        for k in ("last_val_loss", "best_val_loss"):
            d[k.replace("loss", "bpc")] = d[k] / LN2 if d[k] is not None else None
        return d


# --- planning -----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    parameters: int
    vocab_size: int
    train_tokens: int
    val_tokens: int
    streams: int
    stream_len: int
    batches_per_epoch: int
    tokens_per_epoch: int
    total_steps: int | None  # None when only --max-time bounds the run
    estimated_memory_bytes: int
    device: str
    precision: str
    world_size: int = 1  # processes; `streams` counts the streams of all of them

    def to_dict(self) -> dict:
        return asdict(self)


def total_steps(config: TrainConfig, batches: int) -> int | None:
    """The step budget: the nearer of max_steps and max_epochs; with no budget at all DEFAULT_EPOCHS epochs but at
    least DEFAULT_MIN_STEPS steps; None when only max_time bounds the run."""
    if not (config.max_steps or config.max_epochs or config.max_time):
        return max(DEFAULT_EPOCHS * batches, DEFAULT_MIN_STEPS)
    limits = [x for x in (config.max_steps, config.max_epochs * batches) if x > 0]
    return min(limits) if limits else None


def estimate_memory(config: TrainConfig, parameters: int, model: ModelConfig, tokens: np.ndarray | None = None) -> int:
    """Rough peak bytes (of one process): fp32 weights + gradients + two AdamW moments, plus activations kept for
    backward. ``model``: the resolved model configuration (its head); ``tokens``: training ids, whose first
    million give the share of positions each adaptive tail cluster scores (every position counted without them).
    """
    per_layer = {"rnn": 2, "gru": 6, "lstm": 8}[config.cell] * config.hidden  # gates and states per step
    per_token = config.embed + config.layers * per_layer + 3 * _head_width(model, tokens)  # scores, softmax, grad
    return int(4 * (4 * parameters + config.batch_size * config.seq_len * per_token))


def _head_width(model: ModelConfig, tokens: np.ndarray | None) -> float:
    """Output scores one training position keeps on average: V for the full head; for the adaptive head the root's
    C + K, plus each tail cluster's projection and scores times the share of positions whose target is in it."""
    if model.head != "adaptive":
        return float(model.vocab_size)
    bounds = (*model.cutoffs, model.vocab_size)
    counts = None
    if tokens is not None and len(tokens) > 0:
        counts = np.bincount(np.asarray(tokens[:1_000_000], dtype=np.int64), minlength=model.vocab_size)
    width = float(model.cutoffs[0] + len(model.cutoffs))
    for i in range(len(model.cutoffs)):
        lo, hi = bounds[i], bounds[i + 1]
        share = counts[lo:hi].sum() / counts.sum() if counts is not None else 1.0
        width += share * (hi - lo + max(1, int(model.hidden // model.div_value ** (i + 1))))
    return width


def adamw(params, **options) -> torch.optim.AdamW:
    """AdamW with its fused kernel where the device has one (the CPU since torch 2.4, CUDA): one pass over the
    weights instead of a dozen. LSTM 512x2 (4.3 M weights), 2 cores: 1.6 ms a step against 10-17 ms for the default
    per-tensor loop; poetgen's whole training step at that size (batch 64 x 100) measured 6-10% faster in fp32 and
    1-7% in bf16. Same update, same state (a checkpoint of either resumes in the other)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except RuntimeError:  # no fused kernel for these weights' device or dtype: the per-tensor implementation
        return torch.optim.AdamW(params, **options)


def step_speed(c: TrainConfig, device: str = "auto", threads: int | None = None, seconds: float = 0.6,
               max_steps: int = 12, precision: str = "fp32") -> float:
    """Training steps a second on this machine of the model and batch ``c`` describes, with 65 symbols (Tiny
    Shakespeare's, the corpus of preset `auto`'s curves; poetgen.training.config.auto_preset): full training steps
    (forward, backward, clipping, AdamW) on random tokens, 2 warm-up steps, then timed for ``seconds`` (at most
    ``max_steps``). Under a second on a 2-core CPU, model building and oneDNN's first calls included; readings of one
    machine spread about +-10%, and a real run, with its data, logging and evaluations, makes fewer (PROBE_SHARE).
    Its threads are set as training will set them; the previous count is restored. ``precision``: fp32 or bf16
    (autocast, as training runs it)."""
    dev = torch.device(resolve_device(device))
    amp = autocast_dtype(dev, precision)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        model = CharRNN(ModelConfig(65, cell=c.cell, layers=c.layers, hidden=c.hidden, embed=c.embed,
                                    dropout=c.dropout, weight_drop=c.weight_drop,
                                    embed_dropout=c.embed_dropout)).to(dev)
        opt = adamw(model.parameters(), lr=1e-3)
        batch = torch.randint(0, 65, (c.batch_size, c.seq_len + 1), generator=gen).to(dev)

        def step() -> None:
            with autocast(dev, amp):
                loss, _ = model(batch[:, :-1], None, batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0).item()  # .item(): waits for the device
            opt.step()

        for _ in range(2):
            step()
        t0, steps = time.perf_counter(), 0
        while steps < max_steps and (steps == 0 or time.perf_counter() - t0 < seconds):
            step()
            steps += 1
        rate = steps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return rate


@dataclass
class PrecisionProbe:
    """What ``precision_probe`` measured: training characters per second in fp32 and in bf16 (each the median of
    ``trials`` alternating trials) at the run's own model and batch."""

    fp32: float
    bf16: float
    trials: int

    @property
    def gain(self) -> float:
        return self.bf16 / self.fp32


def precision_probe(config: TrainConfig, dataset: Dataset, model_options: dict | None = None,
                    seconds: float = 3.0, vocab_size: int | None = None, id_map: np.ndarray | None = None
                    ) -> PrecisionProbe:
    """Full training steps (forward, backward, clipping, AdamW) of the model and batch ``config`` describes, on the
    dataset's first batch, in fp32 and in bf16 autocast, alternating (one warm-up step each, then up to three trials
    each, fewer when a step is slow, about ``seconds`` in all); the medians. ``vocab_size`` and ``id_map``: the
    model's vocabulary when it is not the dataset's (a fine-tuned model's, poetgen.data.batches.vocab_map). Touches
    no random state of the run (torch's generator is forked) and restores the thread count."""
    task_class(dataset).sizes(config, dataset, 1)  # a configuration with no batch at all: the plan's own error
    dev = torch.device(resolve_device(config.device))
    amps = {"fp32": None, "bf16": torch.bfloat16}
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            task = task_class(dataset)(config, dataset, id_map, Local())
            model = build_model(task.model_config(config, vocab_size or len(dataset.vocab), model_options))
            model.to(dev).train()
            opt = adamw(model.parameters(), lr=config.lr)

            def step(amp) -> tuple[int, float]:
                t0 = time.perf_counter()
                loss, tokens = task.loss(model, 0, dev, amp)  # step 0: the first batch, nothing carried
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or 1e9).item()
                opt.step()
                return tokens, time.perf_counter() - t0

            warm = [step(amps[name])[1] for name in amps]  # oneDNN builds its primitives on a first call
            trials = max(1, min(3, int(seconds / (2 * max(warm)))))
            rates: dict[str, list[float]] = {name: [] for name in amps}
            for _ in range(trials):
                for name, amp in amps.items():
                    tokens, took = step(amp)
                    rates[name].append(tokens / took)
    finally:
        torch.set_num_threads(before)
    return PrecisionProbe(statistics.median(rates["fp32"]), statistics.median(rates["bf16"]), trials)


def make_plan(
    config: TrainConfig, dataset: Dataset, vocab_size: int | None = None, *, world_size: int = 1,
    local_rank: int | None = None, model_options: dict | None = None,
) -> Plan:
    """Sizes of a run (of all ``world_size`` processes together); raises TrainingError when the configuration gives
    no batch at all. ``local_rank``: the device of that process of a distributed run. For a pair dataset the
    tokens are answer characters, ``streams`` the pairs of a batch (``stream_len`` 0)."""
    vocab_size = vocab_size or len(dataset.vocab)
    task = task_class(dataset)
    sizes = task.sizes(config, dataset, world_size)
    try:
        model_config = task.model_config(config, vocab_size, model_options)
    except PoetgenError as e:
        raise TrainingError(str(e)) from None
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(model_config)
    params = model.num_parameters()
    if world_size > 1 and local_rank is None:
        local_rank = 0  # a plan made before launching: describe the first process
    device = resolve_device(config.device, local_rank)
    return Plan(
        parameters=params,
        vocab_size=vocab_size,
        **sizes,
        total_steps=total_steps(config, sizes["batches_per_epoch"]),
        estimated_memory_bytes=estimate_memory(config, params, model.config, dataset.train),
        device=str(device),
        precision="bf16" if autocast_dtype(device, config.precision) else "fp32",
        world_size=world_size,
    )


# --- schedule -------------------------------------------------------------------------------------------------


def lr_at(config: TrainConfig, step: int, total: int | None, time_fraction: float = 0.0) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio.

    The decay follows the nearer budget: steps (max_steps / max_epochs) or, with --max-time, the clock. With no
    bound at all the rate stays at its peak after warmup. ``step`` is the 0-based index of the step being taken.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = time_fraction
    if total:
        progress = max(progress, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    progress = min(max(progress, 0.0), 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- signals ------------------------------------------------------------------------------------------------


@contextmanager
def catch_signals(abort_on_repeat: bool = True) -> Iterator[threading.Event]:
    """SIGINT / SIGTERM set the returned event (with ``.signum``) so the loop can finish its step and save.
    A second signal interrupts at once (KeyboardInterrupt) unless ``abort_on_repeat`` is False: under torchrun,
    which passes a signal on to every worker and kills them itself 30 s later, a worker must not abort the
    collective save halfway (its peers would lose it)."""
    event = threading.Event()
    event.signum = None  # type: ignore[attr-defined]
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if event.is_set():
            if not abort_on_repeat:
                return
            raise KeyboardInterrupt
        event.signum = signum  # type: ignore[attr-defined]
        event.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    bad_evals: int = 0  # evaluations since the best one
    evals: int = 0
    elapsed: float = 0.0  # training seconds over all sessions
    tokens_seen: int = 0
    smooth_loss: float | None = None
    best_step: int | None = None

    def check(self) -> None:
        """TypeError for a value of the wrong kind (from a damaged or foreign checkpoint): now, not mid-run."""
        for f in fields(self):
            v = getattr(self, f.name)
            number = isinstance(v, int) or ("float" in f.type and isinstance(v, float))
            if not ((number and not isinstance(v, bool)) or (v is None and "None" in f.type)):
                raise TypeError(f"train_state {f.name} = {v!r}")


def train(
    config: TrainConfig,
    dataset: Dataset,
    run_dir: str | Path,
    *,
    resume: Checkpoint | None = None,
    init_from: Checkpoint | None = None,
    map_unknown: bool = False,
    callbacks: TrainCallbacks | None = None,
    stop: StopFlag | None = None,
    model_options: dict | None = None,
) -> TrainResult:
    """Train (or resume) into ``run_dir``. ``stop.is_set()`` is checked after every step: then save and return.

    resume: a checkpoint of this run (its last.ckpt); weights, optimizer, RNG, hidden state and step continue.
    init_from: a checkpoint to fine-tune from: its architecture and vocabulary, fresh optimizer and schedule.
    model_options: model fields beyond TrainConfig's, e.g. {"attention": "additive"} for an encoder-decoder (a
    resumed or fine-tuned model keeps its own).
    """
    run_dir = Path(run_dir)
    ctx = context()
    cb = (callbacks or TrainCallbacks()) if ctx.is_main else TrainCallbacks()  # progress from rank 0 only

    with ExitStack() as stack:

        def prepare() -> _Loop:
            nonlocal config
            if resume is not None and init_from is not None:
                raise TrainingError("--resume and --init-from cannot be combined")
            source = resume or init_from
            nonlocal model_options
            if source is not None:
                kind, wanted = getattr(source.model_config, "kind", "charrnn"), task_class(dataset).__name__
                if (kind == "seq2seq") != (wanted == "PairTask"):
                    raise TrainingError(f"{source.path} holds a {kind} model, which cannot train on "
                                        f"{'the pairs' if dataset.is_pairs else 'the text'} of {dataset.path}")
                if kind == "seq2seq":
                    model_options = {"attention": source.model_config.attention}
                # The checkpoint decides the architecture (the dropout rates may change when fine-tuning).
                arch = {k: getattr(source.model_config, k) for k in MODEL_FIELDS if k not in REGULARISERS}
                config = TrainConfig(**{**config.to_dict(), **arch})
                vocab = source.vocab
            else:
                vocab = dataset.vocab
            if resume is not None:
                fp_run, fp_data = resume.dataset_meta.get("fingerprint"), dataset.fingerprint
                if fp_run and fp_data and fp_run != fp_data:
                    raise TrainingError(
                        f"the dataset {dataset.path} differs from the one this run was trained on (fingerprint "
                        f"{fp_data[:12]} != {fp_run[:12]}); resume needs the same data, or fine-tune with --init-from"
                    )
                _check_world_size(resume, ctx.world_size, run_dir)
            id_map = vocab_map(dataset.vocab, vocab, map_unknown=map_unknown) if source is not None else None
            plan = make_plan(config, dataset, len(vocab), world_size=ctx.world_size,
                             local_rank=ctx.local_rank if ctx.distributed else None, model_options=model_options)
            device = torch.device(plan.device)
            amp = autocast_dtype(device, config.precision)
            if config.threads:
                torch.set_num_threads(config.threads)
            if ctx.is_main:  # only rank 0 owns the run directory
                stack.enter_context(run_lock(run_dir))
                if resume is None and any((run_dir / n).exists() for n in (LAST, BEST)):
                    raise TrainingError(
                        f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, or "
                        "choose another --name"
                    )
                if resume is None:  # a run that stopped before its first save: nothing to keep, its log restarts
                    (run_dir / METRICS).unlink(missing_ok=True)
            loop = _Loop(config, dataset, run_dir, vocab, id_map, plan, device, amp, cb, stop, ctx, model_options)
            loop.build(resume, init_from)
            return loop

        # Every rank checks; if one fails, all stop here instead of waiting for it in the first collective.
        return ctx.agree(prepare).run(resume, init_from)


def _check_world_size(resume: Checkpoint, world_size: int, run_dir: Path) -> None:
    saved = int(resume.train_state.get("world_size", 1))
    if saved == world_size:
        return
    how = (f"poetgen train --nproc {saved} --resume {run_dir} (or torchrun --nproc-per-node {saved} -m poetgen "
           f"train --resume {run_dir})") if saved > 1 else f"poetgen train --resume {run_dir}, in one process"
    raise TrainingError(
        f"{resume.path} was trained by {saved} process{'es' if saved > 1 else ''} and resumes exactly only with "
        f"{saved} (this run has {world_size}): each process carries its own streams' hidden state and random "
        f"state. Resume with {how}; or, to go on with {world_size}, fine-tune from it with --init-from "
        "(fresh optimizer and schedule)"
    )


class _Loop:
    def __init__(self, config, dataset, run_dir, vocab, id_map, plan, device, amp, callbacks, stop, ctx,
                 model_options=None):
        self.c: TrainConfig = config
        self.dataset: Dataset = dataset
        self.run_dir: Path = run_dir
        self.vocab: Vocab = vocab
        self.id_map = id_map
        self.plan: Plan = plan
        self.device: torch.device = device
        self.amp = amp
        self.cb: TrainCallbacks = callbacks
        self.stop = stop
        self.ctx: Local = ctx
        # The validation scorer is looked up here, at run time (tests replace it to steer early stopping).
        scorer = pair_cross_entropy if dataset.is_pairs else cross_entropy
        self.task = task_class(dataset)(config, dataset, id_map, ctx, scorer)
        self.model_options = model_options
        self.total = plan.total_steps
        self.last_path: Path | None = None
        self.saved_step = -1
        self.eval_seconds = 0.0  # duration of the latest evaluation
        self.best_path: Path | None = run_dir / BEST if (run_dir / BEST).exists() else None

    # --- setup ------------------------------------------------------------------------------------------------
    def build(self, resume: Checkpoint | None, init_from: Checkpoint | None) -> None:
        """Model, optimizer and state, without any collective (so it may fail on one rank alone)."""
        c, ctx = self.c, self.ctx
        if resume is None:
            torch.manual_seed(c.seed)
            random.seed(c.seed)
            np.random.seed(c.seed % 2**32)
        self.raw_model = build_model(self.task.model_config(c, len(self.vocab), self.model_options))
        if ctx.distributed and resume is None:  # same weights everywhere, but each rank its own dropout masks
            torch.manual_seed(rank_seed(c.seed, ctx.rank))
            random.seed(rank_seed(c.seed, ctx.rank))
        source = resume or init_from
        if source is not None:
            self.raw_model.load_state_dict(source.model_state)
        self.raw_model.to(self.device).train()
        decay, no_decay = [], []  # no weight decay on biases
        for name, p in self.raw_model.named_parameters():
            (no_decay if name.endswith("bias") or "bias_" in name else decay).append(p)
        self.opt = adamw(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr, betas=(c.beta1, c.beta2),
        )
        self.state = _State()
        if resume is not None:
            if resume.optimizer_state is None:
                raise TrainingError(f"{resume.path} has no optimizer state, so it cannot be resumed exactly")
            try:
                self.opt.load_state_dict(resume.optimizer_state)
                known = {k: v for k, v in resume.train_state.items() if k in _State.__dataclass_fields__}
                self.state = _State(**known)
                self.state.check()
            except (ValueError, KeyError, TypeError) as e:
                raise TrainingError(f"{resume.path} is damaged: its training state cannot be resumed ({e})") from None
            # load_state_dict brings back the saved hyperparameters; the (possibly overridden) config wins.
            for g, wd in zip(self.opt.param_groups, (c.weight_decay, 0.0)):
                g["betas"], g["weight_decay"] = (c.beta1, c.beta2), wd
            self.task.restore(resume, self.device)
            if ctx.distributed:
                restore_rank_rng(resume.tensors, ctx.rank)
            else:
                restore_rng(resume)

    def _wrap(self) -> None:
        """DDP (a collective: it copies rank 0's weights to all ranks), then torch.compile when asked for."""
        model = self.ctx.wrap(self.raw_model, self.device)
        self.model = torch.compile(model) if self.c.compile else model

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _train_state(self) -> dict:
        s = asdict(self.state)
        s["epoch"], s["window"] = divmod(self.state.step, len(self.task))
        s["world_size"] = self.ctx.world_size
        return s

    def _save(self, path: Path, kind: str) -> Path:
        """Every rank calls this (the hidden and RNG states are gathered); rank 0 writes."""
        ctx = self.ctx
        extra = self.task.state_tensors()  # LM: the carried hidden state of all ranks (a collective)
        if ctx.distributed:
            extra.update(rng_tensors(ctx, self.device))
        if ctx.is_main:
            meta = dict(self.dataset.meta)
            meta["path"] = str(self.dataset.path.resolve())
            save_checkpoint(
                path, self.raw_model, self.vocab, train_config=self.c.to_dict(), train_state=self._train_state(),
                optimizer=self.opt, dataset_meta=meta, extra_tensors=extra,
            )
            self.cb.on_checkpoint(path, kind)
        return path

    def _save_last(self) -> None:
        if self.saved_step == self.state.step:
            return
        self.saved_step = self.state.step
        self.last_path = self._save(self.run_dir / LAST, "last")
        if self.c.keep > 0:
            self._save(self.run_dir / f"step-{self.state.step:08d}.ckpt", "snapshot")
            for old in sorted(self.run_dir.glob("step-*.ckpt"))[: -self.c.keep] if self.ctx.is_main else ():
                old.unlink(missing_ok=True)

    def _log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # --- evaluation -------------------------------------------------------------------------------------------
    def _evaluate(self) -> bool:
        """Score the whole validation split; returns True when early stopping should end the run.

        The figure is `poetgen eval`'s cold cross-entropy (same scorer, same streams): every symbol once. It runs on
        the raw model: outside DDP (each rank scores its own streams, no gradient to synchronise) and outside
        torch.compile (the scorer's shapes are not training's; a compiled module would recompile for them)."""
        s = self.state
        t0 = time.perf_counter()
        ctx = self.ctx
        loss = self.task.evaluate(self.raw_model, self.amp)
        self.eval_seconds = time.perf_counter() - t0
        s.evals += 1
        if not math.isfinite(loss):
            raise self._error(self._nan_message(f"validation loss became {loss}"))
        s.last_val_loss = loss
        improved = s.best_val_loss is None or loss < s.best_val_loss
        if improved:
            s.best_val_loss, s.best_step, s.bad_evals = loss, s.step, 0
        else:
            s.bad_evals += 1
        info = {"type": "eval", "step": s.step, "val_loss": loss, "val_bpc": loss / LN2, "best": improved,
                "best_val_loss": s.best_val_loss, "elapsed": s.elapsed}
        self._log(info)
        self.cb.on_eval(info)
        if improved:
            self.best_path = self._save(self.run_dir / BEST, "best")
        if self.c.sample_every and s.evals % self.c.sample_every == 0 and ctx.is_main:
            self.cb.on_sample(s.step, self._sample(seed=s.step))
        return bool(self.c.patience and s.bad_evals >= self.c.patience)

    def _sample(self, seed: int) -> str:
        """A short sample for the progress display, by `poetgen sample`'s own code. Its numpy generator is seeded by
        the step, so the training RNG stream (dropout masks) is not disturbed: showing samples never changes the run.
        <unk> is shown as U+FFFD. A pair task shows the greedy answer to a validation first line."""
        return self.task.sample(self.raw_model, self.vocab, seed, self.c.sample_length)

    def _error(self, message: str) -> TrainingError:
        """An error every rank raises at the same step; rank 0 reports it for all."""
        e = TrainingError(message)
        return e if self.ctx.is_main else mark_reported(e)  # type: ignore[return-value]

    def _stop_votes(self) -> list[float]:
        """[stop asked, by SIGINT, by SIGTERM] on this rank; summed over ranks with each step's loss."""
        if self.stop is None or not self.stop.is_set():
            return [0.0, 0.0, 0.0]
        signum = getattr(self.stop, "signum", None)
        return [1.0, float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]

    def _nproc_flag(self) -> str:
        return f" --nproc {self.ctx.world_size}" if self.ctx.distributed else ""

    def _nan_message(self, what: str) -> str:
        last = self.last_path or (self.run_dir / LAST if (self.run_dir / LAST).exists() else None)
        keep = (f"The last good checkpoint is {last}; resume it with a lower rate: "
                f"poetgen train{self._nproc_flag()} --resume {self.run_dir} --lr {self.c.lr / 3:.3g}") if last else \
            "No checkpoint was saved yet."
        return (f"{what} at step {self.state.step + 1}: training diverged. Try a lower --lr (now {self.c.lr:g}), "
                f"a stronger --grad-clip, or a smaller model. {keep}")

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self, resume: Checkpoint | None, init_from: Checkpoint | None) -> TrainResult:
        self._wrap()
        c, s, n, ctx = self.c, self.state, len(self.task), self.ctx
        if resume is not None and ctx.is_main:
            rewind_metrics(self.run_dir / METRICS, s.step)
        start = {"type": "resume" if resume else "start", "step": s.step, "time": time.time(),
                 "poetgen_version": __version__, "config": c.to_dict(), "plan": self.plan.to_dict(),
                 "dataset": str(self.dataset.path), "init_from": str(init_from.path) if init_from else None}
        self._log(start)
        self.cb.on_start({**start, "run_dir": str(self.run_dir)})
        has_val = len(self.dataset.val) > 0

        session_t0, session_step0 = time.perf_counter(), s.step
        window_t0, window_tokens = session_t0, 0
        elapsed0 = s.elapsed
        status, signum = "completed", None
        just_evaluated = False
        while True:
            if self.total is not None and s.step >= self.total:
                break
            s.elapsed = elapsed0 + (time.perf_counter() - session_t0)
            # --max-time includes the final evaluation: stop early enough to fit one more.
            time_up = bool(c.max_time) and s.elapsed + (self.eval_seconds if has_val else 0.0) >= c.max_time
            if c.max_time and ctx.distributed:
                # Rank 0's clock decides for all ranks (and sets the learning rate, which follows the clock).
                s.elapsed, up = ctx.broadcast([s.elapsed, float(time_up)])
                time_up = up > 0
            if time_up:
                status = "time_limit"
                break
            lr = lr_at(c, s.step, self.total, s.elapsed / c.max_time if c.max_time else 0.0)
            for g in self.opt.param_groups:
                g["lr"] = lr
            # The mean loss of this rank's batch, through the (DDP-wrapped) model; the tokens of all ranks' batch.
            loss, tokens_per_step = self.task.loss(self.model, s.step, self.device, self.amp)
            loss_value = loss.item()
            votes = None
            if ctx.distributed:
                # One all-reduce per step: the mean loss over all N·B streams (what one process with batch N·B
                # reports), and the stop votes; so every rank sees the same NaN, and stops after the same step.
                total, *votes = ctx.sum([loss_value, *self._stop_votes()])
                loss_value = total / ctx.world_size
            if not math.isfinite(loss_value):
                raise self._error(self._nan_message(f"the training loss became {loss_value}"))
            self.opt.zero_grad(set_to_none=True)
            ctx.collective(loss.backward)  # DDP averages the gradients over ranks during backward
            # The norm is computed even without clipping: a non-finite gradient must never reach the weights.
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.raw_model.parameters(), c.grad_clip if c.grad_clip > 0 else float("inf")
            ).item()
            if not math.isfinite(grad_norm):  # the same on every rank: the gradients are averaged
                raise self._error(self._nan_message(f"the gradient norm became {grad_norm}"))
            self.opt.step()

            s.step += 1
            s.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            s.smooth_loss = loss_value if s.smooth_loss is None else 0.95 * s.smooth_loss + 0.05 * loss_value
            now = time.perf_counter()
            s.elapsed = elapsed0 + (now - session_t0)
            steps_per_s = (s.step - session_step0) / max(now - session_t0, 1e-9)
            info = {"type": "train", "step": s.step, "epoch": s.step / n, "loss": loss_value,
                    "smooth_loss": s.smooth_loss, "lr": lr, "grad_norm": grad_norm,
                    "chars_per_sec": window_tokens / max(now - window_t0, 1e-9), "elapsed": s.elapsed,
                    "total_steps": self.total, "eta": self._eta(steps_per_s), "val_loss": s.last_val_loss,
                    "val_bpc": s.last_val_loss / LN2 if s.last_val_loss is not None else None}
            self.cb.on_step(info)
            if s.step % c.log_every == 0:
                self._log({k: v for k, v in info.items() if k not in ("total_steps", "eta", "val_loss", "val_bpc")})
                window_t0, window_tokens = now, 0

            just_evaluated = False
            early = False
            if has_val and s.step % c.eval_every == 0:
                early = self._evaluate()
                just_evaluated = True
            save_every = c.save_every or c.eval_every
            if s.step % save_every == 0:
                self._save_last()
            if early:
                status = "early_stopped"
                break
            if votes is not None:
                if votes[0] > 0:
                    status = "interrupted"
                    signum = signal.SIGTERM if votes[2] else signal.SIGINT if votes[1] else None
                    break
            elif self.stop is not None and self.stop.is_set():
                status, signum = "interrupted", getattr(self.stop, "signum", None)
                break

        # The end: a final evaluation (not when interrupted: a resumed run must see the same evaluations as an
        # unbroken one), and the last checkpoint.
        if status != "interrupted" and has_val and not just_evaluated:
            self._evaluate()
        self._save_last()
        # Leave together: torchrun stops every worker as soon as one exits non-zero (say 143 after SIGTERM), so
        # no rank may exit before rank 0 has written the last checkpoint.
        ctx.barrier()
        sig_name = signal.Signals(signum).name if signum else None
        return TrainResult(
            run_dir=self.run_dir, status=status, step=s.step, epoch=s.step / n, train_loss=s.smooth_loss,
            last_val_loss=s.last_val_loss, best_val_loss=s.best_val_loss, elapsed=s.elapsed,
            tokens_seen=s.tokens_seen, last_checkpoint=self.last_path, best_checkpoint=self.best_path,
            signal=sig_name,
        )

    def _eta(self, steps_per_s: float) -> float | None:
        s, c = self.state, self.c
        etas = []
        if self.total is not None and steps_per_s > 0:
            etas.append((self.total - s.step) / steps_per_s)
        if c.max_time:
            etas.append(max(c.max_time - s.elapsed, 0.0))
        return min(etas) if etas else None
