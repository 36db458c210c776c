"""The Llama-architecture decoder, one pipeline stage of it, sharded for one tensor-parallel rank.

::

    tokens ─▶ embed (stage 0) ─▶ [ x + o(attn(rope(qkv(norm(x))))) ─▶ x + down(silu(gate(norm(x))) · up(norm(x))) ] × L
                                        │ column-parallel qkv         │ column-parallel gate/up
                                        └ row-parallel o: all-reduce  └ row-parallel down: all-reduce
           ─▶ norm ─▶ lm_head ─▶ argmax (last stage)                  (stages in between pass the hidden state on)

Every formula follows transformers' ``modeling_llama`` so that float32 greedy tokens are identical: RMSNorm in
float32 and cast back before the weight; rotary cos/sin computed in float32 from the position and cast to the
model's dtype; the "rotate half" convention of Hugging Face checkpoints; llama3 frequency scaling.

Each rank holds its own static KV cache, [batch, kv_heads/tp, max_seq, head_dim] per layer, so a decode step's
tensors have fixed shapes and addresses (what a CUDA graph needs). Prompts of different lengths are left-padded:
``pad[b]`` leading slots of row b are masked out of every attention, and row b's rotary positions start after them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from worker.llm.shape import LlamaShape, RopeSettings


@dataclass
class Parallel:
    """This rank's place in the model: its TP slice and its pipeline stage's layers. Every layer of a stage holds
    this one object, so a warm standby, which builds its model before it joins the group's world, sets ``group``
    once at promotion (mutable for that reason)."""

    tp: int = 1
    tp_rank: int = 0
    group: Any = None  # torch.distributed group of the TP ranks (None when tp == 1)
    first_stage: bool = True
    last_stage: bool = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x


# -- rotary embeddings ------------------------------------------------------------------------------------------
def rope_inv_freq(rope: RopeSettings, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (float32), with Llama 3's scaling: long wavelengths slowed by ``factor``, short ones kept,
    the band between interpolated smoothly (transformers' ``_compute_llama3_parameters``)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind != "llama3":
        return inv
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin of shape [B, 1, T, head_dim] for positions [B, T], computed in float32 then cast (as HF does)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


# -- layers -------------------------------------------------------------------------------------------------------
# Parameters are created uninitialised (torch.empty) on their device and in their dtype, then filled from the
# checkpoint: no random init to throw away, and no meta-device init, whose first use imports torch's reference
# decompositions (~2 s of a restart on a CPU core). With an arena (worker/weights.py) each parameter is instead the
# next view of the weight keeper's buffer, in the order the constructors below ask for them.
def _param(*dims: int, like: "Alloc") -> nn.Parameter:
    return nn.Parameter(like.empty(dims), requires_grad=False)


@dataclass(frozen=True)
class Alloc:
    dtype: torch.dtype
    device: torch.device
    arena: Any = None  # worker.weights.Plan / Arena: where parameters come from (None: fresh tensors)

    def empty(self, dims: tuple[int, ...]) -> torch.Tensor:
        if self.arena is not None:
            return self.arena.empty(dims, self.dtype)
        return torch.empty(*dims, dtype=self.dtype, device=self.device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, alloc: Alloc) -> None:
        super().__init__()
        self.weight = _param(dim, like=alloc)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention over this rank's heads: heads/tp query heads, kv_heads/tp key/value heads."""

    def __init__(self, shape: LlamaShape, par: Parallel, alloc: Alloc) -> None:
        super().__init__()
        self.par = par
        self.head_dim = shape.head_dim
        self.heads = shape.num_attention_heads // par.tp
        self.kv_heads = shape.num_key_value_heads // par.tp
        out = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.wqkv = _param(out, shape.hidden_size, like=alloc)  # q, k, v rows of this rank, fused: one GEMM
        self.wo = _param(shape.hidden_size, self.heads * self.head_dim, like=alloc)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache_pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = F.linear(x, self.wqkv).split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = apply_rope(q.view(b, t, self.heads, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, self.kv_heads, hd).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.kv_heads, hd).transpose(1, 2)
        k_all, v_all = self.k_cache[:b], self.v_cache[:b]
        k_all.index_copy_(2, cache_pos, k)  # in place, no host sync: capturable in a CUDA graph
        v_all.index_copy_(2, cache_pos, v)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=hd ** -0.5,
                                           enable_gqa=self.heads != self.kv_heads)
        y = F.linear(y.transpose(1, 2).reshape(b, t, self.heads * hd), self.wo)
        return self.par.all_reduce(y)


class MLP(nn.Module):
    """SwiGLU over this rank's intermediate columns: gate/up column-parallel (fused), down row-parallel."""

    def __init__(self, shape: LlamaShape, par: Parallel, alloc: Alloc) -> None:
        super().__init__()
        self.par = par
        self.inter = shape.intermediate_size // par.tp
        self.w_gate_up = _param(2 * self.inter, shape.hidden_size, like=alloc)
        self.w_down = _param(shape.hidden_size, self.inter, like=alloc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w_gate_up).split(self.inter, dim=-1)
        return self.par.all_reduce(F.linear(F.silu(gate) * up, self.w_down))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, par: Parallel, alloc: Alloc) -> None:
        super().__init__()
        self.input_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, alloc)
        self.attn = Attention(shape, par, alloc)
        self.post_norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, alloc)
        self.mlp = MLP(shape, par, alloc)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache_pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_norm(x))


class Stage(nn.Module):
    """One pipeline stage for one TP rank. ``forward`` takes token ids on the first stage, the previous stage's
    hidden state otherwise; it returns the hidden state, or on the last stage the greedy next token of each row."""

    def __init__(self, shape: LlamaShape, par: Parallel, n_layers: int, alloc: Alloc) -> None:
        super().__init__()
        self.shape, self.par = shape, par
        # The embedding and the output head are replicated on the TP ranks that need them (not vocab-parallel):
        # the logits then come from one full matmul, exactly as in transformers. A tied head shares the embedding.
        h, v = shape.hidden_size, shape.vocab_size
        self.embed = _param(v, h, like=alloc) if par.first_stage else None
        self.layers = nn.ModuleList(DecoderLayer(shape, par, alloc) for _ in range(n_layers))
        self.norm = RMSNorm(h, shape.rms_norm_eps, alloc) if par.last_stage else None
        tied = shape.tie_word_embeddings and self.embed is not None
        self.lm_head = (self.embed if tied else _param(v, h, like=alloc)) if par.last_stage else None
        self.register_buffer("inv_freq", rope_inv_freq(shape.rope, shape.head_dim).to(alloc.device),
                             persistent=False)
        self.pad: torch.Tensor | None = None  # [max_batch] left-padding of each row, set by prefill
        self.max_seq = 0

    def allocate_cache(self, batch: int, max_seq: int, dtype: torch.dtype, device: torch.device) -> None:
        for layer in self.layers:
            a = layer.attn
            dims = (batch, a.kv_heads, max_seq, a.head_dim)
            a.k_cache = torch.zeros(dims, dtype=dtype, device=device)
            a.v_cache = torch.zeros(dims, dtype=dtype, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_seq = max_seq

    def forward(self, x: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
        """x: [B, T] token ids or [B, T, H] hidden; cache_pos: [T] cache slots of these T positions."""
        b = x.shape[0]
        h = F.embedding(x, self.embed) if self.embed is not None else x
        pad = self.pad[:b, None]
        positions = (cache_pos[None, :] - pad).clamp(min=0)  # [B, T]: rotary positions start after the padding
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        mask = self._mask(pad, cache_pos)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache_pos)
        if self.lm_head is None:
            return h
        logits = F.linear(self.norm(h[:, -1]), self.lm_head)
        return logits.float().argmax(dim=-1)

    def _mask(self, pad: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S]: causal over the cache, no padding slot as a key, except a padding query's own slot
        (a row of no keys at all would give NaN, which would then reach the cache of later layers)."""
        keys = torch.arange(self.max_seq, device=cache_pos.device)
        q = cache_pos[:, None]  # [T, 1]
        causal = keys[None, :] <= q  # [T, S]
        real = keys[None, None, :] >= pad[:, :, None]  # [B, 1, S]
        own = keys[None, :] == q  # [T, S]
        return (causal[None] & (real | own[None]))[:, None]


# -- loading -----------------------------------------------------------------------------------------------------
def load_stage(reader: Any, shape: LlamaShape, par: Parallel, layers: range, dtype: torch.dtype,
               device: torch.device, arena: Any = None) -> Stage:
    """Build this rank's stage (uninitialised, or in ``arena``) and fill it from the checkpoint with only this
    rank's slices: on a CUDA device through pinned staging buffers (worker/llm/fastload.py), elsewhere slice by
    slice."""
    from worker.llm import fastload

    stage = Stage(shape, par, len(layers), Alloc(dtype, device, arena))
    fills = stage_fills(stage, shape, par, layers)
    with torch.no_grad():
        if fastload.wanted(device):
            fastload.fill(reader, fills, device)
        else:
            reader.fill(fills)
    return stage.eval()


def kept_stage(shape: LlamaShape, par: Parallel, layers: range, dtype: torch.dtype, device: torch.device,
               arena: Any) -> Stage:
    """This rank's stage with every parameter a view of the weight keeper's ``arena``: nothing read, nothing
    copied. (With a ``weights.Plan`` as the arena: the dry run that counts the bytes, on the meta device.)"""
    return Stage(shape, par, len(layers), Alloc(dtype, device, arena)).eval()


def stage_fills(stage: Stage, shape: LlamaShape, par: Parallel, layers: range) -> list[Any]:
    """Every parameter of ``stage`` (or rows of one: q, k, v into the fused wqkv, gate and up into w_gate_up)
    with the checkpoint slice that fills it."""
    from worker.llm.checkpoint import Fill

    r, n = par.tp_rank, par.tp
    out: list[Fill] = []
    for local, i in enumerate(layers):
        p, layer = f"model.layers.{i}.", stage.layers[local]
        q, kv = layer.attn.heads * layer.attn.head_dim, layer.attn.kv_heads * layer.attn.head_dim
        wqkv, gate_up = layer.attn.wqkv, layer.mlp.w_gate_up
        out += [Fill(wqkv[:q], p + "self_attn.q_proj.weight", "rows", r, n),
                Fill(wqkv[q:q + kv], p + "self_attn.k_proj.weight", "rows", r, n),
                Fill(wqkv[q + kv:], p + "self_attn.v_proj.weight", "rows", r, n),
                Fill(layer.attn.wo, p + "self_attn.o_proj.weight", "cols", r, n),
                Fill(gate_up[:layer.mlp.inter], p + "mlp.gate_proj.weight", "rows", r, n),
                Fill(gate_up[layer.mlp.inter:], p + "mlp.up_proj.weight", "rows", r, n),
                Fill(layer.mlp.w_down, p + "mlp.down_proj.weight", "cols", r, n),
                Fill(layer.input_norm.weight, p + "input_layernorm.weight"),
                Fill(layer.post_norm.weight, p + "post_attention_layernorm.weight")]
    if stage.embed is not None:
        out.append(Fill(stage.embed, "model.embed_tokens.weight"))
    if stage.lm_head is not None:
        out.append(Fill(stage.norm.weight, "model.norm.weight"))
        if stage.lm_head is not stage.embed:  # tied on a single stage: already filled as the embedding
            head = "model.embed_tokens.weight" if shape.tie_word_embeddings else "lm_head.weight"
            out.append(Fill(stage.lm_head, head))
    return out
