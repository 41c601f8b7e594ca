"""The character-level recurrent language model: embedding -> stacked RNN / LSTM / GRU -> output layer.

Shapes: B = batch (parallel streams), T = time steps, V = vocabulary size, E = embedding size, H = hidden size,
L = layers. Hidden state is ``(h, c)`` for the LSTM and a single tensor for RNN / GRU, each ``(L, B, H)``.

Output layer (``head``):

* ``full``: one linear layer H -> V and a softmax over all V symbols (``head.weight`` (V, H), ``head.bias`` (V,)).
* ``adaptive``: the adaptive softmax of Grave et al. 2017 ("Efficient softmax approximation for GPUs"), for
  large vocabularies whose ids are sorted by frequency (poetgen's are). With cutoffs c_1 < ... < c_K (C = c_1),
  the C most frequent symbols form the shortlist and the rest K tail clusters [c_i, c_{i+1}) (c_{K+1} = V):

      root  = head.root.weight @ x + head.root.bias                 (C + K,)  shortlist logits, then one per cluster
      log p(y) = log_softmax(root)[y]                                y < C
      log p(y) = log_softmax(root)[C + i]                            y in cluster i (0-based), n_i = c_{i+1} - c_i
                 + log_softmax(W_out,i @ (W_proj,i @ x) + b_out,i)[y - c_i]

  with W_proj,i = ``head.tails.i.proj.weight`` (d_i, H), d_i = max(1, H // div_value ** (i + 1)), and W_out,i,
  b_out,i = ``head.tails.i.out``'s weight (n_i, d_i) and bias (n_i,). Training touches a tail cluster only for the targets in it (most targets fall
  in the shortlist), so a step costs about H·(C + K) instead of H·V per token.

``forward(idx, hidden)`` returns per-symbol scores (B, T, V) whose log-softmax is the model's log-probabilities
(the full head: logits; the adaptive head: the log-probabilities themselves), so sampling and evaluation treat
both heads alike. ``forward(idx, hidden, targets)`` returns the mean cross-entropy instead, without building the
(B, T, V) scores for the adaptive head (the training step; it goes through forward so DDP sees it).

Regularisers in training mode only (AWD-LSTM, Merity et al. 2018, "Regularizing and optimizing LSTM language
models"); the weights a checkpoint holds are used as they are at inference, so the numpy runtime knows nothing of them:

* ``dropout``: on the embedding output, between layers (torch's RNN) and before the output layer;
* ``weight_drop``: DropConnect on each layer's hidden-to-hidden matrix (``rnn.weight_hh_l<k>``): one mask per
  forward, shared by every stream and time step, the kept entries scaled by 1 / (1 - p); the fused RNN kernel still
  runs (the masked matrices are passed to it with torch.func.functional_call);
* ``embed_dropout``: whole rows of the embedding matrix (characters) zeroed with probability p per forward, the
  kept rows scaled by 1 / (1 - p): a dropped character is unknown at every position of the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

# The configuration lives in a torch-free module (`poetgen sample` reads it without torch); re-exported here.
from poetgen.model.config import AUTO_HEAD_MIN_VOCAB, CELLS, HEADS, ModelConfig, auto_cutoffs  # noqa: F401

Hidden = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def head_input(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The output layer's input and the context to run it (and the loss) in: under bf16 autocast on the CPU, x in
    fp32 with autocast off, so that the scores are not rounded to bf16's 8 bits (a logit near 10 to within 0.03):
    on Tiny Shakespeare (`small`, 400 steps) bf16 training ended 0.037 nats/char behind fp32, 0.013 with the head in
    fp32, at the same step time (benchmarks/RESULTS.md, issue 20). Elsewhere x as it is and no change."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return x.float(), torch.autocast("cpu", enabled=False)
    return x, nullcontext()


class AdaptiveHead(nn.Module):
    """The adaptive softmax (see the module docstring for the parameters and the math). Input x: (N, H)."""

    def __init__(self, hidden: int, vocab_size: int, cutoffs: tuple[int, ...], div_value: float):
        super().__init__()
        self.bounds = (*cutoffs, vocab_size)  # cluster i covers ids [bounds[i], bounds[i + 1])
        self.shortlist = cutoffs[0]
        self.root = nn.Linear(hidden, self.shortlist + len(cutoffs))  # shortlist logits, then one per tail cluster
        self.tails = nn.ModuleList()
        for i in range(len(cutoffs)):
            d = max(1, int(hidden // div_value ** (i + 1)))
            tail = nn.Module()
            tail.proj = nn.Linear(hidden, d, bias=False)
            tail.out = nn.Linear(d, self.bounds[i + 1] - self.bounds[i])
            self.tails.append(tail)
        self.register_buffer("cutoff_ids", torch.tensor(cutoffs), persistent=False)  # for bucketize

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V) log-probabilities of every symbol."""
        C = self.shortlist
        root = F.log_softmax(self.root(x).float(), dim=-1)  # (N, C + K)
        parts = [root[:, :C]]
        for i, tail in enumerate(self.tails):
            cluster = F.log_softmax(tail.out(tail.proj(x)).float(), dim=-1)  # (N, n_i)
            parts.append(cluster + root[:, C + i : C + i + 1])
        return torch.cat(parts, dim=-1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean negative log-probability of targets y (N,) given x (N, H): each tail cluster is computed only for
        the rows whose target lies in it. Every tail runs even with no such row (an empty matmul), so that every
        parameter is in the graph at every step, as DistributedDataParallel requires."""
        C = self.shortlist
        which = torch.bucketize(y, self.cutoff_ids, right=True)  # (N,) 0 = shortlist, i + 1 = tail cluster i
        root_target = torch.where(which == 0, y, C + which - 1)  # (N,) the row's entry among the C + K root logits
        total = F.cross_entropy(self.root(x).float(), root_target, reduction="sum")
        for i, tail in enumerate(self.tails):
            rows = (which == i + 1).nonzero().squeeze(1)  # (n,)
            scores = tail.out(tail.proj(x.index_select(0, rows))).float()  # (n, n_i)
            total = total + F.cross_entropy(scores, y.index_select(0, rows) - self.bounds[i], reduction="sum")
        return total / y.numel()


def head_scores(head: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """The output layer ``head`` (a full nn.Linear or an AdaptiveHead) over x (B, T, H): scores (B, T, V) (logits,
    or the adaptive head's log-probabilities), or with targets (B, T) their mean cross-entropy (the adaptive head
    then never builds the scores). Run as ``head_input`` says. CharRNN's and the encoder-decoder's one output path."""
    x, precision = head_input(x)
    with precision:
        if isinstance(head, AdaptiveHead):
            flat = x.reshape(-1, x.size(-1))  # (B·T, H)
            if targets is not None:
                return head.loss(flat, targets.reshape(-1))
            return head.log_probs(flat).view(*x.shape[:-1], -1)
        logits = head(x)  # (B, T, V)
        if targets is not None:
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed)
        self.drop = nn.Dropout(c.dropout)
        rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[c.cell]
        extra = {"nonlinearity": "tanh"} if c.cell == "rnn" else {}
        # torch applies `dropout` only between layers, and warns when there is a single layer.
        self.rnn = rnn_cls(
            c.embed, c.hidden, num_layers=c.layers, dropout=c.dropout if c.layers > 1 else 0.0,
            batch_first=True, **extra,
        )
        self.head: nn.Module
        if c.head == "adaptive":
            self.head = AdaptiveHead(c.hidden, c.vocab_size, c.cutoffs, c.div_value)
        else:
            self.head = nn.Linear(c.hidden, c.vocab_size)
            if c.tie_weights:
                self.head.weight = self.embedding.weight  # (V, E) == (V, H)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small uniform embedding (as in pytorch/examples): N(0, 1) rows are far too large once tied to the output.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        for name, p in self.head.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif not self.config.tie_weights:
                nn.init.uniform_(p, -0.1, 0.1)
        if self.config.cell == "lstm":
            # Forget-gate bias 1 (gate order i, f, g, o): remember by default, which speeds early learning.
            H = self.config.hidden
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        p[H : 2 * H].fill_(1.0)

    def forward(
        self, idx: torch.Tensor, hidden: Hidden | None = None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """idx: (B, T) token ids -> scores (B, T, V) (logits, or the adaptive head's log-probabilities) and the
        hidden state after the last step. With targets (B, T): the mean cross-entropy (a scalar) instead of scores.
        """
        x = self.drop(self._embed(idx))  # (B, T, E)
        out, hidden = self._recur(x, hidden)  # (B, T, H)
        return head_scores(self.head, self.drop(out), targets), hidden

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        p = self.config.embed_dropout
        if not (self.training and p > 0):
            return self.embedding(idx)
        w = self.embedding.weight  # (V, E)
        keep = w.new_empty((w.size(0), 1)).bernoulli_(1.0 - p) / (1.0 - p)  # (V, 1)
        return F.embedding(idx, w * keep)

    def _recur(self, x: torch.Tensor, hidden: Hidden | None) -> tuple[torch.Tensor, Hidden]:
        p = self.config.weight_drop
        if not (self.training and p > 0):
            return self.rnn(x, hidden)
        weights = {name: F.dropout(w, p) if name.startswith("weight_hh") else w
                   for name, w in self.rnn.named_parameters()}
        return torch.func.functional_call(self.rnn, weights, (x, hidden))

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> Hidden:
        """Zero state, (L, B, H) per tensor, on ``device`` (default: where the weights are)."""
        p = next(self.parameters())
        shape = (self.config.layers, batch_size, self.config.hidden)
        device = p.device if device is None else device
        h = torch.zeros(shape, dtype=p.dtype, device=device)
        if self.config.cell == "lstm":
            return (h, torch.zeros_like(h))
        return h

    def num_parameters(self) -> int:
        """Distinct trainable values (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


# --- hidden-state helpers (the state is a tensor or an (h, c) tuple) -------------------------------------------


def detach_hidden(hidden: Hidden | None) -> Hidden | None:
    """Cut the autograd graph between windows (truncated BPTT) while keeping the values."""
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)  # type: ignore[return-value]
    return hidden.detach()


def select_hidden(hidden: Hidden, index: torch.Tensor) -> Hidden:
    """Keep the batch rows in ``index`` (LongTensor (K,)): (L, B, H) -> (L, K, H)."""
    if isinstance(hidden, tuple):
        return tuple(h.index_select(1, index) for h in hidden)  # type: ignore[return-value]
    return hidden.index_select(1, index)


def cat_hidden(parts: Sequence[Hidden]) -> Hidden:
    """Join states along the batch dimension: [(L, B_i, H), ...] -> (L, sum B_i, H)."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))  # type: ignore[misc]
    return torch.cat(list(parts), dim=1)  # type: ignore[arg-type]


def hidden_to(hidden: Hidden | None, device: torch.device | str) -> Hidden | None:
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(h.to(device) for h in hidden)  # type: ignore[return-value]
    return hidden.to(device)
