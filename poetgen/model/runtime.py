"""CharRNN inference in numpy, without torch: what `poetgen sample` runs on the CPU.

Why: ``import torch`` alone takes seconds, and a per-step ``nn.LSTM`` call for one stream is bound by Python and
dispatch overhead, not by arithmetic. Here one step is a handful of BLAS calls and in-place ufuncs on
preallocated float32 buffers.

The step for batch B (shapes: H hidden, G gate width: H for rnn, 4H for lstm and gru, see below)::

    layer 0:  g = table[tokens] + [h_0 | 1] @ W_0          table (V, G) = embedding @ W_ih^T + biases
              (or, without the table, g = [embedding[tokens] | h_0 | 1] @ W_0)
    layer l:  g = [h_{l-1} | h_l | 1] @ W_l                 one fused matmul per layer, biases as the last row
    cell:     h_l (and c_l) from g, written in place into the layer's input buffer X_l = [x_l | h_l | 1]
    head:     scores = [h_last | 1] @ W_out                 (B, V), the full head; the adaptive head's log-
                                                            probabilities otherwise (see ``_make_head``)

``scores`` are what ``CharRNN.forward`` returns for one step: their log-softmax is the model's log-probabilities
(the full head: logits). Gates are reordered and pre-scaled at load time so that one ``tanh`` call covers every
gate of a layer: sigmoid(x) = (tanh(x / 2) + 1) / 2, so the sigmoid gates' weights are halved.

* lstm: torch's gate order (i, f, g, o) becomes (i, f, o, g); G = 4H.
* gru: columns (r, z, n_input, n_hidden), G = 4H: r and z sum both inputs, while n keeps the input and hidden
  parts apart because n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
* rnn: h = tanh(g), G = H.

``Runtime`` also takes a whole prefix per row (``prefix``), keeps or repeats rows (``select``: dropping finished
samples), and reports nothing but arrays: the decoding itself lives in poetgen.generation.sample.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from poetgen.errors import CheckpointError

F32 = np.float32
# The layer-0 lookup table costs V x E x G multiply-adds to build and V x G floats to hold; it pays off once the
# call runs more row-steps than the vocabulary has symbols (see ``Runtime.use_table``), and never past this size.
MAX_TABLE_BYTES = 256 * 2**20


def length_groups(prefixes: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
    """Rows of equal prefix length, to run as one batch each: -> (groups of row indexes, shortest first;
    ``inverse`` (U,) such that ``np.concatenate(per-group results)[inverse]`` is in the order given). Shared by the
    numpy Runtime and generation's TorchEngine."""
    by_length: dict[int, list[int]] = {}
    for u, ids in enumerate(prefixes):
        by_length.setdefault(len(ids), []).append(u)
    groups = [members for _, members in sorted(by_length.items())]
    order = np.array([u for members in groups for u in members], dtype=np.intp)
    inverse = np.empty(len(order), dtype=np.intp)
    inverse[order] = np.arange(len(order))
    return groups, inverse


@dataclass(frozen=True)
class Int8Rows:
    """A weight matrix as a compact model file stores it (poetgen.checkpoint.compact): int8 ``q`` (rows, cols) and
    float32 ``scale`` (rows,), the weight being ``q[r] * scale[r]`` row by row. ``Runtime`` takes it in a state dict
    in place of the float32 matrix and scales it while laying it out, with the same float32 numbers the checkpoint
    readers' dequantization gives (``read_model(path, keep_int8=True)`` hands these over)."""

    q: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


def _dense(w: Any) -> np.ndarray:
    """A weight as a C-contiguous float32 array (an Int8Rows scaled: float32(q) * scale, as the readers do)."""
    if isinstance(w, Int8Rows):
        return np.multiply(w.q, w.scale[:, None], dtype=F32)
    return np.ascontiguousarray(w, dtype=F32)


def _put_t(out: np.ndarray, w: Any, rows: slice, factor: float = 1.0) -> None:
    """out[...] = factor * float32(w)[rows].T, written in place in one pass (two with a factor), the numbers exactly
    those of the float32 expression: the product is rounded to float32 first, then multiplied by ``factor``."""
    if isinstance(w, Int8Rows):
        np.multiply(w.q[rows].T, w.scale[rows][None, :], out=out)
    else:
        np.copyto(out, np.asarray(w[rows], dtype=F32).T)
    if factor != 1.0:
        out *= F32(factor)


@dataclass
class _Layer:
    n_in: int  # columns of the layer input in X (0 for layer 0 with the lookup table)
    W: np.ndarray  # (n_in + H + 1, G) fused input, hidden and bias rows
    X: np.ndarray  # (B, n_in + H + 1) [x | h | 1]: the layer's input, its state h, and the bias column
    c: np.ndarray | None  # (B, H) lstm cell state


class Runtime:
    """A CharRNN's forward pass in numpy float32, with the recurrent state of B rows carried between calls.

    Build it with ``poetgen.generation.engines.load_runtime(checkpoint)`` or
    ``Runtime.from_state(config, state_dict)``. Then::

        scores = rt.prefix([[0, 5, 9], [0, 7]])   # (2, V): state now holds 2 rows, each after its whole prefix
        rt.select(np.array([0, 0, 1]))            # rows 0, 0, 1 (repeat, reorder or drop rows)
        scores = rt.step(np.array([3, 4, 8]))     # (3, V): one symbol per row, state carried

    Returned scores are a buffer the next call overwrites; the caller may modify them in place.
    """

    def __init__(self, config: Any, state: dict[str, np.ndarray], vocab: Any = None, path: Path | None = None):
        self.config, self.vocab, self.path = config, vocab, path
        c = config
        self.cell, self.H, self.V, self.L = c.cell, c.hidden, c.vocab_size, c.layers
        H = self.H
        self.G = H if c.cell == "rnn" else 4 * H
        self.embedding = _dense(state["embedding.weight"])  # (V, E)
        self._w: list[np.ndarray] = []  # per layer (n_in + H + 1, G) fused
        for i in range(self.L):
            w_ih, w_hh = state[f"rnn.weight_ih_l{i}"], state[f"rnn.weight_hh_l{i}"]  # (G0, n_in), (G0, H)
            b_ih, b_hh = state[f"rnn.bias_ih_l{i}"], state[f"rnn.bias_hh_l{i}"]  # (G0,)
            self._w.append(self._fuse(w_ih, w_hh, b_ih, b_hh))
        self._head = _make_head(c, state)
        self.table: np.ndarray | None = None  # (V, G) layer-0 input part, built on demand
        self.layers: list[_Layer] = []
        self.reset(0)

    @classmethod
    def from_state(cls, config: Any, state: dict[str, Any], vocab: Any = None) -> Runtime:
        """From a state dict of numpy arrays or torch tensors (CPU or not), e.g. ``CharRNN.state_dict()``."""
        arrays = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in
                  state.items()}
        return cls(config, arrays, vocab)

    # --- weights ---------------------------------------------------------------------------------------------

    def _fuse(self, w_ih: Any, w_hh: Any, b_ih: np.ndarray, b_hh: np.ndarray) -> np.ndarray:
        """torch's (G0, n_in), (G0, H), (G0,), (G0,) -> one (n_in + H + 1, G) matrix for [x | h | 1] @ W.

        Each block is written in its place in one pass (``_put_t``), from float32 or straight from int8 rows: the
        copies in between were most of a 2x768 model's build time (tens of MB of fresh memory)."""
        H, n_in = self.H, w_ih.shape[1]
        b_ih, b_hh = np.asarray(b_ih, dtype=F32), np.asarray(b_hh, dtype=F32)
        W = np.zeros((n_in + H + 1, self.G), dtype=F32)
        xs, hs, bs = slice(0, n_in), slice(n_in, n_in + H), n_in + H
        if self.cell == "rnn":
            _put_t(W[xs], w_ih, slice(None))
            _put_t(W[hs], w_hh, slice(None))
            np.add(b_ih, b_hh, out=W[bs])
        elif self.cell == "lstm":
            order = [0, 1, 3, 2]  # torch (i, f, g, o) -> (i, f, o, g)
            scale = [0.5, 0.5, 0.5, 1.0]  # sigmoid gates through tanh(x / 2)
            for dst, (src, s) in enumerate(zip(order, scale)):
                cols, rows = slice(dst * H, (dst + 1) * H), slice(src * H, (src + 1) * H)
                _put_t(W[xs, cols], w_ih, rows, s)
                _put_t(W[hs, cols], w_hh, rows, s)
                W[bs, cols] = s * (b_ih[rows] + b_hh[rows])
        else:  # gru, torch order (r, z, n)
            for k in range(2):  # r, z: both inputs summed, halved for the tanh sigmoid
                cols = rows = slice(k * H, (k + 1) * H)
                _put_t(W[xs, cols], w_ih, rows, 0.5)
                _put_t(W[hs, cols], w_hh, rows, 0.5)
                W[bs, cols] = 0.5 * (b_ih[rows] + b_hh[rows])
            n = slice(2 * H, 3 * H)
            _put_t(W[xs, 2 * H : 3 * H], w_ih, n)
            W[bs, 2 * H : 3 * H] = b_ih[n]
            _put_t(W[hs, 3 * H :], w_hh, n)
            W[bs, 3 * H :] = b_hh[n]
        return W

    def use_table(self, enable: bool = True) -> None:
        """Precompute layer 0's input part for every symbol (a (V, G) gather replaces a matmul per step).

        Worth it when a call runs more row-steps than about V (its build is one (V, E) x (E, G) matmul). The
        state is kept."""
        want = enable and self.V * self.G * 4 <= MAX_TABLE_BYTES
        if want == (self.table is not None):
            return
        E, H = self.embedding.shape[1], self.H
        W0 = self._w[0]
        if want:
            self.table = self.embedding @ W0[:E] + W0[E + H]  # (V, G) input part and biases
        else:
            self.table = None
        old = self.layers[0]
        self.layers[0] = self._layer0(old.X.shape[0], old.c)
        self.layers[0].X[:, -H - 1 : -1] = old.X[:, -H - 1 : -1]

    def _layer0(self, B: int, c: np.ndarray | None = None) -> _Layer:
        H, E = self.H, self.embedding.shape[1]
        if self.table is not None:  # [h | 1] @ [W_hh rows; zero bias row]: the bias is in the table
            W = np.zeros((H + 1, self.G), dtype=F32)
            W[:H] = self._w[0][E : E + H]
            n_in = 0
        else:
            W, n_in = self._w[0], E
        X = np.zeros((B, n_in + H + 1), dtype=F32)
        X[:, -1] = 1.0
        cell = (np.zeros((B, H), dtype=F32) if c is None else c) if self.cell == "lstm" else None
        return _Layer(n_in, W, X, cell)

    # --- state -----------------------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.layers[0].X.shape[0]

    def reset(self, batch: int) -> None:
        """Zero state for ``batch`` rows."""
        self.layers = [self._layer0(batch)]
        for i in range(1, self.L):
            X = np.zeros((batch, 2 * self.H + 1), dtype=F32)
            X[:, -1] = 1.0
            c = np.zeros((batch, self.H), dtype=F32) if self.cell == "lstm" else None
            self.layers.append(_Layer(self.H, self._w[i], X, c))
        self._buffers(batch)

    def _buffers(self, B: int) -> None:
        self._g = np.empty((B, self.G), dtype=F32)  # gates
        self._tmp = np.empty((B, self.H), dtype=F32)
        self._scores = np.empty((B, self.V), dtype=F32)

    def select(self, index: np.ndarray) -> None:
        """Keep the rows ``index`` (K,) of the state, in that order (rows may repeat): (B, ...) -> (K, ...)."""
        index = np.asarray(index, dtype=np.intp)
        for layer in self.layers:
            layer.X = layer.X[index]
            if layer.c is not None:
                layer.c = layer.c[index]
        self._buffers(len(index))

    def hidden(self) -> tuple[np.ndarray, ...]:
        """The state as torch lays it out: (h,) or (h, c), each (L, B, H) (for tests and comparisons)."""
        H = self.H
        h = np.stack([layer.X[:, layer.n_in : layer.n_in + H] for layer in self.layers])
        if self.cell == "lstm":
            return h, np.stack([layer.c for layer in self.layers])
        return (h,)

    # --- forward ---------------------------------------------------------------------------------------------

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) ints -> scores (B, V) after feeding them, state carried."""
        H, g = self.H, self._g
        layers = self.layers
        first = layers[0]
        if self.table is not None:
            np.matmul(first.X, first.W, out=g)
            g += self.table[tokens]
        else:
            np.take(self.embedding, tokens, axis=0, out=first.X[:, : first.n_in], mode="clip")
            np.matmul(first.X, first.W, out=g)
        self._cell(g, first)
        for below, layer in zip(layers, layers[1:]):
            layer.X[:, :H] = below.X[:, below.n_in : below.n_in + H]
            np.matmul(layer.X, layer.W, out=g)
            self._cell(g, layer)
        last = layers[-1]
        return self._head(last.X[:, last.n_in :], self._scores)

    def prefix(self, prefixes: list[list[int]]) -> np.ndarray:
        """Start afresh with one row per prefix (each at least one id): -> scores (U, V) after each whole prefix.

        Prefixes of one length run together, each layer over all steps at once for its input part; rows end up in
        the order given."""
        if not prefixes or any(len(p) == 0 for p in prefixes):
            raise ValueError("every prefix needs at least one id")
        groups, inverse = length_groups(prefixes)
        parts: list[tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray]] = []
        for members in groups:
            scores = self.feed(np.array([prefixes[u] for u in members], dtype=np.intp), fresh=True)
            parts.append(([lay.X for lay in self.layers], [lay.c for lay in self.layers], scores.copy()))
        for i, layer in enumerate(self.layers):
            layer.X = np.concatenate([p[0][i] for p in parts])[inverse]
            if layer.c is not None:
                layer.c = np.concatenate([p[1][i] for p in parts])[inverse]  # type: ignore[misc]
        self._buffers(len(inverse))
        return np.concatenate([p[2] for p in parts])[inverse]

    def append(self, prefixes: list[list[int]]) -> np.ndarray:
        """``prefix`` for new rows added after the rows already held, whose state is kept: -> scores (U, V) of the
        new rows. Each new row's numbers are exactly what ``prefix`` alone gives (continuous batching: a request
        joins a running batch, poetgen.serving)."""
        old = [(layer.X, layer.c) for layer in self.layers]
        scores = self.prefix(prefixes)
        if old and len(old[0][0]):
            for layer, (X, c) in zip(self.layers, old):
                layer.X = np.concatenate([X, layer.X])
                if c is not None:
                    layer.c = np.concatenate([c, layer.c])  # type: ignore[list-item]
            self._buffers(self.batch)
        return scores

    def fork(self) -> Runtime:
        """Another Runtime over the same (read-only) weights with a state of its own, empty: two decoding loops
        in two threads without a second copy of the model."""
        other = copy.copy(self)
        other.reset(0)
        return other

    def feed(self, ids: np.ndarray, fresh: bool = False) -> np.ndarray:
        """ids (B, T) -> scores (B, V) after the last step. ``fresh``: from a zero state for B rows; else the
        carried state (B must match)."""
        ids = np.asarray(ids, dtype=np.intp)
        B, T = ids.shape
        if fresh:
            self.reset(B)
        H, E = self.H, self.embedding.shape[1]
        g = self._g
        seq: np.ndarray | None = None  # (B, T, H) outputs of the layer below
        for i, layer in enumerate(self.layers):
            W = self._w[i]
            n_in = E if i == 0 else H
            if i == 0 and self.table is not None:
                gx = self.table[ids]  # (B, T, G)
            else:
                x = self.embedding[ids] if i == 0 else seq  # (B, T, n_in)
                gx = x @ W[:n_in] + W[n_in + H]  # (B, T, G)
            w_h = W[n_in : n_in + H]  # (H, G)
            h = layer.X[:, layer.n_in : layer.n_in + H]
            out = np.empty((B, T, H), dtype=F32)
            for t in range(T):
                np.matmul(h, w_h, out=g)
                g += gx[:, t]
                self._cell(g, layer)
                out[:, t] = h
            seq = out
        last = self.layers[-1]
        return self._head(last.X[:, last.n_in :], self._scores)

    def _cell(self, g: np.ndarray, layer: _Layer) -> None:
        """Gates g (B, G) -> the layer's new h, written over the old one in X (and c updated)."""
        H = self.H
        h = layer.X[:, layer.n_in : layer.n_in + H]
        if self.cell == "lstm":  # g: (i, f, o) halved, then the candidate
            np.tanh(g, out=g)
            s = g[:, : 3 * H]
            s += 1.0  # 2 * sigmoid for i, f, o
            c, tmp = layer.c, self._tmp
            c *= s[:, H : 2 * H]
            np.multiply(s[:, :H], g[:, 3 * H :], out=tmp)
            c += tmp
            c *= 0.5  # c = f * c + i * g
            np.tanh(c, out=h)
            h *= s[:, 2 * H :]
            h *= 0.5  # h = o * tanh(c)
        elif self.cell == "gru":  # g: (r, z) halved, input part of n, hidden part of n
            rz = g[:, : 2 * H]
            np.tanh(rz, out=rz)
            rz += 1.0
            rz *= 0.5
            n = self._tmp
            np.multiply(g[:, :H], g[:, 3 * H :], out=n)
            n += g[:, 2 * H : 3 * H]
            np.tanh(n, out=n)
            h -= n
            h *= g[:, H : 2 * H]
            h += n  # h' = (1 - z) * n + z * h
        else:
            np.tanh(g, out=h)


# --- output layers --------------------------------------------------------------------------------------------


def _make_head(config: Any, state: dict[str, np.ndarray]):
    """The output layer as a function (x (B, H + 1) = [h | 1], out (B, V)) -> out. One per head type."""
    head = getattr(config, "head", "full")
    if head == "full":
        W = _with_bias(state["head.weight"], state["head.bias"])  # (H + 1, V)

        def full(x: np.ndarray, out: np.ndarray) -> np.ndarray:
            return np.matmul(x, W, out=out)

        return full
    if head == "adaptive":
        return _adaptive_head(config, state)
    raise CheckpointError(f"the numpy sampler has no output layer {head!r}")


def _with_bias(w: Any, b: np.ndarray) -> np.ndarray:
    """torch's Linear weight (n, d) and bias (n,) -> [W^T; b] (d + 1, n), for [x | 1] @ it. Laid out in memory as
    torch's rows with the bias appended (a transposed view: no transposing copy), which is also the layout the
    products' float32 results were checked in: for one row, BLAS sums in a layout-dependent order."""
    n, d = w.shape
    out = np.empty((n, d + 1), dtype=F32)
    if isinstance(w, Int8Rows):
        np.multiply(w.q, w.scale[:, None], out=out[:, :d])
    else:
        out[:, :d] = np.asarray(w, dtype=F32)
    out[:, d] = b
    return out.T


def log_softmax(x: np.ndarray) -> np.ndarray:
    """In place over the last axis of x (B, N); returns x. (The one torch-free log-softmax: decoding, beam search
    and the compact export's comparison use it; of the adaptive head's scores, already log-probabilities, a no-op.)"""
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _adaptive_head(config: Any, state: dict[str, np.ndarray]):
    """poetgen.model.rnn.AdaptiveHead.log_probs: the shortlist's log-probabilities from the root, each tail cluster's
    its own log-softmax plus the root's log-probability of the cluster (see poetgen.model.rnn's docstring)."""
    cutoffs = tuple(config.cutoffs)
    bounds = (*cutoffs, config.vocab_size)
    C = cutoffs[0]
    root = _with_bias(state["head.root.weight"], state["head.root.bias"])  # (H + 1, C + K)
    tails = []
    for i in range(len(cutoffs)):
        w = state[f"head.tails.{i}.proj.weight"]  # (d, H)
        proj = np.empty(w.shape[::-1], dtype=F32)  # (H, d)
        _put_t(proj, w, slice(None))
        tails.append((proj, _with_bias(state[f"head.tails.{i}.out.weight"], state[f"head.tails.{i}.out.bias"])))

    def adaptive(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        r = log_softmax(x @ root)  # (B, C + K)
        out[:, :C] = r[:, :C]
        h = x[:, :-1]
        for i, (proj, w) in enumerate(tails):
            s = out[:, bounds[i] : bounds[i + 1]]  # (B, n_i), written in place
            np.matmul(h @ proj, w[:-1], out=s)  # (B, d) @ (d, n_i)
            s += w[-1]
            log_softmax(s)
            s += r[:, C + i : C + i + 1]
        return out

    return adaptive
