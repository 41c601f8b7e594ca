"""Ship a trained checkpoint as a package model: a compact file and its model card in poetgen/shipped/.

    python benchmarks/ship_model.py CKPT --name tang [--quantize int8] [--card card.json] [--set key=value ...]
        [--dataset DIR] [--eval] [--eval-source] [--threads 2]

1. Exports CKPT (a .ckpt file or run directory) with poetgen.checkpoint.compact.export_model into a temporary
   file, and compares it with CKPT on the first --compare-symbols symbols of the dataset's val split (numpy
   runtime, exact: KL, largest log-probability difference, change in cross-entropy). Refuses a file over
   --max-bytes (16 MB) before anything is written into the shipped directory.
2. --eval: the exact validation cross-entropy of the exported model on the dataset's val split through poetgen's
   eval library (poetgen.evaluation.scoring, the figures `poetgen eval` prints; cold and warm). --eval-source
   does the same for CKPT in fp32, for the card's comparison.
3. Writes <out-dir>/<name>.safetensors (the card embedded in its metadata) and <out-dir>/<name>.json (the card,
   with the file's SHA-256), then reads it back by name as `poetgen sample` does and times that.

The card is built from: fields the checkpoint records (model, data, steps, training time, train_config), this
machine and the repository's commit (when not given), the measurements above, then --card FILE (a JSON object)
and --set KEY=VALUE (JSON values, else strings; dotted keys nest: --set poems.copy_rate=0.012) on top, so what
you give wins. Give what only you know: "command", "machine" (if trained elsewhere), "poems" (poem metrics),
"weaknesses", "summary" (one line, shown when sample falls back to the model).

--dataset defaults to the dataset the checkpoint records. The card goes to stdout as JSON; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from poetgen.checkpoint.compact import MODEL_SUFFIX, QUANTIZE, export_model  # noqa: E402
from poetgen.checkpoint.format import find_checkpoint, read_model  # noqa: E402
from poetgen.checkpoint.shipped import ENV_SHIPPED, is_model_name, write_card  # noqa: E402
from poetgen.evaluation.units import LN2  # noqa: E402

MAX_BYTES = 16_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(card: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        card = card.setdefault(p, {})
        if not isinstance(card, dict):
            raise SystemExit(f"--set {key}: {p} is not an object in the card")
    card[last] = value


def merge(base: dict, given: dict) -> dict:
    """``given`` over ``base``, objects merged key by key."""
    out = dict(base)
    for k, v in given.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, {platform.system()}"


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def eval_figures(path: Path, dataset: Path) -> dict:
    from poetgen.evaluation.scoring import evaluate_checkpoint

    t = time.perf_counter()
    report = evaluate_checkpoint(path, [str(dataset)], split="val").to_dict()
    log(f"  eval of {path.name}: cold {report['cold']['nats_per_char']:.4f} nats/symbol, "
        f"{time.perf_counter() - t:.0f} s")
    report.pop("checkpoint", None)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--name", required=True, help="the shipped name (-c NAME), e.g. tang")
    ap.add_argument("--quantize", choices=QUANTIZE, default="int8")
    ap.add_argument("--card", help="a JSON file: the card's fields (command, machine, poems, weaknesses, ...)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one card field (repeatable)")
    ap.add_argument("--dataset", help="prepared dataset directory (default: the one the checkpoint records)")
    ap.add_argument("--eval", action="store_true", help="exact validation cross-entropy of the exported model")
    ap.add_argument("--eval-source", action="store_true", help="and of the fp32 checkpoint")
    ap.add_argument("--compare-symbols", type=int, default=32768)
    ap.add_argument("--out-dir", default=str(REPO / "poetgen" / "shipped"))
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for --eval")
    args = ap.parse_args()
    if not is_model_name(args.name):
        ap.error(f"--name {args.name!r}: letters, digits, '_', '.', '-' only")

    ckpt = find_checkpoint(args.checkpoint)
    src = read_model(ckpt)
    meta = src.data.get("dataset_meta") or {}
    dataset = Path(args.dataset or meta.get("path") or "")
    given = json.loads(Path(args.card).read_text(encoding="utf-8")) if args.card else {}
    if not isinstance(given, dict):
        raise SystemExit(f"{args.card} must hold a JSON object")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: KEY=VALUE")
        set_dotted(given, key, parse_value(value))

    ids = None
    if args.dataset or (meta.get("path") and Path(meta["path"]).is_dir()):
        from poetgen.data.dataset import load_dataset

        ds = load_dataset(dataset)
        if ds.vocab != src.vocab:
            raise SystemExit(f"{dataset} has another vocabulary than {ckpt}; give the dataset it was trained on")
        ids = ds.val[: args.compare_symbols]
    if (args.eval or args.eval_source) and ids is None:
        ap.error("--eval needs the dataset: give --dataset")

    out_dir = Path(args.out_dir)
    final = out_dir / f"{args.name}{MODEL_SUFFIX}"
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / final.name
        log(f"exporting {ckpt} ({args.quantize}) ...")
        rep = export_model(ckpt, trial, quantize=args.quantize, text=ids)
        log(f"  {rep.bytes:,} bytes ({rep.bytes / 2**20:.2f} MiB), {rep.parameters:,} parameters, "
            f"{rep.seconds:.2f} s")
        if rep.comparison is not None:
            c = rep.comparison
            log(f"  vs fp32 on {c.symbols:,} val symbols: CE {c.ce_reference:.5f} -> {c.ce_other:.5f} "
                f"({rep.ce_change:+.5f} nats), KL {c.kl:.2e}, max |d log p| {c.max_abs_logprob_diff:.3f} "
                f"(targets {c.max_abs_target_diff:.3f})")
        if rep.bytes > args.max_bytes:
            log(f"error: {rep.bytes:,} bytes is over --max-bytes {args.max_bytes:,}; nothing written to {out_dir}")
            return 1
        import torch

        torch.set_num_threads(args.threads)
        validation = eval_figures(trial, dataset) if args.eval else None
        source_validation = eval_figures(ckpt, dataset) if args.eval_source else None

    config = src.model_config
    state = (src.data.get("compact") or {}).get("source", {}).get("train_state") or src.data.get("train_state") or {}
    auto: dict = {
        "summary": f"{config.cell.upper()} {config.layers}x{config.hidden}, trained by poetgen on "
                   f"{meta.get('name') or 'its dataset'}",
        "model": {**{k: getattr(config, k) for k in ("cell", "layers", "hidden", "embed", "head", "div_value")},
                  "cutoffs": list(config.cutoffs), "vocab_size": config.vocab_size, "parameters": rep.parameters},
        "data": {k: meta[k] for k in ("name", "fingerprint", "options") if k in meta},
        "commit": commit(),
        "machine": machine(),
        "training": {"steps": state.get("step"), "seconds": state.get("elapsed"),
                     "tokens_seen": state.get("tokens_seen"), "best_val_loss": state.get("best_val_loss"),
                     "best_step": state.get("best_step"), "train_config": src.data.get("train_config") or {}},
        "export": {"quantize": args.quantize, "source": ckpt.name, "source_bytes": rep.source_bytes,
                   "tensors": rep.tensors},
    }
    if rep.comparison is not None:
        auto["export"]["vs_fp32"] = {**vars(rep.comparison), "ce_change": rep.ce_change, "text": "val split head"}
    if validation is not None:
        cold = validation["cold"]
        auto["validation"] = {"nats_per_char": cold["nats_per_char"], "bits_per_char": cold["nats_per_char"] / LN2,
                              "figure": "cold (training's val loss; `poetgen eval`'s first figure)", **validation}
    if source_validation is not None:
        auto["validation_fp32_source"] = source_validation
    card = merge(auto, given)

    export_model(ckpt, final, quantize=args.quantize, card=card)  # the same tensors as the trial, card embedded
    card_path = write_card(final, card)
    log(f"wrote {final} and {card_path}")

    os.environ[ENV_SHIPPED] = str(out_dir)  # read it back by name, as `poetgen sample -c NAME` does
    from poetgen.model.runtime import Runtime

    times, runtime_times = [], []
    for _ in range(5):
        t = time.perf_counter()
        mf = read_model(args.name)
        t1 = time.perf_counter()
        Runtime(mf.model_config, mf.weights, mf.vocab, mf.path)
        times.append(t1 - t)
        runtime_times.append(time.perf_counter() - t1)
    log(f"read back by name: read_model (hash check, dequantize) median {statistics.median(times) * 1000:.0f} ms, "
        f"Runtime build median {statistics.median(runtime_times) * 1000:.0f} ms")
    full = json.loads(card_path.read_text(encoding="utf-8"))
    full["_measured_load"] = {"read_model_ms": [round(t * 1000, 1) for t in times],
                              "runtime_build_ms": [round(t * 1000, 1) for t in runtime_times]}
    print(json.dumps(full, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
