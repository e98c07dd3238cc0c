#!/usr/bin/env python3
"""Render a report in headless Chromium and check the screenshot is not blank.

    python scripts/check_report_render.py REPORT.html OUT.png [--chromium PATH] [--size 1280,2400]

Exit 0 when OUT.png exists and no single colour covers more than 99% of its pixels;
1 when the screenshot is missing or essentially blank; 2 for bad arguments or no Chromium.
The PNG is read with Pillow when it is installed, otherwise with zlib (and numpy if present).
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

BLANK_SHARE = 0.99
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(chromium: str, html: Path, png: Path, size: str = "1280,2400", timeout: float = 120) -> subprocess.CompletedProcess:
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="honed-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={size}",
            html.resolve().as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- PNG reading


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter_row(ftype: int, row: bytearray, prior: bytes | bytearray, bpp: int) -> bytearray:
    n = len(row)
    if ftype == 0:
        return row
    if ftype == 1:  # Sub
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif ftype == 2:  # Up
        row = bytearray((x + y) & 0xFF for x, y in zip(row, prior))
    elif ftype == 3:  # Average
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prior[i]) >> 1)) & 0xFF
    elif ftype == 4:  # Paeth
        for i in range(n):
            a = row[i - bpp] if i >= bpp else 0
            c = prior[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + _paeth(a, prior[i], c)) & 0xFF
    else:
        raise ValueError(f"unknown PNG filter type {ftype}")
    return row


def _colour_counts_zlib(data: bytes) -> tuple[int, int, Counter]:
    """(width, height, Counter of pixel byte-strings) for an 8-bit non-interlaced PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat = 8, []
    width = height = depth = ctype = interlace = None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if width is None or not idat:
        raise ValueError("PNG has no IHDR or no image data")
    if depth != 8 or interlace:
        raise ValueError(f"unsupported PNG (bit depth {depth}, interlace {interlace}); install Pillow")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    bpp = channels
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    counts: Counter = Counter()
    prior = bytes(stride)
    try:
        import numpy as np
    except ImportError:
        np = None
    for y in range(height):
        start = y * (stride + 1)
        ftype = raw[start]
        row = bytearray(raw[start + 1:start + 1 + stride])
        if np is not None and ftype in (1, 2):
            cur = np.frombuffer(bytes(row), dtype=np.uint8)
            if ftype == 2:
                cur = cur + np.frombuffer(bytes(prior), dtype=np.uint8)
            else:
                cur = np.cumsum(cur.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(-1)
            row = bytearray(cur.tobytes())
        else:
            row = _unfilter_row(ftype, row, prior, bpp)
        prior = bytes(row)
        if np is not None:
            px = np.frombuffer(prior, dtype=np.uint8).reshape(width, bpp)
            if bpp > 1:
                packed = np.zeros(width, dtype=np.uint64)
                for ch in range(bpp):
                    packed = (packed << np.uint64(8)) | px[:, ch].astype(np.uint64)
            else:
                packed = px[:, 0]
            vals, cnt = np.unique(packed, return_counts=True)
            counts.update(dict(zip(vals.tolist(), cnt.tolist())))
        else:
            counts.update(prior[i:i + bpp] for i in range(0, stride, bpp))
    return width, height, counts


def colour_stats(png: Path) -> tuple[int, int, int, float]:
    """(width, height, number of distinct colours, share of the most common colour)."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        with Image.open(png) as im:
            im = im.convert("RGBA")
            w, h = im.size
            colours = im.getcolors(maxcolors=w * h) or []
            top = max((c for c, _ in colours), default=0)
            return w, h, len(colours), top / (w * h)
    w, h, counts = _colour_counts_zlib(png.read_bytes())
    top = max(counts.values()) if counts else 0
    return w, h, len(counts), top / (w * h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--chromium", default=None, help="path or name of the Chromium binary")
    ap.add_argument("--size", default="1280,2400", help="window size W,H (default 1280,2400)")
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"error: no report at {args.report}", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(f"error: no Chromium found (tried {', '.join(CANDIDATES)}); pass --chromium", file=sys.stderr)
        return 2
    out = args.out.resolve()
    try:
        proc = screenshot(chromium, args.report, out, args.size, args.timeout)
    except subprocess.TimeoutExpired:
        print(f"FAIL: Chromium did not finish within {args.timeout:.0f}s", file=sys.stderr)
        return 1
    if not out.is_file() or out.stat().st_size == 0:
        print(f"FAIL: no screenshot written to {out} (chromium exit {proc.returncode})", file=sys.stderr)
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    try:
        w, h, n_colours, top_share = colour_stats(out)
    except Exception as exc:
        print(f"FAIL: cannot read {out}: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {w}x{h}, {n_colours} colours, most common colour covers {100 * top_share:.1f}% of pixels")
    if top_share > BLANK_SHARE:
        print(f"FAIL: the screenshot is essentially blank (> {100 * BLANK_SHARE:.0f}% one colour)", file=sys.stderr)
        return 1
    print("OK: the report renders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
