"""Module shapes, the KL formula, the batched rollout against the per-step one, and bench.py's reference."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from models import CVAE, gaussian_lstm, lstm, vgg_decoder, vgg_encoder
from models.cvae import kl_standard_normal
import models.vgg_64 as vgg_64
from models.norm import fold_batch_norm
from models.vgg_64 import Conv3x3, upsampled_conv, winograd_f4, winograd_f4_weight


def test_module_shapes():
    enc, dec = vgg_encoder(16, base_channels=4), vgg_decoder(16, base_channels=4)
    x = torch.rand(2, 5, 3, 64, 64)  # (B, T, C, H, W)
    h, skips = enc(x)
    assert h.shape == (2, 5, 16) and h.abs().max() <= 1
    assert [s.shape[-3:] for s in skips] == [(4, 64, 64), (8, 32, 32), (16, 16, 16), (32, 8, 8)]
    assert all(s.shape[:2] == (2, 5) for s in skips)
    y = dec(h, dec.skip_terms(skips))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    # The split first convolution of each block is the convolution of cat([upsampled, skip])
    # (in eval mode, where BatchNorm does not depend on how the frames are grouped into calls).
    dec.eval()
    y = dec(h, dec.skip_terms(skips))
    d = dec.upc1(h.reshape(10, 16, 1, 1))
    for block, s in zip((dec.upc2, dec.upc3, dec.upc4, dec.upc5), reversed(skips)):
        d = block(torch.cat([F.interpolate(d, scale_factor=2), s.reshape(10, *s.shape[2:])], 1))
    torch.testing.assert_close(y, d.reshape(y.shape), atol=1e-6, rtol=1e-5)
    pred = lstm(10, 6, 12, 2)
    out, state = pred(torch.randn(3, 4, 10))
    assert out.shape == (3, 4, 6) and len(state) == 2 and state[0][0].shape == (3, 12)
    out2, _ = pred(torch.randn(5, 1, 10))  # no state sized to an earlier batch
    assert out2.shape == (5, 1, 6)
    z, mu, logvar, _ = gaussian_lstm(10, 7, 12, 1)(torch.randn(3, 4, 10))
    assert z.shape == mu.shape == logvar.shape == (3, 4, 7)


def test_upsampled_conv_is_upsample_then_conv():
    for H, W in ((8, 8), (16, 9), (3, 5)):
        d = torch.randn(2, 5, H, W, dtype=torch.float64)
        w, b = torch.randn(7, 5, 3, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
        ref = F.conv2d(F.interpolate(d, scale_factor=2, mode="nearest"), w, b, padding=1)
        torch.testing.assert_close(upsampled_conv(d, w, b), ref, atol=1e-12, rtol=1e-12)


def test_winograd_f4_is_a_convolution():
    for H, W in ((8, 8), (4, 12)):
        x = torch.randn(3, 5, H, W, dtype=torch.float64)
        w, b = torch.randn(7, 5, 3, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
        torch.testing.assert_close(winograd_f4(x, winograd_f4_weight(w), b), F.conv2d(x, w, b, padding=1),
                                   atol=1e-10, rtol=1e-10)
    # A frozen layer keeps the transform of its weight, and notices when the weight changes.
    conv = Conv3x3(256, 8).requires_grad_(False)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        for change in (lambda: None, lambda: conv.weight.mul_(-2), lambda: setattr(conv, "weight", torch.nn.Parameter(
                0.02 * torch.randn(8, 256, 3, 3), requires_grad=False))):
            change()
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
            assert conv._f4[0] is conv.weight


@pytest.mark.skipif(not vgg_64._nnpack_available(), reason="this PyTorch build has no NNPACK")
def test_winograd_inference_matches_direct(monkeypatch):
    calls, f4_calls = [], []
    nnpack, f4 = torch._nnpack_spatial_convolution, vgg_64.winograd_f4
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or nnpack(*a))
    monkeypatch.setattr(vgg_64, "winograd_f4", lambda *a: f4_calls.append(a[0].shape) or f4(*a))
    model = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=32).eval()  # 64-256 channels: some layers qualify
    frames, conds, noise = torch.rand(2, 4, 3, 64, 64), torch.randn(2, 4, 7), torch.randn(2, 3, 4)
    with torch.no_grad():
        fast = model(frames, conds, 2, teacher_forcing=False, prior=True, noise=noise)["pred"]
        assert {s[-3:] for s in calls} == {(64, 32, 32), (128, 16, 16)}
        assert {s[-3:] for s in f4_calls} == {(256, 8, 8)}
        calls += f4_calls
        monkeypatch.setattr(vgg_64, "WINOGRAD", False)
        n = len(calls)
        direct = model(frames, conds, 2, teacher_forcing=False, prior=True, noise=noise)["pred"]
        assert len(calls) == n
    torch.testing.assert_close(fast, direct, atol=1e-5, rtol=0)
    monkeypatch.setattr(vgg_64, "WINOGRAD", True)
    model(frames, conds, 2, teacher_forcing=True)["mse"].backward()  # training keeps the direct algorithm
    assert len(calls) == n


def test_kl_matches_closed_form():
    mu, logvar = torch.randn(6, 9), torch.randn(6, 9)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), ref)


def _model():
    torch.manual_seed(0)
    m = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    x = torch.rand(4, 8, 3, 64, 64)
    c = torch.randn(4, 8, 7)
    m.train()
    for _ in range(3):  # move BatchNorm running statistics away from their initial values
        m(x, c, 2)
    return m.eval(), x, c, torch.randn(4, 7, 4)


def test_batched_rollout_matches_per_step():
    m, x, c, noise = _model()
    with torch.no_grad():
        for tf, prior in ((True, False), (True, True), (False, True), (False, False)):
            a = m(x, c, 3, teacher_forcing=tf, prior=prior, noise=noise, batched=True)
            b = m(x, c, 3, teacher_forcing=tf, prior=prior, noise=noise, batched=False)
            torch.testing.assert_close(a["pred"], b["pred"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a["kld_per_step"], b["kld_per_step"], atol=1e-5, rtol=1e-4)
            assert a["pred"].shape == (4, 7, 3, 64, 64)
            assert a["kld_per_step"].shape == ((2,) if prior else (7,))
            for batched in (True, False):  # decoding from the last given frame on: the same frames
                d = m(x, c, 3, teacher_forcing=tf, prior=prior, noise=noise, batched=batched, decode_from=3)
                torch.testing.assert_close(d["pred"], a["pred"][:, 2:], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(d["mse_per_step"], a["mse_per_step"][2:], atol=1e-6, rtol=1e-4)
        with pytest.raises(ValueError, match="decode_from"):
            m(x, c, 3, decode_from=4)


def test_inference_copy_folds_batch_norm():
    m, x, c, noise = _model()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded = fold_batch_norm(m)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in folded.modules())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert m.training and all(p.requires_grad for p in m.parameters())  # the model itself is untouched
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    m.eval()
    with torch.no_grad():
        for tf in (True, False):
            a = m(x, c, 2, teacher_forcing=tf, prior=True, noise=noise)["pred"]
            torch.testing.assert_close(folded(x, c, 2, teacher_forcing=tf, prior=True, noise=noise)["pred"], a,
                                       atol=1e-5, rtol=1e-4)


def test_batched_rollout_trains_as_per_step():
    """In training, too: the same losses, gradients and BatchNorm running statistics."""
    results = []
    for batched in (True, False):
        m, x, c, noise = _model()
        m.train()
        out = m(x, c, 2, teacher_forcing=True, noise=noise, batched=batched)
        (out["mse"] + out["kld"]).backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (a, grad_a, state_a), (b, grad_b, state_b) = results
    torch.testing.assert_close(a["pred"], b["pred"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["kld_per_step"], b["kld_per_step"], atol=1e-5, rtol=1e-4)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], atol=1e-5, rtol=1e-3, msg=name)
    for name in state_a:  # running means, variances and counts of every BatchNorm
        torch.testing.assert_close(state_a[name], state_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rollout_uses_predictions_without_teacher_forcing():
    m, x, c, noise = _model()
    m.train()  # batch statistics keep the small freshly initialised network sensitive to its input
    x2 = x.clone()
    x2[:, 3:] = torch.rand_like(x2[:, 3:])  # change frames the model must not see after n_past=3
    with torch.no_grad():
        a = m(x, c, 3, teacher_forcing=False, prior=True, noise=noise)["pred"]
        b = m(x2, c, 3, teacher_forcing=False, prior=True, noise=noise)["pred"]
        assert torch.equal(a, b)
        t = m(x2, c, 3, teacher_forcing=True, prior=True, noise=noise)["pred"]
        assert not torch.equal(a[:, 3:], t[:, 3:])


def test_condition_t_minus_1_drives_step_t():
    """Step t sees cond_{t-1}: changing cond at the last frame changes nothing, at t-1 it does."""
    m, x, c, noise = _model()
    c_last, c_prev = c.clone(), c.clone()
    c_last[:, -1] += 5
    c_prev[:, 3] += 5
    with torch.no_grad():
        base = m(x, c, 2, prior=True, noise=noise)["pred"]
        assert torch.equal(base, m(x, c_last, 2, prior=True, noise=noise)["pred"])
        changed = m(x, c_prev, 2, prior=True, noise=noise)["pred"]
        assert torch.equal(base[:, :3], changed[:, :3]) and not torch.equal(base[:, 3], changed[:, 3])


def test_bench_reference_is_the_same_model():
    """bench.py's SVG-style reference rollout computes CVAE.forward's losses and gradients."""
    import bench
    torch.manual_seed(0)
    m = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    svg = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    svg.decoder = bench.SVGDecoder(16, 4)
    svg.load_state_dict(m.state_dict())
    x, c = torch.rand(4, 6, 3, 64, 64), torch.randn(4, 6, 7)
    outs = []
    for forward in (lambda: m(x, c, 2, batched=False), lambda: bench.svg_forward(svg, x, c, 2)):
        torch.manual_seed(5)  # the same posterior noise, drawn first by both
        out = forward()
        (out["mse"] + out["kld"]).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0]["mse"], outs[1]["mse"])
    torch.testing.assert_close(outs[0]["kld"], outs[1]["kld"])
    for (name, p), q in zip(m.named_parameters(), svg.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
