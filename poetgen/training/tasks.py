"""What the training loop (poetgen.training.loop) trains, behind one small interface, so the loop exists once.

A task knows its data and model; the loop owns everything else (budgets, schedule, optimizer, evaluation
timing, checkpoints, resume, signals, the NaN guard, progress, metrics, DDP):

    sizes(config, dataset, world_size) -> dict      the plan's data sizes (TrainingError: no batch at all)
    model_config(config, vocab_size, options)       the model's config (CharRNN's ModelConfig, or Seq2SeqConfig)
    len(task)                                       batches per epoch; the batch of a step is a function of the step
    loss(model, step, device, amp) -> (loss, tokens)   the mean loss of this rank's batch, tokens of all ranks' batch
    evaluate(raw_model, amp) -> nats                the exact validation figure (the scorer the loop passes in:
                                                    poetgen.evaluation.scoring's cross_entropy / pair_cross_entropy)
    sample(raw_model, vocab, seed, length) -> str   a line for the progress display
    state_tensors() / restore(resume, device)       what a checkpoint carries besides weights and optimizer

``LMTask``: the character language model over contiguous streams (truncated BPTT, hidden state carried from
window to window and saved). ``PairTask``: the 对句 encoder-decoder over a pair dataset (prepare --pairs): batches
of pairs of one length, the answering line teacher-forced given the first line, nothing carried between steps.
"""

from __future__ import annotations

from typing import Any

import torch

from poetgen.checkpoint.torch_io import Checkpoint
from poetgen.data.batches import StreamBatches, stream_layout
from poetgen.data.dataset import Dataset
from poetgen.data.pairs import PairBatches, teacher_inputs
from poetgen.data.vocab import Vocab
from poetgen.errors import ConfigError, TrainingError
from poetgen.model.config import ModelConfig, Seq2SeqConfig
from poetgen.model.devices import autocast
from poetgen.model.rnn import detach_hidden, hidden_to


def task_class(dataset: Dataset) -> type:
    return PairTask if dataset.is_pairs else LMTask


class LMTask:
    def __init__(self, config: Any, dataset: Dataset, id_map: Any, ctx: Any, scorer: Any = None):
        """``scorer``: poetgen.evaluation.scoring.cross_entropy (the default) or a stand-in."""
        from poetgen.evaluation.scoring import cross_entropy

        self.c, self.dataset, self.id_map, self.ctx = config, dataset, id_map, ctx
        self.scorer = scorer or cross_entropy
        self.batches = StreamBatches(dataset.train, config.batch_size, config.seq_len, id_map,
                                     rank=ctx.rank, world_size=ctx.world_size)
        self.hidden: Any = None

    @staticmethod
    def sizes(config: Any, dataset: Dataset, world_size: int) -> dict:
        n = len(dataset.train)
        streams = config.batch_size * world_size
        stream_len, batches = stream_layout(n, streams, config.seq_len)
        if batches == 0:
            need = streams * config.seq_len + 1
            if n - 1 >= config.seq_len * world_size:
                hint = f"--batch-size {(n - 1) // config.seq_len // world_size} or lower"
            elif world_size > 1:
                hint = "fewer processes"
            else:
                hint = f"--batch-size 1 --seq-len {max(1, n - 1)} or lower"
            who = f"{world_size} processes × {config.batch_size}" if world_size > 1 else f"{config.batch_size}"
            raise TrainingError(
                f"zero batches: the training split has {n:,} tokens, but {who} streams of "
                f"{config.seq_len} characters need at least {need:,}. Use {hint}, or more data."
            )
        return {"train_tokens": n, "val_tokens": len(dataset.val), "streams": streams, "stream_len": stream_len,
                "batches_per_epoch": batches, "tokens_per_epoch": batches * streams * config.seq_len}

    @staticmethod
    def model_config(config: Any, vocab_size: int, options: dict | None = None) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **config.model_dict())

    def __len__(self) -> int:
        return len(self.batches)

    def loss(self, model: torch.nn.Module, step: int, device: torch.device, amp: Any) -> tuple[torch.Tensor, int]:
        window = step % len(self.batches)
        if window == 0:
            self.hidden = None  # a new epoch: the streams wrap around, nothing to carry over
        batch = self.batches.get(window).to(device)  # (B, T+1): this rank's streams
        with autocast(device, amp):
            # The mean cross-entropy comes out of forward (through DDP), which spares the adaptive head the
            # (B, T, V) scores.
            loss, hidden = model(batch[:, :-1], self.hidden, batch[:, 1:])
        # Detached now (values kept, gradients stop at the window edge); the graph of this step keeps its own.
        self.hidden = detach_hidden(hidden)
        return loss, self.ctx.world_size * self.c.batch_size * self.c.seq_len

    def evaluate(self, raw_model: torch.nn.Module, amp: Any) -> float:
        ctx = self.ctx
        return self.scorer(raw_model, self.dataset.val, warmup=0, id_map=self.id_map, amp=amp, rank=ctx.rank,
                             world_size=ctx.world_size, reduce=ctx.sum if ctx.distributed else None).cold.nats

    def sample(self, raw_model: torch.nn.Module, vocab: Vocab, seed: int, length: int) -> str:
        from poetgen.generation.sample import SampleOptions, generate

        options = SampleOptions(temperature=0.8, length=length, seed=seed)
        return generate(raw_model, vocab, options=options, threads=1).samples[0].generated

    def state_tensors(self) -> dict:
        """The carried hidden state of all ranks, gathered in stream order ((L, N·B, H)): every rank calls this."""
        extra = {}
        if self.hidden is not None:
            hs = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
            for i, h in enumerate(hs):
                parts = self.ctx.gather(h)  # (L, B, H) of every rank, on rank 0
                if parts is not None:
                    extra[f"hidden.{i}"] = torch.cat(parts, dim=1)
        return extra

    def restore(self, resume: Checkpoint, device: torch.device) -> None:
        hidden = [resume.tensors[f"hidden.{i}"] for i in range(2) if f"hidden.{i}" in resume.tensors]
        if not hidden:
            return
        # Saved in stream order for all ranks, (L, N·B, H): this rank's streams are rows r·B … r·B+B-1.
        c, ctx = self.c, self.ctx
        B, rows = c.batch_size, ctx.world_size * c.batch_size
        if any(h.dim() != 3 or h.size(1) != rows for h in hidden):
            raise TrainingError(f"{resume.path}: the saved hidden state does not have {rows} streams")
        hidden = [h[:, ctx.rank * B : (ctx.rank + 1) * B].contiguous() for h in hidden]
        self.hidden = hidden_to(tuple(hidden) if c.cell == "lstm" else hidden[0], device)


class PairTask:
    def __init__(self, config: Any, dataset: Dataset, id_map: Any, ctx: Any, scorer: Any = None):
        """``scorer``: poetgen.evaluation.scoring.pair_cross_entropy (the default) or a stand-in."""
        from poetgen.evaluation.scoring import pair_cross_entropy

        self.scorer = scorer or pair_cross_entropy
        if id_map is not None:
            raise TrainingError("an encoder-decoder is fine-tuned on data of its own vocabulary only")
        self.c, self.dataset, self.ctx = config, dataset, ctx
        self.batches = PairBatches(dataset.train, dataset.pairs["train"], config.batch_size, config.seed,
                                   rank=ctx.rank, world_size=ctx.world_size)

    @staticmethod
    def sizes(config: Any, dataset: Dataset, world_size: int) -> dict:
        table = dataset.pairs["train"]
        batches = len(PairBatches(dataset.train, table, config.batch_size, config.seed, world_size=world_size))
        if batches == 0:
            raise TrainingError(f"zero batches: the training split has {len(table):,} pairs, fewer than the "
                                f"{world_size} processes need (one pair each)")
        return {"train_tokens": int(table[:, 1].sum()), "val_tokens": int(dataset.pairs["val"][:, 1].sum()),
                "streams": config.batch_size * world_size, "stream_len": 0, "batches_per_epoch": batches,
                "tokens_per_epoch": int(table[:, 1].sum())}

    @staticmethod
    def model_config(config: Any, vocab_size: int, options: dict | None = None) -> Seq2SeqConfig:
        d = config.model_dict()
        given = [f"--{k.replace('_', '-')}" for k in ("weight_drop", "embed_dropout") if d[k]]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to the language "
                              "model only, not to the encoder-decoder "
                              "a pair dataset trains (its regulariser is --dropout)")
        return Seq2SeqConfig(vocab_size=vocab_size, **{k: d[k] for k in ("cell", "layers", "hidden", "embed",
                                                                       "dropout", "tie_weights", "head", "cutoffs",
                                                                       "div_value")}, **(options or {}))

    def __len__(self) -> int:
        return len(self.batches)

    def loss(self, model: torch.nn.Module, step: int, device: torch.device, amp: Any) -> tuple[torch.Tensor, int]:
        src, tgt = (t.to(device) for t in self.batches.get(step))  # (b, n) each
        with autocast(device, amp):
            loss, _ = model(src, teacher_inputs(tgt), tgt)
        return loss, self.batches.tokens(step)

    def evaluate(self, raw_model: torch.nn.Module, amp: Any) -> float:
        ctx = self.ctx
        return self.scorer(raw_model, self.dataset.val, self.dataset.pairs["val"], amp=amp, rank=ctx.rank,
                                  world_size=ctx.world_size, reduce=ctx.sum if ctx.distributed else None).score.nats

    def sample(self, raw_model: torch.nn.Module, vocab: Vocab, seed: int, length: int) -> str:
        """The greedy answer to a validation pair's first line (the step picks which), as 'first → answer'."""
        from poetgen.generation.couplet import CoupletOptions, answer_lines

        split = "val" if len(self.dataset.pairs["val"]) else "train"
        table = self.dataset.pairs[split]
        first, _, _ = self.dataset.pair_lines(split, [seed % len(table)])[0]
        text = vocab.decode(first.tolist())
        got = answer_lines(raw_model, vocab, [text], CoupletOptions(temperature=0.0))
        return f"{text} → {got[0][0].text}"

    def state_tensors(self) -> dict:
        return {}

    def restore(self, resume: Checkpoint, device: torch.device) -> None:
        pass
