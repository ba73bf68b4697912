"""The reference itself: properties of the gated delta rule that hold exactly."""
import torch

from graphdelta.reference import causal_conv1d, gated_delta_rule, l2norm

B, T, H, K, V = 2, 9, 2, 8, 4


def _inputs(HV=H, per_channel=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    g_shape = (B, T, HV, K) if per_channel else (B, T, HV)
    return (r(B, T, H, K), l2norm(r(B, T, H, K)), r(B, T, HV, V),
            -torch.rand(*g_shape, generator=gen, dtype=torch.float64),
            torch.rand(B, T, HV, generator=gen, dtype=torch.float64))


def test_delta_rule_writes_value_exactly_with_beta_one():
    # With beta = 1 and a unit key, the updated state maps k_t to v_t exactly.
    q, k, v, g, beta = _inputs()
    beta = torch.ones_like(beta)
    k = k / k.norm(dim=-1, keepdim=True)
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    _, S = gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], initial_state=h0,
                            output_final_state=True)
    torch.testing.assert_close(torch.einsum("bhk,bhkv->bhv", k[:, 0], S), v[:, 0])


def test_zero_beta_and_gate_keeps_the_state():
    q, k, v, g, beta = _inputs()
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o, S = gated_delta_rule(q, k, v, torch.zeros_like(g), torch.zeros_like(beta), initial_state=h0,
                            output_final_state=True)
    torch.testing.assert_close(S, h0)
    torch.testing.assert_close(o, torch.einsum("bthk,bhkv->bthv", q * K**-0.5, h0))


def test_scalar_gate_is_a_broadcast_per_channel_gate():
    q, k, v, g, beta = _inputs()
    o1, s1 = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o2, s2 = gated_delta_rule(q, k, v, g.unsqueeze(-1).expand(B, T, H, K), beta, output_final_state=True)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2)


def test_gva_reads_key_head_h_over_group():
    # HV = 4 value heads on H = 2 key heads: value head h uses key head h // 2.
    q, k, v, g, beta = _inputs(HV=4)
    o, s = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    for h in range(4):
        oh, sh = gated_delta_rule(q[:, :, h // 2 : h // 2 + 1], k[:, :, h // 2 : h // 2 + 1],
                                  v[:, :, h : h + 1], g[:, :, h : h + 1], beta[:, :, h : h + 1],
                                  output_final_state=True)
        torch.testing.assert_close(o[:, :, h : h + 1], oh)
        torch.testing.assert_close(s[:, h : h + 1], sh)


def test_vk_layout_is_the_transpose():
    q, k, v, g, beta = _inputs(per_channel=True)
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o1, s1 = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o2, s2 = gated_delta_rule(q, k, v, g, beta, initial_state=h0.transpose(-1, -2),
                              output_final_state=True, state_layout="vk")
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(s1, s2.transpose(-1, -2))


def test_conv_matches_torch_conv1d():
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    w, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y, state = causal_conv1d(x, w, b)
    expected = torch.nn.functional.conv1d(x.transpose(1, 2), w.unsqueeze(1), b, padding=3, groups=5)
    torch.testing.assert_close(y, torch.nn.functional.silu(expected[..., :11]).transpose(1, 2))
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))
