"""`poetgen serve` as a user meets it: the server started as a subprocess on a free port of 127.0.0.1 with a tiny
model (and a tiny pair model for POST /v1/couplets), then real HTTP. Also the pieces under it: Runtime.append / fork
and the batcher's time limit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, make_dataset

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
OTHER = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
ARTIFACTS = REPO / "tests" / "artifacts"


# --- a tiny model and a server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """An LSTM trained 60 steps on two poems (seconds): its 40-symbol vocabulary can write every form."""
    from poetgen.data.dataset import load_dataset
    from poetgen.training.config import TrainConfig
    from poetgen.training.loop import train

    root = tmp_path_factory.mktemp("serve")
    ds = load_dataset(make_dataset(root / "tiny", [POEM if i % 2 == 0 else OTHER for i in range(40)], [POEM, OTHER]))
    train(TrainConfig(cell="lstm", layers=1, hidden=32, embed=16, dropout=0.0, batch_size=4, seq_len=32, lr=2e-2,
                      warmup_steps=5, eval_every=1000, sample_every=0, log_every=1, max_steps=60), ds, root / "run")
    return root / "run" / "best.ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, *flags: str, log: Path | None = None):
    """`poetgen serve -c model --port P flags...` until the block ends; -> (base URL, path of its stderr log)."""
    port = free_port()
    log = log or model.parent / f"serve-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "poetgen", "serve", "-c", str(model), "--port", str(port),
                                 *flags], stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=model.parent)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield base, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(model_path):
    with running_server(model_path) as (base, log):
        yield base, log


def request(url: str, body: bytes | None = None, method: str | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """-> (status, headers, body), for every status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get(url: str) -> tuple[int, dict]:
    status, _, body = request(url)
    return status, json.loads(body)


def post(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
    status, _, answer = request(url, body, "POST", {"Content-Type": "application/json"})
    return status, json.loads(answer)


def stream(url: str) -> list[tuple[str, dict]]:
    """The Server-Sent Events of a GET, as (event name, data)."""
    status, headers, body = request(url)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, body)
    events = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def poetgen_sample(model: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poetgen", "sample", "-c", str(model), "-q", *flags],
                          capture_output=True, text=True, timeout=120)


def query(**params) -> str:
    from urllib.parse import urlencode

    return urlencode({k: v for k, v in params.items()})


# --- the endpoints ----------------------------------------------------------------------------------------------


def test_healthz_models_stats_openapi_and_page(server, model_path):
    base, _ = server
    assert get(base + "/healthz") == (200, {"status": "ok", "models": ["run"]})
    status, models = get(base + "/v1/models")
    assert status == 200 and models["default"] == "run"
    (m,) = models["models"]
    assert (m["name"], m["kind"], m["vocab_size"], m["cell"], m["card"]) == ("run", "poem", 40, "lstm", None)
    status, stats = get(base + "/v1/stats")
    assert status == 200 and {"steps", "mean_batch", "max_batch", "rejected"} <= set(stats["models"]["run"])
    status, schema = get(base + "/openapi.json")
    assert status == 200 and "/v1/poems" in schema["paths"] and "/v1/poems/stream" in schema["paths"]
    status, headers, page = request(base + "/")
    html = page.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "/v1/poems/stream" in html and 'name="viewport"' in html
    assert "http://" not in html and "https://" not in html  # nothing loaded from elsewhere


@pytest.mark.parametrize("flags, body", [
    (["--form", "五绝", "--seed", "11", "--prime", "床"], {"form": "五绝", "seed": 11, "prime": "床"}),
    (["--acrostic", "明月白日", "--form", "七绝", "--seed", "3", "--rhyme"],
     {"acrostic": "明月白日", "form": "七绝", "seed": 3, "rhyme": True}),
    (["--length", "30", "--seed", "5", "--temperature", "1.2", "--top-k", "9", "--repetition-penalty", "1.3"],
     {"length": 30, "seed": 5, "temperature": 1.2, "top_k": 9, "repetition_penalty": 1.3}),
])
def test_a_seeded_request_served_alone_is_poetgen_sample_s_poem(server, model_path, flags, body):
    """Fewer row-steps than the vocabulary's 40 symbols: `poetgen sample` runs without its lookup table, as the
    server always does, so the numbers are the same to the bit (see poetgen.serving.batcher)."""
    base, _ = server
    cli = poetgen_sample(model_path, "--json", *flags)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    status, got = post(base + "/v1/poems", body)
    assert status == 200, got
    (poem,) = got["poems"]
    assert (poem["text"], poem["mean_logprob"], poem["tokens"], got["seed"]) == (
        want["text"], want["mean_logprob"], want["tokens"], want["seed"])
    assert got["settings"] == {k: v for k, v in want["settings"].items() if k != "checkpoint"}


def test_the_stream_is_the_same_poem_character_by_character(server):
    base, _ = server
    events = stream(base + "/v1/poems/stream?" + query(form="七绝", acrostic="明月白日", seed=8, prime="明"))
    assert events[0] == ("start", {"model": "run", "seed": 8})
    pieces = [data["text"] for name, data in events if name == "message"]
    assert all(len(p) == 1 for p in pieces[1:]) and pieces[0] == "明"  # the prime, then a character per event
    name, done = events[-1]
    status, posted = post(base + "/v1/poems", {"form": "七绝", "acrostic": "明月白日", "seed": 8, "prime": "明"})
    assert name == "done" and status == 200
    assert "".join(pieces) == posted["poems"][0]["text"] == done["poems"][0]["text"]
    lines = posted["poems"][0]["text"].replace("。", "，").split("，")[:-1]
    assert [line[0] for line in lines] == list("明月白日") and all(len(line) == 7 for line in lines)


def test_n_best_of_beam_and_script(server):
    base, _ = server
    status, got = post(base + "/v1/poems", {"form": "五绝", "n": 3, "seed": 2})
    assert status == 200 and len(got["poems"]) == 3 and all(p["ended"] for p in got["poems"])
    for options in ({"best_of": 3}, {"beam": 3, "n": 2}):
        status, got = post(base + "/v1/poems", {"form": "五绝", "seed": 2, **options})
        assert status == 200 and len(got["poems"]) == options.get("n", 1), got
        assert all(len(p["text"]) == 24 for p in got["poems"])
    from poetgen.data.normalize import convert_script

    simplified = post(base + "/v1/poems", {"form": "五律", "seed": 4})[1]["poems"][0]["text"]
    status, got = post(base + "/v1/poems", {"form": "五律", "seed": 4, "output_script": "traditional"})
    traditional = got["poems"][0]["text"]
    assert status == 200 and traditional == convert_script(simplified, "traditional") != simplified


def test_errors_are_json_with_the_status_a_client_expects(server, model_path):
    base, _ = server
    cli = poetgen_sample(model_path, "--temperature", "-1")
    assert cli.returncode == 1
    cases = [
        ({"temperature": -1}, 400, cli.stderr.strip().removeprefix("Error: ")),  # the CLI's own words
        ({"form": "五绝", "rhyme_group": "东"}, 400, "--rhyme-group applies to --rhyme"),
        ({"acrostic": "龙"}, 400, "the acrostic has character(s) not in the model's vocabulary: '龙'"),
        ({"temperatur": 1}, 400, "unknown option 'temperatur'"),
        ({"temperature": "hot"}, 400,
         "temperature: Input should be a valid number, unable to parse string as a number"),
        ({"n": 99}, 400, "n must be at most 16 on this server (--max-n), got 99"),
        ({"acrostic": "明月" * 200}, 400,
         "the poem needs 3201 symbols, more than this server allows (--max-length 1000)"),
        (b"{not json", 400, None),
        (b"[1, 2]", 400, "the body must be a JSON object of options"),
        ({"model": "nope"}, 404, "no model named 'nope' on this server (loaded: run)"),
        (b"{" + b" " * 20000 + b"}", 413, "the request body is over 16,384 bytes (--max-body)"),
    ]
    for payload, code, message in cases:
        status, answer = post(base + "/v1/poems", payload)
        assert status == code, (payload, answer)
        assert set(answer) == {"error"} and (message is None or answer["error"] == message), answer
    assert get(base + "/v1/poems/stream?n=2")[0] == 400
    assert get(base + "/v1/poems/stream?model=nope")[0] == 404
    assert get(base + "/no/such/page") == (404, {"error": "no such page: /no/such/page"})
    status, answer = post(base + "/v1/couplets", {"prime": "明月"})
    assert status == 404 and "start poetgen serve with -c PAIR_CKPT" in answer["error"], answer
    # A body without a Content-Length (chunked) is cut off as soon as it passes the cap.
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/poems HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 8000
        for _ in range(3):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b"0\r\n\r\n")
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(4096):  # the server closes the connection after a 413
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and json.loads(body) == {
        "error": "the request body is over 16,384 bytes (--max-body)"}


def test_concurrent_requests_decode_together(server):
    base, log = server
    before = get(base + "/v1/stats")[1]["models"]["run"]
    results: dict[int, tuple] = {}

    def ask(i: int) -> None:
        results[i] = post(base + "/v1/poems", {"form": "七律", "seed": i, "temperature": 1.0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(24)) and all(s == 200 for s, _ in results.values())
    assert all(len(a["poems"][0]["text"]) == 64 and a["seed"] == i for i, (_, a) in results.items())
    after = get(base + "/v1/stats")[1]["models"]["run"]
    steps = after["steps"] - before["steps"]
    rows = after["rows_stepped"] - before["rows_stepped"]
    assert after["requests"] - before["requests"] == 24
    # 24 poems of 65 symbols each would take 24 x 64 steps one at a time: together, far fewer.
    assert after["max_requests"] > 1 and rows == 24 * 64 and steps < 24 * 64 / 2, after
    assert "POST /v1/poems 200" in log.read_text()  # one line per request: method, path, status, ms
    line = next(x for x in log.read_text().splitlines() if "POST /v1/poems 200" in x)
    assert line.endswith(" ms")


def test_a_full_queue_answers_503_and_cors_is_off_unless_asked(model_path, tmp_path):
    with running_server(model_path, "--max-batch", "1", "--queue", "1", "--cors", "https://poems.example") as (
            base, _):
        answers: list[tuple[int, dict]] = []
        barrier = threading.Barrier(16)

        def ask(i: int) -> None:
            # 120 lines of 5 (the acrostic's form allows no early end): ~100 ms each, while the others arrive
            barrier.wait()
            answers.append(post(base + "/v1/poems", {"acrostic": "明月" * 60, "line_length": 5, "seed": i}))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(s for s, _ in answers)
        assert set(codes) == {200, 503} and len(codes) == 16, codes
        busy = next(a for s, a in answers if s == 503)
        assert busy == {"error": "the server is busy: 1 request(s) already wait for this model (--queue); "
                                 "try again shortly"}
        assert get(base + "/v1/stats")[1]["models"]["run"]["rejected"] == codes.count(503)
        _, headers, _ = request(base + "/healthz", headers={"Origin": "https://poems.example"})
        assert headers.get("access-control-allow-origin") == "https://poems.example"


def test_no_cors_header_by_default(server):
    base, _ = server
    _, headers, _ = request(base + "/healthz", headers={"Origin": "https://poems.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_serve_refuses_bad_flags():
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch must be at least 1" in result.output


# --- 对句: a pair model beside the poem model ---------------------------------------------------------------------

# The toy task of test_seq2seq: each character through a fixed table (天 -> 地 ...); some first lines have a comma.
SOURCE = "天地山水风雨花月日云春秋江河"
TABLE = dict(zip(SOURCE, "地天水山雨风月花云日秋春河江"))


@pytest.fixture(scope="module")
def pair_path(tmp_path_factory) -> Path:
    """A GRU encoder-decoder trained 40 steps on 400 toy pairs (about a second): far from exact, but a model."""
    import random

    from poetgen.data.dataset import load_dataset
    from poetgen.data.prepare import PrepareOptions, prepare
    from poetgen.training.config import TrainConfig
    from poetgen.training.loop import train

    root = tmp_path_factory.mktemp("couplets")
    rng, rows = random.Random(1), []
    for _ in range(400):
        first = "".join(rng.choice(SOURCE) for _ in range(rng.choice((4, 5))))
        if rng.random() < 0.3:
            first = first[:2] + "，" + first[2:]
        rows.append(f"{first}\t{''.join(TABLE.get(c, c) for c in first)}\n")
    (root / "pairs.tsv").write_text("".join(rows), encoding="utf-8")
    prepare([str(root / "pairs.tsv")], root / "data", PrepareOptions(pairs=True, val_fraction=0.05))
    train(TrainConfig(cell="gru", layers=1, hidden=32, embed=16, dropout=0.0, batch_size=32, max_steps=40, lr=1e-2,
                      warmup_steps=5, eval_every=1000, sample_every=0, device="cpu", threads=1),
          load_dataset(root / "data"), root / "pairs")
    return root / "pairs" / "best.ckpt"


@pytest.fixture(scope="module")
def pair_server(pair_path, model_path):
    """The pair model first (requests to /v1/poems still go to the poem model), one request taken at a time."""
    with running_server(pair_path, "-c", str(model_path), "--queue", "1") as (base, log):
        yield base, log


def test_the_pair_model_is_listed_as_couplet_and_the_poem_model_keeps_its_kind(pair_server, pair_path):
    base, _ = pair_server
    status, models = get(base + "/v1/models")
    assert status == 200 and (models["default"], models["default_couplet"]) == ("run", "pairs")
    pair, poem = models["models"]
    assert (pair["name"], pair["kind"], pair["cell"], pair["hidden"], pair["attention"]) == (
        "pairs", "couplet", "gru", 32, "dot")
    from poetgen.checkpoint.torch_io import load_checkpoint

    assert pair["vocab_size"] == len(load_checkpoint(pair_path).vocab) and pair["path"] == str(pair_path)
    assert (poem["name"], poem["kind"]) == ("run", "poem")
    assert "/v1/couplets" in get(base + "/openapi.json")[1]["paths"]
    status, got = post(base + "/v1/poems", {"form": "五绝", "seed": 1})  # no model named: the poem model
    assert status == 200 and got["model"] == "run" and len(got["poems"][0]["text"]) == 24


def test_answers_keep_the_first_line_s_length_and_punctuation(pair_server):
    base, _ = pair_server
    status, got = post(base + "/v1/couplets", {"primes": ["天地，山水风", "春秋"], "seed": 3, "n": 2})
    assert status == 200, got
    assert got["model"] == "pairs" and got["seed"] == 3 and len(got["answers"]) == 2
    for first, group in zip(["天地，山水风", "春秋"], got["answers"]):
        assert [a["rank"] for a in group] == [0, 1]
        for a in group:
            assert a["first"] == first and len(a["text"]) == len(first)
            assert all((x == "，") == (y == "，") and x != y for x, y in zip(first, a["text"]) if x != "，")
            assert a["mean_logprob"] == pytest.approx(a["logprob"] / len(first)) and a["logprob"] < 0


def test_a_seed_gives_answer_lines_answers_and_poetgen_sample_s(pair_server, pair_path):
    from typer.testing import CliRunner

    from poetgen.checkpoint.torch_io import load_model
    from poetgen.cli.app import app
    from poetgen.generation.couplet import CoupletOptions, answer_lines

    base, _ = pair_server
    body = {"prime": "天地山水风", "seed": 7, "n": 3, "temperature": 1.2, "top_k": 5}
    status, got = post(base + "/v1/couplets", body)
    assert status == 200 and got["seed"] == 7, got
    again = post(base + "/v1/couplets", body)[1]
    assert again["answers"] == got["answers"] and len({a["text"] for a in got["answers"][0]}) > 1
    model, ckpt = load_model(pair_path)
    (group,) = answer_lines(model, ckpt.vocab, ["天地山水风"], CoupletOptions(temperature=1.2, top_k=5, num_samples=3,
                                                                             seed=7))
    assert [a["text"] for a in got["answers"][0]] == [a.text for a in group]
    assert [a["logprob"] for a in got["answers"][0]] == pytest.approx([a.logprob for a in group])
    cli = CliRunner().invoke(app, ["sample", "-c", str(pair_path), "--prime", "天地山水风", "--seed", "7", "-q"])
    assert cli.exit_code == 0, cli.output
    status, default = post(base + "/v1/couplets", {"prime": "天地山水风", "seed": 7})  # the CLI's defaults (-t 0.8)
    assert status == 200 and cli.stdout == default["answers"][0][0]["text"] + "\n"
    status, unseeded = post(base + "/v1/couplets", {"prime": "天地山水风"})
    assert status == 200 and isinstance(unseeded["seed"], int)  # drawn, and reported
    status, greedy = post(base + "/v1/couplets", {"prime": "天地山水风", "temperature": 0})
    assert status == 200 and greedy["seed"] is None  # nothing drawn


def test_beam_answers_are_the_best_first(pair_server):
    base, _ = pair_server
    status, got = post(base + "/v1/couplets", {"prime": "江河日月", "beam": 6, "n": 4})
    assert status == 200, got
    (group,) = got["answers"]
    scores = [a["logprob"] for a in group]
    assert len(group) == 4 and scores == sorted(scores, reverse=True) and len({a["text"] for a in group}) == 4
    assert post(base + "/v1/couplets", {"prime": "江河日月", "beam": 6, "n": 4})[1]["answers"] == got["answers"]


def test_couplet_errors_are_json_with_the_cli_s_words(pair_server, pair_path):
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    base, _ = pair_server
    cli = CliRunner().invoke(app, ["sample", "-c", str(pair_path), "--prime", "天地", "-t", "-1", "-q"])
    assert cli.exit_code == 1
    long_line = "天地" * 501
    cases = [
        ({"prime": "天地", "temperature": -1}, 400, cli.output.strip().removeprefix("Error: ")),
        ({"prime": "天地", "beam": 2, "n": 3}, 400, "-n 3 asks for more answers than the beam's 2 hypotheses"),
        ({"prime": "天地龘"}, 400, "the first line has character(s) not in the model's vocabulary: '龘'"),
        ({"prime": " "}, 400, "a first line to answer is empty"),
        ({"primes": ["天地", ""]}, 400, "a first line to answer is empty"),
        ({}, 400, "give the first line to answer: prime, or primes (a list)"),
        ({"prime": "天地", "primes": ["山水"]}, 400, "give prime or primes, not both"),
        ({"prime": "天地", "form": "五绝"}, 400, "unknown option 'form'"),
        ({"prime": "天地", "n": 17}, 400, "n must be at most 16 on this server (--max-n), got 17"),
        ({"prime": "天地", "beam": 65}, 400, "beam must be at most 64 on this server (--max-batch), got 65"),
        ({"primes": ["天地"] * 9, "n": 8}, 400, "primes x n must be at most 64 on this server (--max-batch), got 72"),
        ({"prime": long_line}, 400,
         "a first line may have at most 1000 characters on this server (--max-length), got 1002"),
        ({"prime": "天地", "model": "nope"}, 404, "no model named 'nope' on this server (loaded: pairs, run)"),
        ({"prime": "天地", "model": "run"}, 400,
         "model 'run' writes poems, not couplets: ask it with POST /v1/poems (or GET /v1/poems/stream)"),
        (b"{" + b" " * 20000 + b"}", 413, "the request body is over 16,384 bytes (--max-body)"),
    ]
    for payload, code, message in cases:
        status, answer = post(base + "/v1/couplets", payload)
        assert (status, answer) == (code, {"error": message}), payload
    other = "model 'pairs' is a pair (对句) model, which answers a first line: ask it with POST /v1/couplets"
    assert post(base + "/v1/poems", {"model": "pairs"}) == (400, {"error": other})
    assert get(base + "/v1/poems/stream?model=pairs") == (400, {"error": other})


def test_a_couplet_request_while_another_decodes_is_answered_503(pair_server):
    """--queue 1: while a long request decodes, the next is refused at once; then the server takes requests again."""
    base, _ = pair_server
    slow: list = []
    thread = threading.Thread(target=lambda: slow.append(post(base + "/v1/couplets", {
        "primes": ["天地山水风雨花月日云春秋江河" * 10] * 8, "beam": 8})))
    thread.start()
    deadline = time.monotonic() + 30
    while get(base + "/v1/stats")[1]["models"]["pairs"]["waiting"] == 0 and not slow:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    busy = post(base + "/v1/couplets", {"prime": "天地"})
    thread.join()
    assert busy == (503, {"error": "the server is busy: 1 request(s) already wait for this model (--queue); "
                                   "try again shortly"}), (busy, slow)
    (status, got), = slow
    assert status == 200 and [len(g) for g in got["answers"]] == [1] * 8 and len(got["answers"][0][0]["text"]) == 140
    assert post(base + "/v1/couplets", {"prime": "天地"})[0] == 200
    stats = get(base + "/v1/stats")[1]["models"]["pairs"]
    assert stats["rejected"] == 1 and stats["waiting"] == 0


def test_a_poem_only_server_does_not_import_torch(model_path):
    """torch takes seconds to import: only a pair model, which runs in torch, brings it in."""
    code = ("import sys; from poetgen.serving.app import create_app; from poetgen.serving.batcher import Limits; "
            "from poetgen.serving.models import load_models; models, _ = load_models([sys.argv[1]], Limits()); "
            "create_app(models); print(models[0].kind, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["poem", "False"], out.stderr


# --- the pieces under the server ---------------------------------------------------------------------------------


def test_runtime_append_adds_rows_whose_numbers_are_prefix_s_and_fork_has_its_own_state(model_path):
    from poetgen.generation.engines import load_runtime

    rt = load_runtime(model_path)
    alone = load_runtime(model_path)
    first = rt.prefix([[0, 5, 9]]).copy()
    rt.step(np.array([3]))
    held = rt.hidden()[0].copy()
    new = rt.append([[0, 7], [0, 3, 4, 5]])
    assert rt.batch == 3 and np.array_equal(rt.hidden()[0][:, :1], held)  # the old row kept its state
    assert np.array_equal(new, alone.prefix([[0, 7], [0, 3, 4, 5]]))
    assert np.array_equal(rt.step(np.array([1, 2, 3]))[1:], alone.step(np.array([2, 3])))
    other = rt.fork()
    assert other.batch == 0 and rt.batch == 3
    assert np.array_equal(other.prefix([[0, 5, 9]]), first) and rt.batch == 3


def test_with_no_model_named_the_shipped_tang_comes_first_else_the_newest_run(model_path, tmp_path, monkeypatch):
    from poetgen.checkpoint.compact import export_model
    from poetgen.checkpoint.shipped import ENV_SHIPPED, write_card
    from poetgen.serving.batcher import Limits
    from poetgen.serving.models import load_models

    run = tmp_path / "checkpoints" / "poems"
    run.mkdir(parents=True)
    shutil.copy(model_path, run / "best.ckpt")
    shipped = tmp_path / "shipped"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_SHIPPED, str(shipped))  # empty: no shipped model
    models, notes = load_models([], Limits())
    assert [m.name for m in models] == ["poems"] and "newest run" in notes[0]
    models[0].batcher.stop()
    export_model(model_path, shipped / "tang.safetensors", card={"summary": "test"})
    write_card(shipped / "tang.safetensors", {"summary": "test"})
    models, notes = load_models([], Limits())
    assert [m.name for m in models] == ["tang"] and models[0].card["summary"] == "test"
    assert models[0].describe()["card"]["summary"] == "test" and "shipped model tang" in notes[0]
    models[0].batcher.stop()
    models, _ = load_models([str(run), "tang", str(run / "best.ckpt")], Limits())  # names: run dir, shipped, again
    assert [m.name for m in models] == ["poems", "tang", "poems-2"]
    for m in models:
        m.batcher.stop()


class RowWise:
    """A model whose scores for a row depend on that row's own symbols only, with no product across rows: decoded
    beside others, a request's numbers are then exactly its numbers alone, so a batch's bookkeeping (groups of
    options, forms stepped together, rows leaving) can be held to ``generate``'s output to the bit."""

    def __init__(self, V: int):
        self.V, self.state = V, np.zeros(0, dtype=np.uint64)

    def _scores(self) -> np.ndarray:
        return np.stack([np.random.default_rng(int(h)).standard_normal(self.V).astype(np.float32) * 3
                         for h in self.state]).reshape(len(self.state), self.V)

    def _feed(self, state: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return (state * np.uint64(1_000_003) + tokens.astype(np.uint64) + np.uint64(1)) % np.uint64(2**61 - 1)

    def prefix(self, prefixes: list[list[int]]) -> np.ndarray:
        self.state = np.zeros(len(prefixes), dtype=np.uint64)
        for u, ids in enumerate(prefixes):
            for i in ids:
                self.state[u : u + 1] = self._feed(self.state[u : u + 1], np.array([i]))
        return self._scores()

    def append(self, prefixes: list[list[int]]) -> np.ndarray:
        held = self.state
        scores = self.prefix(prefixes)
        self.state = np.concatenate([held, self.state])
        return scores

    def select(self, index: np.ndarray) -> None:
        self.state = self.state[index]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.state = self._feed(self.state, tokens)
        return self._scores()

    def fork(self) -> RowWise:
        return RowWise(self.V)


def test_requests_decoded_together_are_each_what_generate_writes_alone(model_path):
    """Sixteen requests of different forms and options (n > 1, an acrostic that rhymes, a prime, greedy, top-k,
    top-p, a repetition penalty, rows that end early) joined into one batch: each answer is generate's, to the bit,
    and the stream of one is its poem."""
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions, generate
    from poetgen.serving.batcher import Batcher

    vocab = open_model(model_path, "cpu").vocab
    asks = [("", SampleOptions(form="五绝", seed=s)) for s in range(5)] + [
        ("", SampleOptions(form="七绝", acrostic="明月白日", rhyme=True, seed=3, num_samples=3)),
        ("白日", SampleOptions(form="五绝", seed=4, num_samples=2)),
        ("", SampleOptions(form="五律", temperature=1.0, top_k=5, seed=5)),
        ("", SampleOptions(form="五绝", temperature=0, seed=6)),
        ("", SampleOptions(length=12, num_samples=3, top_p=0.9, seed=7)),
        ("床前", SampleOptions(length=10, num_samples=2, repetition_penalty=1.3, seed=8)),
        ("", SampleOptions(length=30, temperature=1.5, num_samples=4, seed=9)),  # some rows draw <eot> early
    ] + [("", SampleOptions(form="七律", seed=s, style="明月")) for s in range(10, 14)]
    batcher = Batcher(RowWise(len(vocab)), vocab)  # started once every request waits: one batch
    answers: dict[int, tuple] = {}
    pieces: list[str] = []
    for i, (prime, o) in enumerate(asks):
        batcher.submit(prime, o, lambda r, e, i=i: answers.setdefault(i, (r, e)),
                       pieces.append if i == 5 else None)
    batcher.start()
    deadline = time.monotonic() + 60
    while len(answers) < len(asks) and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert batcher.stats.max_requests == len(asks) and batcher.stats.steps < 70
    ended_early = 0
    for i, (prime, o) in enumerate(asks):
        result, error = answers[i]
        assert error is None, error
        want = generate(RowWise(len(vocab)), vocab, [prime], o)
        assert [(s.text, s.mean_logprob, s.tokens, s.ended) for s in result.samples] == [
            (s.text, s.mean_logprob, s.tokens, s.ended) for s in want.samples], (prime, o)
        assert result.seed == o.seed and len(result.samples) == o.num_samples
        ended_early += sum(s.ended and s.tokens < 30 for s in result.samples) if o.length == 30 else 0
    assert ended_early > 0  # rows left the batch before their request's end
    assert "".join(pieces) == answers[5][0].samples[0].text


def test_tuned_threads_are_chosen_apart_for_bursts_and_single_requests(monkeypatch):
    """bench_serve's load on a tuned server (--threads 0): rounds of 64 one-row requests one at a time, where two
    threads lose, then 64 at once, where they halve the step. The bursts move to two threads, the single requests
    stay on one."""
    import poetgen.generation.threads as threads
    from poetgen.serving.batcher import _Tuners

    count = [1]  # OpenBLAS's thread count, faked
    monkeypatch.setattr(threads, "_openblas", lambda: (lambda n: count.__setitem__(0, n), lambda: count[0]))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    per_row = {(1, 1): 2e-3, (1, 2): 2.5e-3, (64, 1): 0.33e-3, (64, 2): 0.18e-3}  # (rows, threads) -> seconds
    tuners = _Tuners(None)
    used: dict[int, list[int]] = {1: [], 64: []}
    for _ in range(6):
        for _ in range(64):
            tuners.idle()
            for _ in range(24):
                with tuners.step(1):
                    used[1].append(count[0])
                    now[0] += per_row[1, count[0]]
        tuners.idle()
        for _ in range(25):
            with tuners.step(64):
                used[64].append(count[0])
                now[0] += 64 * per_row[64, count[0]]
    assert used[64][:25] == [1] * 25  # before the warm-up, one thread
    assert used[64][-50:].count(2) >= 40  # then two, one thread tried again now and then
    assert used[1].count(2) < 0.02 * len(used[1])  # a few lost trials


def test_a_request_is_planned_on_the_event_loop_only_when_that_is_quick(model_path):
    """The server submits a request from its event loop when planning it takes microseconds (texts the model knows,
    a form whose masks are built), and from a worker thread otherwise (masks to build, a script to convert)."""
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions
    from poetgen.serving.batcher import Batcher

    opened = open_model(model_path, "cpu")
    batcher = Batcher(opened.model, opened.vocab)  # not started: requests only queue
    wujue, acrostic = SampleOptions(form="五绝", seed=1), SampleOptions(acrostic="明月白日", rhyme=True, seed=1)
    assert batcher.plans_quickly("", SampleOptions(length=9)) and batcher.plans_quickly("白日", SampleOptions())
    assert not batcher.plans_quickly("", wujue) and not batcher.plans_quickly("", acrostic)
    batcher.submit("", wujue, lambda r, e: None)
    batcher.submit("", acrostic, lambda r, e: None)
    assert batcher.plans_quickly("床前", wujue) and batcher.plans_quickly("", acrostic)
    assert not batcher.plans_quickly("", SampleOptions(form="五绝", rhyme=True))  # other masks
    assert not batcher.plans_quickly("牀前", wujue)  # 牀 is not in the vocabulary: OpenCC may convert it
    assert not batcher.plans_quickly("", SampleOptions(style="夜"))


def test_the_batcher_keeps_only_the_recent_constraints(model_path):
    """Every acrostic is a constraint of its own: a server keeps the most recent few, not one per client's whim."""
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions, constraint_key
    from poetgen.serving.batcher import Batcher, ConstraintCache

    cache = ConstraintCache(size=2)
    cache[("a",)], cache[("b",)] = 1, 2
    assert cache.get(("a",)) == 1  # used: now the most recent
    cache[("c",)] = 3
    assert ("b",) not in cache and cache.get(("a",)) == 1 and cache.get(("c",)) == 3 and len(cache) == 2
    opened = open_model(model_path, "cpu")
    batcher = Batcher(opened.model, opened.vocab)  # not started: requests only queue
    batcher._constraints = ConstraintCache(size=3)
    heads = "床前明月光疑是地上霜"
    for i in range(len(heads) - 3):
        options = SampleOptions(acrostic=heads[i:i + 4], seed=1)
        batcher.submit("", options, lambda r, e: None)
        assert constraint_key(options, options.acrostic) in batcher._constraints
    assert len(batcher._constraints) == 3


def test_a_failure_in_the_batcher_answers_the_requests_it_held(model_path, monkeypatch):
    """A bug must not leave a client waiting: the request that was joining the batch gets the error."""
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions
    from poetgen.serving.batcher import Batcher

    opened = open_model(model_path, "cpu")

    def broken(prefixes):
        raise RuntimeError("broken append")

    monkeypatch.setattr(opened.model, "append", broken)
    batcher = Batcher(opened.model, opened.vocab).start()
    done = threading.Event()
    box: list = []
    batcher.submit("", SampleOptions(form="五绝", seed=1), lambda r, e: (box.append((r, e)), done.set()))
    assert done.wait(10)
    batcher.stop()
    ((result, error),) = box
    assert result is None and str(error) == "broken append" and batcher.stats.failed == 1


def test_a_request_past_its_time_limit_is_stopped(model_path):
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions
    from poetgen.serving.batcher import Batcher, Limits, TimedOut

    opened = open_model(model_path, "cpu")
    batcher = Batcher(opened.model, opened.vocab, Limits(timeout=1e-9)).start()
    done = threading.Event()
    box: list = []
    batcher.submit("", SampleOptions(form="七律", seed=1), lambda r, e: (box.append((r, e)), done.set()))
    assert done.wait(10)
    ((result, error),) = box
    batcher.stop()
    assert result is None and isinstance(error, TimedOut) and "--timeout" in str(error)
    assert batcher.stats.failed == 1


# --- a real browser ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_the_page_writes_a_qijue_acrostic_in_a_browser(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    base, _ = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's screen
            page.goto(base + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length > 0")
            page.select_option("#form", "七绝")
            page.fill("#acrostic", "明月白日")
            page.click("#write")
            page.wait_for_function("document.getElementById('poem').dataset.state === 'done'", timeout=30000)
            text = page.inner_text("#poem")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert page.evaluate("document.body.scrollWidth <= window.innerWidth")  # no sideways scrolling
        finally:
            browser.close()
    lines = [line.strip("，。") for line in text.splitlines() if line.strip()]
    assert len(lines) == 4 and all(len(line) == 7 for line in lines), text
    assert [line[0] for line in lines] == list("明月白日")
