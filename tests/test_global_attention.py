"""The global scale attends over every spot of a slide: its fused attention must be exact and must not hold L × L.

`Attention` calls torch's scaled_dot_product_attention, which picks a fused (flash / memory-efficient) kernel
where it can. These tests pin down that (a) on a small slide it equals the textbook softmax(QKᵀ/√d)V, with
and without an additive bias, and (b) a 20,000-spot slide is encoded on a CPU without materialising the
20,000² attention matrix (8 heads × 20,000² × 4 B = 12.8 GB).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from genedml.heads import layers
from genedml.heads.layers import Attention, GlobalEncoder, masked_bias

REPO = Path(__file__).resolve().parents[1]


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d + bias) V in float64, the full L × L matrix held."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores + attn_mask.double()
    return (scores.softmax(-1) @ v).to(torch.float32)


def explicit_forward(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    out = exact_attention(q, k, v, bias)
    return attn.out(out.transpose(1, 2).reshape(b, n, d))


def slide_tokens(n: int, dim: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and Visium-style array positions (hex grid: odd rows shifted one column) of an n-spot slide."""
    g = torch.Generator().manual_seed(seed)
    cols = int(math.ceil(math.sqrt(n * 2 / math.sqrt(3))))
    row, col = torch.arange(n) // cols, torch.arange(n) % cols
    grid = torch.stack([2 * col + row % 2, row], dim=1)
    return torch.randn(n, dim, generator=g), grid


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_memory_efficient_attention_equals_exact_attention_on_a_small_slide(with_bias: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(128, heads=8, dropout=0.0).eval()
    tokens, _ = slide_tokens(300)
    x = tokens[None]
    bias = None
    if with_bias:  # a per-head additive bias plus masked keys, as the neighbour and fusion encoders pass
        valid = torch.rand(1, 300) > 0.2
        bias = torch.randn(1, 8, 300, 300) + masked_bias(valid, torch.float32)
    with torch.no_grad():
        fused = attn(x, bias)
        exact = explicit_forward(attn, x, bias)
    assert fused.shape == (1, 300, 128)
    torch.testing.assert_close(fused, exact, rtol=1e-4, atol=1e-5)


def test_global_encoder_with_fused_attention_equals_it_with_exact_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    encoder = GlobalEncoder(128, depth=2, heads=8, mlp_ratio=1.0, dropout=0.0).eval()
    tokens, grid = slide_tokens(300)
    with torch.no_grad():
        fused = encoder(tokens, grid)
        monkeypatch.setattr(layers.F, "scaled_dot_product_attention", exact_attention)
        exact = encoder(tokens, grid)
    torch.testing.assert_close(fused, exact, rtol=1e-4, atol=1e-5)


# Runs in its own process so the peak RSS (VmHWM, reset after setup) is the encoding's alone. Sizes run in
# order and stop at the first that needs half of a materialised 8 × L × L matrix, so a fallback to the exact
# kernel shows at 4,000 spots (0.5 GB) and never tries 20,000 (12.8 GB) on a shared machine.
MEASURE = textwrap.dedent("""
    import json, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from test_global_attention import slide_tokens
    from genedml.heads.layers import GlobalEncoder

    def rss(key):
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    torch.set_num_threads(1)
    encoder = GlobalEncoder(128, depth=2, heads=8).eval()
    out = {{}}
    for n in {sizes!r}:
        tokens, grid = slide_tokens(n)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before, start = rss("VmRSS"), time.perf_counter()
        with torch.no_grad():
            encoder(tokens, grid)
        out[n] = {{"peak_increase_bytes": rss("VmHWM") - before, "seconds": time.perf_counter() - start,
                  "materialised_bytes": 8 * n * n * 4}}
        if out[n]["peak_increase_bytes"] > out[n]["materialised_bytes"] / 2:
            break
    print(json.dumps(out))
""")


def global_encoding_peaks(sizes: list[int]) -> dict[int, dict[str, float]]:
    """Peak RSS increase and seconds of GlobalEncoder(128, depth 2, 8 heads) on slides of these sizes (CPU, 1 thread)."""
    code = MEASURE.format(tests=str(Path(__file__).parent), sizes=sizes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {int(n): r for n, r in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    print(runs)
    return runs


def test_global_encoding_of_a_4000_spot_slide_does_not_hold_the_attention_matrix() -> None:
    runs = global_encoding_peaks([4000])
    assert runs[4000]["peak_increase_bytes"] < 256e6, runs  # measured ≈ 50 MB; 8 × 4000² × 4 B = 512 MB


@pytest.mark.slow  # ≈ 22 s of encoding, 31 s in all, on this shared 2-core machine
def test_global_encoding_of_a_20000_spot_slide_runs_on_cpu_within_a_memory_bound() -> None:
    runs = global_encoding_peaks([4000, 20000])
    assert 20000 in runs, f"a 4,000-spot slide already needed {runs[4000]['peak_increase_bytes'] / 1e6:.0f} MB: L x L is materialised"
    assert runs[20000]["peak_increase_bytes"] < 1e9, runs  # measured ≈ 180 MB; 8 × 20000² × 4 B = 12.8 GB
