"""Writing image–caption webdataset shards (library + ``python -m ldm.data.write_shards``).

Output is plain webdataset: per sample ``<key>.jpg|png|webp`` (source bytes, not re-encoded,
when already JPEG/PNG/WebP; other formats PIL can read are converted to PNG), the caption as
``<key>.txt`` and/or inside ``<key>.json`` under a configurable field (the json also records the
source path). Keys are sequential ``%09d`` strings (dots in file names would break webdataset's
key/extension split). Each shard is written under ``<name>.tmp-<pid>`` and renamed when complete,
so a killed writer never leaves a half shard under a final name.

Sources: an image folder with sidecar captions (``x.jpg`` + ``x.txt``), or a CSV / JSONL table
with a path column and a caption column (paths relative to the table's directory).

Example::

    python -m ldm.data.write_shards --folder photos/ --out data/ \\
        --max-samples 10000 --max-bytes 1e9 --caption-format both
    # ... prints: train with: data.train_shards='data/train-{000000..000003}.tar'
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ldm.data.shard_writer import ShardWriter

_DIRECT_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_CONVERT_EXTS = {".bmp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclass
class SourceItem:
    """One image with its caption, before writing.

    Attributes:
        image_path: Path of the image file.
        caption: Caption text (None when the source had none).
        meta: Extra JSON-serialisable fields stored in the ``json`` member.
    """

    image_path: str
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class WriteSummary:
    """What a write produced: shard paths, samples written, and skips per reason."""

    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"wrote {self.written} samples to {len(self.shards)} shards; "
            f"skipped {sum(self.skipped.values())} ({skipped})"
        )


def load_image_member(path: str, verify: bool = True) -> tuple[str, bytes]:
    """Read an image file as ``(extension, bytes)`` for a shard member.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unsupported or undecodable image (message starts with the reason).
    """
    suffix = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        data = f.read()
    if suffix not in _DIRECT_EXTS and suffix not in _CONVERT_EXTS:
        raise ValueError(f"unsupported_format: {suffix}")
    try:
        img = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:  # PIL would only warn
            raise ValueError(
                f"too_large: {img.width}x{img.height} pixels > PIL.Image.MAX_IMAGE_PIXELS ({limit})"
            )
        if verify or suffix in _CONVERT_EXTS:
            img.draft("RGB", (64, 64))
            img.load()
    except Image.DecompressionBombError as exc:  # a decompression bomb: counted, not raised
        raise ValueError(f"too_large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"corrupt_image: {exc}") from exc
    if suffix in _DIRECT_EXTS:
        return _DIRECT_EXTS[suffix], data
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, format="PNG")
    return "png", out.getvalue()


def iter_folder(folder: str, caption_ext: str = "txt") -> Iterator[SourceItem]:
    """Images under ``folder`` (recursively, sorted) with ``<stem>.<caption_ext>`` captions."""
    exts = set(_DIRECT_EXTS) | _CONVERT_EXTS
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in exts:
                continue
            caption_path = os.path.join(root, f"{stem}.{caption_ext}")
            caption = None
            if os.path.isfile(caption_path):
                with open(caption_path, encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            rel = os.path.relpath(os.path.join(root, name), folder)
            yield SourceItem(os.path.join(root, name), caption, {"source": rel})


def iter_table(
    path: str, path_column: str = "path", caption_column: str = "caption"
) -> Iterator[SourceItem]:
    """Rows of a ``.csv`` or ``.jsonl`` table; relative image paths resolve to its directory."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            rows: Iterable[dict[str, Any]] = (json.loads(line) for line in f if line.strip())
        else:
            rows = csv.DictReader(f)
        for row in rows:
            image = str(row.get(path_column) or "")
            caption = row.get(caption_column)
            yield SourceItem(os.path.join(base, image), caption, {"source": image})


def write_shards(
    items: Iterable[SourceItem],
    pattern: str,
    *,
    max_samples: int | None = 10_000,
    max_bytes: float | None = None,
    caption_format: str = "txt",
    caption_field: str = "caption",
    verify: bool = True,
    progress: bool = True,
    total: int | None = None,
) -> WriteSummary:
    """Write source items into webdataset shards.

    Args:
        items: Images with captions (:func:`iter_folder`, :func:`iter_table`, or your own).
        pattern: Shard path pattern with a ``%d`` field, e.g. ``"out/train-%06d.tar"``.
        max_samples: Samples per shard limit.
        max_bytes: Bytes per shard limit.
        caption_format: ``"txt"``, ``"json"`` or ``"both"``.
        caption_field: JSON field holding the caption.
        verify: Decode each image (at reduced size) and skip undecodable ones.
        progress: Show a tqdm progress bar.
        total: Item count for the progress bar.

    Returns:
        The summary (also loggable with ``str()``).
    """
    if caption_format not in ("txt", "json", "both"):
        raise ValueError(f"caption_format must be txt, json or both, got {caption_format!r}")
    summary = WriteSummary()
    index = 0
    with ShardWriter(pattern, max_samples=max_samples, max_bytes=max_bytes) as writer:
        for item in tqdm(items, total=total, disable=not progress, unit="img"):
            caption = (item.caption or "").strip()
            if not caption:
                summary.skipped["missing_caption"] += 1
                continue
            try:
                ext, data = load_image_member(item.image_path, verify=verify)
            except FileNotFoundError:
                summary.skipped["missing_image"] += 1
                continue
            except ValueError as exc:
                summary.skipped[str(exc).split(":", 1)[0]] += 1
                continue
            sample: dict[str, Any] = {"__key__": f"{index:09d}", ext: data}
            if caption_format in ("txt", "both"):
                sample["txt"] = caption
            if caption_format in ("json", "both"):
                sample["json"] = {**item.meta, caption_field: caption}
            writer.write(sample)
            index += 1
    summary.shards = writer.shards
    summary.written = index
    return summary


DEFAULT_PREFIX = "train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see :func:`build_parser`)."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option is documented in ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m ldm.data.write_shards",
        description="Write image-caption webdataset shards from an image folder with sidecar "
        "captions or from a CSV/JSONL table.",
        epilog="Shards are named <out>/<prefix>-000000.tar, -000001.tar, ...; the summary "
        "prints the brace pattern to pass as data.train_shards.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--folder",
        help="image folder, searched recursively; each image's "
        "caption is the sidecar file <stem>.<caption-ext> next to it",
    )
    source.add_argument(
        "--table",
        help="CSV or JSONL file with an image path column and a "
        "caption column (paths relative to the table's folder)",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="shard name prefix: <prefix>-000000.tar (default: %(default)s)",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=10_000,
        help="samples per shard at most (default: %(default)s)",
    )
    parser.add_argument(
        "--max-bytes",
        type=float,
        default=None,
        help="bytes per shard at most, e.g. 1e9 (default: no limit)",
    )
    parser.add_argument(
        "--caption-format",
        choices=("txt", "json", "both"),
        default="txt",
        help="store captions as <key>.txt, inside <key>.json, or both "
        "(default: %(default)s; train with data.caption_key=txt or json:<field>)",
    )
    parser.add_argument(
        "--caption-field",
        default="caption",
        help="JSON field holding the caption (default: %(default)s)",
    )
    parser.add_argument(
        "--caption-ext",
        default="txt",
        help="--folder: extension of the sidecar caption files (default: %(default)s)",
    )
    parser.add_argument(
        "--path-column",
        default="path",
        help="--table: column with the image paths (default: %(default)s)",
    )
    parser.add_argument(
        "--caption-column",
        default="caption",
        help="--table: column with the captions (default: %(default)s)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not decode-check images (faster; undecodable images are then "
        "only counted when training reads them)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def source_items(args: argparse.Namespace) -> list[SourceItem]:
    """The items the command line names.

    Raises:
        UsageError: The folder or table does not exist, or its columns are missing.
    """
    from ldm.boundary import UsageError

    if args.folder:
        if not os.path.isdir(args.folder):
            raise UsageError(f"--folder {args.folder} is not a folder")
        return list(iter_folder(args.folder, args.caption_ext))
    if not os.path.isfile(args.table):
        raise UsageError(f"--table {args.table} not found (a .csv or .jsonl file)")
    try:
        items = list(iter_table(args.table, args.path_column, args.caption_column))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--table {args.table} cannot be parsed ({exc})") from None
    if items and all(not item.meta["source"] for item in items):
        raise UsageError(
            f"--table {args.table} has no column {args.path_column!r}: name the "
            "image path column with --path-column"
        )
    return items


def brace_pattern(shards: list[str]) -> str:
    """The webdataset brace pattern naming exactly ``shards`` (as :meth:`ShardWriter` names
    them), e.g. ``out/train-{000000..000011}.tar``; one shard is its own path."""
    if len(shards) <= 1:
        return shards[0] if shards else ""
    first, last = shards[0], shards[-1]
    stem, digits = first[: -len(".tar")].rsplit("-", 1)
    last_digits = last[: -len(".tar")].rsplit("-", 1)[1]
    return f"{stem}-{{{digits}..{last_digits}}}.tar"


def run(args: argparse.Namespace) -> WriteSummary:
    """Write the shards the command line asks for and print the summary.

    Raises:
        UsageError: Bad source (see :func:`source_items`), or no sample could be written.
    """
    from ldm.boundary import UsageError

    items = source_items(args)
    if args.max_samples < 1:
        raise UsageError(f"--max-samples must be at least 1, got {args.max_samples}")
    summary = write_shards(
        items,
        os.path.join(args.out, f"{args.prefix}-%06d.tar"),
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        caption_format=args.caption_format,
        caption_field=args.caption_field,
        verify=not args.no_verify,
        progress=not args.quiet,
        total=len(items),
    )
    print(summary)
    if not summary.written:
        source = args.folder or args.table
        raise UsageError(
            f"no sample written from {source} ({len(items)} images found): "
            "images need a caption (--caption-ext / --caption-column)"
        )
    print(f"train with: data.train_shards='{brace_pattern(summary.shards)}'")
    return summary


def _cli(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when shards were written, 2 (one line) for bad input."""
    from ldm.boundary import error_boundary

    return error_boundary(_cli)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
