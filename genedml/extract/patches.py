"""Reading patches for the encoder: batched, resized to the model's pixel size, prefetched in threads.

Region reading (numpy slicing of a decoded JPEG, or TIFF tile decoding) and resizing release the GIL,
so a small thread pool keeps the next batches ready while the model runs on the current one.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from genedml.data.image import RegionReader


def read_patches(image: RegionReader, boxes: np.ndarray, patch_px: int) -> torch.Tensor:
    """(B, patch_px, patch_px, 3) uint8 patches for `boxes` (x, y, w, h), white-padded off the image."""
    regions = np.stack([image.read_region(int(x), int(y), int(w), int(h)).pixels for x, y, w, h in boxes])
    batch = torch.from_numpy(regions)
    if batch.shape[1] != patch_px or batch.shape[2] != patch_px:
        # Antialiased resampling to the model's pixel size (a field of view in µm at the target µm/px).
        chw = batch.permute(0, 3, 1, 2).float()
        chw = F.interpolate(chw, size=(patch_px, patch_px), mode="bilinear", antialias=True, align_corners=False)
        batch = chw.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return batch


def iter_patch_batches(
    image: RegionReader,
    boxes: np.ndarray,
    patch_px: int,
    batch_size: int,
    workers: int = 2,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield uint8 batches in `boxes` order; up to `workers + 1` batches are read ahead in threads."""

    def load(chunk: np.ndarray) -> torch.Tensor:
        batch = read_patches(image, chunk, patch_px)
        return batch.pin_memory() if pin_memory else batch

    chunks = (boxes[i : i + batch_size] for i in range(0, len(boxes), batch_size))
    if workers <= 0:
        yield from (load(c) for c in chunks)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="genedml-patches") as pool:
        pending: deque = deque(pool.submit(load, c) for _, c in zip(range(workers + 1), chunks))
        while pending:
            batch = pending.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield batch


def dihedral_views(batch: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) → (B, 8, H, W, 3): rotations by 0/90/180/270°, then the same after a horizontal flip.

    View 0 is the identity, so the plain local features equal view 0 of the augmented ones.
    """
    flipped = torch.flip(batch, dims=(2,))
    views = [torch.rot90(batch, k, dims=(1, 2)) for k in range(4)] + [torch.rot90(flipped, k, dims=(1, 2)) for k in range(4)]
    return torch.stack(views, dim=1)
