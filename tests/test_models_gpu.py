"""In a model on a GPU: a few DeltaFormer layers under torch.compile (Inductor) and under
CUDA graph capture, forward and backward, against eager."""

import torch

from conftest import gpu_only
from dfgen.runtime import deltaformer_attn


class TinyDeltaFormer(torch.nn.Module):
    def __init__(self, dim=256, heads=4, layers=3):
        super().__init__()
        self.heads = heads
        self.qkvb = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim + heads) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        B, T, C = x.shape
        for qkvb, out in zip(self.qkvb, self.out):
            proj = qkvb(x)
            q, k, v = (t.reshape(B, T, self.heads, C // self.heads)
                       for t in proj[..., :3 * C].split(C, dim=-1))
            beta = torch.sigmoid(proj[..., 3 * C:].float())
            x = x + out(deltaformer_attn(q.contiguous(), k.contiguous(), v.contiguous(), beta)
                        .reshape(B, T, C))
        return x


def _model_and_input(dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = TinyDeltaFormer().cuda().to(dtype)
    x = torch.randn(2, 512, 256, device="cuda", dtype=dtype)
    return model, x


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.float().square().mean().backward()
    return y.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@gpu_only
def test_small_model_under_torch_compile():
    model, x = _model_and_input()
    y_ref, g_ref = _grads(model, x)
    compiled = torch.compile(model, fullgraph=True)
    y, g = _grads(compiled, x)
    assert _rel(y, y_ref) < 2e-2
    assert max(_rel(a, b) for a, b in zip(g, g_ref)) < 5e-2


@gpu_only
def test_small_model_under_torch_compile_with_cuda_graph_trees():
    """mode='reduce-overhead': Inductor's CUDA graph trees run the dfgen:: ops eagerly in
    their private memory pool before capturing them; nothing dfgen keeps may be allocated
    there (the flag pool once was, and torch.compile raised)."""
    model, x = _model_and_input()
    y_ref, g_ref = _grads(model, x)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up run, recording, then replays
        torch.compiler.cudagraph_mark_step_begin()
        y, g = _grads(compiled, x)
    assert _rel(y, y_ref) < 2e-2
    assert max(_rel(a, b) for a, b in zip(g, g_ref)) < 5e-2
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x).clone()
    assert _rel(y, y_ref) < 2e-2


@gpu_only
def test_small_model_under_cuda_graphs():
    model, x = _model_and_input()
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile kernels, resolve configs
        for _ in range(2):
            _grads(model, static_x)
    torch.cuda.current_stream().wait_stream(stream)
    model.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.float().square().mean().backward()
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    y_graph = static_y.clone()
    g_graph = [p.grad.clone() for p in model.parameters()]
    y_ref, g_ref = _grads(model, fresh)
    assert _rel(y_graph, y_ref) < 1e-3
    assert max(_rel(a, b) for a, b in zip(g_graph, g_ref)) < 1e-3


@gpu_only
def test_forward_under_cuda_graph_capture():
    q, k, v = (torch.randn(1, 1024, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    beta = torch.rand(1, 1024, 4, device="cuda")
    with torch.no_grad():
        deltaformer_attn(q, k, v, beta)  # warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = deltaformer_attn(q, k, v, beta)
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, deltaformer_attn(q, k, v, beta))
