"""What models use: deltaformer_attn (attention.py), its autograd Functions (autograd.py)
and torch.library ops (ops.py), the input checks (inputs.py), the config a call runs under
(resolve.py) and the fla-compatible layer (layers.py). Imports kernels and select, never
the tools (tuner, CLI, reference checks)."""
