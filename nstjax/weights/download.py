"""The cache dir: download a registry source once, verify it, keep its canonical file.

``$NSTJAX_CACHE`` (default: the user cache dir) holds ``{name}.safetensors``
per source. A source's raw file placed there by hand under its original name
is verified and converted instead of downloading; ``$NSTJAX_WEIGHTS_URL_<NAME>``
replaces a source's URL (a mirror: the checksum still applies) and
``$NSTJAX_DOWNLOAD_TIMEOUT`` the 30 s network timeout.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import platformdirs
from tqdm import tqdm

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
    """The canonical file of ``source``: cached, else converted from its raw file
    (placed by hand, or downloaded and verified); the raw file is then removed."""
    dest = cached_path(source)
    if dest.is_file():
        return dest
    raw = cache_dir() / source.filename
    if raw.is_file():
        _verify_placed(source, raw)
    else:
        _download(source, raw)
    try:
        weights = read_weights(raw, source.preprocessing, source.name)
    except WeightsError:
        if dest.is_file():  # another process converted and removed it meanwhile
            return dest
        raise
    try:
        save_canonical(dest, weights)
    except OSError as e:
        raise WeightsError(f"cannot write {dest} ({e.strerror or e}): set NSTJAX_CACHE "
                           "to a writable directory") from None
    raw.unlink(missing_ok=True)
    return dest


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
        raise WeightsError(f"cannot write {raw} ({e.strerror or e}): set NSTJAX_CACHE to a "
                           "writable directory") from None
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
