"""The cache dir: download a registry source once, verify it, keep its canonical file.

``$NSTJAX_CACHE`` (default: the user cache dir) holds ``{name}.safetensors``
per source and its sha256, recorded when it was written, in
``{name}.safetensors.sha256`` (``sha256sum`` format): a canonical file that was
truncated or altered since is refused when it is loaded. A source's raw file
placed there by hand under its original name is verified and converted instead
of downloading; ``$NSTJAX_WEIGHTS_URL_<NAME>`` replaces a source's URL (a
mirror: the checksum still applies) and ``$NSTJAX_DOWNLOAD_TIMEOUT`` the 30 s
network timeout.

Processes sharing the cache dir (a sweep started at once) take the lock file
``{name}.lock`` there to download and convert: one does, the others wait and
then use its file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import platformdirs
from tqdm import tqdm

from nstjax.atomic import stale_temporaries, write_text
from nstjax.weights.formats import WeightsError, file_hash, read_weights, save_canonical
from nstjax.weights.registry import WeightSource, get_source

TIMEOUT_VARIABLE = "NSTJAX_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 30.0


def cache_dir() -> Path:
    """Where weights (and other caches) are kept: ``$NSTJAX_CACHE`` or the user cache dir."""
    path = os.environ.get("NSTJAX_CACHE") or platformdirs.user_cache_dir("nstjax")
    return Path(path).expanduser().absolute()


def cached_path(source: WeightSource) -> Path:
    """The canonical file of ``source`` in the cache dir (it may not exist yet)."""
    return cache_dir() / source.canonical_filename


def download_timeout() -> float:
    """Seconds a connection may stay silent: ``$NSTJAX_DOWNLOAD_TIMEOUT``, default 30."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(text)
    except ValueError:
        timeout = 0.0
    if not timeout > 0:
        raise WeightsError(f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds > 0: "
                           f"set it to e.g. {DEFAULT_TIMEOUT:g} or unset it")
    return timeout


def fetch(name: str) -> Path:
    """The canonical file of registry source ``name``, downloaded on first use."""
    return fetch_source(get_source(name))


def fetch_source(source: WeightSource) -> Path:
    """The canonical file of ``source``, checked against its recorded sha256: cached,
    else converted from its raw file (placed by hand, or downloaded and verified),
    under the source's lock; the raw file is then removed."""
    dest = cached_path(source)
    if dest.is_file() and _recorded(dest) is not None:
        return _verified(source, dest)
    with _lock(source):
        if dest.is_file():  # written by the lock's last holder, or copied in by hand
            if _recorded(dest) is None:
                _adopt(source, dest)
            return _verified(source, dest)
        for path in (dest, _record_path(dest)):
            for tmp in stale_temporaries(path):  # left by a killed writer; none writes now
                tmp.unlink(missing_ok=True)
        raw = cache_dir() / source.filename
        if raw.is_file():
            _verify_placed(source, raw)
        else:
            _download(source, raw)
        weights = read_weights(raw, source.preprocessing, source.name)
        try:
            _record_path(dest).unlink(missing_ok=True)  # a deleted file's: never beside the new one
            save_canonical(dest, weights)
            _record(dest)
        except OSError as e:
            raise _cannot_write(dest, e) from None
        raw.unlink(missing_ok=True)
    return dest


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _recorded(dest: Path) -> str | None:
    """The sha256 recorded for ``dest`` when it was written ('' if unreadable), or None."""
    try:
        text = _record_path(dest).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    digest = text.split(maxsplit=1)[0] if text.strip() else ""
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else ""


def _record(dest: Path) -> None:
    """Record ``dest``'s sha256 beside it, as ``sha256sum`` writes it."""
    write_text(_record_path(dest), f"{file_hash(dest)}  {dest.name}\n")


def _rebuild(source: WeightSource) -> str:
    return f"delete it and run python -m nstjax.weights fetch {source.name} to rebuild it"


def _adopt(source: WeightSource, dest: Path) -> None:
    """Read and check whole a canonical file without a record (copied in by hand), then record it."""
    try:
        read_weights(dest, None, source.name)
    except WeightsError as e:
        raise WeightsError(f"{e}; or {_rebuild(source)}") from None
    try:
        _record(dest)
    except OSError as e:
        raise _cannot_write(_record_path(dest), e) from None


def _verified(source: WeightSource, dest: Path) -> Path:
    """``dest``, if it is still the file that was written: its recorded sha256."""
    recorded = _recorded(dest)
    got = file_hash(dest)
    if got != recorded:
        raise WeightsError(
            f"{dest} is corrupt: truncated or altered since it was written (its sha256 is "
            f"{got}, {_record_path(dest).name} records {recorded or 'nothing readable'}): "
            f"{_rebuild(source)}")
    return dest


@contextlib.contextmanager
def _lock(source: WeightSource) -> Iterator[None]:
    """Hold ``{name}.lock`` in the cache dir: one process at a time fetches ``source``."""
    from filelock import FileLock, Timeout

    path = cache_dir() / f"{source.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process fetching the {source.name} weights (lock file "
                  f"{path})", file=sys.stderr, flush=True)
            lock.acquire()
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        yield
    finally:
        lock.release()


def _cannot_write(path: Path, e: OSError) -> WeightsError:
    return WeightsError(f"cannot write {path} ({e.strerror or e}): free space there, or set "
                        "NSTJAX_CACHE to a writable directory with room")


def _by_hand(source: WeightSource, url: str) -> str:
    return (f"to install it by hand, download {source.describe_file()} from {url} into the "
            f"cache dir {cache_dir()}, or pass the path of a local weights file")


def _mismatch(source: WeightSource, raw: Path) -> str | None:
    """Why ``raw`` is not the source's file (its size, then its checksum), or None."""
    size = raw.stat().st_size
    if source.size is not None and size != source.size:
        return f"is {size:,} bytes, not {source.size:,}"
    got = file_hash(raw, source.hash_algorithm)
    if not source.hash_matches(got):
        return f"does not match its checksum {source.known_hash} ({source.check}; got {got})"
    return None


def _verify_placed(source: WeightSource, raw: Path) -> None:
    """Check a raw file found in the cache dir (placed by hand) against the registry."""
    problem = _mismatch(source, raw)
    if problem:
        hint = " (an incomplete download?)" if problem.startswith("is ") else ""
        raise WeightsError(f"{raw} {problem}{hint}: replace it with the file from "
                           f"{source.download_url()}, or delete it to download it again")


def _download(source: WeightSource, raw: Path) -> None:
    """Download ``source`` to ``raw`` with pooch (progress bar, timeout), then check it
    (size, and the whole checksum or its pinned prefix); a mismatch is removed.

    pooch's own log line is muted and the progress bar shows once data flows,
    so that a failure prints nothing but the one-line error.
    """
    import pooch
    import requests

    url, timeout = source.download_url(), download_timeout()
    progress = tqdm(desc=f"downloading {source.filename}", total=source.size or source.approx_size,
                    unit="B", unit_scale=True, delay=0.5)
    downloader = pooch.HTTPDownloader(progressbar=progress, chunk_size=1 << 20, timeout=timeout)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        pooch.retrieve(url, known_hash=None, fname=raw.name, path=raw.parent,
                       downloader=downloader)
        problem = _mismatch(source, raw)
    except requests.exceptions.RequestException as e:
        raise WeightsError(f"cannot download the {source.name} weights from {url} "
                           f"({_reason(e, timeout)}); {_by_hand(source, url)}") from None
    except OSError as e:
        raise _cannot_write(raw, e) from None
    finally:
        progress.close()
        logger.setLevel(level)
    if problem:
        raw.unlink(missing_ok=True)
        raise WeightsError(f"the file downloaded from {url} {problem} and was removed: try "
                           f"again; if that fails too, {_by_hand(source, source.url)}")


def _reason(exc, timeout: float) -> str:
    """A short cause of a failed request: 'Connection refused', 'HTTP 404 Not Found', ..."""
    import requests

    response = getattr(exc, "response", None)
    if isinstance(exc, requests.exceptions.HTTPError) and response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    text = str(exc)
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in text.lower():
        return f"no answer within {timeout:g} s"
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text)
    if errno:
        return errno.group(1).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]
