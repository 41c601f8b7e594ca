"""poetgen.data.download against a real HTTP server on 127.0.0.1 that serves ../shared/data/tang (53 of the 58 files).

The server (http.server in a thread, ephemeral port) supports Range and can be told, per file, to misbehave for
its next requests: answer 500, die after half the body, serve altered bytes, ignore Range, or stall.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from poetgen.data import download as dl
from poetgen.data.download import TANG_FILES, DownloadError, download_corpus, named_source, verify_file
from poetgen.errors import CorpusError

from helpers import shared_path

FOLDER = "全唐诗"
PRESENT = 53  # files poet.tang.0 ... poet.tang.52000 are in ../shared/data/tang; 53000 ... 57000 are not
FAST = dict(retries=3, backoff=0.001, max_backoff=0.01, timeout=5)


# --- the test server ----------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv: TangServer = self.server.tang  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        name = path.removeprefix(f"/{FOLDER}/")
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append({"name": name, "range": rng, "raw_path": self.path})
            plan = srv.plans.get(name)
            action = plan.pop(0) if plan else "ok"
        file = srv.root / name
        if not path.startswith(f"/{FOLDER}/") or "/" in name or not file.is_file():
            self.send_error(404)
            return
        if action == "500":
            self.send_error(500)
            return
        if action == "stall":
            time.sleep(srv.stall)
        data = file.read_bytes()
        if action == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1 :]
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and action != "norange":
            start = int(m.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if action == "die":  # half the body, then the connection closes (HTTP/1.0)
            self.wfile.write(body[: len(body) // 2])
            return
        self.wfile.write(body)


class TangServer:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.plans: dict[str, list[str]] = {}
        self.stall = 0.0
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.tang = self  # type: ignore[attr-defined]
        self.httpd.handle_error = lambda *a: None  # a stalled handler writing to a closed socket is expected
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def mirror(self) -> str:
        return f"http://127.0.0.1:{self.port}/{urllib.parse.quote(FOLDER)}/"

    def names(self) -> list[str]:
        return [r["name"] for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tang_dir() -> Path:
    return shared_path("tang")


@pytest.fixture
def server(tang_dir):
    srv = TangServer(tang_dir)
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No proxy may reroute 127.0.0.1 traffic, no mirror from the environment, a private cache."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", dl.ENV_MIRROR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("POETGEN_CACHE_DIR", str(tmp_path / "cache"))


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- pinned constants ---------------------------------------------------------------------------------------


def test_pinned_sums_are_the_58_files_of_shared_sha256sums(tang_dir):
    listed = {}
    for line in (tang_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    assert TANG_FILES == [f"poet.tang.{n}.json" for n in range(0, 58000, 1000)]
    assert dl.TANG_SHA256 == listed
    # the files that are present really hash to the pinned sums
    for name in ("poet.tang.0.json", "poet.tang.52000.json"):
        assert sha((tang_dir / name).read_bytes()) == dl.TANG_SHA256[name]


def test_upstream_url_is_pinned_commit_and_percent_encoded_folder():
    assert dl.TANG_BASE_URL == (
        "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/"
        "99ebbef7e1345c0985c44b9fd96a3f9e776f117b/%E5%85%A8%E5%94%90%E8%AF%97/"
    )
    assert dl.file_url(dl.TANG_BASE_URL, "poet.tang.0.json").endswith("%E8%AF%97/poet.tang.0.json")


def test_file_selection_accepts_numbers_and_names_and_rejects_strangers():
    tang = dl.CORPORA["tang"]
    assert dl.resolve_files(tang, "2000,0 poet.tang.1000.json") == [
        "poet.tang.0.json",
        "poet.tang.1000.json",
        "poet.tang.2000.json",
    ]
    assert dl.resolve_files(tang, [57000, "0"]) == ["poet.tang.0.json", "poet.tang.57000.json"]
    assert dl.resolve_files(tang, None) == TANG_FILES
    for bad in ("500", "58000", "poet.song.0.json", " , "):
        with pytest.raises(DownloadError):
            dl.resolve_files(tang, bad)


def test_mirror_must_be_a_url(monkeypatch):
    with pytest.raises(DownloadError, match="not an http"):
        download_corpus(mirror="ftp://example.org/x/", files="0")
    monkeypatch.setenv(dl.ENV_MIRROR, "http://m.example/a")
    assert dl.base_url(dl.CORPORA["tang"]) == "http://m.example/a/"
    assert dl.base_url(dl.CORPORA["tang"], "http://n.example/b/") == "http://n.example/b/"


# --- downloads that work ------------------------------------------------------------------------------------


def test_downloads_and_verifies_a_selection(server, tang_dir, tmp_path):
    events: list[dict] = []
    dest = tmp_path / "out"
    report = download_corpus(dest=dest, mirror=server.mirror, files="0,1000,52000", on_progress=events.append, **FAST)
    names = ["poet.tang.0.json", "poet.tang.1000.json", "poet.tang.52000.json"]
    assert report.downloaded == names and report.skipped == [] and report.verified == 3
    sizes = {n: (tang_dir / n).stat().st_size for n in names}
    assert report.bytes == sum(sizes.values())
    for n in names:
        assert (dest / n).read_bytes() == (tang_dir / n).read_bytes()
        assert verify_file(dest / n, dl.TANG_SHA256[n])
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)  # no .part left behind
    # the folder name went over the wire percent-encoded
    assert server.requests[0]["raw_path"] == "/%E5%85%A8%E5%94%90%E8%AF%97/poet.tang.0.json"
    assert [r["range"] for r in server.requests] == [None, None, None]
    # progress: start ... progress ... done per file, indices 1..3, last progress equals the file size
    done = [e for e in events if e["event"] == "done"]
    assert [(e["file"], e["index"], e["files"]) for e in done] == [(n, i, 3) for i, n in enumerate(names, 1)]
    for n in names:
        prog = [e for e in events if e["file"] == n and e["event"] == "progress"]
        assert prog[-1]["bytes_done"] == prog[-1]["bytes_total"] == sizes[n]
        assert [e["bytes_done"] for e in prog] == sorted(e["bytes_done"] for e in prog)


def test_default_destination_is_the_cache_and_mirror_comes_from_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv(dl.ENV_MIRROR, server.mirror)
    report = download_corpus(files=["3000"], **FAST)
    assert report.dest == tmp_path / "cache" / "corpora" / "tang"
    assert verify_file(report.dest / "poet.tang.3000.json", dl.TANG_SHA256["poet.tang.3000.json"])
    assert server.names() == ["poet.tang.3000.json"]


def test_all_present_files_then_named_source_names_the_missing_ones(server, tmp_path):
    t0 = time.perf_counter()
    report = download_corpus(mirror=server.mirror, files=range(0, PRESENT * 1000, 1000), **FAST)
    elapsed = time.perf_counter() - t0
    assert report.verified == PRESENT and len(server.requests) == PRESENT
    assert elapsed < 15, elapsed
    with pytest.raises(CorpusError, match=r"5 of 58 files missing .*run `poetgen download tang` first"):
        named_source("tang")
    with pytest.raises(DownloadError, match="53000.*HTTP 404"):  # the rest are not on this server
        download_corpus(mirror=server.mirror, **FAST)
    assert server.names()[PRESENT:] == ["poet.tang.53000.json"]  # 52 skipped without a request; 404 not retried


def test_already_verified_file_is_not_fetched_again_but_a_corrupt_one_is(server, tmp_path):
    dest = tmp_path / "out"
    download_corpus(dest=dest, mirror=server.mirror, files="0,1000", **FAST)
    assert len(server.requests) == 2
    again = download_corpus(dest=dest, mirror=server.mirror, files="0,1000", **FAST)
    assert again.skipped == ["poet.tang.0.json", "poet.tang.1000.json"] and again.bytes == 0
    assert len(server.requests) == 2
    (dest / "poet.tang.1000.json").write_bytes(b"[]")  # damaged local copy
    fixed = download_corpus(dest=dest, mirror=server.mirror, files="0,1000", **FAST)
    assert fixed.skipped == ["poet.tang.0.json"] and fixed.downloaded == ["poet.tang.1000.json"]
    assert server.names()[2:] == ["poet.tang.1000.json"]


def test_file_url_mirror(tang_dir, tmp_path):
    report = download_corpus(dest=tmp_path / "out", mirror=tang_dir.as_uri(), files="4000", **FAST)
    assert report.downloaded == ["poet.tang.4000.json"]
    with pytest.raises(DownloadError, match="no such file"):
        download_corpus(dest=tmp_path / "out", mirror=tang_dir.as_uri(), files="57000", **FAST)


# --- downloads that go wrong --------------------------------------------------------------------------------


def test_corrupted_bytes_raise_naming_file_and_both_sums_and_are_not_kept(server, tang_dir, tmp_path):
    name = "poet.tang.2000.json"
    server.plans[name] = ["corrupt"] * 10
    data = bytearray((tang_dir / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    dest = tmp_path / "out"
    with pytest.raises(DownloadError) as err:
        download_corpus(dest=dest, mirror=server.mirror, files="2000", **FAST)
    msg = str(err.value)
    assert name in msg and dl.TANG_SHA256[name] in msg and sha(bytes(data)) in msg
    assert list(dest.iterdir()) == []  # neither the final file nor the .part
    assert len(server.requests) == 1  # a fresh download that does not verify is not retried


def test_500_then_200_is_retried_with_growing_backoff(server, tmp_path):
    name = "poet.tang.5000.json"
    server.plans[name] = ["500", "500"]
    events: list[dict] = []
    report = download_corpus(
        dest=tmp_path / "out", mirror=server.mirror, files="5000", on_progress=events.append,
        retries=3, backoff=0.001, max_backoff=0.0015, timeout=5,
    )  # fmt: skip
    assert report.downloaded == [name] and report.retries == 2
    assert server.names() == [name] * 3
    retries = [e for e in events if e["event"] == "retry"]
    assert [(e["attempt"], e["delay"]) for e in retries] == [(1, 0.001), (2, 0.0015)]  # doubled, then capped
    assert "500" in retries[0]["error"]


def test_persistent_500_gives_up_after_the_retries(server, tmp_path):
    server.plans["poet.tang.5000.json"] = ["500"] * 10
    with pytest.raises(DownloadError, match="giving up after 3 attempts .*HTTP 500"):
        download_corpus(dest=tmp_path / "out", mirror=server.mirror, files="5000", retries=2, backoff=0.001)
    assert len(server.requests) == 3


def test_server_dying_mid_file_leaves_no_final_file_and_a_rerun_resumes_with_range(server, tang_dir, tmp_path):
    name = "poet.tang.6000.json"
    size = (tang_dir / name).stat().st_size
    server.plans[name] = ["die"]
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match="closed after"):
        download_corpus(dest=dest, mirror=server.mirror, files="6000", retries=0)
    assert not (dest / name).exists()
    half = size // 2
    assert (dest / (name + ".part")).stat().st_size == half
    report = download_corpus(dest=dest, mirror=server.mirror, files="6000", **FAST)
    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert report.resumed == [name] and report.bytes == size - half
    assert (dest / name).read_bytes() == (tang_dir / name).read_bytes()
    assert not (dest / (name + ".part")).exists()


def test_server_dying_twice_is_resumed_within_one_run(server, tang_dir, tmp_path):
    name = "poet.tang.7000.json"
    size = (tang_dir / name).stat().st_size
    server.plans[name] = ["die", "die"]
    report = download_corpus(dest=tmp_path / "out", mirror=server.mirror, files="7000", **FAST)
    first, second = size // 2, size // 2 + (size - size // 2) // 2
    assert [r["range"] for r in server.requests] == [None, f"bytes={first}-", f"bytes={second}-"]
    assert report.retries == 2 and report.bytes == size
    assert verify_file(tmp_path / "out" / name, dl.TANG_SHA256[name])


def test_server_ignoring_range_means_starting_over(server, tang_dir, tmp_path):
    name = "poet.tang.8000.json"
    size = (tang_dir / name).stat().st_size
    server.plans[name] = ["die", "norange"]
    report = download_corpus(dest=tmp_path / "out", mirror=server.mirror, files="8000", **FAST)
    assert server.requests[1]["range"] == f"bytes={size // 2}-"  # asked to resume, got a 200 with everything
    assert report.resumed == [] and report.bytes == size // 2 + size
    assert verify_file(tmp_path / "out" / name, dl.TANG_SHA256[name])


def test_stale_part_that_does_not_verify_after_resuming_is_fetched_whole_once(server, tmp_path):
    name = "poet.tang.9000.json"
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / (name + ".part")).write_bytes(b"x" * 1000)  # left over from something else
    report = download_corpus(dest=dest, mirror=server.mirror, files="9000", **FAST)
    assert [r["range"] for r in server.requests] == ["bytes=1000-", None]
    assert report.downloaded == [name] and report.resumed == []
    assert verify_file(dest / name, dl.TANG_SHA256[name])


def test_read_timeout_is_retried(server, tmp_path):
    name = "poet.tang.10000.json"
    server.plans[name] = ["stall"]
    server.stall = 1.0
    events: list[dict] = []
    report = download_corpus(dest=tmp_path / "out", mirror=server.mirror, files="10000", retries=2, backoff=0.001,
                             timeout=0.3, on_progress=events.append)
    assert report.retries == 1 and report.downloaded == [name]
    # It gave up on the stalled response (waiting 1 s for it would have been a success without a retry), and said
    # why; a mechanism check, not a stopwatch, so a loaded machine cannot fail it.
    assert [e["error"] for e in events if e["event"] == "retry"] == ["timed out"]


def _assert_how_to(msg: str, dest: Path) -> None:
    assert "poet.tang.N.json for N = 0, 1000, …, 57000" in msg
    assert dl.TANG_BASE_URL in msg
    assert str(dest) in msg
    assert "poetgen download tang" in msg


def test_unreachable_mirror_fails_fast_with_how_to(tmp_path):
    events: list[dict] = []
    with pytest.raises(DownloadError) as err:
        # default retries and backoff: failing fast must not depend on the test making them tiny
        download_corpus(mirror=f"http://127.0.0.1:{closed_port()}/", files="0,1000", on_progress=events.append)
    assert [e for e in events if e["event"] == "retry"] == []  # fast: no retry (each would wait 0.5 s, 1 s, ...)
    msg = str(err.value)
    assert msg.startswith("cannot reach 127.0.0.1:") and "refused" in msg.lower()
    _assert_how_to(msg, tmp_path / "cache" / "corpora" / "tang")


def test_dns_failure_fails_fast_with_how_to(monkeypatch, tmp_path):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no lookup leaves the machine
    events: list[dict] = []
    with pytest.raises(DownloadError, match="cannot reach mirror.invalid") as err:
        download_corpus(mirror="http://mirror.invalid/tang/", files="0", on_progress=events.append)
    assert [e for e in events if e["event"] == "retry"] == []  # fast: no retry after the failed lookup
    _assert_how_to(str(err.value), tmp_path / "cache" / "corpora" / "tang")


# --- named_source -------------------------------------------------------------------------------------------


def test_named_source_missing_unknown_corrupt_and_complete(server, tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match=r"58 of 58 files missing .*run `poetgen download tang` first"):
        named_source("tang")
    with pytest.raises(CorpusError, match="unknown corpus 'song'"):
        named_source("song")
    # a three-file corpus, so that "complete" is reachable with the files the server has
    names = ["poet.tang.0.json", "poet.tang.1000.json", "poet.tang.2000.json"]
    mini = dl.Corpus("mini", server.mirror, {n: dl.TANG_SHA256[n] for n in names})
    monkeypatch.setitem(dl.CORPORA, "mini", mini)
    download_corpus("mini", **FAST)
    folder = named_source("mini")
    assert folder == tmp_path / "cache" / "corpora" / "mini"
    assert sorted(p.name for p in folder.iterdir()) == names
    (folder / names[1]).write_bytes((folder / names[1]).read_bytes()[:-1])
    with pytest.raises(CorpusError, match="do not match their pinned SHA-256 .*poet.tang.1000.json"):
        named_source("mini")


# --- the CLI ------------------------------------------------------------------------------------------------


def _cli(args: list[str], cache: Path):
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    return CliRunner().invoke(app, ["download", *args], env={"POETGEN_CACHE_DIR": str(cache)})


def test_cli_downloads_a_selection_then_skips_it(server, tang_dir, tmp_path):
    cache = tmp_path / "clicache"
    names = ["poet.tang.0.json", "poet.tang.1000.json", "poet.tang.2000.json"]
    r = _cli(["tang", "--mirror", server.mirror, "--files", "0,1000", "--files", names[2], "--json"], cache)
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # not a terminal: no progress bar
    summary = json.loads(r.stdout)
    assert summary["files"] == summary["verified"] == summary["downloaded"] == 3 and summary["skipped"] == 0
    assert summary["bytes"] == sum((tang_dir / n).stat().st_size for n in names)
    assert summary["dest"] == str(cache / "corpora" / "tang") and summary["downloaded_files"] == names
    for n in names:
        assert verify_file(cache / "corpora" / "tang" / n, dl.TANG_SHA256[n])

    r = _cli(["--mirror", server.mirror, "--files", "0,1000,2000"], cache)
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout.startswith(f"tang: 3 file(s) verified in {cache / 'corpora' / 'tang'} (0 downloaded, 3 already")
    assert len(server.requests) == 3

    r = _cli(["--mirror", server.mirror, "--files", "0", "--quiet"], cache)
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


def test_cli_prints_retry_notices_on_stderr(server, tmp_path):
    server.plans["poet.tang.11000.json"] = ["500"]
    r = _cli(["--mirror", server.mirror, "--files", "11000", "--dest", str(tmp_path / "d")], tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("retrying poet.tang.11000.json in 0.5 s (attempt 1 failed: HTTP 500")
    assert (tmp_path / "d" / "poet.tang.11000.json").is_file() and not (tmp_path / "c").exists()


def test_cli_failures_exit_1_with_error(server, tmp_path):
    cache = tmp_path / "clicache"
    r = _cli(["--mirror", f"http://127.0.0.1:{closed_port()}/", "--json"], cache)
    assert r.exit_code == 1 and r.stdout == ""  # the first line of stderr is the error: no retry notice came first
    assert r.stderr.startswith("Error: cannot reach 127.0.0.1:") and "Traceback" not in r.output
    _assert_how_to(r.stderr.replace("\n", " "), cache / "corpora" / "tang")

    r = _cli(["--mirror", server.mirror, "--files", "56000"], cache)  # not on the test server: 404
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "HTTP 404" in r.stderr

    for args in (["song"], ["--files", "123"]):
        r = _cli(args, cache)
        assert r.exit_code == 1 and r.stderr.startswith("Error: "), args
    r = _cli(["--retries", "-1"], cache)
    assert r.exit_code == 2


def test_part_longer_than_the_file_gets_416_and_starts_over(server, tang_dir, tmp_path):
    name = "poet.tang.12000.json"
    size = (tang_dir / name).stat().st_size
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / (name + ".part")).write_bytes(b"y" * (size + 10))
    report = download_corpus(dest=dest, mirror=server.mirror, files="12000", **FAST)
    assert [r["range"] for r in server.requests] == [f"bytes={size + 10}-", None]
    assert report.downloaded == [name] and report.retries == 1
    assert verify_file(dest / name, dl.TANG_SHA256[name]) and not (dest / (name + ".part")).exists()
