"""Matrix-multiply peaks and poetgen's training step in fp32 and bf16 (issue 7, target 3). Run by benchmarks/run.py.

    python benchmarks/flops.py peak [--quick] [--threads N] [--json]
    python benchmarks/flops.py bf16 [--quick] [--threads N] [--json] [--dataset DIR]

`peak`: the best rate of a large matrix product through oneDNN (torch._C._nn.mkldnn_linear on tensors in oneDNN's
layout: the library PyTorch's CPU LSTM runs on) in fp32 and in bf16, through torch.matmul (fp32), and of a bf16
F.linear; best over a few shapes, each timed several times (the best time counts: other processes only ever slow a
run down). bf16 is emulated on a CPU without bf16 instructions (some 20 GFLOP/s): a shape whose one product would
take more than BF16_MAX_CALL seconds at the rate measured so far is left out. `bf16_native`: what
poetgen.model.devices.cpu_bf16_native says of this CPU (AVX512-BF16 or AMX-BF16).

`bf16`: poetgen's training step (poetgen.model.rnn.CharRNN, the AdamW with the parameter groups, betas and gradient
clipping the train loop uses, cross-entropy on fp32 logits, hidden state carried and detached) at LSTM 512 x 2,
embedding 512, batch 64, sequence 100, vocabulary 67 (Tiny Shakespeare's), timed in fp32 and under
torch.autocast("cpu", dtype=torch.bfloat16). When the whole model cannot run under autocast (oneDNN has no bf16
LSTM on CPUs without bf16 instructions) the error is reported, and so is the step with only the embedding and the
output layer under autocast and the LSTM in fp32. If a bf16 step is at least 1.2x faster and --dataset is given,
both precisions train the same model from the same start for --check-steps steps and are scored on the validation
split: bf16 qualifies when it is at least 1.5x faster and its loss is within 0.01 nats of fp32's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "baselines"))
from common import lstm_train_flops_per_char, score_recurrent  # noqa: E402

FULL_SHAPES = [(6400, 1024, 2048), (2048, 2048, 2048), (4096, 4096, 4096), (6400, 512, 2048)]
QUICK_SHAPES = [(256, 256, 256), (512, 512, 512)]


def best_time(f, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def peak(quick: bool) -> dict:
    """Best GFLOP/s over the shapes (M, K, N): (M x K) times (K x N)."""
    torch.manual_seed(0)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    repeats = 3 if quick else 5
    onednn, matmul, per_shape = 0.0, 0.0, []
    for M, K, N in shapes:
        a, w = torch.randn(M, K), torch.randn(N, K)  # F.linear layout: a @ w.T
        b = w.t().contiguous()  # (K, N) for torch.matmul
        flop = 2.0 * M * K * N
        am, wm = a.to_mkldnn(), w.to_mkldnn()
        r1 = flop / best_time(lambda: torch._C._nn.mkldnn_linear(am, wm, None), repeats) / 1e9
        r2 = flop / best_time(lambda: torch.matmul(a, b), repeats) / 1e9
        onednn, matmul = max(onednn, r1), max(matmul, r2)
        per_shape.append({"shape": [M, K, N], "onednn_gflops": r1, "matmul_gflops": r2})
    M, K, N = shapes[1]
    a, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
    bf16 = 2.0 * M * K * N / best_time(lambda: F.linear(a, w), max(2, repeats - 2)) / 1e9
    return {"onednn_gflops": onednn, "matmul_gflops": matmul, "bf16_linear_gflops": bf16,
            "bf16_linear_shape": [M, K, N], **bf16_peak(shapes, repeats, per_shape), "shapes": per_shape,
            "threads": torch.get_num_threads(), "bf16_native": bf16_native()}


BF16_MAX_CALL = 1.5  # seconds: larger products are left out of the bf16 peak (emulated bf16 is slow)


def bf16_peak(shapes: list[tuple[int, int, int]], repeats: int, per_shape: list[dict]) -> dict:
    """The best bf16 GFLOP/s through oneDNN (mkldnn_linear on bf16 tensors in oneDNN's layout); F.linear on bf16
    tensors where that path is refused (its error kept). Shapes smallest first, each timed only when one product
    is expected to take at most BF16_MAX_CALL seconds."""
    best, error, how = 0.0, None, "mkldnn_linear"
    for M, K, N in sorted(shapes, key=lambda s: s[0] * s[1] * s[2]):
        flop = 2.0 * M * K * N
        if best and flop / (best * 1e9) > BF16_MAX_CALL:
            continue
        a, w = torch.randn(M, K), torch.randn(N, K)
        try:
            am, wm = a.to_mkldnn(torch.bfloat16), w.to_mkldnn(torch.bfloat16)
            f = lambda: torch._C._nn.mkldnn_linear(am, wm, None)  # noqa: E731
            t = best_time(f, 1, warmup=1)
        except RuntimeError as e:  # a CPU oneDNN refuses bf16 on: the bf16 F.linear PyTorch falls back to
            error, how = str(e).splitlines()[0][:200], "F.linear"
            ab, wb = a.bfloat16(), w.bfloat16()
            f = lambda: F.linear(ab, wb)  # noqa: E731
            t = best_time(f, 1, warmup=1)
        rate = flop / min(t, best_time(f, max(1, repeats - 2) if t < BF16_MAX_CALL / 3 else 1, warmup=0)) / 1e9
        best = max(best, rate)
        next((x for x in per_shape if x["shape"] == [M, K, N]), {})["onednn_bf16_gflops"] = rate
    return {"onednn_bf16_gflops": best, "onednn_bf16_how": how, "onednn_bf16_error": error}


def bf16_native() -> bool | None:
    """poetgen's own test of native bf16 (None when poetgen cannot be imported here)."""
    try:
        from poetgen.model.devices import cpu_bf16_native
    except ImportError:
        return None
    return bool(cpu_bf16_native())


# --- poetgen's step -----------------------------------------------------------------------------------------------


def make_step(model, config, mode: str):
    """One training step of poetgen's loop on (B, T+1) id batches. mode: fp32 | bf16 | bf16-head (LSTM in fp32)."""
    decay, no_decay = [], []  # as poetgen.training.loop builds them: no weight decay on biases
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "bias_" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                            betas=(config.beta1, config.beta2))
    state = {"hidden": None}
    bf16 = torch.bfloat16

    def forward(x, hidden):
        if mode == "fp32":
            return model(x, hidden)
        if mode == "bf16":
            with torch.autocast("cpu", dtype=bf16):
                return model(x, hidden)
        # bf16-head: embedding and output layer under autocast, the recurrence in fp32 (CharRNN's parts)
        with torch.autocast("cpu", dtype=bf16):
            e = model.drop(model.embedding(x))
        out, hidden = model.rnn(e.float(), hidden)
        with torch.autocast("cpu", dtype=bf16):
            return model.head(model.drop(out)), hidden

    def step(batch) -> float:
        logits, hidden = forward(batch[:, :-1], state["hidden"])  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        opt.step()
        state["hidden"] = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
        return loss.item()

    return step, state


def bf16_check(quick: bool, dataset: str | None, check_steps: int) -> dict:
    from poetgen.training.config import TrainConfig
    from poetgen.model.rnn import CharRNN, ModelConfig

    V, E, H, L, B, T = (67, 128, 128, 2, 16, 50) if quick else (67, 512, 512, 2, 64, 100)
    warmup, steps = (1, 3) if quick else (2, 6)
    config = TrainConfig()
    rng = np.random.default_rng(0)
    batches = torch.from_numpy(rng.integers(0, V, size=(warmup + steps, B, T + 1)))

    def build():
        torch.manual_seed(0)
        return CharRNN(ModelConfig(vocab_size=V, cell="lstm", layers=L, hidden=H, embed=E, dropout=0.0))

    out = {"model": f"poetgen CharRNN LSTM {L}x{H}, embed {E}, vocab {V}; batch {B} x seq {T}",
           "flops_per_char": lstm_train_flops_per_char(V, E, H, L), "threads": torch.get_num_threads()}
    for mode in ("fp32", "bf16", "bf16-head"):
        step, _ = make_step(build(), config, mode)
        try:
            for i in range(warmup):
                step(batches[i])
            times = []
            for i in range(steps):
                t = time.perf_counter()
                step(batches[warmup + i])
                times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            out[mode] = {"step_seconds": sec, "chars_per_sec": B * T / sec, "error": None}
        except RuntimeError as e:
            out[mode] = {"step_seconds": None, "chars_per_sec": None, "error": str(e).splitlines()[0][:200]}
        if mode == "bf16" and out[mode]["error"] is None:
            break  # the whole model runs in bf16: no need for the partial variant
    fp32 = out["fp32"]["chars_per_sec"]
    best_mode = max((m for m in ("bf16", "bf16-head") if m in out and out[m]["chars_per_sec"]),
                    key=lambda m: out[m]["chars_per_sec"], default=None)
    out["best_bf16_mode"] = best_mode
    out["speedup"] = out[best_mode]["chars_per_sec"] / fp32 if best_mode and fp32 else None
    out["val_delta"] = None
    if out["speedup"] and out["speedup"] >= 1.2 and dataset:  # near enough to the bar for its quality to matter
        out["val_delta"] = val_delta(dataset, config, best_mode, build, B, T, check_steps)
    out["qualifies"] = bool(out["speedup"] and out["speedup"] >= 1.5 and out["val_delta"] is not None
                            and abs(out["val_delta"]) <= 0.01)
    return out


def val_delta(dataset: str, config, mode: str, build, B: int, T: int, steps: int) -> float:
    """bf16 minus fp32 validation nats after `steps` identical steps from the same start on the dataset."""
    train = np.load(Path(dataset) / "train.npy").astype(np.int64)
    val = np.load(Path(dataset) / "val.npy").astype(np.int64)
    ids = np.concatenate([train, val])
    L = (len(train) - 1) // B
    losses = {}
    for m in ("fp32", mode):
        model = build()
        step, _ = make_step(model, config, m)
        for j in range(steps):
            k = (j * T) % (L - T)
            step(torch.from_numpy(np.stack([train[s * L + k : s * L + k + T + 1] for s in range(B)])))
        model.eval()
        losses[m], _ = score_recurrent(model, ids, len(train), len(ids))
    return losses[mode] - losses["fp32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("peak", "bf16"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dataset", help="bf16: a dataset for the validation-loss check")
    ap.add_argument("--check-steps", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = peak(args.quick) if args.what == "peak" else bf16_check(args.quick, args.dataset, args.check_steps)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
