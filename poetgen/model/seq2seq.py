"""The 对句 encoder-decoder: read a whole first line both ways, then write the answering line with attention.

The shape of PyTorch's "Translation with a Sequence to Sequence Network and Attention" tutorial, in three parts:

* ``EncoderRNN``: the shared embedding, then a stacked bidirectional GRU or LSTM; its outputs (B, S, 2H) are what
  attention looks at, and its last forward and backward states, joined and projected (``bridge``), start the decoder.
* ``Attention``: scores between a decoder state q (H) and each encoder output k (2H), softmax over the S source
  positions, context = the weighted sum of encoder outputs. ``dot`` (Luong's multiplicative "general" form,
  q · W k) or ``additive`` (Bahdanau's v · tanh(W q + U k)).
* ``AttnDecoder``: the same embedding, a stacked GRU or LSTM over the previous answer characters, attention from
  each of its outputs (Luong's order: attend after the step, so teacher-forced training runs the RNN over all T
  steps at once), then tanh(W [h; context]) -> the V scores through CharRNN's output layer (full, or the adaptive
  softmax, whose scores are log-probabilities).

Shapes: B batch, S source length, T target length, E embedding, H hidden (per direction in the encoder), L layers,
V vocabulary. The decoder's first input is <eot> (id 0), which ends every line elsewhere in poetgen; the answer has
no end symbol of its own, since its length is the first line's (poetgen.generation.couplet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poetgen.model.config import Seq2SeqConfig
from poetgen.model.rnn import AdaptiveHead, head_scores

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # (L, B, H), or (h, c) for the LSTM
BOS_ID = 0  # the decoder's first input: <eot>


def _rnn(c: Seq2SeqConfig, bidirectional: bool) -> nn.Module:
    cls = nn.LSTM if c.cell == "lstm" else nn.GRU
    return cls(c.embed, c.hidden, num_layers=c.layers, batch_first=True, bidirectional=bidirectional,
               dropout=c.dropout if c.layers > 1 else 0.0)


class EncoderRNN(nn.Module):
    def __init__(self, c: Seq2SeqConfig, embedding: nn.Embedding):
        super().__init__()
        self.embedding, self.c = embedding, c
        self.drop = nn.Dropout(c.dropout)
        self.rnn = _rnn(c, bidirectional=True)
        self.bridge = nn.Linear(2 * c.hidden, c.hidden)  # last fwd and bwd states -> the decoder's first
        if c.cell == "lstm":
            self.bridge_c = nn.Linear(2 * c.hidden, c.hidden)

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, State]:
        """src (B, S) -> outputs (B, S, 2H), the decoder's initial state (L, B, H)."""
        out, state = self.rnn(self.drop(self.embedding(src)))  # (B, S, 2H); (2L, B, H) per tensor
        L, B, H = self.c.layers, src.size(0), self.c.hidden

        def join(h: torch.Tensor, proj: nn.Module) -> torch.Tensor:
            h = h.view(L, 2, B, H)  # layer-major, then direction
            return torch.tanh(proj(torch.cat([h[:, 0], h[:, 1]], dim=-1)))  # (L, B, H)

        if isinstance(state, tuple):
            return out, (join(state[0], self.bridge), join(state[1], self.bridge_c))
        return out, join(state, self.bridge)


class Attention(nn.Module):
    def __init__(self, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.key = nn.Linear(2 * hidden, hidden, bias=False)  # U (additive) or W (dot): (2H) -> H
        if kind == "additive":
            self.query = nn.Linear(hidden, hidden, bias=False)
            self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H), keys (B, S, H) = self.key(values), values (B, S, 2H) -> context (B, T, 2H), weights (B, T, S).
        ``mask`` (B, S): True at source positions to ignore (padding)."""
        if self.kind == "dot":
            scores = q @ keys.transpose(1, 2)  # (B, T, S)
        else:
            scores = self.v(torch.tanh(self.query(q).unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)  # (B, T, S)
        if mask is not None:
            scores = scores.masked_fill(mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        return weights @ values, weights  # (B, T, 2H), (B, T, S)


class AttnDecoder(nn.Module):
    def __init__(self, c: Seq2SeqConfig, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        self.drop = nn.Dropout(c.dropout)
        self.rnn = _rnn(c, bidirectional=False)
        self.attention = Attention(c.hidden, c.attention)
        self.combine = nn.Linear(3 * c.hidden, c.hidden)  # [h; context] -> H
        self.out: nn.Module = (AdaptiveHead(c.hidden, c.vocab_size, c.cutoffs, c.div_value) if c.head == "adaptive"
                               else nn.Linear(c.hidden, c.vocab_size))

    def forward(self, tgt_in: torch.Tensor, state: State, values: torch.Tensor, keys: torch.Tensor,
                mask: torch.Tensor | None = None, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """tgt_in (B, T): <eot> then the answer's characters but the last -> scores (B, T, V) (logits, or the
        adaptive head's log-probabilities), state, weights (B, T, S); with targets (B, T) the mean cross-entropy
        instead of the scores (the adaptive head then never builds them). One step of decoding is T = 1."""
        h, state = self.rnn(self.drop(self.embedding(tgt_in)), state)  # (B, T, H)
        context, weights = self.attention(h, keys, values, mask)  # (B, T, 2H), (B, T, S)
        mixed = self.drop(torch.tanh(self.combine(torch.cat([h, context], dim=-1))))  # (B, T, H)
        return head_scores(self.out, mixed, targets), state, weights


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)  # shared by encoder and decoder
        self.encoder = EncoderRNN(config, self.embedding)
        self.decoder = AttnDecoder(config, self.embedding)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S), tgt_in (B, T) -> scores (B, T, V) (logits, or the adaptive head's log-probabilities) and
        attention weights (B, T, S); with targets (B, T): the mean cross-entropy (a scalar) instead of the scores
        (the training step goes through forward, for DDP)."""
        values, state = self.encoder(src)
        out, _, weights = self.decoder(tgt_in, state, values, self.decoder.attention.key(values), targets=targets)
        return out, weights

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, State]:
        """src (B, S) -> values (B, S, 2H), keys (B, S, H), the decoder's initial state: what every step reuses."""
        values, state = self.encoder(src)
        return values, self.decoder.attention.key(values), state

    def step(self, tokens: torch.Tensor, state: State, values: torch.Tensor, keys: torch.Tensor
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoding step: tokens (B,) -> log-probabilities (B, V), the new state, attention weights (B, S)."""
        scores, state, weights = self.decoder(tokens[:, None], state, values, keys)
        return F.log_softmax(scores[:, 0].float(), dim=-1), state, weights[:, 0]  # (a no-op on log-probabilities)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def select_state(state: State, index: torch.Tensor) -> State:
    """Keep the batch rows ``index`` (K,) of a decoder state: (L, B, H) -> (L, K, H)."""
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)  # type: ignore[return-value]
    return state.index_select(1, index)


def build_model(config) -> nn.Module:
    """The torch module a config describes: a Seq2Seq for an encoder-decoder config, else a CharRNN."""
    if isinstance(config, Seq2SeqConfig):
        return Seq2Seq(config)
    from poetgen.model.rnn import CharRNN

    return CharRNN(config)
