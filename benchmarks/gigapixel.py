"""Gigapixel slides: does reading spot patches from a >= 50,000 x 50,000 px pyramidal TIFF touch only the tiles
it needs?

In a temporary directory (deleted afterwards unless --keep):
  1. writes a tiled, JPEG-compressed, pyramidal BigTIFF of `--size` x `--size` px (level 0 at `--mpp`),
     levels halving down to ~2,000 px in SubIFDs, like a scanner's SVS/OME-TIFF. Tissue is an ellipse over
     most of the slide, glass (white) around it. The tissue tiles are a few distinct H&E-like tiles from
     genedml's synthetic tissue, JPEG-encoded once by tifffile and written again and again as raw bytes,
     so the file takes seconds, not the hours encoding 40k tiles would;
  2. places `--spots` spots on a Visium-like hexagonal lattice (pitch `--pitch-um`) in the tissue;
  3. reads the 224 px region of every spot through genedml.data.image.open_image / TiffImage.read_region,
     as extraction does, in the spots' given order (random, as Visium barcode order is) and in raster order;
  4. optionally (`--extract-spots N`) runs the real extraction (local patch + lattice neighbours) with the
     random-init `tiny-cnn` backbone on N spots into a temporary cache, with the tile cache off, then on.
Reports open seconds, tiles and bytes (compressed, read from the file; decoded) per spot, seconds per spot,
peak RSS, and how many distinct tiles all reads touched; each order is read with TiffImage's tile cache off
and at its default size (open_image's). Prints markdown and
writes JSON (machine, date, exact command).

    nice -n 10 python benchmarks/gigapixel.py --size 50000 --spots 3000 --out benchmarks/results/gigapixel
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from genedml.data.image import open_image
from genedml.data.synthetic import make_synthetic_sample
from genedml.data.tiff import TiffImage

JPEG = {"compression": "jpeg", "compressionargs": {"level": 85}, "photometric": "rgb"}
DISTINCT_TILES = 24
MIN_LEVEL_PX = 2000


# ------------------------------------------------------------------------------------------- slide
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_mb(field: str) -> float | None:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def textured_tiles(tile: int, mpp: float, count: int) -> list[np.ndarray]:
    """`count` distinct tile x tile H&E-like crops of genedml's synthetic tissue."""
    side_spots = int(np.ceil(np.sqrt(count))) * tile * mpp / 100.0  # enough 100 µm pitches to cut `count`
    sample = make_synthetic_sample("texture", grid=(int(side_spots) + 1,) * 2, mpp=mpp, seed=7)
    pixels = sample.image.read_region(0, 0, sample.image.width, sample.image.height).pixels
    rows, cols = pixels.shape[0] // tile, pixels.shape[1] // tile
    crops = [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    if len(crops) < count:
        raise SystemExit(f"synthetic texture gave {len(crops)} tiles, need {count}")
    return crops[:count]


def encoded_tiles(tiles: list[np.ndarray], workdir: Path) -> list[bytes]:
    """Each tile JPEG-encoded exactly as tifffile writes it (the raw bytes of a scratch file's tiles)."""
    tile = tiles[0].shape[0]
    strip = np.concatenate(tiles, axis=1)  # one row of tiles
    scratch = workdir / "scratch.tif"
    tifffile.imwrite(scratch, strip, tile=(tile, tile), bigtiff=True, **JPEG)
    with tifffile.TiffFile(scratch) as tif, open(scratch, "rb") as fh:
        page = tif.pages[0]
        out = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            fh.seek(offset)
            out.append(fh.read(count))
    scratch.unlink()
    return out


def write_slide(path: Path, size: int, tile: int, tissue: list[bytes], glass: bytes) -> dict:
    """Pyramidal BigTIFF: level 0 of size x size, levels halving to >= MIN_LEVEL_PX, from pre-encoded tiles."""
    sizes = [size]
    while sizes[-1] // 2 >= MIN_LEVEL_PX:
        sizes.append(sizes[-1] // 2)

    def tiles_of(side: int):
        n = -(-side // tile)
        centre = (n - 1) / 2
        for r in range(n):
            for c in range(n):
                inside = ((r - centre) / (0.45 * n)) ** 2 + ((c - centre) / (0.40 * n)) ** 2 <= 1.0
                yield tissue[(r * 7 + c * 13) % len(tissue)] if inside else glass

    start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, side in enumerate(sizes):
            extra = {"subifds": len(sizes) - 1} if level == 0 else {"subfiletype": 1}
            tif.write(tiles_of(side), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), **JPEG, **extra)
    return {"seconds": time.perf_counter() - start, "bytes": path.stat().st_size, "levels": sizes}


def hex_spots(n: int, pitch_px: float, centre: float, seed: int) -> np.ndarray:
    """(n, 2) x, y centres on a hexagonal lattice around (centre, centre), in a random (barcode-like) order."""
    cols = int(np.ceil(np.sqrt(n * 2 / np.sqrt(3))))
    rows = -(-n // cols)
    r, c = np.divmod(np.arange(rows * cols), cols)
    xy = np.stack([(c + 0.5 * (r % 2)) * pitch_px, r * pitch_px * np.sqrt(3) / 2], axis=1)[:n]
    xy += centre - xy.mean(axis=0)
    return xy[np.random.default_rng(seed).permutation(n)]


# ------------------------------------------------------------------------------------------- reads
class TileBytes:
    """Compressed bytes of each level-0 tile, by the zarr chunk key tifffile uses ("row.col.0")."""

    def __init__(self, path: Path) -> None:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].levels[0].pages[0]
            self.counts = np.asarray(page.databytecounts)
            self.across = -(-page.imagewidth // page.tilewidth)
        self.keys: list[str] = []

    def wrap(self, image: TiffImage) -> None:
        """Record the keys of the tiles `image` fetches from the file (not those its tile cache serves)."""
        get = image._store.get  # TiffImage's caching and counting wrapper

        async def recording_get(key: str, *args, **kwargs):
            if re.fullmatch(r"\d+\.\d+\.\d+", key) and key not in image._tiles:
                self.keys.append(key)
            return await get(key, *args, **kwargs)

        image._store.get = recording_get

    def compressed(self, keys: list[str]) -> int:
        idx = [int(r) * self.across + int(c) for r, c, _ in (k.split(".") for k in keys)]
        return int(self.counts[idx].sum())


def read_spots(path: Path, boxes: np.ndarray, tile_bytes: TileBytes, label: str, cache: bool) -> dict:
    """Open the slide and read every box once, in the given order; per-spot costs. `cache`: TiffImage's
    default tile cache (what open_image gives extraction), else none."""
    start = time.perf_counter()
    image = open_image(path) if cache else TiffImage(path, tile_cache_mb=0)
    open_s = time.perf_counter() - start
    assert isinstance(image, TiffImage)
    tile_bytes.keys = []
    tile_bytes.wrap(image)
    rss_before = _vm_mb("VmRSS")
    start = time.perf_counter()
    cpu = time.process_time()
    for x, y, w, h in boxes:
        image.read_region(int(x), int(y), int(w), int(h))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(boxes)
    result = {
        "order": label, "tile_cache_mb": image._tiles.max_bytes / 2**20, "spots": n, "open_seconds": open_s, "seconds_per_spot": seconds / n,
        "cpu_seconds_per_spot": cpu / n, "tiles_per_spot": image.chunks_read / n,
        "decoded_bytes_per_spot": image.bytes_decoded / n,
        "compressed_bytes_per_spot": tile_bytes.compressed(tile_bytes.keys) / n,
        "region_bytes": int(boxes[0, 2] * boxes[0, 3] * 3),
        "cache_hits_per_spot": image.cache_hits / n, "distinct_tiles": len(set(tile_bytes.keys)), "rss_before_mb": rss_before, "rss_after_mb": _vm_mb("VmRSS"),
    }
    assert image.chunks_read == len(tile_bytes.keys)
    image.close()
    return result


def run_extract(path: Path, centres: np.ndarray, mpp: float, n: int, workdir: Path, cache: bool) -> dict:
    """The real extraction (local + lattice neighbours, tiny-cnn random-init) of n neighbouring spots, with
    TiffImage's default tile cache (as `genedml extract` opens slides) or none."""
    import torch

    from genedml.backbones import load_backbone
    from genedml.data.sample import Sample
    from genedml.extract.runner import ExtractSettings, run_extraction

    torch.set_num_threads(1)
    # The n spots nearest the lattice centre (a contiguous patch of tissue, so lattice tiles are shared as in
    # a whole capture area), still in their random order.
    centre = centres.mean(axis=0)
    centres = centres[np.sort(np.argsort(np.linalg.norm(centres - centre, axis=1))[:n])]
    image = open_image(path) if cache else TiffImage(path, tile_cache_mb=0)
    sample = Sample("giga", "giga", mpp, np.array([f"s{i}" for i in range(n)]), centres[:n], image)
    backbone = load_backbone("tiny-cnn", random_init=True, device="cpu")
    settings = ExtractSettings(batch_size=64, workers=1, device="cpu")
    start, cpu = time.perf_counter(), time.process_time()
    reports = run_extraction([sample], backbone, workdir / f"cache{int(cache)}", settings)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = reports[0]
    return {"tile_cache": cache, "spots": n, "seconds": seconds, "seconds_per_spot": seconds / n,
            "cpu_seconds_per_spot": cpu / n,
            "tiles_encoded": int(report.tiles_local + report.tiles_neighbor),
            "level0_tiles_decoded_per_spot": image.chunks_read / n,
            "decoded_bytes_per_spot": image.bytes_decoded / n, "peak_rss_mb": _rss_mb()}


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return {"cpu_model": cpu.group(1).strip() if cpu else platform.machine(), "cpu_count": os.cpu_count(),
            "mem_gb": round(int(mem.group(1)) / 2**20, 1) if mem else None, "tifffile": tifffile.__version__,
            "python": platform.python_version()}


def markdown(result: dict) -> str:
    s = result["slide"]
    lines = [(f"Slide {s['levels'][0]:,} × {s['levels'][0]:,} px, {s['tile']} px JPEG tiles, {len(s['levels'])} levels, "
             f"{s['bytes'] / 1e9:.2f} GB, written in {s['seconds']:.1f} s; {result['spots']:,} spots, {result['fov_px']} px regions."),
             "",
             ("| order | tile cache | open s | tiles decoded / spot | compressed KB read / spot | decoded KB / spot "
             "(region: KB) | ms / spot, wall (CPU) | distinct tiles (decoded / distinct) | RSS before → after MB |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["reads"]:
        cache = f"{r['tile_cache_mb']:.0f} MB" if r["tile_cache_mb"] else "off"
        lines.append(f"| {r['order']} | {cache} | {r['open_seconds']:.3f} | {r['tiles_per_spot']:.2f} | "
                     f"{r['compressed_bytes_per_spot'] / 1e3:.0f} | {r['decoded_bytes_per_spot'] / 1e3:.0f} "
                     f"({r['region_bytes'] / 1e3:.0f}) | {r['seconds_per_spot'] * 1e3:.2f} ({r['cpu_seconds_per_spot'] * 1e3:.2f}) | {r['distinct_tiles']:,} "
                     f"({r['tiles_per_spot'] * r['spots'] / r['distinct_tiles']:.1f}×) | "
                     f"{r['rss_before_mb']:.0f} → {r['rss_after_mb']:.0f} |")
    for e in result["extract"]:
        lines += ["", (f"Extraction (tiny-cnn, random-init, local + lattice, 1 torch thread, tile cache "
                  f"{'on' if e['tile_cache'] else 'off'}) of {e['spots']} spots: {e['seconds']:.1f} s "
                  f"({e['seconds_per_spot'] * 1e3:.1f} ms / spot wall, {e['cpu_seconds_per_spot'] * 1e3:.1f} CPU), "
                  f"{e['tiles_encoded']} patches encoded, {e['level0_tiles_decoded_per_spot']:.1f} level-0 tiles and "
                  f"{e['decoded_bytes_per_spot'] / 1e6:.2f} MB decoded per spot.")]
    lines += ["", f"Peak RSS of the whole run: {result['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=50_000, help="level-0 width and height in px")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--spots", type=int, default=3000)
    parser.add_argument("--pitch-um", type=float, default=100.0)
    parser.add_argument("--fov", type=int, default=224, help="region side in level-0 px")
    parser.add_argument("--extract-spots", type=int, default=0, help="run the real extraction on this many spots")
    parser.add_argument("--keep", type=Path, default=None, help="write the slide here and keep it")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gigapixel"))
    args = parser.parse_args(argv)
    command = "python " + shlex.join(["benchmarks/gigapixel.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="genedml-gigapixel-") as tmp:
        workdir = Path(tmp)
        path = (args.keep or workdir) / "slide.tif"
        start = time.perf_counter()
        tiles = textured_tiles(args.tile, args.mpp, DISTINCT_TILES)
        tissue = encoded_tiles(tiles, workdir)
        glass = encoded_tiles([np.full_like(tiles[0], 242)], workdir)[0]
        texture_s = time.perf_counter() - start
        slide = write_slide(path, args.size, args.tile, tissue, glass) | {"tile": args.tile, "texture_seconds": texture_s,
                                                                          "tissue_tile_kb": np.mean([len(t) for t in tissue]) / 1e3}
        del tiles
        centres = hex_spots(args.spots, args.pitch_um / args.mpp, args.size / 2, seed=0)
        boxes = np.concatenate([np.rint(centres - args.fov / 2).astype(np.int64),
                                np.full((len(centres), 2), args.fov)], axis=1)
        tile_bytes = TileBytes(path)
        raster = np.lexsort((boxes[:, 0], boxes[:, 1] // args.tile))
        reads = [read_spots(path, b, tile_bytes, label, cache)
                 for b, label in ((boxes, "spot order (random, as Visium barcodes)"),
                                  (boxes[raster], "raster order (tile row, then x)"))
                 for cache in (False, True)]
        extract = [run_extract(path, centres, args.mpp, args.extract_spots, workdir, cache)
                   for cache in (False, True)] if args.extract_spots else []
    result = {"slide": slide, "spots": args.spots, "fov_px": args.fov, "mpp": args.mpp, "pitch_um": args.pitch_um,
              "reads": reads, "extract": extract, "peak_rss_mb": _rss_mb(), "command": command,
              "machine": machine(), "load_average": os.getloadavg(),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"size{args.size}_tile{args.tile}_spots{args.spots}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\n-> {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
