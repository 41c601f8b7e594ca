"""A plain per-step nn.LSTM sampling loop: the anchor for poetgen's sampling speed (issue 7, target 4).

    python benchmarks/baselines/sample_loop.py [--quick] [--json]

Embedding (V x 128) -> nn.LSTM 2 x 256 -> Linear (256 -> V), V = 6,000 (about a simplified Tang vocabulary, as in
benchmarks/bench_sample.py), untrained. One forward call per character with the hidden state carried, softmax of
logits / temperature 1.0, torch.multinomial, the drawn ids fed back: what a user writes first. Characters per second
for 1 stream (400 characters) and 64 parallel streams (100 characters each), at 1 thread and at the given thread
count; the best of --repeats runs each.
"""

from __future__ import annotations

import time

from common import base_parser, report, setup_torch


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--vocab", type=int, default=6000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch = setup_torch(args.threads, args.seed)
    from torch import nn

    V = args.vocab
    emb, lstm, head = nn.Embedding(V, 128), nn.LSTM(128, 256, 2, batch_first=True), nn.Linear(256, V)
    repeats = 1 if args.quick else 3
    gen = torch.Generator().manual_seed(args.seed)

    def run(batch: int, length: int) -> float:
        with torch.inference_mode():
            x, hidden = torch.zeros(batch, 1, dtype=torch.long), None
            t = time.perf_counter()
            for _ in range(length):
                out, hidden = lstm(emb(x), hidden)
                probs = torch.softmax(head(out[:, -1]) / 1.0, dim=-1)  # (batch, V)
                x = torch.multinomial(probs, 1, generator=gen)  # (batch, 1)
            return batch * length / (time.perf_counter() - t)

    threads = sorted({1, torch.get_num_threads()})
    result = {"model": f"Embedding {V}x128 -> nn.LSTM 2x256 -> Linear 256x{V}, untrained", "threads": threads}
    for batch, length in ((1, 100 if args.quick else 400), (64, 30 if args.quick else 100)):
        best = 0.0
        for th in threads:
            torch.set_num_threads(th)
            run(batch, 5)  # warm-up
            best = max(best, max(run(batch, length) for _ in range(repeats)))
        result[f"chars_per_sec_{batch}"] = best
    report(result, args.json)


if __name__ == "__main__":
    main()
