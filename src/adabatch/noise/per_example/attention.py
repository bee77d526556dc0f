"""nn.MultiheadAttention, whose projections are bare Parameters used functionally."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch import kernels
from adabatch.noise.per_example.base import (
    _acc_dtype,
    _Call,
    _cat_t,
    _proj_dense,
    _Refused,
    _Rule,
)


def _canonical_mask(mask: Tensor | None, dt: torch.dtype) -> Tensor | None:
    """A boolean mask as an additive float mask (True -> -inf), as nn.MultiheadAttention does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dt, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dt)


class _MultiheadAttentionRule(_Rule):
    """Exact rule for nn.MultiheadAttention, whose projections are bare Parameters.

    The module's attention is recomputed batched from the
    captured inputs, with the q/k/v projection outputs (and the repeated bias_k/bias_v) as
    autograd leaves; one backward from the captured output-gradient gives each example's
    gradient with respect to them, and every weight is then a linear map with known inputs
    and output-gradients: in_proj rows q|k|v from (query|key|value, dq|dk|dv), out_proj from
    (attention context, output-grad). Cost: the q/k/v projections and the attention forward
    and backward once more (no weight-gradient GEMMs), plus ghost/materialised norms; memory:
    the attention activations of a chunk of examples.
    """

    kind = "multihead_attention"
    stock = (nn.MultiheadAttention,)
    _signature = inspect.signature(nn.MultiheadAttention.forward)

    def refuse_call(self, module):
        if module.training and module.dropout > 0:
            return (
                f"dropout={module.dropout} in train mode: recomputing the module per example "
                "would draw different dropout masks"
            )
        return None

    def refuse(self, module):
        return super().refuse(module) or self.refuse_call(module)

    def capture(self, module, args, kwargs, where):
        bound = self._signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        bdim = 0 if module.batch_first else 1
        for name in ("query", "key", "value"):
            if not isinstance(a[name], Tensor) or a[name].dim() != 3:
                raise _Refused(f"unbatched {name} of shape {tuple(a[name].shape)}: no batch dim")
        B = a["query"].shape[where.require(a["query"].shape[:2], bdim, "query")]
        # Self-attention (one tensor as query, key and value): in_proj is then one [3E, E]
        # linear map of one input, so its three row blocks share one Gram matrix.
        a["_self_attention"] = a["query"] is a["key"] and a["key"] is a["value"]
        mask = a["attn_mask"]
        if isinstance(mask, Tensor) and mask.dim() == 3:
            a["attn_mask"] = mask.reshape(B, module.num_heads, *mask.shape[1:])
        return a, B, 0  # (the rule reads both layouts itself)

    def compute(self, unit, calls, probe):
        return self._compute_decomposed(unit, calls, probe)

    # ---- decomposed: batched recompute with the projection outputs as leaves
    def _intermediates(self, m, P: dict, call: _Call, s: int, e: int, dt) -> dict[str, Tensor]:
        """Batch-first inputs, per-example output-grads of the projections, for examples s:e."""
        a, bf = call.captured, m.batch_first
        E, H = m.embed_dim, m.num_heads
        hd, c = E // H, e - s

        def seq_first(t: Tensor) -> Tensor:
            t = (t[s:e] if bf else t[:, s:e]).to(dt)
            return t.transpose(0, 1) if bf else t

        query, key, value = (seq_first(a[n]) for n in ("query", "key", "value"))
        L = query.shape[0]
        if m._qkv_same_embed_dim:
            wq, wk, wv = P["in_proj_weight"].chunk(3)
        else:
            wq, wk, wv = P["q_proj_weight"], P["k_proj_weight"], P["v_proj_weight"]
        bq = bk = bv = None
        if m.in_proj_bias is not None:
            bq, bk, bv = P["in_proj_bias"].chunk(3)
        q = F.linear(query, wq, bq).requires_grad_()  # leaves: computed under no_grad
        k = F.linear(key, wk, bk).requires_grad_()
        v = F.linear(value, wv, bv).requires_grad_()
        leaves = [q, k, v]

        # Masks, following F.multi_head_attention_forward step by step.
        kpm = a["key_padding_mask"]
        kpm = _canonical_mask(None if kpm is None else kpm[s:e], dt)
        sdpa_causal = a["is_causal"] and kpm is None and not a["need_weights"]
        mask = None
        if not sdpa_causal and a["attn_mask"] is not None:
            mask = _canonical_mask(a["attn_mask"], dt)
            # 2-D [L, S] broadcasts; the capture stored a 3-D mask as [B, heads, L, S].
            mask = mask.unsqueeze(0) if mask.dim() == 2 else mask[s:e].flatten(0, 1)
        with torch.enable_grad():
            k_all, v_all = k, v
            if m.bias_k is not None and m.bias_v is not None:
                bk_rep = P["bias_k"].repeat(1, c, 1).requires_grad_()
                bv_rep = P["bias_v"].repeat(1, c, 1).requires_grad_()
                leaves += [bk_rep, bv_rep]
                k_all, v_all = torch.cat([k, bk_rep]), torch.cat([v, bv_rep])
                mask = None if mask is None else F.pad(mask, (0, 1))
                kpm = None if kpm is None else F.pad(kpm, (0, 1))
            qh = q.reshape(L, c * H, hd).transpose(0, 1)
            kh = k_all.reshape(k_all.shape[0], c * H, hd).transpose(0, 1)
            vh = v_all.reshape(v_all.shape[0], c * H, hd).transpose(0, 1)
            if m.add_zero_attn:
                zeros = torch.zeros(c * H, 1, hd, dtype=dt, device=qh.device)
                kh, vh = torch.cat([kh, zeros], 1), torch.cat([vh, zeros], 1)
                mask = None if mask is None else F.pad(mask, (0, 1))
                kpm = None if kpm is None else F.pad(kpm, (0, 1))
            S = kh.shape[1]
            if kpm is not None:
                kpm = kpm.view(c, 1, 1, S).expand(-1, H, -1, -1).reshape(c * H, 1, S)
                mask = kpm if mask is None else mask + kpm
            if sdpa_causal:  # scaled_dot_product_attention(is_causal=True): top-left causal
                causal = torch.ones(L, S, dtype=torch.bool, device=qh.device).triu(1)
                mask = _canonical_mask(causal, dt).unsqueeze(0)
            q_scaled = qh * math.sqrt(1.0 / hd)
            kt = kh.transpose(-2, -1)
            scores = torch.bmm(q_scaled, kt) if mask is None else torch.baddbmm(mask, q_scaled, kt)
            weights = torch.softmax(scores, dim=-1)
            ctx = torch.bmm(weights, vh).view(c, H, L, hd).permute(0, 2, 1, 3).reshape(c, L, E)
            cots = dict(zip(call.out_index, call.grads))
            g_out = cots.get(0)
            g_out = (
                torch.zeros(c, L, E, dtype=dt, device=ctx.device) if g_out is None
                else (g_out[s:e] if bf else g_out[:, s:e].transpose(0, 1)).to(dt)
            )
            terms = (ctx * (g_out @ P["out_proj.weight"])).sum()
            if 1 in cots:
                w = weights.view(c, H, L, S)
                w = w.mean(1) if a["average_attn_weights"] else w
                terms = terms + (w * cots[1][s:e].to(dt)).sum()
            grads = torch.autograd.grad(terms, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        out = {
            "x_q": query.transpose(0, 1), "x_k": key.transpose(0, 1),
            "x_v": value.transpose(0, 1), "d_q": grads[0].transpose(0, 1),
            "d_k": grads[1].transpose(0, 1), "d_v": grads[2].transpose(0, 1),
            "ctx": ctx.detach(), "g_out": g_out,
        }
        if len(grads) == 5:
            out["d_bias_k"], out["d_bias_v"] = grads[3][0], grads[4][0]
        return out

    def _compute_decomposed(self, unit, calls, probe):
        m = unit.module
        B, E = calls[0].batch, m.embed_dim
        dt = _acc_dtype(*unit.params.values())
        P = {n: t.detach().to(dt) for n, t in m.named_parameters()}
        device = calls[0].grads[0].device
        names = list(unit.params)
        sq = {n: torch.zeros(B, dtype=dt, device=device) for n in names}
        proj = {n: torch.zeros((), dtype=dt, device=device) for n in names}
        dense = {n: torch.zeros_like(P[n]) for n in names if n in _DENSE_MHA}
        seq = 1 if m.batch_first else 0
        per_example = sum(  # attention scores/weights (+ grads) and ~12 [T, E] tensors per call
            4 * m.num_heads * c.captured["query"].shape[seq] * (c.captured["key"].shape[seq] + 2)
            + 12 * E * (c.captured["query"].shape[seq] + c.captured["key"].shape[seq])
            for c in calls
        )
        step = max(1, probe.max_chunk_elems // max(1, per_example))
        blocks = {  # parameter -> (rows of it, input key, grad key) per linear block
            "in_proj_weight": [(slice(0, E), "x_q", "d_q"), (slice(E, 2 * E), "x_k", "d_k"),
                               (slice(2 * E, 3 * E), "x_v", "d_v")],
            "q_proj_weight": [(slice(0, E), "x_q", "d_q")],
            "k_proj_weight": [(slice(0, E), "x_k", "d_k")],
            "v_proj_weight": [(slice(0, E), "x_v", "d_v")],
            "out_proj.weight": [(slice(0, E), "ctx", "g_out")],
        }
        biases = {"in_proj_bias": ["d_q", "d_k", "d_v"], "out_proj.bias": ["g_out"]}
        if all(c.captured["_self_attention"] for c in calls):
            blocks["in_proj_weight"] = [(slice(0, 3 * E), "x_q", "d_qkv")]
        for s in range(0, B, step):
            e = min(B, s + step)
            parts = [self._intermediates(m, P, c, s, e, dt) for c in calls]
            if "in_proj_weight" in names and blocks["in_proj_weight"][0][2] == "d_qkv":
                for p in parts:
                    p["d_qkv"] = torch.cat([p["d_q"], p["d_k"], p["d_v"]], dim=-1)

            def cat(key: str, parts=parts) -> Tensor:
                return _cat_t([p[key] for p in parts])

            for n in names:
                if n in blocks:
                    for rows, xk, gk in blocks[n]:
                        x, g = cat(xk), cat(gk)
                        sq[n][s:e] += kernels.linear_sq_norms(
                            x, g, probe.method, max_chunk_elems=probe.max_chunk_elems
                        )
                        if probe._verify_now:
                            u, v = unit.vecs[n]
                            proj[n] += torch.linalg.vecdot(
                                (g @ u[rows]).flatten(), (x @ v).flatten()
                            )
                elif n in biases:
                    gs = [cat(k) for k in biases[n]]
                    sq[n][s:e] = sum(kernels.bias_sq_norms(g) for g in gs)
                    dense[n] += torch.cat([g.sum((0, 1)) for g in gs])
                else:  # bias_k / bias_v: per-example gradients summed over calls
                    g = sum(p["d_" + n] for p in parts)
                    sq[n][s:e] = torch.linalg.vecdot(g, g)
                    dense[n] += g.sum(0).view_as(dense[n])
        if probe._verify_now:
            for n in dense:
                proj[n] = _proj_dense(unit.vecs[n], dense[n])
        return {n: (sq[n], proj[n] if probe._verify_now else None) for n in names}


_DENSE_MHA = ("in_proj_bias", "out_proj.bias", "bias_k", "bias_v")

