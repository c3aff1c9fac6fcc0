"""dfgen/kernels/flags.py: the wavefront's flags come from a pool zeroed once per many
launches; every slice handed out is zero, 16-byte aligned and disjoint from every other
slice handed out since the last zeroing; used slices are zeroed again before reuse."""

import torch

from dfgen.kernels.flags import FlagPool, unpooled, zeroed_flags

from conftest import DEVICE, gpu_only


def test_slices_are_zero_aligned_and_disjoint_until_the_pool_is_zeroed_again():
    pool = FlagPool(torch.full((64,), 7, dtype=torch.int32))
    assert int(pool.buffer.abs().sum()) == 0
    taken = []
    for n in (5, 1, 12, 9):
        s = pool.take(n)
        assert s.numel() == n and s.data_ptr() % 16 == 0 and int(s.abs().sum()) == 0
        s.fill_(1)  # a launch leaves its slice dirty
        taken.append((s.data_ptr(), s.data_ptr() + 4 * n))
    spans = sorted(taken)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    big = pool.take(40)  # 5 + 1 + 12 + 9 rounded up to 4s is 36: 36 + 40 > 64 wraps
    assert big.data_ptr() == pool.buffer.data_ptr() and int(pool.buffer.abs().sum()) == 0


def test_zeroed_flags_are_zeros_of_the_asked_size():
    for n in (1, 33, 5000):
        flags = zeroed_flags(n, DEVICE)
        assert flags.shape == (n,) and flags.dtype == torch.int32 and int(flags.abs().sum()) == 0
        flags.fill_(1)
    assert int(zeroed_flags(17, DEVICE).abs().sum()) == 0


@gpu_only
def test_calls_inside_unpooled_take_fresh_zeros_not_pool_slices():
    pooled = zeroed_flags(8, DEVICE).untyped_storage().data_ptr()
    with unpooled():
        fresh = zeroed_flags(8, DEVICE)
    assert fresh.untyped_storage().data_ptr() != pooled and int(fresh.abs().sum()) == 0
    assert zeroed_flags(8, DEVICE).untyped_storage().data_ptr() == pooled
