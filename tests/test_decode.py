"""Prefill with return_cache=True, then decoding steps: each step's o, u and lse equal the
full recomputation's rows at those positions (the float64 reference over the whole
sequence), for one and several new tokens a step, grouped heads, padded and packed
prefills, cache growth, a split and an unsplit cache sweep; bad inputs."""

import dataclasses
import math

import pytest
import torch

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, make_grouped_inputs
from dfgen.errors import ConfigError, InputError
from dfgen.reference import naive_deltaformer_attn, naive_deltaformer_u, naive_lse
from dfgen.runtime import DecodingCache, deltaformer_attn, deltaformer_decode

SMALL = dict(BLOCK_N=16, MIN_PROGRAMS=1024)  # many cache slices even at tiny sizes
UNSPLIT = dict(BLOCK_N=16, MIN_PROGRAMS=1)



def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


def _reference(q, k, v, beta, scale=None):
    """o and u of the whole sequence (float64), per query head."""
    args = [t.double() for t in (q, k, v, beta)]
    return naive_deltaformer_attn(*args, scale=scale), naive_deltaformer_u(*args, scale=scale)


def _decode_through(q, k, v, beta, T0, steps, config, scale=None):
    """Prefill the first T0 tokens, then decode the rest in steps of the given sizes; the
    outputs of every position and the cache at the end."""
    with torch.no_grad():
        o, cache = deltaformer_attn(q[:, :T0], k[:, :T0], v[:, :T0], beta[:, :T0],
                                    return_cache=True, scale=scale)
        outs, t = [o], T0
        for n in steps:
            sl = slice(t, t + n)
            outs.append(deltaformer_decode(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], cache,
                                           config=config))
            t += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("config", [SMALL, UNSPLIT], ids=["split", "unsplit"])
def test_decode_steps_equal_the_full_recomputation(config, dtype_name):
    dtype = DTYPES[dtype_name]
    B, H, H_kv, D = 2, 4, 2, 32
    steps = [1, 1, 3, 1, 5, 1]
    T0 = 21
    q, k, v, beta = make_grouped_inputs(B, T0 + sum(steps), H, H_kv, D, dtype, seed=3)
    o, cache = _decode_through(q, k, v, beta, T0, steps, config)
    ref_o, ref_u = _reference(q, k, v, beta)
    tol = _tol(dtype)
    assert_close(o[:, T0:], ref_o[:, T0:], dtype, "decoded o", tol)
    assert_close(o[:, :T0], ref_o[:, :T0], dtype, "prefill o", tol)
    T = q.shape[1]
    assert cache.max_length == T and cache.get_seq_length() == T
    assert cache.lengths.tolist() == [T] * B
    assert_close(cache.solved_values()[:, T0:], ref_u[:, T0:], dtype, "decoded u", tol)
    assert torch.equal(cache.keys(), k)  # every key, the prefill's and the appended ones


@pytest.mark.parametrize("D,dtype_name", [(16, "bf16"), (16, "fp32"), (64, "fp16")])
def test_decode_at_other_head_dims(D, dtype_name):
    """Head dim 16 (whose 16-bit prefill runs the head-dim-32 kernels on padded inputs, while
    the decode kernels take it as it is) and 64."""
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_grouped_inputs(2, 15, 2, 1, D, dtype, seed=D)
    o, cache = _decode_through(q, k, v, beta, 11, [1, 3], SMALL)
    ref_o, ref_u = _reference(q, k, v, beta)
    assert_close(o, ref_o, dtype, "o", _tol(dtype))
    assert_close(cache.solved_values(), ref_u, dtype, "u", _tol(dtype))


def test_decode_from_a_single_token_and_the_lse():
    """The first token has a = 0, u = v, o = v; each step's lse is the inclusive one."""
    dtype = torch.float32
    q, k, v, beta = make_grouped_inputs(1, 9, 2, 1, 32, dtype, seed=4)
    with torch.no_grad():
        o0, lse0, cache = deltaformer_attn(q[:, :1], k[:, :1], v[:, :1], beta[:, :1],
                                           return_lse=True, return_cache=True)
        assert torch.allclose(o0, v[:, :1].expand_as(o0), atol=1e-6)
        lses = [lse0]
        for t in range(1, 9):
            o, lse = deltaformer_decode(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                        beta[:, t:t + 1], cache, return_lse=True, config=SMALL)
            lses.append(lse)
    ref_lse = naive_lse(q.double(), k.double())
    assert_close(torch.cat(lses, 2), ref_lse, dtype, "lse", 1e-5)
    assert_close(o, _reference(q, k, v, beta)[0][:, 8:], dtype, "o", 1e-4)


def test_decode_without_beta_and_with_a_scale():
    dtype = torch.float32
    q, k, v, beta = make_grouped_inputs(2, 30, 2, 2, 32, dtype, seed=5)
    ones = torch.ones_like(beta)
    with torch.no_grad():
        _, cache = deltaformer_attn(q[:, :20], k[:, :20], v[:, :20], None, return_cache=True,
                                    scale=0.25)
        assert cache.scale == 0.25
        o = deltaformer_decode(q[:, 20:], k[:, 20:], v[:, 20:], None, cache, config=SMALL)
        with pytest.raises(InputError, match="scale"):
            deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], None, cache, scale=0.5)
    assert_close(o, _reference(q, k, v, ones, scale=0.25)[0][:, 20:], dtype, "o", 1e-4)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_decode_with_the_solves_own_queries(dtype_name):
    """q_solve: u from q_solve's scores, o from q's, through a prefill and steps of one and
    three tokens; the lse is the attention's (q's)."""
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_grouped_inputs(2, 24, 4, 2, 32, dtype, seed=15)
    q_solve = torch.randn(q.shape, generator=torch.Generator().manual_seed(16)).to(dtype).to(DEVICE)
    with torch.no_grad():
        o, cache = deltaformer_attn(q[:, :19], k[:, :19], v[:, :19], beta[:, :19], q_solve=q_solve[:, :19],
                                    return_cache=True)
        assert cache.q_solve
        outs, lses = [o], []
        for sl in (slice(19, 20), slice(20, 21), slice(21, 24)):
            o, lse = deltaformer_decode(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], cache,
                                        q_solve=q_solve[:, sl], return_lse=True, config=SMALL)
            outs.append(o)
            lses.append(lse)
        with pytest.raises(InputError, match="q_solve"):  # the prefill had it
            deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], cache)
    args = [t.double() for t in (q, k, v, beta)]
    ref_o = naive_deltaformer_attn(*args, q_solve=q_solve.double())
    ref_u = naive_deltaformer_u(q_solve.double(), *args[1:])
    tol = _tol(dtype)
    assert_close(torch.cat(outs, 1), ref_o, dtype, "o", tol)
    assert_close(cache.solved_values()[:, 19:], ref_u[:, 19:], dtype, "u", tol)
    assert_close(torch.cat(lses, 2), naive_lse(args[0], args[1])[:, :, 19:], dtype, "lse", 1e-2)


def test_padded_prefill_then_decode():
    """attention_mask (left and right padding): every row continues from its own tokens."""
    dtype = torch.float32
    B, T, H, D = 3, 14, 2, 32
    q, k, v, beta = make_grouped_inputs(B, T, H, H, D, dtype, seed=6)
    mask = torch.ones(B, T, dtype=torch.int64, device=DEVICE)
    mask[0, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    B += 1  # and a row of padding only: its first decoded token has o = u = v
    q, k, v, beta = (torch.cat([t, t[:1]]) for t in (q, k, v, beta))
    nq, nk, nv, nb = make_grouped_inputs(B, 4, H, H, D, dtype, seed=7)
    mask = torch.cat([mask, torch.zeros_like(mask[:1])])
    with torch.no_grad():
        o, cache = deltaformer_attn(q, k, v, beta, attention_mask=mask, return_cache=True)
        assert cache.lengths.tolist() == [9, 14, 9, 0]
        assert dataclasses.is_dataclass(cache) and cache.scale is None
        steps = [deltaformer_decode(nq[:, i:i + 1], nk[:, i:i + 1], nv[:, i:i + 1],
                                    nb[:, i:i + 1], cache, config=SMALL) for i in range(4)]
    decoded = torch.cat(steps, 1)
    assert torch.allclose(decoded[3, 0], nv[3, 0].expand(H, D), atol=1e-6)
    for b in range(B):
        keep = mask[b].bool()
        row = [torch.cat([t[b:b + 1][:, keep], n[b:b + 1]], 1) for t, n in
               ((q, nq), (k, nk), (v, nv), (beta, nb))]
        ref_o, ref_u = _reference(*row)
        n_keep = int(keep.sum())
        if n_keep:
            assert_close(o[b:b + 1][:, keep], ref_o[:, :n_keep], dtype, f"row {b} prefill", 1e-4)
        else:
            assert (o[b] == 0).all()
        assert_close(decoded[b:b + 1], ref_o[:, n_keep:], dtype, f"row {b} decoded", 1e-4)
        assert_close(cache.solved_values()[b:b + 1, :n_keep + 4], ref_u, dtype, f"row {b} u", 1e-4)


def test_packed_prefill_then_decode():
    """cu_seqlens: one cache row per sequence."""
    dtype = torch.bfloat16
    lengths = [7, 1, 12]
    q, k, v, beta = make_grouped_inputs(1, sum(lengths), 2, 1, 32, dtype, seed=8)
    nq, nk, nv, nb = make_grouped_inputs(3, 3, 2, 1, 32, dtype, seed=9)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        _, cache = deltaformer_attn(q, k, v, beta, cu_seqlens=cu, max_seqlen=12, return_cache=True)
        assert cache.batch_size == 3 and cache.lengths.tolist() == lengths
        decoded = deltaformer_decode(nq, nk, nv, nb, cache, config=SMALL)  # three tokens at once
    for r, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        row = [torch.cat([t[:, a:b], n[r:r + 1]], 1) for t, n in
               ((q, nq), (k, nk), (v, nv), (beta, nb))]
        assert_close(decoded[r:r + 1], _reference(*row)[0][:, b - a:], dtype, f"sequence {r}", 2e-2)


def test_wrong_trusted_offsets_give_a_cache_not_a_crash():
    """cu_seqlens with a max_seqlen below the longest sequence (trusted, not read back):
    wrong rows, as the kernels promise, and no index outside the cache."""
    q, k, v, beta = make_grouped_inputs(1, 20, 1, 1, 32, torch.float32, seed=19)
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        _, cache = deltaformer_attn(q, k, v, beta, cu_seqlens=cu, max_seqlen=5, return_cache=True)
        assert cache.capacity == 5 and cache.lengths.tolist() == [3, 5]
        o = deltaformer_decode(q[:2, :1].expand(2, 1, 1, 32), k[:2, :1].expand(2, 1, 1, 32),
                               v[:2, :1].expand(2, 1, 1, 32), beta[:2, :1].expand(2, 1, 1), cache)
    assert torch.isfinite(o).all()


def test_the_cache_grows_and_keeps_what_it_held():
    dtype = torch.float32
    q, k, v, beta = make_grouped_inputs(1, 80, 1, 1, 32, dtype, seed=10)
    o, cache = _decode_through(q, k, v, beta, 3, [1] * 40 + [37], SMALL)
    assert cache.capacity >= 80 and cache.max_length == 80
    assert_close(o, _reference(q, k, v, beta)[0], dtype, "o", 1e-4)
    assert "max_length=80" in repr(cache)


def test_a_long_continuation_warns(monkeypatch):
    import dfgen.api.decode as decode

    monkeypatch.setattr(decode, "MANY_NEW_TOKENS", 4)
    q, k, v, beta = make_grouped_inputs(1, 12, 1, 1, 32, torch.float32, seed=18)
    with torch.no_grad():
        _, cache = deltaformer_attn(q[:, :6], k[:, :6], v[:, :6], beta[:, :6], return_cache=True)
        with pytest.warns(RuntimeWarning, match="prefill"):
            o = deltaformer_decode(q[:, 6:], k[:, 6:], v[:, 6:], beta[:, 6:], cache, config=SMALL)
    assert_close(o, _reference(q, k, v, beta)[0][:, 6:], torch.float32, "o", 1e-4)


def test_reorder_keeps_rows():
    dtype = torch.float32
    q, k, v, beta = make_grouped_inputs(2, 12, 1, 1, 32, dtype, seed=11)
    with torch.no_grad():
        _, cache = deltaformer_attn(q[:, :10], k[:, :10], v[:, :10], beta[:, :10], return_cache=True)
        cache.reorder(torch.tensor([1, 1], device=DEVICE))
        o = deltaformer_decode(q[1:, 10:].expand(2, -1, -1, -1), k[1:, 10:].expand(2, -1, -1, -1),
                               v[1:, 10:].expand(2, -1, -1, -1), beta[1:, 10:].expand(2, -1, -1),
                               cache, config=SMALL)
    ref = _reference(q[1:], k[1:], v[1:], beta[1:])[0][:, 10:]
    assert_close(o[:1], ref, dtype, "row 0 (now row 1's)", 1e-4)
    assert torch.equal(o[0], o[1])


def test_bad_decode_inputs_are_clear_errors():
    q, k, v, beta = make_grouped_inputs(2, 6, 2, 2, 32, torch.float32, seed=12)
    with torch.no_grad():
        _, cache = deltaformer_attn(q, k, v, beta, return_cache=True)
        with pytest.raises(InputError, match="DecodingCache"):
            deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], (k, v))
        with pytest.raises(InputError, match="do not fit the cache"):
            deltaformer_decode(q[:1, :1], k[:1, :1], v[:1, :1], beta[:1, :1], cache)
        with pytest.raises(InputError, match="cache holds"):
            deltaformer_decode(q[:, :1].bfloat16(), k[:, :1].bfloat16(), v[:, :1].bfloat16(),
                               beta[:, :1], cache)
        with pytest.raises(ConfigError, match="BLOCK_N"):
            deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], cache,
                               config=dict(BLOCK_N=24))
        with pytest.raises(InputError, match="return_lse"):
            deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], cache, return_lse="yes")
        with pytest.raises(InputError, match="return_cache"):
            deltaformer_attn(q, k, v, beta, return_cache=1)
        with pytest.raises(InputError, match="q_solve"):  # the prefill had none
            deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], cache, q_solve=q[:, :1])
    leaf = q[:, :1].clone().requires_grad_()
    with pytest.raises(InputError, match="not differentiable"):
        deltaformer_decode(leaf, k[:, :1], v[:, :1], beta[:, :1], cache)
    assert cache.max_length == 6  # nothing was appended by the refused calls


def test_a_malformed_cache_is_refused_before_any_launch():
    """A cache is input: buffers that do not fit each other would let the kernels write
    outside them."""
    q, k, v, beta = make_grouped_inputs(2, 8, 2, 1, 32, torch.float32, seed=17)
    step = [t[:, :1] for t in (q, k, v, beta)]
    breakages = {
        "capacity": lambda c: setattr(c, "u", c.u[:, :4]),
        "last dim": lambda c: setattr(c, "k", c.k.repeat_interleave(2, -1)[..., ::2]),  # stride 2
        "lengths": lambda c: setattr(c, "lengths", c.lengths.long()),
        "max_length": lambda c: setattr(c, "max_length", 10 ** 6),
        "dtype": lambda c: setattr(c, "u", c.u.double()),
    }
    for what, breaking in breakages.items():
        with torch.no_grad():
            _, cache = deltaformer_attn(q, k, v, beta, return_cache=True)
            deltaformer_decode(*step, cache, config=SMALL)  # fine, and checked once
            breaking(cache)
            with pytest.raises(InputError, match="DecodingCache"):
                deltaformer_decode(*step, cache, config=SMALL)
            assert cache.max_length in (9, 10 ** 6), what
    with pytest.raises(InputError, match="lengths"):  # built by hand, wrongly
        DecodingCache(k, v, [8, 8], 8)


def test_a_hostile_length_stays_inside_the_cache():
    """Lengths past the capacity (a corrupted cache) are clamped by the kernels: wrong rows,
    no access outside the buffers."""
    q, k, v, beta = make_grouped_inputs(1, 8, 1, 1, 32, torch.float32, seed=13)
    with torch.no_grad():
        _, cache = deltaformer_attn(q, k, v, beta, return_cache=True)
        cache.reserve(1)
        cache.lengths.fill_(10 ** 6)
        o = deltaformer_decode(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], cache, config=SMALL)
    assert torch.isfinite(o).all()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"])
def test_decode_every_head_dim_and_dtype_on_the_gpu(D, dtype_name):
    """The default decode knobs, a cache of 1000 tokens, one token then four at once, grouped
    heads."""
    dtype = DTYPES[dtype_name]
    q, k, v, beta = make_grouped_inputs(3, 1005, 8, 2, D, dtype, seed=D)
    o, cache = _decode_through(q, k, v, beta, 1000, [1, 4], None, scale=1.2 / math.sqrt(D))
    ref_o, ref_u = _reference(q, k, v, beta, scale=1.2 / math.sqrt(D))
    tol = 3e-3 if dtype == torch.float32 else 2e-2
    assert_close(o[:, 1000:], ref_o[:, 1000:], dtype, "decoded o", tol)
    assert_close(cache.solved_values()[:, 1000:], ref_u[:, 1000:], dtype, "decoded u", tol)


def test_a_prefill_that_trains_gives_the_same_cache():
    """return_cache where inputs require grad: o is differentiable (the training Function),
    the cache equals the inference prefill's."""
    q, k, v, beta = make_grouped_inputs(2, 19, 2, 1, 32, torch.float32, seed=14)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    o, lse, cache = deltaformer_attn(*leaves, return_lse=True, return_cache=True)
    grads = torch.autograd.grad(o.square().sum(), leaves)
    plain = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    ref_grads = torch.autograd.grad(deltaformer_attn(*plain).square().sum(), plain)
    with torch.no_grad():
        o2, lse2, cache2 = deltaformer_attn(q, k, v, beta, return_lse=True, return_cache=True)
    assert torch.allclose(o.detach(), o2, atol=1e-6) and torch.allclose(lse, lse2, atol=1e-6)
    assert torch.allclose(cache.solved_values(), cache2.solved_values(), atol=1e-6)
    assert not cache.u.requires_grad and not cache.k.requires_grad
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5)
