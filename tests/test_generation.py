"""Greedy generation through dfgen's layer with a cache equals recomputing the whole
sequence at every step: a small language model of our own (every machine), and fla's
DeltaFormer model with dfgen's layers through model.generate (a GPU with fla and
transformers)."""

import importlib.util

import pytest
import torch

from conftest import DEVICE, ON_GPU
from dfgen.layers import DeltaFormerAttention, DeltaFormerCache


class TinyLM(torch.nn.Module):
    """Embedding, pre-norm blocks of DeltaFormer attention and an MLP, a head; the layers get
    fla's arguments (attention_mask, past_key_values, use_cache)."""

    def __init__(self, vocab=61, dim=64, heads=2, kv_heads=1, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.attn = torch.nn.ModuleList(
            DeltaFormerAttention(hidden_size=dim, num_heads=heads, num_kv_heads=kv_heads,
                                 qk_norm=True, layer_idx=i) for i in range(layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
            for _ in range(layers))
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(dim) for _ in range(2 * layers + 1))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, attention_mask=None, past_key_values=None, use_cache=False):
        x = self.embed(ids)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norms[2 * i](x), attention_mask=attention_mask,
                         past_key_values=past_key_values, use_cache=use_cache)[0]
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.norms[-1](x)), past_key_values


def _greedy_cached(model, ids, steps, attention_mask=None):
    cache = DeltaFormerCache()
    logits, _ = model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        logits, _ = model(out[-1], past_key_values=cache, use_cache=True)
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, 1), cache


def _greedy_recomputed(model, ids, steps):
    for _ in range(steps):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_greedy_generation_with_the_cache_equals_recomputing():
    torch.manual_seed(0)
    model = TinyLM().to(DEVICE).eval()
    prompt = torch.randint(0, 61, (2, 7), device=DEVICE)
    with torch.no_grad():
        tokens, cache = _greedy_cached(model, prompt, 64)
        expected = _greedy_recomputed(model, prompt, 64)[:, 7:]
    assert torch.equal(tokens, expected)
    assert cache.get_seq_length(0) == 7 + 63 and len(cache) == 2
    assert len(set(tokens[0].tolist())) > 3  # not a constant sequence


def test_greedy_generation_of_a_left_padded_batch():
    """Prompts of different lengths, left-padded as generate() does: each row's tokens are
    those of its prompt generated alone."""
    torch.manual_seed(1)
    model = TinyLM(layers=1).to(DEVICE).eval()
    short = torch.randint(0, 61, (1, 4), device=DEVICE)
    long = torch.randint(0, 61, (1, 9), device=DEVICE)
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long, device=DEVICE), short], 1), long])
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :5] = 0
    with torch.no_grad():
        tokens, _ = _greedy_cached(model, ids, 12, attention_mask=mask)
        alone = [_greedy_cached(model, p, 12)[0] for p in (short, long)]
    assert torch.equal(tokens[:1], alone[0]) and torch.equal(tokens[1:], alone[1])


def test_beam_reorder_through_the_model_cache():
    torch.manual_seed(2)
    model = TinyLM(layers=1).to(DEVICE).eval()
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    with torch.no_grad():
        _, cache = _greedy_cached(model, ids, 1)
        cache.reorder_cache(torch.tensor([1, 1], device=DEVICE))
        nxt = torch.randint(0, 61, (1, 1), device=DEVICE).expand(2, 1)
        logits, _ = model(nxt, past_key_values=cache, use_cache=True)
        expected, _ = model(torch.cat([ids[1:], nxt[:1]], 1))
    assert torch.allclose(logits[0, -1], expected[0, -1], atol=1e-4)
    assert torch.equal(logits[0], logits[1])
    cache.batch_repeat_interleave(2)
    assert cache[0]["recurrent_state"].batch_size == 4


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("fla") is None or importlib.util.find_spec("transformers") is None,
                    reason="fla and transformers are not installed")
def test_fla_deltaformer_model_generates_with_dfgen_layers():
    """fla's DeltaFormerForCausalLM with every attention layer replaced by dfgen's (same
    weights): model.generate (greedy, 64 new tokens, fla's Cache) equals recomputing the
    whole sequence at each step. Float32, so that no near-tie of two logits decides."""
    try:  # fla's models need its flash-linear-attention package and a recent transformers
        from fla.models import DeltaFormerConfig, DeltaFormerForCausalLM
    except ImportError as err:
        pytest.skip(f"fla's models do not import here: {err}")

    torch.manual_seed(0)
    config = DeltaFormerConfig(hidden_size=256, num_heads=4, num_hidden_layers=2, vocab_size=512,
                               use_cache=True, pad_token_id=0)
    model = DeltaFormerForCausalLM(config).cuda().eval()
    for i, block in enumerate(model.model.layers):
        ours = DeltaFormerAttention(hidden_size=256, num_heads=4, layer_idx=i,
                                    beta_activation="identity").cuda()
        missing, unexpected = ours.load_state_dict(block.attn.state_dict(), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        with torch.no_grad():  # fla's raw beta: small projections keep it near (0, 1)
            ours.b_proj.weight.mul_(0.01)
        block.attn = ours
    model.generation_config.eos_token_id = None  # 64 tokens whatever comes
    prompt = torch.randint(1, 512, (2, 16), device="cuda")
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=64, do_sample=False, use_cache=True)
        ids = prompt
        for _ in range(64):
            logits = model(ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, ids)


def test_cache_maps_like_fla_maps_layer_states():
    """fla's Cache reorders (beam search) and repeats (batch expansion) its layers' states by
    rebuilding dataclasses field by field (fla.models.cache_utils.FLALayer._map_state): a
    DecodingCache rebuilt that way decodes like the original's rows."""
    import dataclasses

    torch.manual_seed(3)
    model = TinyLM(layers=1).to(DEVICE).eval()
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    with torch.no_grad():
        _, cache = _greedy_cached(model, ids, 1)
        state = cache[0]["recurrent_state"]
        rows = torch.tensor([1, 0, 1], device=DEVICE)

        def fla_map(value):  # what fla does with a dataclass state
            return type(value)(**{f.name: (getattr(value, f.name).index_select(0, rows)
                                           if isinstance(getattr(value, f.name), torch.Tensor)
                                           else getattr(value, f.name))
                                  for f in dataclasses.fields(value)})

        cache.states[0]["recurrent_state"] = fla_map(state)
        nxt = torch.randint(0, 61, (3, 1), device=DEVICE)
        logits, _ = model(nxt, past_key_values=cache, use_cache=True)
        for r, src in enumerate(rows.tolist()):
            expected, _ = model(torch.cat([ids[src:src + 1], nxt[r:r + 1]], 1))
            assert torch.allclose(logits[r, -1], expected[0, -1], atol=1e-4)
