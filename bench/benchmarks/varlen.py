"""Packed variable-length throughput against an equal-length batch (issue 6's figure).

    python bench/run.py varlen

8 sequences of mixed lengths between 512 and 4096 (16384 tokens), H = 16, D = 128, bf16,
packed with cu_seqlens, against the batch B = 8, T = 2048 (the same tokens). Useful work is
counted as the sum over sequences of L^2 (the causal attention terms), so the throughput
ratio is (sum L^2 / t_packed) / (8 * 2048^2 / t_batch). Forward and forward+backward,
do_bench medians, fresh random inputs, both in this one process. The packed output is
also checked against dfgen run on each sequence alone.
"""

import torch

from dfgen.runtime import deltaformer_attn
from dfgen.tools.check import random_pass_inputs, relative_error
from dfgen.tools.timing import timer

LENGTHS = [512, 1024, 4096, 2048, 3072, 1536, 2560, 1536]  # sum 16384
H, D, DTYPE = 16, 128, torch.bfloat16


def inputs(B, T, seed):
    return random_pass_inputs((B, T, H, D), DTYPE, torch.device("cuda"), seed)[:5]


def passes(q, k, v, beta, do, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, beta)]

    def fwd():
        with torch.no_grad():
            return deltaformer_attn(q, k, v, beta, **kw)

    def fwd_bwd():
        o = deltaformer_attn(*leaves, **kw)
        return torch.autograd.grad(o, leaves, do)

    return fwd, fwd_bwd


def main():
    assert torch.cuda.is_available(), "varlen measures GPU throughput: it needs a CUDA device"
    total = sum(LENGTHS)
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), device="cuda", dtype=torch.int32)
    packed = inputs(1, total, seed=0)
    batch = inputs(8, 2048, seed=1)
    kw = dict(cu_seqlens=cu, max_seqlen=max(LENGTHS))
    with torch.no_grad():  # packed == each sequence alone
        o = deltaformer_attn(*packed[:4], **kw)
        errs = []
        for i, L in enumerate(LENGTHS):
            s = slice(int(cu[i]), int(cu[i + 1]))
            alone = deltaformer_attn(*(t[:, s] for t in packed[:4]))
            errs.append(relative_error(o[:, s], alone))
    time = timer(True)
    work_packed = sum(L * L for L in LENGTHS)
    work_batch = 8 * 2048 * 2048
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, H={H}, D={D}, bf16; "
          f"lengths {LENGTHS}; packed vs each sequence alone: max rel. diff {max(errs):.1e}")
    print("| pass | packed ms | B=8,T=2048 ms | packed useful TFLOP/s | batch useful TFLOP/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, (p_fn, b_fn) in zip(("fwd", "fwd+bwd"), zip(passes(*packed, **kw), passes(*batch))):
        t_p, t_b = time(p_fn), time(b_fn)
        mult = 2.0 * H * D * (1 if name == "fwd" else 3.5)  # causal: 4 H D L^2 / 2 per attention pass
        tp, tb = mult * work_packed / t_p / 1e9, mult * work_batch / t_b / 1e9
        print(f"| {name} | {t_p:.3f} | {t_b:.3f} | {tp:.1f} | {tb:.1f} | {tp / tb:.2f}x |")


if __name__ == "__main__":
    main()
