"""Decoding (issue 19's figures): one decode step against SDPA's one-query attention over the
same cache, and a prefill with return_cache=True against the plain forward.

    python bench/run.py decode [--rows B,L,H,H_kv,D ...] [--knobs BLOCK_N=32,MIN_PROGRAMS=512]
    python bench/run.py decode --sweep     # each row's decode kernels under a grid of knobs

A decode step: one new token per row of a cache of L tokens (bf16), timed end to end as a
model calls it (deltaformer_decode: checks, the cache's bookkeeping, two launches; each
timed call appends to a cache whose length is reset between calls by the host alone), and
the kernels alone (the decode stage with fixed buffers). SDPA: scaled_dot_product_attention
of the new query over the cache's keys and values ([B, H, 1, D] over [B, H_kv, L, D], GQA
where H_kv < H), the attention a transformer's decode step runs. Both read one key and one
value (u) row per cached token, so both are bound by memory bandwidth; the table gives the
bytes each step reads per microsecond too. do_bench medians, fresh random inputs, one
process. The decode step's o is checked against the float64 recomputation at small sizes
by the tests (tests/test_decode.py), and here against the prefill of the whole sequence at
the first row.
"""

import argparse

import torch
import torch.nn.functional as F

from dfgen.api.cache import DecodingCache
from dfgen.kernels.decode import decode_knobs, decode_step
from dfgen.runtime import deltaformer_attn, deltaformer_decode
from dfgen.tools.timing import timer

ROWS = ["8,8192,16,16,128", "1,32768,16,16,128", "32,2048,32,8,128", "8,8192,16,16,64",
        "64,1024,16,16,128"]
PREFILL = ["1,4096,16,16,128", "8,1024,32,32,64"]
DTYPE = torch.bfloat16


def _row(text):
    return tuple(int(x) for x in text.split(","))


def _knobs(text):
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, value = item.split("=")
        out[name] = int(value)
    return out


def _cache(B, L, H, H_kv, D, gen):
    """A cache of L random tokens per row, with room for one more."""
    k = torch.randn(B, L + 64, H_kv, D, generator=gen, device="cuda", dtype=DTYPE)
    u = torch.randn(B, L + 64, H, D, generator=gen, device="cuda", dtype=DTYPE)
    lengths = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return DecodingCache(k, u, lengths, L)


def decode_row(B, L, H, H_kv, D, knobs, time):
    gen = torch.Generator(device="cuda").manual_seed(B * L + H)
    cache = _cache(B, L, H, H_kv, D, gen)
    q = torch.randn(B, 1, H, D, generator=gen, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, 1, H_kv, D, generator=gen, device="cuda", dtype=DTYPE) for _ in range(2))
    beta = torch.rand(B, 1, H, generator=gen, device="cuda")
    full = decode_knobs(knobs, D, DTYPE)
    start, written = cache.lengths.clone(), torch.empty_like(cache.lengths)

    def step():  # as a model calls it; the cache is rewound on the host (no launch)
        cache.max_length, cache.lengths, cache._spare = L, start, written
        return deltaformer_decode(q, k, v, beta, cache, config=knobs or None)

    spare = torch.empty_like(start)

    def kernels():
        return decode_step(q, k, v, beta, cache.k, cache.u, start, spare, L, full)

    keys = cache.k[:, :L].transpose(1, 2)  # [B, H_kv, L, D] views of the same memory
    values = cache.u[:, :L, :H_kv].transpose(1, 2)
    query = q.transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(query, keys, values, enable_gqa=H_kv < H)

    with torch.no_grad():
        ours, alone, theirs = time(step), time(kernels), time(sdpa)
    read = B * L * (H_kv + H) * D * 2  # bytes of k and u (SDPA: k and v, H_kv heads each)
    read_sdpa = B * L * 2 * H_kv * D * 2
    return ours, alone, theirs, read / (alone * 1e3) / 1e3, read_sdpa / (theirs * 1e3) / 1e3


SWEEP = dict(BLOCK_N=[32, 64, 128], MIN_PROGRAMS=[128, 256, 512, 1024], num_warps=[2, 4, 8],
             num_stages=[2, 3, 4])


def sweep_row(B, L, H, H_kv, D, time):
    """The decode kernels' time under every point of SWEEP that fits (fastest first)."""
    import itertools

    from dfgen.errors import ConfigError

    gen = torch.Generator(device="cuda").manual_seed(B * L + H)
    cache = _cache(B, L, H, H_kv, D, gen)
    q = torch.randn(B, 1, H, D, generator=gen, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, 1, H_kv, D, generator=gen, device="cuda", dtype=DTYPE) for _ in range(2))
    beta = torch.rand(B, 1, H, generator=gen, device="cuda")
    start, spare = cache.lengths.clone(), torch.empty_like(cache.lengths)
    found, points = [], [decode_knobs(None, D, DTYPE)]  # the default first
    for values in itertools.product(*SWEEP.values()):
        try:
            knobs = decode_knobs(dict(zip(SWEEP, values)), D, DTYPE)
        except ConfigError:
            continue
        if knobs != points[0]:
            points.append(knobs)
    for knobs in points:
        with torch.no_grad():
            ms = time(lambda: decode_step(q, k, v, beta, cache.k, cache.u, start, spare, L, knobs))
        found.append((ms, knobs))
    return sorted(found, key=lambda item: item[0])


def check_against_prefill(gen_seed=0):
    """Prefill T-1 tokens, decode the last: equal to the prefill of all T (dfgen's own
    forward) at the last row."""
    gen = torch.Generator(device="cuda").manual_seed(gen_seed)
    B, T, H, D = 2, 3000, 8, 128
    q, k, v = (torch.randn(B, T, H, D, generator=gen, device="cuda", dtype=DTYPE) for _ in range(3))
    beta = torch.rand(B, T, H, generator=gen, device="cuda")
    with torch.no_grad():
        full = deltaformer_attn(q, k, v, beta)
        _, cache = deltaformer_attn(q[:, :-1], k[:, :-1], v[:, :-1], beta[:, :-1], return_cache=True)
        last = deltaformer_decode(q[:, -1:], k[:, -1:], v[:, -1:], beta[:, -1:], cache)
    return ((last - full[:, -1:]).float().norm() / full[:, -1:].float().norm()).item()


def prefill_row(B, T, H, H_kv, D, time):
    gen = torch.Generator(device="cuda").manual_seed(T + H)
    q = torch.randn(B, T, H, D, generator=gen, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, T, H_kv, D, generator=gen, device="cuda", dtype=DTYPE) for _ in range(2))
    beta = torch.rand(B, T, H, generator=gen, device="cuda")
    with torch.no_grad():
        plain = time(lambda: deltaformer_attn(q, k, v, beta))
        cached = time(lambda: deltaformer_attn(q, k, v, beta, return_cache=True))
    return plain, cached


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=ROWS, help="B,L,H,H_kv,D of each decode row")
    ap.add_argument("--prefill", nargs="*", default=PREFILL, help="B,T,H,H_kv,D of each prefill row")
    ap.add_argument("--knobs", help="decode knobs, e.g. BLOCK_N=32,MIN_PROGRAMS=512")
    ap.add_argument("--sweep", action="store_true", help="each row's decode kernels under a grid "
                    "of knobs: the five fastest and the default")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "decode measures GPU time: it needs a CUDA device"
    time = timer(True)
    knobs = _knobs(args.knobs)
    if args.sweep:
        for text in args.rows:
            row = _row(text)
            found = sweep_row(*row, time)
            default = decode_knobs(None, row[4], DTYPE)
            default_ms = next(ms for ms, k in found if k == default)
            print(f"{text}: {len(found)} points; default {default_ms:.4f} ms", flush=True)
            for ms, k in found[:5]:
                print(f"  {ms:.4f} ms ({default_ms / ms:.2f}x the default) {k}", flush=True)
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, decode knobs "
          f"{decode_knobs(knobs, 128, DTYPE)} (head dim 128); the last row of a 3000-token "
          f"sequence decoded against its prefill: rel. diff {check_against_prefill():.1e}")
    print("\n| B, L, H, H_kv, D | decode step ms | its kernels ms | SDPA 1-query ms | step / SDPA "
          "| kernels GB/s | SDPA GB/s |")
    print("|---|---|---|---|---|---|---|")
    for text in args.rows:
        row = _row(text)
        ours, alone, theirs, bw, bw_sdpa = decode_row(*row, knobs, time)
        print(f"| {text} | {ours:.4f} | {alone:.4f} | {theirs:.4f} | {ours / theirs:.2f}x | "
              f"{bw:.0f} | {bw_sdpa:.0f} |", flush=True)
    print("\n| B, T, H, H_kv, D | forward ms | forward + return_cache ms | ratio |")
    print("|---|---|---|---|")
    for text in args.prefill:
        plain, cached = prefill_row(*_row(text), time)
        print(f"| {text} | {plain:.4f} | {cached:.4f} | {cached / plain:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
