"""``graphdelta.fla``: fla 0.6.0's gated delta rule and KDA calls, written as fla's tests write them
(their grids' shapes, shrunk), against graphdelta's float64 reference.

Covered: the in-kernel gate (``use_gate_in_kernel``, ``A_log``, ``dt_bias``), the in-kernel
beta sigmoid and ``allow_neg_eigval``, GVA, ``state_v_first`` and the deprecated
``transpose_state_layout``, varlen with empty sequences, ``chunk_size``, ``gk`` and the default
g and beta of the recurrent form, KDA's gates (A_log, dt_bias, lower_bound, A = 1 without
either), the short convolution and its update step (fla's [N, D, W] states), both gated
RMSNorms, return dtypes, and what fla refuses.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphdelta import fla, reference


def rel_err(x, ref) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12))


def inputs(B, T, H, HV, K, V, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen).to(dtype)
    g_raw = torch.randn(B, T, HV, generator=gen)
    beta_raw = torch.randn(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    return q, k, v, g_raw, beta_raw, h0


def expected(q, k, v, g, beta, h0, cu_seqlens=None, scale=None):
    """The float64 reference with q and k normalized, as fla's tests prepare it."""
    o, s = reference.gated_delta_rule(F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1), v.double(),
                                      g.double(), beta.double(), scale, h0.double(), True, cu_seqlens)
    return o, s


TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


@pytest.mark.parametrize("fn", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("B,T,H,HV,dtype,gate_in_kernel,dt_bias,beta_sigmoid,neg_eigval", [
    (1, 63, 1, 1, torch.float32, False, False, False, False),
    (2, 65, 2, 4, torch.float32, True, True, False, False),
    (2, 37, 2, 2, torch.float16, True, False, True, False),
    (1, 1, 1, 2, torch.float32, False, False, True, True),
    (2, 70, 1, 2, torch.float16, True, True, True, True),
])
def test_fla_options_match_the_reference(fn, B, T, H, HV, dtype, gate_in_kernel, dt_bias, beta_sigmoid, neg_eigval):
    K, V = 16, 8
    q, k, v, g_raw, beta_raw, h0 = inputs(B, T, H, HV, K, V, dtype)
    A_log = torch.log(torch.empty(HV).uniform_(1, 16, generator=torch.Generator().manual_seed(1)))
    bias = torch.randn(HV, generator=torch.Generator().manual_seed(2)) if dt_bias else None
    g = -A_log.exp() * F.softplus(g_raw + (bias if dt_bias else 0)) if gate_in_kernel else F.logsigmoid(g_raw)
    beta = beta_raw.sigmoid() * (2 if neg_eigval else 1) if beta_sigmoid else beta_raw.sigmoid()
    ref_o, ref_s = expected(q, k, v, g, beta, h0)
    options = dict(scale=None, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                   use_beta_sigmoid_in_kernel=beta_sigmoid, allow_neg_eigval=neg_eigval)
    gate = g_raw if gate_in_kernel else g
    b = beta_raw if beta_sigmoid else beta
    if gate_in_kernel:
        options.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=bias)
    if fn == "chunk":
        o, s = fla.chunk_gated_delta_rule(q, k, v, gate, b, **options)
        assert o.dtype == q.dtype
    else:
        o, s = fla.fused_recurrent_gated_delta_rule(q, k, v, gate, beta=b, **options)
        assert o.dtype == v.dtype
    assert s.dtype == torch.float32
    assert rel_err(o, ref_o) < TOL[dtype] and rel_err(s, ref_s) < TOL[dtype]


@pytest.mark.parametrize("fn", [fla.chunk_gated_delta_rule, fla.fused_recurrent_gated_delta_rule])
def test_state_v_first_and_the_deprecated_name(fn):
    q, k, v, g_raw, beta_raw, h0 = inputs(2, 20, 2, 2, 8, 16)
    g, beta = F.logsigmoid(g_raw), beta_raw.sigmoid()
    ref_o, ref_s = expected(q, k, v, g, beta, h0)
    call = dict(g=g, beta=beta, initial_state=h0.transpose(-1, -2), output_final_state=True,
                use_qk_l2norm_in_kernel=True)
    o, s = fn(q, k, v, state_v_first=True, **call)
    assert s.shape == (2, 2, 16, 8) and rel_err(s.transpose(-1, -2), ref_s) < 1e-4 and rel_err(o, ref_o) < 1e-4
    with pytest.warns(DeprecationWarning, match="renamed to `state_v_first`"):
        o2, s2 = fn(q, k, v, transpose_state_layout=True, **call)
    assert torch.equal(o2, o) and torch.equal(s2, s)
    with pytest.raises(ValueError, match="Cannot pass both"):
        fn(q, k, v, state_v_first=True, transpose_state_layout=True, **call)


@pytest.mark.parametrize("fn", [fla.chunk_gated_delta_rule, fla.fused_recurrent_gated_delta_rule])
def test_varlen_with_empty_sequences(fn):
    """[0, 5, 5, 17, 17]: the empty sequences keep their initial state; the others are each
    their own sequence."""
    cu = torch.tensor([0, 5, 5, 17, 17])
    q, k, v, g_raw, beta_raw, _ = inputs(1, 17, 1, 2, 8, 8)
    g, beta = F.logsigmoid(g_raw), beta_raw.sigmoid()
    h0 = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    o, s = fn(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
              use_qk_l2norm_in_kernel=True)
    for seq, (lo, hi) in ((0, (0, 5)), (2, (5, 17))):
        ref_o, ref_s = expected(*(x[:, lo:hi] for x in (q, k, v, g, beta)), h0[seq:seq + 1])
        assert rel_err(o[:, lo:hi], ref_o) < 1e-4 and rel_err(s[seq], ref_s[0]) < 1e-4
    assert torch.equal(s[1], h0[1]) and torch.equal(s[3], h0[3])
    _, s = fn(q, k, v, g=g, beta=beta, output_final_state=True, cu_seqlens=cu)
    assert not s[1].any() and not s[3].any()


def test_recurrent_gates_and_defaults():
    """``gk`` (per key channel) composes with g; g=None is no decay and beta=None is 1."""
    q, k, v, g_raw, _, h0 = inputs(1, 9, 1, 2, 8, 8)
    g = F.logsigmoid(g_raw)
    gk = F.logsigmoid(torch.randn(1, 9, 2, 8, generator=torch.Generator().manual_seed(4)))
    ref_o, ref_s = expected(q, k, v, g[..., None] + gk, torch.ones(1, 9, 2), h0)
    o, s = fla.fused_recurrent_gated_delta_rule(q, k, v, g, gk, initial_state=h0, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ref_o) < 1e-4 and rel_err(s, ref_s) < 1e-4
    ref_o, _ = expected(q, k, v, torch.zeros(1, 9, 2), torch.ones(1, 9, 2), h0)
    o, s = fla.fused_recurrent_gated_delta_rule(q, k, v, initial_state=h0, use_qk_l2norm_in_kernel=True)
    assert s is None and rel_err(o, ref_o) < 1e-4


def test_what_fla_refuses_is_refused():
    q, k, v, g_raw, beta_raw, h0 = inputs(1, 8, 2, 4, 8, 8)
    g, beta = F.logsigmoid(g_raw), beta_raw.sigmoid()
    chunk, recurrent = fla.chunk_gated_delta_rule, fla.fused_recurrent_gated_delta_rule
    with pytest.raises(DeprecationWarning, match="head_first has been removed"):
        chunk(q, k, v, g, beta, head_first=False)
    with pytest.raises(ValueError, match="`chunk_size` must be 16, 32, or 64"):
        chunk(q, k, v, g, beta, chunk_size=128)
    for size in (16, 32):
        assert chunk(q, k, v, g, beta, chunk_size=size)[1] is None
    with pytest.raises(ValueError, match=r"q and k must have the same number of heads"):
        chunk(q, k[:, :, :1], v, g, beta)
    with pytest.raises(ValueError, match=r"num_v_heads \(HV=3\) must be evenly divisible"):
        chunk(q, k, v[:, :, :3], g[..., :3], beta[..., :3])
    with pytest.raises(AssertionError, match="A_log must be provided"):
        chunk(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="`A_log` must be provided"):
        recurrent(q, k, v, g, beta=beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match=r"`g` \(raw pre-activation\) must be provided"):
        recurrent(q, k, v, beta=beta, use_gate_in_kernel=True, A_log=torch.zeros(4))
    for fn in (chunk, recurrent):
        with pytest.raises(ValueError, match="requires `use_beta_sigmoid_in_kernel=True`"):
            fn(q, k, v, g, beta=beta, allow_neg_eigval=True)
    with pytest.raises(NotImplementedError, match="gv"):
        recurrent(q, k, v, g, gv=torch.zeros(1, 8, 4, 8), beta=beta)
    with pytest.raises(NotImplementedError, match="cp_context"):
        chunk(q, k, v, g, beta, cp_context=object())
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        chunk(q, k, v, g, beta)
    with torch.no_grad():
        assert chunk(q, k, v, g, beta)[0].shape == v.shape


def kda_gate(g_raw, A_log, dt_bias, lower_bound):
    """The KDA gate as fla's naive gates write it, in float64."""
    HV, K = g_raw.shape[-2:]
    raw = g_raw.double() + (dt_bias.double().view(HV, K) if dt_bias is not None else 0)
    A = A_log.double().view(HV, 1).exp() if A_log is not None else 1
    return lower_bound * torch.sigmoid(A * raw) if lower_bound is not None else -A * F.softplus(raw)


@pytest.mark.parametrize("fn", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("B,T,H,HV,dtype,gate,has_A,has_bias,lower_bound,beta_sigmoid,neg_eigval", [
    (1, 63, 1, 1, torch.float32, False, False, False, None, False, False),
    (2, 65, 2, 4, torch.float32, True, True, True, None, False, False),
    (2, 37, 2, 2, torch.float16, True, True, True, -5.0, True, False),
    (1, 20, 1, 2, torch.float32, True, False, True, -3.0, True, True),
])
def test_kda_calls_match_the_reference(fn, B, T, H, HV, dtype, gate, has_A, has_bias, lower_bound, beta_sigmoid,
                                       neg_eigval):
    K, V = 8, 16
    q, k, v, _, beta_raw, h0 = inputs(B, T, H, HV, K, V, dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    g_raw = torch.randn(B, T, HV, K, generator=gen)
    A_log = torch.log(torch.empty(HV).uniform_(1, 16, generator=gen)) if has_A else None
    dt_bias = torch.randn(HV * K, generator=gen) if has_bias else None
    g = kda_gate(g_raw, A_log, dt_bias, lower_bound) if gate else F.logsigmoid(g_raw)
    beta = beta_raw.sigmoid() * (2 if neg_eigval else 1)
    ref_o, ref_s = expected(q, k, v, g, beta, h0)
    options = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                   use_beta_sigmoid_in_kernel=beta_sigmoid, allow_neg_eigval=neg_eigval)
    if gate:
        options.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
    gate_in, beta_in = (g_raw if gate else g.float()), (beta_raw if beta_sigmoid else beta)
    if fn == "chunk":
        o, s = fla.chunk_kda(q, k, v, gate_in, beta_in, safe_gate=lower_bound is not None, **options)
        assert o.dtype == q.dtype
    else:
        o, s = fla.fused_recurrent_kda(q, k, v, gate_in, beta_in, **options)
        assert o.dtype == v.dtype
    assert s.dtype == torch.float32
    assert rel_err(o, ref_o) < TOL[dtype] and rel_err(s, ref_s) < TOL[dtype]


def test_kda_refusals_and_defaults():
    q, k, v, _, beta_raw, h0 = inputs(1, 8, 2, 2, 8, 8)
    g = F.logsigmoid(torch.randn(1, 8, 2, 8, generator=torch.Generator().manual_seed(7)))
    beta = beta_raw.sigmoid()
    with pytest.raises(ValueError, match="`chunk_size` must be either 32 or 64 for KDA, got 16"):
        fla.chunk_kda(q, k, v, g, beta, chunk_size=16)
    with pytest.raises(AssertionError, match="initial_state must be in float32"):
        fla.chunk_kda(q, k, v, g, beta, initial_state=h0.half())
    with pytest.raises(ValueError, match="`A_log` must be provided when `use_gate_in_kernel=True` and `lower_bound`"):
        fla.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="`lower_bound` must be specified when `safe_gate=True`"):
        fla.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True, A_log=torch.zeros(2), safe_gate=True)
    with pytest.raises(ValueError, match=r"safe range \[-5, 0\), got -6"):
        fla.chunk_kda(q, k, v, g, beta, use_gate_in_kernel=True, safe_gate=True, lower_bound=-6)
    with pytest.raises(AssertionError, match="g must have shape"):
        fla.chunk_kda(q, k, v, g[..., 0], beta)
    with pytest.raises(AssertionError, match="only allowed in inference mode"):
        fla.chunk_kda(q, k, v, g, beta, return_intermediate_states=True)
    # fla's fused form takes A = 1 when the gate is in the kernel without A_log or lower_bound
    ref_o, _ = expected(q, k, v, kda_gate(g, None, None, None), beta, h0)
    o, _ = fla.fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, use_gate_in_kernel=True,
                                   use_qk_l2norm_in_kernel=True)
    assert rel_err(o, ref_o) < 1e-4


@pytest.mark.parametrize("T,activation,varlen", [(9, "swish", False), (2, None, False), (9, "relu", True)])
def test_short_convolution_and_its_update(T, activation, varlen):
    """fla's conventions: states [N, D, W] of the last W inputs (an initial state's first column
    unused), the residual after the activation, any activation but swish/silu none; then one
    update step per sequence continues the same convolution."""
    D, W = 6, 4
    gen = torch.Generator().manual_seed(8)
    B = 1 if varlen else 2
    x, residual = torch.randn(B, T, D, generator=gen), torch.randn(B, T, D, generator=gen)
    weight, bias = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    cu = torch.tensor([0, 3, T]) if varlen else None
    N = 2
    h0 = torch.randn(N, D, W, generator=gen)
    y, final = fla.causal_conv1d(x, weight, bias, residual, h0, True, activation, cu_seqlens=cu)
    act = "silu" if activation in ("swish", "silu") else None
    ref_y, _ = reference.causal_conv1d(x.double(), weight.double(), bias.double(), h0[..., 1:].double(), cu, act)
    assert rel_err(y, ref_y + residual.double()) < 1e-5 and final.dtype == x.dtype and final.shape == (N, D, W)
    bounds = [(0, 3), (3, T)] if varlen else [(0, T), (0, T)]
    for n, (lo, hi) in enumerate(bounds):
        seq = x[0 if varlen else n, lo:hi]
        assert torch.equal(final[n], torch.cat([h0[n], seq.T], -1)[:, -W:])
    token = torch.randn(N, D, generator=gen)
    cache = final.clone()
    out, same = fla.causal_conv1d_update(token[:, None], cache, None, weight, bias, activation)
    assert same is cache and out.shape == (N, 1, D)
    step_ref, _ = reference.causal_conv1d(token[:, None].double(), weight.double(), bias.double(),
                                          final[..., 1:].double(), None, act)
    assert rel_err(out, step_ref) < 1e-5 and torch.equal(cache, torch.cat([final[..., 1:], token[..., None]], -1))
    with pytest.raises(ValueError, match="Unsupported backend"):
        fla.causal_conv1d(x, weight, backend="cudnn")


@pytest.mark.parametrize("activation", ["swish", "sigmoid", "identity"])
def test_rms_norm_gated(activation):
    """fla.modules.fused_norm_gate: x + residual, normalized, times weight, plus bias, times act(g);
    prenorm returns the residual stream too."""
    gen = torch.Generator().manual_seed(9)
    x, g, residual = (torch.randn(3, 5, 16, generator=gen) for _ in range(3))
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    h = (x + residual).double()
    norm = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double() + bias.double()
    gate = {"swish": F.silu(g.double()), "sigmoid": g.double().sigmoid(), "identity": 1.0}[activation]
    y, res = fla.rms_norm_gated(x, g, weight, bias, activation, residual, prenorm=True)
    assert rel_err(y, norm * gate) < 1e-5 and torch.equal(res, x + residual)
    y = fla.rms_norm_gated(x, g, None, None, activation)
    plain = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    gate = {"swish": F.silu(g.double()), "sigmoid": g.double().sigmoid()}.get(activation, 1.0)
    assert rel_err(y, plain * gate) < 1e-5
    # eps = 0, as fla's own test writes it (torch's nn.RMSNorm(eps=0) beside FusedRMSNormGated(eps=0))
    y = fla.rms_norm_gated(x, g, weight, None, activation, eps=0)
    bare = torch.nn.functional.rms_norm(x.double(), (16,), weight.double(), eps=0)
    assert rel_err(y, bare * gate) < 1e-5


@pytest.mark.parametrize("group_size,norm_before_gate,gated",
                         [(None, True, True), (4, True, True), (4, False, True), (8, True, False)])
def test_rmsnorm_fn(group_size, norm_before_gate, gated):
    """fla.modules.layernorm_gated: a SiLU gate before or after the norm, per group of channels."""
    gen = torch.Generator().manual_seed(10)
    x, z = torch.randn(4, 16, generator=gen).half(), torch.randn(4, 16, generator=gen).half()
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    G = group_size or 16
    xd, zd = x.double(), F.silu(z.double())
    h = (xd if norm_before_gate or not gated else xd * zd).view(4, 16 // G, G)
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).view(4, 16) * weight.double() + bias.double()
    ref = y * zd if gated and norm_before_gate else y
    out = fla.rmsnorm_fn(x, weight, bias, z if gated else None, group_size=group_size,
                         norm_before_gate=norm_before_gate)
    assert out.dtype == x.dtype and rel_err(out, ref) < 2e-3


def test_fla_calls_on_the_triton_kernels(monkeypatch):
    """The same calls with every op on its Triton kernel (the interpreter on CPU)."""
    monkeypatch.setenv("GRAPHDELTA_BACKEND", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, g_raw, beta_raw, h0 = (t.to(dev) for t in inputs(1, 20, 1, 2, 16, 16, seed=11))
    A_log = torch.zeros(2, device=dev)
    ref_o, ref_s = expected(q, k, v, -F.softplus(g_raw), beta_raw.sigmoid(), h0)
    for fn in (fla.chunk_gated_delta_rule, fla.fused_recurrent_gated_delta_rule):
        o, s = fn(q, k, v, g_raw, beta=beta_raw, initial_state=h0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, use_beta_sigmoid_in_kernel=True)
        assert rel_err(o.cpu(), ref_o) < 1e-4 and rel_err(s.cpu(), ref_s) < 1e-4
    gk = F.logsigmoid(g_raw[..., None] + torch.randn(1, 20, 2, 16, device=dev))
    ref_o, ref_s = expected(q, k, v, gk, beta_raw.sigmoid(), h0)
    for fn in (fla.chunk_kda, fla.fused_recurrent_kda):
        o, s = fn(q, k, v, gk, beta_raw.sigmoid(), initial_state=h0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True)
        assert rel_err(o.cpu(), ref_o) < 1e-4 and rel_err(s.cpu(), ref_s) < 1e-4
    x, weight = torch.randn(1, 20, 8, device=dev), torch.randn(8, 4, device=dev)
    y, _ = fla.causal_conv1d(x, weight, activation="silu")
    ref_y, _ = reference.causal_conv1d(x.double().cpu(), weight.double().cpu(), None, None, None, "silu")
    assert rel_err(y.cpu(), ref_y) < 1e-5
    z = torch.randn(1, 20, 8, device=dev)
    out = fla.rms_norm_gated(x, z, weight[:, 0], None)
    ref = reference.gated_rms_norm(x.double().cpu(), z.double().cpu(), weight[:, 0].double().cpu(), 1e-6)
    assert rel_err(out.cpu(), ref) < 1e-5


@pytest.mark.parametrize("varlen", [False, True])
def test_kda_intermediate_states(varlen):
    """``return_intermediate_states``: the state at the start of each chunk, [B, NT, HV, K, V] in
    k's dtype (varlen: B = 1, the chunks of every sequence in order), from the reference."""
    q, k, v, _, beta_raw, h0 = inputs(2, 70, 1, 2, 8, 8, torch.float16, seed=12)
    g = F.logsigmoid(torch.randn(2, 70, 2, 8, generator=torch.Generator().manual_seed(13)))
    beta = beta_raw.sigmoid()
    cu = torch.tensor([0, 70, 100]) if varlen else None
    if varlen:  # one packed row: 70 + 30 tokens
        q, k, v, g, beta = (torch.cat([x[:1], x[1:, :30]], 1) for x in (q, k, v, g, beta))
    with torch.inference_mode():
        o, s, h = fla.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                return_intermediate_states=True, use_qk_l2norm_in_kernel=True, chunk_size=32)
    assert h.dtype == k.dtype and h.shape == ((1, 3 + 1, 2, 8, 8) if varlen else (2, 3, 2, 8, 8))
    sequences = [(0, 0, 70), (0, 70, 100)] if varlen else [(0, 0, 70), (1, 0, 70)]
    column = 0
    for n, (row, lo, hi) in enumerate(sequences):
        for start in range(lo, hi, 32):
            want = h0[n:n + 1].double() if start == lo else expected(
                *(x[row:row + 1, lo:start] for x in (q, k, v, g, beta)), h0[n:n + 1])[1]
            got = h[0, column] if varlen else h[row, column % 3]
            assert rel_err(got, want[0]) < 5e-3, (n, start)
            column += 1


FLA_FUNCTIONS = {
    "fla.ops.gated_delta_rule": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "fla.ops.kda": ("chunk_kda", "fused_recurrent_kda"),
    "fla.modules.convolution": ("causal_conv1d", "causal_conv1d_update"),
    "fla.modules.fused_norm_gate": ("rms_norm_gated",),
    "fla.modules.layernorm_gated": ("rmsnorm_fn",),
}


@pytest.mark.parametrize("module", sorted(FLA_FUNCTIONS))
def test_signatures_are_fla_s(module):
    """Where fla is installed: every function's parameters (names, order, defaults) are fla's."""
    import importlib
    import inspect

    pytest.importorskip("fla")
    theirs = importlib.import_module(module)
    for name in FLA_FUNCTIONS[module]:
        want = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(theirs, name)).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(fla, name)).parameters.values()]
        assert got == want, name


def test_against_fla_s_own_references():
    """Where fla is installed: graphdelta.fla's calls against fla's PyTorch references (its naive
    recurrences, GVA by repeating q and k as its tests do, and its naive gates), within fla's
    test tolerances (0.002-0.005 relative)."""
    pytest.importorskip("fla")
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
    from fla.ops.kda.naive import naive_recurrent_kda

    q, k, v, g_raw, beta_raw, h0 = inputs(2, 40, 2, 4, 16, 16, seed=14)
    rq, rk = (F.normalize(x, dim=-1).repeat_interleave(2, dim=2) for x in (q, k))
    gen = torch.Generator().manual_seed(13)
    A_log, dt_bias = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    g, beta = naive_gdn_gate(g_raw, A_log, dt_bias), beta_raw.sigmoid()
    ref_o, ref_s = naive_recurrent_gated_delta_rule(rq, rk, v, beta, g, initial_state=h0, output_final_state=True)
    for fn in (fla.chunk_gated_delta_rule, fla.fused_recurrent_gated_delta_rule):
        o, s = fn(q, k, v, g_raw, beta=beta_raw, initial_state=h0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                  use_beta_sigmoid_in_kernel=True)
        assert rel_err(o, ref_o) < 2e-3 and rel_err(s, ref_s) < 2e-3
    gk_raw = torch.randn(2, 40, 4, 16, generator=torch.Generator().manual_seed(15))
    kda_bias = torch.randn(4 * 16)
    for lower_bound in (None, -5.0):
        gk = (naive_kda_gate(gk_raw, A_log, kda_bias) if lower_bound is None
              else naive_kda_lowerbound_gate(gk_raw, A_log, kda_bias, lower_bound))
        ref_o, ref_s = naive_recurrent_kda(rq, rk, v, gk, beta, initial_state=h0, output_final_state=True)
        for fn in (fla.chunk_kda, fla.fused_recurrent_kda):
            o, s = fn(q, k, v, gk_raw, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                      use_gate_in_kernel=True, A_log=A_log, dt_bias=kda_bias, lower_bound=lower_bound)
            assert rel_err(o, ref_o) < 2e-3 and rel_err(s, ref_s) < 2e-3, (fn.__name__, lower_bound)
