"""Float64 sequential recurrences, written from the papers' equations, independent of layers/.

Each loops over time one token at a time; nothing is chunked, fused or shared with the code
under test.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _dt(dt, bias, softplus, limit=(0.0, math.inf)):
    dt = dt.double() + (0.0 if bias is None else bias.double())
    if softplus:
        dt = F.softplus(dt)
    if tuple(limit) != (0.0, math.inf):
        dt = dt.clamp(limit[0], limit[1])
    return dt


def ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, math.inf), initial_state=None):  # fmt: skip
    """Mamba-2: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, y *= silu(z).

    x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,) or (h, p), z like x,
    initial_state (b, h, p, n). Returns y (b, l, h, p) and the final state, float64.
    """
    batch, seqlen, nheads, headdim = x.shape
    group = torch.arange(nheads) // (nheads // B.shape[2])
    dt = _dt(dt, dt_bias, dt_softplus, dt_limit)
    h = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        h = initial_state.double().clone()
    ys = []
    for t in range(seqlen):
        Bt, Ct = B[:, t, group].double(), C[:, t, group].double()  # (b, h, n)
        decay = torch.exp(dt[:, t] * A.double())[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t].double())[..., None] * Bt[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x.double() * (D.double()[:, None] if D.dim() == 1 else D.double())
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def selective_scan(u, delta, A, B, C, *, D=None, z=None, delta_bias=None,
                   delta_softplus=False, initial_state=None):  # fmt: skip
    """Mamba-1: h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = C_t h_t + D u_t.

    u/delta/z (b, d, l), A (d, n), B/C (b, n, l) or (b, g, n, l), D/delta_bias (d,),
    initial_state (b, d, n). Returns y (b, d, l) and the final state, float64.
    """
    batch, dim, seqlen = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    group = torch.arange(dim) // (dim // B.shape[1])
    delta = _dt(delta.transpose(1, 2), delta_bias, delta_softplus).transpose(1, 2)
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    if initial_state is not None:
        h = initial_state.double().clone()
    ys = []
    for t in range(seqlen):
        Bt, Ct = B[:, group, :, t].double(), C[:, group, :, t].double()  # (b, d, n)
        dt_ = delta[:, :, t, None]
        h = torch.exp(dt_ * A.double()) * h + dt_ * u[:, :, t, None].double() * Bt
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u.double() * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def causal_conv(x, weight, bias=None, *, silu=False, initial_state=None):
    """y[:, d, t] = bias[d] + sum_k weight[d, k] xx[:, d, t + k], xx = initial_state | x.

    x (b, d, l), weight (d, w), initial_state (b, d, w - 1) or None (zeros). Returns y and the
    last w - 1 columns of xx, float64.
    """
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    past = torch.zeros(batch, dim, width - 1, dtype=torch.float64)
    if initial_state is not None:
        past = initial_state.double()
    xx = torch.cat([past, x.double()], dim=-1)
    y = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    for t in range(seqlen):
        for k in range(width):
            y[:, :, t] += weight[:, k].double() * xx[:, :, t + k]
    if bias is not None:
        y = y + bias.double()[:, None]
    if silu:
        y = F.silu(y)
    return y, xx[:, :, seqlen:]


def gated_delta(q, k, v, g, beta, *, scale=None, initial_state=None, seq_idx=None):
    """Gated DeltaNet as the paper writes it, state S (d_v, d_k) per value head:
    S_t = S_{t-1} exp(g_t) (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = scale S_t q_t;
    with g per key channel (Kimi Delta Attention) exp(g_t) is the diagonal matrix
    Diag(exp(g_t)): S_t = S_{t-1} Diag(exp(g_t)) (I - beta_t k_t k_t^T) + beta_t v_t k_t^T.

    q/k (b, l, hk, dk), v (b, l, hv, dv) with hv a multiple of hk (value head h reads key head
    h // (hv // hk)), g (b, l, hv) or (b, l, hv, dk), beta (b, l, hv), initial_state
    (b, hv, dk, dv) (our layout: S^T),
    seq_idx (b, l): S restarts from zero where it changes. scale None: dk ** -0.5. Returns o
    (b, l, hv, dv) and the final state (b, hv, dk, dv), float64.
    """
    batch, seqlen, nv, dv = v.shape
    dk = k.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    head = torch.arange(nv) // (nv // k.shape[2])
    eye = torch.eye(dk, dtype=torch.float64)
    S = torch.zeros(batch, nv, dv, dk, dtype=torch.float64)
    if initial_state is not None:
        S = initial_state.double().transpose(-1, -2).clone()
    outputs = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            S = S * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        qt, kt = q[:, t, head].double(), k[:, t, head].double()  # (b, hv, dk)
        vt, bt = v[:, t].double(), beta[:, t].double()[..., None, None]
        kk = kt[..., :, None] * kt[..., None, :]  # (b, hv, dk, dk)
        if g.dim() == 4:  # S Diag(a): column j of S (key channel j) times a_j
            decayed = S * torch.exp(g[:, t].double())[..., None, :]
        else:
            decayed = S * torch.exp(g[:, t].double())[..., None, None]
        S = decayed @ (eye - bt * kk) + bt * vt[..., :, None] * kt[..., None, :]
        outputs.append(scale * (S @ qt[..., None])[..., 0])
    return torch.stack(outputs, 1), S.transpose(-1, -2)
