"""python -m nstjax.weights: list, fetch, convert and inspect VGG19 weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nstjax.errors import UserError
from nstjax.vgg import CAFFE, TORCHVISION, Preprocessing
from nstjax.weights import (DEFAULT, SOURCES, WeightsError, cache_dir, cached_path, fetch,
                            load_weights, read_file, resolve, save_canonical, save_npz)
from nstjax.weights.download import TIMEOUT_VARIABLE

PRESETS = {"caffe": CAFFE, "torchvision": TORCHVISION}
_WRITERS = {".safetensors": save_canonical, ".npz": save_npz}


def describe(p: Preprocessing | None) -> str:
    if p is None:
        return "unknown (pass it explicitly when loading this file)"
    name = next((f"{k}: " for k, v in PRESETS.items() if v == p), "")
    return (f"{name}{p.channel_order}, scale {p.scale:g}, mean {list(p.mean)}, "
            f"std {list(p.std)}")


def _size(source) -> str:
    return f"{'' if source.size else '~'}{source.approx_size / 1e6:.1f} MB"


def cmd_list(args) -> None:
    rows = [("NAME", "SIZE", "LICENCE", "CACHED", "CHECK", "DESCRIPTION")]
    for s in SOURCES.values():
        cached = "yes" if cached_path(s).is_file() else "no"
        rows.append((s.name + (" (default)" if s.name == DEFAULT else ""), _size(s), s.licence,
                     cached, s.check, f"{s.description}; {s.file_format}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"cache dir: {cache_dir()}")


def cmd_fetch(args) -> None:
    print(fetch(args.name))


def cmd_convert(args) -> None:
    dst = Path(args.dst)
    if dst.suffix not in _WRITERS:
        raise WeightsError(f"{dst}: convert writes .safetensors (canonical) or .npz, "
                           f"not {dst.suffix or 'a file without extension'}")
    weights = load_weights(args.src, PRESETS.get(args.preprocessing))
    _WRITERS[dst.suffix](dst, weights)
    print(f"wrote {dst} (preprocessing {describe(weights.preprocessing)})")


def cmd_info(args) -> None:
    path, _ = resolve(args.file)
    f = read_file(path)
    print(f"file: {f.path}")
    print(f"sha256: {f.sha256}")
    print(f"layout: {f.layout}")
    print(f"preprocessing: {describe(f.preprocessing)}")
    for key in ("source", "origin_sha256"):
        if key in f.metadata:
            print(f"{key.replace('_', ' ')}: {f.metadata[key]}")
    print("layers:")
    for name, p in f.params.items():
        print(f"  {name:8s} kernel {tuple(p['kernel'].shape)}  bias {tuple(p['bias'].shape)}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m nstjax.weights", description="VGG19 weights for nstjax.",
        epilog=f"Weights are cached in $NSTJAX_CACHE (now {cache_dir()}); "
               f"${TIMEOUT_VARIABLE} sets the network timeout (s); "
               "$NSTJAX_WEIGHTS_URL_<NAME> a mirror URL for a source.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the named sources: sizes, licences, cached or not")
    p = sub.add_parser("fetch", help="download a named source into the cache; print its path")
    p.add_argument("name", help=f"one of {', '.join(SOURCES)}")
    p = sub.add_parser("convert", help="write a name's or file's weights as canonical "
                                       ".safetensors or .npz")
    p.add_argument("src", help="a registry name or a .h5, .safetensors, .npz or .pth file")
    p.add_argument("dst", help="the file to write: .safetensors or .npz")
    p.add_argument("--preprocessing", choices=sorted(PRESETS),
                   help="what the weights expect, for a file that does not say")
    p = sub.add_parser("info", help="layers, shapes, preprocessing and sha256 of a file or name")
    p.add_argument("file", help="a weights file or a registry name")
    return ap


COMMANDS = {"list": cmd_list, "fetch": cmd_fetch, "convert": cmd_convert, "info": cmd_info}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
