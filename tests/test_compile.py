"""torch.compile traces deltaformer_attn as custom ops without graph breaks, forward and
backward, and gives the eager results. (aot_eager: the tracing path without Inductor's
code generation, which the interpreter cannot run.)"""

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
    q, k, v, beta = make_inputs(1, 20, 1, 32, torch.float32, seed=14)
    text = CONFIG.json
    torch.library.opcheck(torch.ops.dfgen.attn_fwd.default, (q, k, v, beta, text, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dfgen.attn_fwd_train.default, (q, k, v, None, text, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
