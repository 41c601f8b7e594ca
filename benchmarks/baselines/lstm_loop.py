"""A plain nn.LSTM training loop: the throughput anchor for poetgen's training step (issue 7, target 3).

    python benchmarks/baselines/lstm_loop.py --hidden 512 --layers 2 --batch 64 --seq 100 [--json]

Embedding (V x E) -> nn.LSTM (layers x hidden, batch_first) -> nn.Linear (hidden -> V), cross-entropy, plain Adam;
the hidden state carried from step to step and detached (truncated backpropagation through time). Inputs are
random ids (speed does not depend on the values). After --warmup steps, --steps steps are timed one by one; the
median step gives characters per second and model FLOPs per second (common.lstm_train_flops_per_char).

Then the same step under torch.autocast("cpu", dtype=torch.bfloat16): its speed, or the error it raises (oneDNN
has no bf16 LSTM primitive on CPUs without bf16 support). --precision fp32 or bf16 measures one of the two only
(benchmarks/run.py alternates one precision per process with poetgen's loop); the other's figures are then None.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from common import base_parser, lstm_train_flops_per_char, report, setup_torch


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--embed", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    args = ap.parse_args()
    torch = setup_torch(args.threads, args.seed)
    from torch import nn
    import torch.nn.functional as F

    V, B, T = args.vocab, args.batch, args.seq
    emb = nn.Embedding(V, args.embed)
    lstm = nn.LSTM(args.embed, args.hidden, args.layers, batch_first=True)
    head = nn.Linear(args.hidden, V)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    data = torch.from_numpy(np.random.randint(0, V, size=(args.warmup + args.steps, B, T + 1)))
    state = {"hidden": None}

    def step(i: int, bf16: bool) -> float:
        batch = data[i % len(data)]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, hidden = lstm(emb(batch[:, :-1]), state["hidden"])
            logits = head(out)  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, V), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["hidden"] = tuple(h.detach() for h in hidden)
        return time.perf_counter() - t

    def measure(bf16: bool) -> list[float]:
        state["hidden"] = None
        for i in range(args.warmup):
            step(i, bf16)
        return [step(args.warmup + i, bf16) for i in range(args.steps)]

    flops_per_char = lstm_train_flops_per_char(V, args.embed, args.hidden, args.layers)
    result = {
        "model": f"Embedding {V}x{args.embed} -> nn.LSTM {args.layers}x{args.hidden} -> Linear {args.hidden}x{V}",
        "batch": B, "seq": T, "flops_per_char": flops_per_char, "threads": torch.get_num_threads(),
        "step_seconds": None, "step_times": None, "chars_per_sec": None, "gflops": None,
    }
    fp32 = None
    if args.precision in ("both", "fp32"):
        times = measure(False)
        fp32 = statistics.median(times)
        result.update(step_seconds=fp32, step_times=times, chars_per_sec=B * T / fp32,
                      gflops=flops_per_char * B * T / fp32 / 1e9)
    if args.precision in ("both", "bf16"):
        try:
            times = measure(True)
            bf16 = statistics.median(times)
            result.update(bf16_step_seconds=bf16, bf16_step_times=times, bf16_chars_per_sec=B * T / bf16,
                          bf16_gflops=flops_per_char * B * T / bf16 / 1e9,
                          bf16_speedup=fp32 / bf16 if fp32 else None, bf16_error=None)
        except RuntimeError as e:
            result.update(bf16_step_seconds=None, bf16_step_times=None, bf16_chars_per_sec=None, bf16_gflops=None,
                          bf16_speedup=None, bf16_error=str(e).splitlines()[0][:200])
    report(result, args.json)


if __name__ == "__main__":
    main()
