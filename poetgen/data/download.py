"""Download a named corpus (the complete 全唐诗) into the user cache, verified against pinned SHA-256 sums.

Standard library only (urllib.request), so the download works wherever poetgen is installed. Each file is written
to ``name.part``, fsynced, checked against its pinned sum and only then renamed into place, so the cache never
holds a final file that is incomplete or wrong. An interrupted ``.part`` is continued with an HTTP Range request.

Network policy, in short:
- connection errors, timeouts, HTTP 408 / 429 / 5xx: retried with exponential backoff (capped);
- the very first contact with the host failing at connection level (refused, DNS, connect timeout): no retries,
  an immediate DownloadError telling how to fetch the files by hand and where to put them;
- HTTP 404 and other 4xx: not retried;
- a hash mismatch: the bad file is deleted; retried once from scratch only if it came from a resumed ``.part``
  (whose first half may be stale), otherwise DownloadError naming the file and both sums.

Progress is reported through ``on_progress(event: dict)``; this module never prints.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from poetgen import __version__
from poetgen.errors import CorpusError, DownloadError
from poetgen.data.corpus import file_sha256
from poetgen.paths import cache_dir

ENV_MIRROR = "POETGEN_MIRROR"

UPSTREAM_REPO = "chinese-poetry/chinese-poetry"
UPSTREAM_COMMIT = "99ebbef7e1345c0985c44b9fd96a3f9e776f117b"
TANG_FOLDER = "全唐诗"
TANG_BASE_URL = (
    f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/{urllib.parse.quote(TANG_FOLDER)}/"
)

# `sha256sum` format, in download order, exactly as upstream's files at UPSTREAM_COMMIT hash
# (diff-able against a `sha256sum poet.tang.*.json` of a checkout).
_TANG_SHA256SUMS = """\
4f88f429938082523cdc72a1612bd7a7c3e3f7a33f8192c61ae51340efc3c92d  poet.tang.0.json
6e703b8d8dcedbd6110f6d48d043665ca2131db2035a5bfcef5e59a19aeb6d75  poet.tang.1000.json
ec28efa7e2ae9cdbbba09f0ed186e32ccae47a325ad1e5816b7ad56071c1665a  poet.tang.2000.json
9e4ba2323752b6b9fbdba875cdbc6a26636fe0cabc85fd066370d4915952001f  poet.tang.3000.json
b8a7946c879b9658a6c667a4c55f776fae7e5e00a17789ab06b274c1429afc66  poet.tang.4000.json
a0306e6962cff01639ad9a00b042a201b8dec1f30fa5d768a7b112589887861e  poet.tang.5000.json
982a21d2b15922b406911f1c825785054314c686da86b2155d7aebb362d22771  poet.tang.6000.json
a6fb69d7b4343c904dc56ae5aae34facc2478d196b51c37ceba9d1e2f171b342  poet.tang.7000.json
ac3848e95b02736168003863795de4474838c2d6a71a24ca2a4a280ea5177773  poet.tang.8000.json
b99d6596e3a1fe1a661652383083f92d196b8baf4e461d087081d5e1e1b7a51f  poet.tang.9000.json
b97d1c5509ab62f5b433dee2020c11c4deda4542e276683d1ada6619c34c2113  poet.tang.10000.json
9adf1835246053c821d99af39ce9092e14a94e1baf91740098bd9fc6f6f1cd27  poet.tang.11000.json
ec43d055a219d52ecdb58cd30a8a444189392f0d68b92a41495df1c72c5fd095  poet.tang.12000.json
eb9c85072d7913bb972e07c72f0123e9d7addca22cfd833cb79a5d74b1c76ebf  poet.tang.13000.json
1e366dd3fb5a011091524bed36e4edff5d015bf0ddb14143f298515387dbd9a9  poet.tang.14000.json
0386e58f46517daa3af0e0f385e0223f1efc0dac53afbe8fea64f99074d870b7  poet.tang.15000.json
1c477aef1fc50523f9baf10f29d2d89201a14c4c73001c1c041d0fe8464d11db  poet.tang.16000.json
11bac8333b2042975b9844423d113ff2c6fdf701c8b08a5b3aaa6bc9472222de  poet.tang.17000.json
37543a147d16e3576d5f45ba8f7b8b51fc311bc10eddae9440f16f2d5ae885c2  poet.tang.18000.json
dea74b41bc807ce2527bb119862a251e3a92b6f69bdf9f98b1434a8336830542  poet.tang.19000.json
8ccf0783888b15bec60d0253e278cd4b67e94a77725df8ed079d4d8062d050b4  poet.tang.20000.json
bddae814c82bf6a9fd294504aa48794bca5f03e986110739b1577aa811125cbd  poet.tang.21000.json
d7e7efe3f67415455ae93974a5aa67427e99f6713fde27920bfb657ad3204c4a  poet.tang.22000.json
220a535a762349ec1beed00f1dc11293ccefc70bda15c5258bbcab208b14337f  poet.tang.23000.json
2f40a4ec0e4469c29f0f028d7a4ad73b83850aa271be9b63ea0c08de6e094dee  poet.tang.24000.json
7e7c00ba3f7a95e97de5440f85affa9d54b420d31995b449e97a3e9ea00259f5  poet.tang.25000.json
74b5bed25622da1611928fdb31297fafadaf2876ce32ddb0c8b6d12d772979f4  poet.tang.26000.json
11626fcc310bbbcc601f7c8c4d8a664cef4907076cd7ec4f16268ee5b921ba44  poet.tang.27000.json
86a15affa95859046f869ffd4850886250d1a181e5151b1f096f728fb2d67502  poet.tang.28000.json
e1a0cffe17b4f109399db38f2b23f9b6668b8ca1c3c24e36d5cbe4f40a925862  poet.tang.29000.json
e71996f771d15476bae48751081b473b381774b5d335f6163b183f70a2eaed01  poet.tang.30000.json
f1efaf172d4f6fa9aaacfa4160feb766189989c3264da6ce3a6d64a7c97097bb  poet.tang.31000.json
fcb2096245719199249ad23e75eac6997b5a4341564dd1cf73ce8008975b3d74  poet.tang.32000.json
35abb37f65817ee4630cfeb2db286832e505873c477e12f14693bcd20e920885  poet.tang.33000.json
4b656a62b6a187792c96a632c7e33f443eabda8b48c4fb5dfdda72cf02003095  poet.tang.34000.json
a9671b350e58b805fda88b2c17fa0bf3a05313017d28485010e6f60a69bdf945  poet.tang.35000.json
1c8e71a32743b37d318bf8beb44b8809a8079011231cf3c7106e2c59f03c55b4  poet.tang.36000.json
4c37d2d92ee6fdd73299ef13c91e17b9cbb11ef59d1e024254db1eceb95dc7ae  poet.tang.37000.json
08b2ce85e59eac59fe621921b62c15528e9dfb6a102994297703ad67e14aa83f  poet.tang.38000.json
791d0171fe1dc88cee8424ae0281f495ed0dcdf042f97f2a3fc9b37e05e9426c  poet.tang.39000.json
851d0c3cb796c7f7c63a7765e28564b2c3be3d9691c9f43f88d4d3c64034b5d8  poet.tang.40000.json
3c12f59a5103e582eed9fe6ae13affddc030a31e9956efb13cb7768296ba7396  poet.tang.41000.json
060026beb06028864bce48e8074e2690f92a1dc5a76ee91f98f2d62b5f02a15c  poet.tang.42000.json
de5e658dccbcf0d2b38312b39a2423459b88ef893830bc145d453d82887a5753  poet.tang.43000.json
8c6d550818f5390413bc58fbb3af059d3fa4a92264b1bcf84439c2b0bb043985  poet.tang.44000.json
5177a4747b785f04897c36b77d5e033b11a7bcad759d1557fdb425166b8767f3  poet.tang.45000.json
287e548147e6959306b74c862a1ebe43cdca39adee34e2c63ae5d3b5eaced1f5  poet.tang.46000.json
8b43cce475ed43b1105a12a8bdcef32ac22dc056c5f2c616a2976a4103b5d8ac  poet.tang.47000.json
8df4861e8d7bc114e91d0a5e37d193f662485cd88b8d09289cc5ac9ab243c3ed  poet.tang.48000.json
418e5a082cb70c4f85ce842affec8828a53f6296882e45339c74d553fc46495e  poet.tang.49000.json
894bf4e729932d2b48ba731a48075347cf55626c08ac9f30b2fe412ca9e4e895  poet.tang.50000.json
9bd1b263807c5c64bca773b76d4861a49af19b76184f88260d6080bb03311928  poet.tang.51000.json
1124f4b27f46bd1ffaafdda530719eddbe41858778a0a13e4557ea4eb49ffef0  poet.tang.52000.json
75841062fa939e72ee12669859933c9178b88a5c5492bc9ba84d9ef7c6f1e65a  poet.tang.53000.json
cd2ba326b80ff8490723ad9fb1ace812306f0e433b74268420165068b0a975ac  poet.tang.54000.json
3782736dfee847958363d4adeff1236f148aff3726f2964963b17b06dad2f97b  poet.tang.55000.json
274ad6e13c069e35856e53b5dee6821ad2aa9bf8b2a5f969e2eb1234fe954bca  poet.tang.56000.json
e04c137b040c1a91e16614178c189d0c30a68e1d4657ea8fde8467601e3ac121  poet.tang.57000.json
"""

CHUNK = 64 * 1024
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

ProgressCallback = Callable[[dict], None]


def _parse_sums(text: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in text.splitlines():
        digest, name = line.split()
        sums[name.lstrip("*")] = digest.lower()
    return sums


TANG_SHA256: dict[str, str] = _parse_sums(_TANG_SHA256SUMS)
TANG_FILES: list[str] = list(TANG_SHA256)


@dataclass(frozen=True)
class Corpus:
    """A downloadable corpus: where its files live upstream and what each must hash to."""

    name: str
    base_url: str
    sha256: Mapping[str, str]  # file name -> lowercase hex sum, in download order
    numbered: str = ""  # e.g. "poet.tang.{}.json", so that `--files 1000` means poet.tang.1000.json

    @property
    def files(self) -> list[str]:
        return list(self.sha256)


CORPORA: dict[str, Corpus] = {
    "tang": Corpus("tang", TANG_BASE_URL, TANG_SHA256, numbered="poet.tang.{}.json"),
}


@dataclass
class DownloadReport:
    """What one `download_corpus` call did. Every file in `files` is verified when the call returns."""

    corpus: str
    dest: Path
    url: str  # the base URL used (upstream or mirror)
    files: list[str]
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and verified: not fetched
    resumed: list[str] = field(default_factory=list)  # continued from a .part with a Range request
    bytes: int = 0  # bytes received over the network
    retries: int = 0

    @property
    def verified(self) -> int:
        return len(self.downloaded) + len(self.skipped)

    def to_dict(self) -> dict:
        return {
            "corpus": self.corpus,
            "dest": str(self.dest),
            "url": self.url,
            "files": len(self.files),
            "verified": self.verified,
            "downloaded": len(self.downloaded),
            "skipped": len(self.skipped),
            "resumed": len(self.resumed),
            "bytes": self.bytes,
            "retries": self.retries,
            "downloaded_files": list(self.downloaded),
            "skipped_files": list(self.skipped),
        }


# --- small public helpers -----------------------------------------------------------------------------------


def get_corpus(name: str, error: type[Exception] = DownloadError) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise error(f"unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}") from None


def corpus_dir(name: str) -> Path:
    """Where a named corpus lives in the user cache: ``cache_dir()/corpora/<name>`` (not created here)."""
    return cache_dir() / "corpora" / name


sha256_file = file_sha256  # re-exported: callers of this module name it so


def verify_file(path: Path, sha256: str) -> bool:
    """True when `path` is a regular file whose SHA-256 is `sha256` (hex, any case)."""
    path = Path(path)
    return path.is_file() and sha256_file(path) == sha256.lower()


def resolve_files(corpus: Corpus, files: Iterable[str | int] | str | None) -> list[str]:
    """Turn a selection (`"0,1000"`, `["poet.tang.0.json", 2000]`, None = all) into file names, in corpus order."""
    if files is None:
        return corpus.files
    if isinstance(files, (str, int)):
        files = [files]
    wanted: set[str] = set()
    for item in files:
        for token in str(item).replace(",", " ").split():
            name = corpus.numbered.format(int(token)) if token.isdigit() and corpus.numbered else token
            if name not in corpus.sha256:
                example = corpus.files[0]
                raise DownloadError(
                    f"{token!r} is not a file of corpus {corpus.name!r}; give names like {example}"
                    + (f" or their numbers ({_number_range(corpus)})" if corpus.numbered else "")
                )
            wanted.add(name)
    if not wanted:
        raise DownloadError("the file selection is empty")
    return [f for f in corpus.files if f in wanted]


def _number_range(corpus: Corpus) -> str:
    prefix, _, suffix = corpus.numbered.partition("{}")
    numbers = [f[len(prefix) : len(f) - len(suffix)] for f in corpus.files]
    return f"{numbers[0]}, {numbers[1]}, …, {numbers[-1]}" if len(numbers) > 2 else ", ".join(numbers)


def base_url(corpus: Corpus, mirror: str | None = None) -> str:
    """The base the files sit under by name: `mirror`, else $POETGEN_MIRROR, else upstream. Ends with '/'."""
    url = mirror or os.environ.get(ENV_MIRROR) or corpus.base_url
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DownloadError(f"mirror {url!r} is not an http://, https:// or file:// URL")
    return url if url.endswith("/") else url + "/"


def file_url(base: str, name: str) -> str:
    return base + urllib.parse.quote(name)


def manual_instructions(corpus: Corpus, dest: Path) -> str:
    """How to get the files without this command: the URL pattern and the exact folder."""
    files = corpus.files
    if corpus.numbered:
        pattern = corpus.numbered.replace("{}", "N")
        which = f"{pattern} for N = {_number_range(corpus)}"
    else:
        which = ", ".join(files)
    return (
        f"To get the files by hand, download {corpus.base_url}{which} ({len(files)} files) into {dest} and then "
        f"run `poetgen download {corpus.name}` to verify them; or point --mirror / ${ENV_MIRROR} at a reachable copy."
    )


def named_source(name: str, *, dest: Path | None = None) -> Path:
    """The folder holding every verified file of corpus `name`, for `poetgen prepare corpus:<name>`.

    Raises CorpusError when a file is missing or does not match its pinned sum.
    """
    corpus = get_corpus(name, error=CorpusError)
    folder = Path(dest) if dest is not None else corpus_dir(name)
    missing = [f for f in corpus.files if not (folder / f).is_file()]
    if missing:
        raise CorpusError(
            f"corpus {name!r} is not downloaded ({len(missing)} of {len(corpus.files)} files missing in {folder}, "
            f"e.g. {missing[0]}): run `poetgen download {name}` first"
        )
    bad = [f for f in corpus.files if not verify_file(folder / f, corpus.sha256[f])]
    if bad:
        raise CorpusError(
            f"{len(bad)} file(s) of corpus {name!r} in {folder} do not match their pinned SHA-256 "
            f"(e.g. {bad[0]}): run `poetgen download {name}` first to fetch them again"
        )
    return folder


# --- the download -------------------------------------------------------------------------------------------


def download_corpus(
    name: str = "tang",
    *,
    dest: Path | None = None,
    mirror: str | None = None,
    files: Iterable[str | int] | str | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
    on_progress: ProgressCallback | None = None,
) -> DownloadReport:
    """Fetch and verify the files of corpus `name` (all, or the selection `files`) into `dest`.

    `dest` defaults to ``cache_dir()/corpora/<name>``. `retries` is per file, after the first attempt; the delay
    before retry k (1-based) is ``min(backoff * 2**(k-1), max_backoff)`` seconds. `timeout` bounds each socket
    read, `connect_timeout` each connection attempt.

    `on_progress` receives dicts with keys ``event`` ("skip", "start", "progress", "retry", "done"), ``file``,
    ``index`` (1-based), ``files`` (how many in this call), ``bytes_done`` and ``bytes_total`` (None if the
    server does not say); "retry" adds ``attempt``, ``delay`` and ``error``.
    """
    corpus = get_corpus(name)
    selection = resolve_files(corpus, files)
    base = base_url(corpus, mirror)
    folder = Path(dest) if dest is not None else corpus_dir(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {folder}: {e.strerror or e}") from None
    report = DownloadReport(corpus=name, dest=folder, url=base, files=selection)
    fetcher = _Fetcher(
        corpus, base, folder, report, retries, backoff, max_backoff, timeout, connect_timeout, on_progress
    )
    for index, fname in enumerate(selection, start=1):
        fetcher.fetch(fname, index)
    return report


class _Transient(Exception):
    """A failure worth retrying (connection dropped, timeout, 5xx)."""


class _Restart(Exception):
    """The .part cannot be continued (416, a 206 for the wrong range): it was deleted; fetch from zero."""


class _Fetcher:
    def __init__(self, corpus, base, folder, report, retries, backoff, max_backoff, timeout, connect_timeout, cb):
        self.corpus: Corpus = corpus
        self.base: str = base
        self.folder: Path = folder
        self.report: DownloadReport = report
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(0.0, float(max_backoff))
        self.timeout = float(timeout)
        self.opener = _opener(float(connect_timeout))
        self.on_progress = cb
        # Set once any byte of an HTTP response arrived: before that, a connection-level failure means the host is
        # unreachable (offline, DNS, firewall) and retrying would only make the user wait.
        self.contacted = False

    def emit(self, event: str, fname: str, index: int, done: int = 0, total: int | None = None, **extra) -> None:
        if self.on_progress is not None:
            ev = {"event": event, "file": fname, "index": index, "files": len(self.report.files)}
            ev.update(bytes_done=done, bytes_total=total, **extra)
            self.on_progress(ev)

    # One file: skip if verified, else download (resuming a .part), verify, rename.
    def fetch(self, fname: str, index: int) -> None:
        expected = self.corpus.sha256[fname]
        final = self.folder / fname
        part = self.folder / (fname + ".part")
        url = file_url(self.base, fname)
        if final.exists():
            if verify_file(final, expected):
                part.unlink(missing_ok=True)
                self.report.skipped.append(fname)
                size = final.stat().st_size
                self.emit("skip", fname, index, size, size)
                return
            final.unlink()  # a corrupt or foreign copy: fetch it again
        attempt = 0  # failures so far for this file
        restarted_after_mismatch = False
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if offset and verify_file(part, expected):
                break  # complete already (an earlier run stopped between verify and rename)
            try:
                resumed = self._attempt(url, part, offset, fname, index)
            except (_Transient, _Restart) as e:
                attempt += 1
                if attempt > self.retries:
                    raise DownloadError(
                        f"{fname}: giving up after {attempt} attempts ({e}) at {url}. "
                        + manual_instructions(self.corpus, self.folder)
                    ) from None
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                self.report.retries += 1
                self.emit("retry", fname, index, attempt=attempt, delay=delay, error=str(e))
                time.sleep(delay)
                continue
            actual = sha256_file(part)
            if actual == expected:
                if resumed:
                    self.report.resumed.append(fname)
                break
            part.unlink()
            if resumed and not restarted_after_mismatch:
                restarted_after_mismatch = True  # the kept first half may be from other content: once more, whole
                continue
            raise DownloadError(
                f"{fname} from {url} failed verification: expected sha256 {expected}, got {actual}; "
                f"the bad file was deleted"
            )
        os.replace(part, final)
        _fsync_dir(self.folder)
        self.report.downloaded.append(fname)
        size = final.stat().st_size
        self.emit("done", fname, index, size, size)

    def _attempt(self, url: str, part: Path, offset: int, fname: str, index: int) -> bool:
        """One request. Appends to / rewrites `part`; returns True if it continued an existing .part."""
        headers = {"User-Agent": f"poetgen/{__version__}", "Accept-Encoding": "identity"}
        req = urllib.request.Request(url, headers=headers)
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            self.contacted = True
            e.close()
            if e.code == 416 and offset:
                part.unlink(missing_ok=True)
                raise _Restart("the server refused to continue the partial file") from None
            if e.code in RETRY_STATUSES:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            hint = " (is the mirror a folder holding the files by name?)" if e.code == 404 else ""
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, FileNotFoundError):  # file:// mirror without that file
                raise DownloadError(f"{url}: no such file") from None
            if isinstance(reason, OSError):
                if not self.contacted:
                    raise DownloadError(
                        f"cannot reach {urllib.parse.urlsplit(url).netloc or url} ({_describe(reason)}). "
                        + manual_instructions(self.corpus, self.folder)
                    ) from None
                raise _Transient(_describe(reason)) from None
            raise DownloadError(f"{url}: {reason}") from None
        except (http.client.HTTPException, OSError) as e:  # connected, but no proper response (reset, timeout)
            self.contacted = True
            raise _Transient(_describe(e)) from None

        with resp:
            self.contacted = True
            status = resp.status or 200  # file:// responses carry no status
            length = _int(resp.headers.get("Content-Length"))
            if offset and status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    part.unlink(missing_ok=True)
                    raise _Restart(f"asked for bytes from {offset}, the server sent from {start}")
                mode, done = "ab", offset
                if total is None and length is not None:
                    total = offset + length
            else:  # a 200: a fresh download, or the server ignored Range -> start over
                mode, done, offset, total = "wb", 0, 0, length
            self.emit("start", fname, index, done, total)
            try:
                f = open(part, mode)
            except OSError as e:
                raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
            with f:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError) as e:
                        _flush(f, part)  # keep what arrived: the retry continues from there
                        raise _Transient(f"{_describe(e)} after {done} bytes") from None
                    if not chunk:
                        break
                    try:
                        f.write(chunk)
                    except OSError as e:
                        raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
                    done += len(chunk)
                    self.report.bytes += len(chunk)
                    self.emit("progress", fname, index, done, total)
                _flush(f, part)
            # http.client's read(n) returns b"" when the peer closes early instead of raising: check the length.
            if total is not None and done < total:
                raise _Transient(f"connection closed after {done} of {total} bytes")
            return mode == "ab"


def _flush(f, part: Path) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/200` -> (100, 200); total None for `/*`; (None, None) if unparsable."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = _int(span.partition("-")[0].strip())
    return start, _int(total.strip())


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text


def _opener(connect_timeout: float) -> urllib.request.OpenerDirector:
    """An opener whose connections time out after `connect_timeout` s, reads after the per-request timeout."""

    def short_connect(conn_class):
        class ShortConnect(conn_class):
            def connect(self):
                read_timeout = self.timeout
                if isinstance(read_timeout, (int, float)):
                    self.timeout = min(connect_timeout, read_timeout)
                else:  # None or socket._GLOBAL_DEFAULT_TIMEOUT: no read timeout, but still a short connect
                    self.timeout = connect_timeout
                try:
                    super().connect()
                finally:
                    self.timeout = read_timeout
                self.sock.settimeout(read_timeout if isinstance(read_timeout, (int, float)) else None)

        return ShortConnect

    class HTTPHandler(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kw):
            return super().do_open(short_connect(http_class), req, **kw)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kw):
            return super().do_open(short_connect(http_class), req, **kw)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)
