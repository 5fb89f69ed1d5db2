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
