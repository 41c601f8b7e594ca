"""`poetgen serve` as a user meets it: the server started as a subprocess on a free port of 127.0.0.1 with a tiny
model, then real HTTP. Also the pieces under it: Runtime.append / fork and the batcher's time limit."""

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
    assert status == 501 and "pair" in answer["error"]
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
