"""torch.compile traces deltaformer_attn as custom ops without graph breaks, forward and
backward, and gives the eager results. (aot_eager: the tracing path without Inductor's
code generation, which the interpreter cannot run.)"""

import pytest
import torch

from conftest import make_inputs
from dfgen.kernels.config import KernelConfig, default_config
from dfgen.runtime import deltaformer_attn

CONFIG = KernelConfig("fused", dict(default_config(32, torch.float32).solve, CHUNK=16, BLOCK_N=16,
                                    LOOKAHEAD=1),
                      solve_bwd=dict(default_config(32, torch.float32).solve_bwd, CHUNK=16, BLOCK_M=16),
                      attn_bwd=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2))


def layer(q, k, v, beta):
    return deltaformer_attn(torch.tanh(q), k * 2.0, v, torch.sigmoid(beta), config=CONFIG).sum(-1)


def test_compile_fullgraph_forward_and_backward():
    q, k, v, beta = make_inputs(1, 40, 2, 32, torch.float32, seed=12)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
    eager_out = layer(*eager_leaves)
    eager_grads = torch.autograd.grad(eager_out.sum(), eager_leaves)
    assert torch.allclose(out, eager_out, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


def test_compile_without_grad_uses_the_forward_op():
    q, k, v, beta = make_inputs(1, 24, 1, 32, torch.float32, seed=13)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(q, k, v, beta), layer(q, k, v, beta), atol=1e-6)


def test_custom_ops_pass_opcheck():
    q, k, v, beta = make_inputs(1, 20, 2, 32, torch.float32, seed=14)
    text = TWO_STAGE.json
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=q.device)
    mask = torch.ones(1, 20, dtype=torch.long, device=q.device)
    mask[0, :3] = 0
    utils = ("test_schema", "test_faketensor")
    for op, args in (
            (torch.ops.dfgen.attn_fwd.default, (q, k, v, beta, None, 0, text, 0.2)),
            (torch.ops.dfgen.attn_fwd.default, (q, k, v, beta, cu, 13, text, 0.2)),
            (torch.ops.dfgen.attn_fwd_train.default, (q, k, v, None, cu, 13, text, 0.2)),
            (torch.ops.dfgen.attn_fwd_qsolve.default, (q, q * 0.5, k, v, beta, None, 0, text, 0.2)),
            (torch.ops.dfgen.attn_fwd_masked.default, (q, k, v, beta, mask, text, 0.2))):
        torch.library.opcheck(op, args, test_utils=utils)


def _compiled_against_eager(fn, inputs, **kwargs):
    """fn under torch.compile (fullgraph: no graph break) against eager, output and every
    gradient."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    eager = [t.clone().requires_grad_() for t in inputs]
    eager_out = fn(*eager)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), eager)
    assert torch.allclose(out, eager_out, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


TWO_STAGE = KernelConfig("two_stage", CONFIG.solve, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
                         solve_bwd=CONFIG.solve_bwd, attn_bwd=CONFIG.attn_bwd)


def test_compile_packed_sequences_with_max_seqlen():
    q, k, v, beta = make_inputs(1, 30, 2, 32, torch.float32, seed=15)
    cu = torch.tensor([0, 9, 10, 30], dtype=torch.int32, device=q.device)
    _compiled_against_eager(
        lambda q, k, v, b: deltaformer_attn(q, k, v, b, cu_seqlens=cu, max_seqlen=20, config=CONFIG,
                                            scale=0.3),
        (q, k, v, beta))
    with pytest.raises(Exception, match="max_seqlen"):  # reading it would break the graph
        torch.compile(lambda *a: deltaformer_attn(*a, cu_seqlens=cu, config=CONFIG), fullgraph=True,
                      backend="aot_eager")(q, k, v, beta)


def test_compile_padding_mask():
    q, k, v, beta = make_inputs(2, 18, 2, 32, torch.float32, seed=16)
    mask = torch.ones(2, 18, dtype=torch.long, device=q.device)
    mask[0, :5] = 0
    mask[1, 15:] = 0
    _compiled_against_eager(
        lambda q, k, v, b: deltaformer_attn(q, k, v, b, attention_mask=mask, config=CONFIG),
        (q, k, v, beta))
    with torch.no_grad():
        o, lse = torch.compile(lambda *a: deltaformer_attn(*a, attention_mask=mask, config=CONFIG,
                                                           return_lse=True),
                               fullgraph=True, backend="aot_eager")(q, k, v, beta)
        eager_o, eager_lse = deltaformer_attn(q, k, v, beta, attention_mask=mask, config=CONFIG,
                                              return_lse=True)
    assert torch.allclose(o, eager_o, atol=1e-6) and torch.equal(torch.isinf(lse), torch.isinf(eager_lse))


def test_compile_q_solve():
    q, k, v, beta = make_inputs(1, 26, 2, 32, torch.float32, seed=17)
    q_solve = torch.randn_like(q)
    _compiled_against_eager(
        lambda q, qs, k, v, b: deltaformer_attn(q, k, v, b, q_solve=qs, config=TWO_STAGE),
        (q, q_solve, k, v, beta))
    cu = torch.tensor([0, 11, 26], dtype=torch.int32, device=q.device)
    _compiled_against_eager(
        lambda q, qs, k, v, b: deltaformer_attn(q, k, v, b, q_solve=qs, config=TWO_STAGE,
                                                cu_seqlens=cu, max_seqlen=15),
        (q, q_solve, k, v, beta))
