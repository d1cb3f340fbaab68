"""The plain model (shapes, KL, the recurrence's conditions) and every fast path against it: the batched
rollout (losses, gradients, BatchNorm statistics), the inference rollout, skip terms, the upsampled
convolution, Winograd, BatchNorm folding; both priors, with and without conditions, with the decoder
modulated by the condition (FiLM, CondConv), with spatial latent levels and with the pixel-motion output."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence as torch_kl

import models.fast as fast
from models import CVAE, gaussian_lstm, kl_divergence, lstm, vgg_decoder, vgg_encoder
from models.fast import upsampled_conv, winograd_f4, winograd_f4_weight
from models.cvae import PixelMotion
from models.vgg_64 import CondConv2d, FiLM, condconv2d

VARIANTS = [dict(prior="fixed"), dict(prior="learned"), dict(prior="learned", cond_dim=0),
            dict(prior="fixed", last_frame_skip=True)]
EXTRAS = [dict(cond_conv="film"), dict(cond_conv="condconv", condconv_experts=3, prior="learned"),
          dict(latent_levels=2), dict(latent_levels=3, prior="learned", cond_conv="film", z_spatial_dim=2),
          dict(motion="cdna", motion_kernels=3, prior="learned"), dict(motion="flow", motion_kernels=2)]
VARIANTS += EXTRAS


def inner_loop(variants, keep):
    """The variants as parameters, those not in `keep` marked slow: `pytest -m "not slow"` checks a few that
    cover every code path (fixed and learned prior, FiLM, CondConv, spatial levels), CI checks them all."""
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in variants]


INNER = [VARIANTS[0], EXTRAS[1], EXTRAS[3], EXTRAS[5]]  # fixed prior; condconv + learned; 3 levels + learned + FiLM; flow


def test_module_shapes_and_clip_forms():
    enc, dec = vgg_encoder(16, base_channels=4), vgg_decoder(16, base_channels=4)
    x = torch.rand(2, 5, 3, 64, 64)  # (B, T, C, H, W)
    h, skips = enc(x[:, 0])
    assert h.shape == (2, 16) and h.abs().max() <= 1
    assert [s.shape for s in skips] == [(2, 4, 64, 64), (2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
    y = dec(h, skips)
    assert y.shape == (2, 3, 64, 64) and 0 <= y.min() and y.max() <= 1
    # The clip forms (eval mode: BatchNorm does not depend on how frames are grouped into calls) equal
    # the plain per-frame calls; the decoder's split first convolution equals the concatenation.
    enc.eval(), dec.eval()
    hc, skc = fast.encode(enc, x)
    assert hc.shape == (2, 5, 16) and all(s.shape[:2] == (2, 5) for s in skc)
    yc = fast.decode(dec, hc, fast.skip_terms(dec, skc))[0]
    for t in range(5):
        h, skips = enc(x[:, t])
        torch.testing.assert_close(hc[:, t], h)
        torch.testing.assert_close(yc[:, t], dec(h, skips), atol=1e-6, rtol=1e-5)
    pred = lstm(10, 6, 12, 2)
    out, state = pred(torch.randn(3, 10))
    assert out.shape == (3, 6) and len(state) == 2 and state[0][0].shape == (3, 12)
    out2, _ = pred(torch.randn(5, 10))  # no state sized to an earlier batch
    assert out2.shape == (5, 6)
    z, mu, logvar, _ = gaussian_lstm(10, 7, 12, 1)(torch.randn(3, 10))
    assert z.shape == mu.shape == logvar.shape == (3, 7)


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
    conv = torch.nn.Conv2d(256, 8, 3, 1, 1).requires_grad_(False)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        for change in (lambda: None, lambda: conv.weight.mul_(-2), lambda: setattr(conv, "weight", torch.nn.Parameter(
                0.02 * torch.randn(8, 256, 3, 3), requires_grad=False))):
            change()
            torch.testing.assert_close(fast.run_per_step(conv, x, 1), F.conv2d(x, conv.weight, conv.bias, padding=1),
                                       atol=1e-4, rtol=1e-4)
            assert conv._f4[0] is conv.weight


@pytest.mark.skipif(not fast._nnpack_available(), reason="this PyTorch build has no NNPACK")
def test_winograd_inference_matches_direct(monkeypatch):
    calls, f4_calls = [], []
    nnpack, f4 = torch._nnpack_spatial_convolution, fast.winograd_f4
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or nnpack(*a))
    monkeypatch.setattr(fast, "winograd_f4", lambda *a: f4_calls.append(a[0].shape) or f4(*a))
    monkeypatch.setattr(fast, "ALGORITHMS", None)  # the rule, whatever an evaluation measured before
    model = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=32).eval()  # 64-256 channels: some layers qualify
    frames, conds, noise = torch.rand(2, 4, 3, 64, 64), torch.randn(2, 4, 7), torch.randn(2, 3, 4)
    with torch.no_grad():
        fast_pred = fast.predict(model, frames, conds, 2, 2, noise)
        assert {s[-3:] for s in calls} == {(64, 32, 32), (128, 16, 16)}
        assert {s[-3:] for s in f4_calls} == {(256, 8, 8)}
        calls += f4_calls
        monkeypatch.setattr(fast, "WINOGRAD", False)
        n = len(calls)
        direct = fast.predict(model, frames, conds, 2, 2, noise)
        assert len(calls) == n
    torch.testing.assert_close(fast_pred, direct, atol=1e-5, rtol=0)
    monkeypatch.setattr(fast, "WINOGRAD", True)
    model(frames, conds, 2, batched=True)["mse"].backward()  # training keeps the direct algorithm
    assert len(calls) == n


def test_measured_inference_algorithms_are_used_and_match_direct(monkeypatch):
    """choose_inference_algorithms times every 3x3 layer shape of inference in each algorithm that applies and
    picks per shape; set_inference_algorithms then routes each layer to its pick, whatever the rule says, and
    the predictions stay those of the direct algorithm up to rounding."""
    monkeypatch.setattr(fast, "ALGORITHMS", None)
    model = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=16).eval()
    frames, conds, noise = torch.rand(2, 4, 3, 64, 64), torch.randn(2, 4, 7), torch.randn(2, 3, 4)
    choice, times = fast.choose_inference_algorithms(model, frames, conds, 2, 2, repeats=1, screen_rows=1)
    # every 3x3 layer of the encoder (64x64 to 8x8) and the decoder's skip terms, keyed by shape
    assert {"3->16@64x64", "16->16@64x64", "32->32@32x32", "128->128@8x8"} <= set(choice) == set(times)
    for key, algo in choice.items():
        assert "direct" in times[key] and algo in times[key]
        assert algo == "direct" or times[key][algo] < 0.9 * times[key]["direct"]
    assert set(times["16->16@64x64"]) >= {"direct", "f4"}
    assert fast.choose_inference_algorithms(model, frames, conds, 2, 2, known=choice) == ({}, {})
    with torch.no_grad():
        ref = fast.predict(model, frames, conds, 2, 2, noise)
        f4_calls, f4 = [], fast.winograd_f4
        monkeypatch.setattr(fast, "winograd_f4", lambda *a: f4_calls.append(a[0].shape) or f4(*a))
        fast.set_inference_algorithms({key: "f4" for key in choice})  # f4 everywhere, the rule's 8x8 only
        pred = fast.predict(model, frames, conds, 2, 2, noise)
        assert {s[-3:] for s in f4_calls} >= {(16, 64, 64), (32, 32, 32), (128, 8, 8)}
        fast.set_inference_algorithms({})  # nothing chosen: direct everywhere
        n = len(f4_calls)
        torch.testing.assert_close(fast.predict(model, frames, conds, 2, 2, noise), ref, atol=0, rtol=0)
        assert len(f4_calls) == n
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=0)


def test_online_choice_times_the_callers_calls_and_keeps_the_fastest(monkeypatch):
    """OnlineChoice runs the candidates in turn on the caller's own calls, counted per number of rows, and
    after one warm-up and `repeats` timed calls of each keeps the fastest for every later call; a Winograd
    candidate must beat direct by min_gain; its cost is the trial calls' excess over the winner's best."""
    clock, ran = [0.0], []
    monkeypatch.setattr(fast.time, "perf_counter", lambda: clock[0])

    def run_with(seconds):
        def run(name):
            ran.append(name)
            clock[0] += seconds[name]
            return name
        return run
    choice = fast.OnlineChoice(["direct", "nnpack", "f4"], repeats=2)
    run = run_with({"direct": 3.0, "nnpack": 1.0, "f4": 2.0})
    assert [choice(run, 8) for _ in range(8)] == ["direct", "nnpack", "f4"] * 2 + ["direct", "nnpack"]
    assert choice.result() is None
    assert choice(run, 4) == "direct" and choice.result() is None  # another number of rows: counted apart
    assert choice(run, 8) == "f4" and choice.result() == "nnpack"  # the 3rd call of each at 8 rows decides
    assert choice.cost_s == 3 * (3.0 - 1.0) + 3 * (2.0 - 1.0)  # warm-ups included; the 4-row call not counted
    assert [choice(run, r) for r in (8, 4, 2)] == ["nnpack"] * 3
    tie = fast.OnlineChoice(["direct", "f4"], repeats=1)
    run = run_with({"direct": 1.0, "f4": 0.95})  # under 10% faster: direct's exact-as-possible rounding wins
    assert [tie(run, 2) for _ in range(5)] == ["direct", "f4", "direct", "f4", "direct"] and tie.result() == "direct"


def test_online_inference_algorithms_match_direct():
    """conv3x3 under an OnlineChoice: every call, timed or decided, is the convolution up to the algorithms'
    rounding, and a predict decides the shapes it calls often enough."""
    model = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=8).eval()
    frames, conds, noise = torch.rand(2, 12, 3, 64, 64), torch.randn(2, 12, 7), torch.randn(2, 11, 4)
    try:
        with torch.no_grad():
            fast.set_inference_algorithms({})
            ref = fast.predict(model, frames, conds, 2, 10, noise)
            choice, times = fast.choose_inference_algorithms(model, frames, conds, 2, screen_rows=1, screen_loss=100,
                                                             online=True)
            online = {k: v for k, v in choice.items() if isinstance(v, fast.OnlineChoice)}
            assert online and set(choice) == set(times)  # every shape that can take Winograd is timed online
            assert all(v == "direct" for k, v in choice.items() if k not in online)
            fast.set_inference_algorithms(choice)
            pred = fast.predict(model, frames, conds, 2, 10, noise)
            assert all(v.result() in v.candidates for v in online.values())
            torch.testing.assert_close(pred, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(fast.predict(model, frames, conds, 2, 10, noise), ref, atol=1e-5, rtol=0)
    finally:
        fast.set_inference_algorithms(None)


@pytest.mark.skipif(not fast._nnpack_available(), reason="this PyTorch build has no NNPACK")
def test_the_screen_drops_only_our_winograd():
    """The few-row screen may drop F(4x4) but never NNPACK, whose time on a few rows is mostly its per-call
    cost: with the strictest screen every shape is left to the evaluation's calls with direct and NNPACK."""
    model = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=8).eval()
    frames, conds = torch.rand(2, 2, 3, 64, 64), torch.randn(2, 3, 7)
    with torch.no_grad():
        choice, _ = fast.choose_inference_algorithms(model, frames, conds, 2, screen_rows=1, screen_loss=0.0, online=True)
    assert choice and all(isinstance(v, fast.OnlineChoice) and v.candidates == ("direct", "nnpack") for v in choice.values())


def test_condconv_with_one_expert_is_a_convolution():
    """CondConv with K=1 and routing weight 1 is the plain convolution with that kernel; with K experts each
    example gets its own mix, as separate convolutions would compute it; its BatchNorm folds into the experts."""
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64)
    w, b = torch.randn(1, 7, 5, 3, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(condconv2d(x, w, b, torch.ones(3, 1, dtype=torch.float64)),
                               F.conv2d(x, w[0], b, padding=1), atol=1e-12, rtol=1e-12)
    w, r = torch.randn(4, 7, 5, 3, 3, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    ref = torch.cat([F.conv2d(x[n:n + 1], torch.einsum("k,koihw->oihw", r[n], w), b, padding=1) for n in range(3)])
    torch.testing.assert_close(condconv2d(x, w, b, r), ref, atol=1e-12, rtol=1e-12)
    conv = CondConv2d(5, 7, 4, 6)
    assert conv(torch.randn(3, 5, 8, 8), torch.randn(3, 6)).shape == (3, 7, 8, 8)


def test_modulated_decoder_needs_a_condition_and_starts_as_the_plain_one():
    with pytest.raises(ValueError, match="cond_conv='film'.*cond_dim=0"):
        CVAE(cond_dim=0, cond_conv="film")
    torch.manual_seed(0)
    plain = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    film = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4, cond_conv="film")
    # The existing modules keep their parameter names and shapes; FiLM adds its own, initialised to zero.
    shapes = {k: v.shape for k, v in film.state_dict().items()}
    assert all(shapes[k] == v.shape for k, v in plain.state_dict().items())
    assert {k.split(".")[1] for k in set(shapes) - set(plain.state_dict())} == {"film"}
    film.load_state_dict(plain.state_dict(), strict=False)
    x, c, noise = torch.rand(2, 5, 3, 64, 64), torch.randn(2, 5, 7), torch.randn(2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(film(x, c, 2, noise=noise)["pred"], plain(x, c, 2, noise=noise)["pred"])


def test_pixel_motion_moves_the_input_frame():
    """The pixel-motion outputs: a one-hot CDNA kernel, or a constant integer flow, moves the input frame by
    its offset (replicated borders), and the masks choose between the moved frames and the decoder's image,
    pixel by pixel."""
    torch.manual_seed(0)
    prev, image, g = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64), torch.randn(3, 6)
    down = torch.cat([prev[:, :, :1], prev[:, :, :-1]], 2)  # y[i] = x[i - 1]: moved one row down
    cdna = PixelMotion("cdna", g_dim=6, kernels=2, size=5)
    with torch.no_grad():  # kernel 0: the identity; kernel 1: the tap one row above the centre
        cdna.proj.weight.zero_()
        bias = torch.full((2, 25), -1e4)
        bias[0, 12], bias[1, 7] = 0.0, 0.0
        cdna.proj.bias.copy_(bias.flatten())
    flow = torch.zeros(3, 4, 64, 64)
    flow[:, 3] = -1.0  # field 1: dy = -1, x'(p) = x(p - one row)
    spot = torch.zeros(3, 2, 64, 64)  # two maps moved along with the frame (designated pixels)
    spot[:, 0, 20, 30], spot[:, 1, 40:43, 10] = 1.0, 1 / 3
    spot_down = torch.cat([spot[:, :, :1], spot[:, :, :-1]], 2)
    for pm, extra in ((cdna, []), (PixelMotion("flow", g_dim=6, kernels=2), [flow])):
        for k in range(3):
            masks = torch.full((3, 3, 64, 64), -1e4).index_fill(1, torch.tensor([k]), 0.0)  # mask k all 1
            y = pm(torch.cat([image, masks, *extra], 1), prev, g)
            torch.testing.assert_close(y, [prev, down, image][k], atol=2e-5, rtol=0)  # grid rounding (flow)
            y = pm(torch.cat([image, masks, *extra], 1), torch.cat([prev, spot], 1), g)
            torch.testing.assert_close(y[:, :3], [prev, down, image][k], atol=2e-5, rtol=0)
            torch.testing.assert_close(y[:, 3:], [spot, spot_down, 0 * spot][k], atol=2e-5, rtol=0)  # painted: no mass
        masks = torch.cat([torch.zeros(3, 1, 64, 64), torch.full((3, 2, 64, 64), -1e4)], 1)
        masks[:, 2, :, 32:] = 0.0  # right half: the identity and the image (mask 2) mixed 50/50
        y = pm(torch.cat([image, masks, *extra], 1), prev, g)
        torch.testing.assert_close(y[..., :32], prev[..., :32], atol=2e-5, rtol=0)
        torch.testing.assert_close(y[..., 32:], 0.5 * (prev + image)[..., 32:], atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["cdna", "flow"])
def test_designated_pixels_follow_the_predicted_motion(kind):
    """predict(track=...): a map on the last given frame is moved step by step as the frames are, the same in
    the plain and the fast rollout. The decoder's last layer is set to a constant output: all weight on the
    first motion, which shifts the frame one pixel left per step, so a point's map moves one pixel a step."""
    m, x, c, noise = _model(motion=kind, motion_kernels=2)
    last = m.decoder.upc5[1]  # the ConvTranspose2d giving image, mask logits (and flows)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[3] = 30.0  # mask logits: motion 0 takes all the weight
        if kind == "flow":
            last.bias[6] = 1.0  # field 0: dx = +1, x'(p) = x(p + 1): the frame moves one pixel left
        else:  # kernel 0: all its weight on the tap right of the centre
            m.motion.proj.weight.zero_()
            bias = torch.full((2, 25), -1e4)
            bias[:, 13] = 0.0
            m.motion.proj.bias.copy_(bias.flatten())
    track = torch.zeros(4, 1, 64, 64)
    track[:, 0, 30, 40] = 1.0
    with torch.no_grad():
        pred, maps = m.predict(x, c, 3, 5, noise, track=track)
        assert pred.shape == (4, 5, 3, 64, 64) and maps.shape == (4, 5, 1, 64, 64)
        for k in range(5):
            want = torch.zeros(4, 64, 64)
            want[:, 30, 39 - k] = 1.0
            torch.testing.assert_close(maps[:, k, 0], want, atol=1e-4, rtol=0)
        left = torch.cat([x[:, 2, ..., 1:], x[:, 2, ..., 63:]], -1)  # the last given frame one pixel left
        torch.testing.assert_close(pred[:, 0], left, atol=1e-4, rtol=0)
        for model in (m, fast.inference_copy(m)):
            fast_pred, fast_maps = fast.predict(model, x, c, 3, 5, noise, track=track)
            torch.testing.assert_close(fast_pred, pred, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(fast_maps, maps, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="track"):
        _model()[0].predict(x, c, 3, 5, noise, track=track)


def test_kl_matches_torch_distributions():
    mu_q, logvar_q, mu_p, logvar_p = torch.randn(4, 6, 9).unbind(0)
    q = Normal(mu_q, (0.5 * logvar_q).exp())
    torch.testing.assert_close(kl_divergence(mu_q, logvar_q), torch_kl(q, Normal(0.0, 1.0)))
    torch.testing.assert_close(kl_divergence(mu_q, logvar_q, mu_p, logvar_p),
                               torch_kl(q, Normal(mu_p, (0.5 * logvar_p).exp())))
    zeros = torch.zeros_like(mu_p)  # the general form with p = N(0, I) is the standard-normal one
    torch.testing.assert_close(kl_divergence(mu_q, logvar_q, zeros, zeros), kl_divergence(mu_q, logvar_q))


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4, **kw)
    m = CVAE(**cfg)
    for mod in m.modules():  # FiLM starts as the identity: give it something to modulate
        if isinstance(mod, FiLM):
            torch.nn.init.normal_(mod.proj.weight, 0.0, 0.5)
    x = torch.rand(4, 8, 3, 64, 64)
    c = torch.randn(4, 8, 7) if m.cond_dim else None
    m.train()
    for _ in range(3):  # move BatchNorm running statistics away from their initial values
        m(x, c, 2, batched=True)
    noise = torch.randn(4, 7, 4)  # the global z's; with spatial levels, a list with theirs
    if m.latent_levels > 1:
        noise = [noise] + [torch.randn(4, 7, *s) for s in m.noise_shapes()[1:]]
    return m.eval(), x, c, noise


@pytest.mark.parametrize("kw", inner_loop(VARIANTS, INNER))
def test_fast_rollouts_match_the_plain_model(kw):
    m, x, c, noise = _model(**kw)
    with torch.no_grad():
        for tf in (True, False):
            a = m(x, c, 3, teacher_forcing=tf, noise=noise)
            b = m(x, c, 3, teacher_forcing=tf, noise=noise, batched=True)
            torch.testing.assert_close(b["pred"], a["pred"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b["kl"], a["kl"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b["kl_levels"], a["kl_levels"], atol=1e-5, rtol=1e-4)
            assert a["pred"].shape == (4, 7, 3, 64, 64) and a["kl"].shape == (7, 4)
            assert a["kl_levels"].shape == (m.latent_levels,)
        copy = fast.inference_copy(m)
        for posterior in (False, True):
            p = m.predict(x, c, 3, 5, noise, posterior=posterior)
            assert p.shape == (4, 5, 3, 64, 64)
            torch.testing.assert_close(fast.predict(m, x, c, 3, 5, noise, posterior=posterior), p, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(fast.predict(copy, x, c, 3, 5, noise, posterior=posterior), p, atol=1e-5, rtol=1e-4)


# BatchNorm statistics over the clip: its plain form is CVAE.forward_clip
CLIP = [dict(bn_stats="clip", cond_conv="film"), dict(bn_stats="clip", latent_levels=3, prior="learned", cond_conv="film",
        z_spatial_dim=2), dict(bn_stats="clip", motion="flow", motion_kernels=2, last_frame_skip=True)]


@pytest.mark.parametrize("kw", inner_loop(VARIANTS + CLIP, INNER + CLIP[:1]))
def test_batched_rollout_trains_as_per_step(kw):
    """In training, too: the same losses, gradients and BatchNorm running statistics (with bn_stats="clip",
    those of the plain CVAE.forward_clip). In float64: the two
    rollouts sum in different orders, and in float32 that rounding alone moves some gradients by 1e-3 of
    their size on AVX-512 hosts (and the spatial levels' KL, nats at initialisation, makes the gradients
    of the biases before a BatchNorm, zero in exact arithmetic, show rounding of ~1e-4)."""
    results = []
    for batched in (True, False):
        m, x, c, noise = _model(**kw)
        m, x = m.double(), x.double()
        c = None if c is None else c.double()
        noise = [n.double() for n in noise] if isinstance(noise, list) else noise.double()
        m.train()
        out = m(x, c, 2, teacher_forcing=True, noise=noise, batched=batched)
        (out["mse"] + out["kld"]).backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (a, grad_a, state_a), (b, grad_b, state_b) = results
    torch.testing.assert_close(a["pred"], b["pred"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["kl"], b["kl"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a["kl_levels"], b["kl_levels"], atol=1e-5, rtol=1e-4)
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], atol=1e-5, rtol=1e-3, msg=name)
    for name in state_a:  # running means, variances and counts of every BatchNorm
        torch.testing.assert_close(state_a[name], state_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_clip_statistics_change_training_only():
    """bn_stats="clip" normalises the encoder and decoder over the whole clip in training: other losses and
    running statistics than per step (the encoder's first BatchNorm receives the mean over all B * T frames),
    the same model in eval mode; without teacher forcing it refuses to train."""
    step, x, c, noise = _model(cond_conv="film")
    clip = copy.deepcopy(step)
    clip.bn_stats = "clip"
    with torch.no_grad():
        for batched in (False, True):
            torch.testing.assert_close(clip(x, c, 2, noise=noise, batched=batched)["pred"],
                                       step(x, c, 2, noise=noise, batched=batched)["pred"], atol=0, rtol=0)
        bn = clip.encoder.c1[0][1]
        m, before = bn.momentum, bn.running_mean.clone()
        clip.train(), step.train()
        a, b = clip(x, c, 2, noise=noise, batched=True), step(x, c, 2, noise=noise, batched=True)
        assert (a["mse"] - b["mse"]).abs() > 1e-6
        frames_mean = clip.encoder.c1[0][0](x.flatten(0, 1)).mean((0, 2, 3))  # the first conv's output, all frames
        torch.testing.assert_close(bn.running_mean, (1 - m) * before + m * frames_mean, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="teacher forcing"):
        clip(x, c, 2, teacher_forcing=False, noise=noise)
    with pytest.raises(ValueError, match="bn_stats"):
        CVAE(bn_stats="frame")


@pytest.mark.parametrize("kw", inner_loop(VARIANTS[:3] + EXTRAS, [VARIANTS[0], EXTRAS[3]]))
def test_fed_back_training_rollout_matches_the_plain_one(kw):
    """Without teacher forcing: the same losses in training, and the same gradients. Gradients are compared
    with BatchNorm in eval mode: in training, the batch statistics of this untrained model's near-constant
    fed-back frames make its gradients chaotic (an input change of 1e-6 moves them by several times their
    size, in either rollout), so only the losses can be compared there."""
    for train in (True, False):
        results = []
        for batched in (True, False):
            m, x, c, noise = _model(**kw)
            m.train(train)
            out = m(x, c, 3, teacher_forcing=False, noise=noise, batched=batched)
            (out["mse"] + out["kld"]).backward()
            results.append((out, {n: p.grad for n, p in m.named_parameters()}))
        (a, grad_a), (b, grad_b) = results
        torch.testing.assert_close(a["pred"], b["pred"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["kl"], b["kl"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["kl_levels"], b["kl_levels"], atol=1e-5, rtol=1e-4)
        for name in grad_a if not train else ():
            torch.testing.assert_close(grad_a[name], grad_b[name], atol=1e-6, rtol=1e-3, msg=name)


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_spatial_levels_kl_shapes_and_noise(prior, monkeypatch):
    """Each latent level's KL is KL(q || p) of torch.distributions over that level's Gaussians (N(0, I) for
    the fixed prior), summed over its dimensions and steps, averaged over the batch; kld sums the levels.
    Predictions take every level from the prior, and are a function of the noise passed."""
    m, x, c, noise = _model(latent_levels=3, prior=prior, z_spatial_dim=3)
    assert m.noise_shapes() == [(4,), (3, 8, 8), (3, 16, 16)]
    seen = {0: [], 1: []}
    latent = m.decoder.latent

    def spy(i, u, target=None, eps=None):
        z, st = latent(i, u, target, eps)
        seen[i].append(st)
        return z, st

    monkeypatch.setattr(m.decoder, "latent", spy)
    with torch.no_grad():
        out = m(x, c, 2, noise=noise)
    ref = [out["kl"].sum()]
    for i in (0, 1):
        assert len(seen[i]) == 7 and all(st[0].shape == (4, 3, 8 * 2 ** i, 8 * 2 ** i) for st in seen[i])
        kl = 0
        for mu_q, logvar_q, mu_p, logvar_p in seen[i]:
            p = Normal(0.0, 1.0) if mu_p is None else Normal(mu_p, (0.5 * logvar_p).exp())
            kl = kl + torch_kl(Normal(mu_q, (0.5 * logvar_q).exp()), p).sum((1, 2, 3)).mean()
        ref.append(kl)
    torch.testing.assert_close(out["kl_levels"], torch.stack(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["kld"], out["kl_levels"].sum())
    monkeypatch.undo()
    with torch.no_grad():
        pred = m.predict(x, c, 2, 5, noise)
        assert pred.shape == (4, 5, 3, 64, 64)
        torch.testing.assert_close(fast.predict(m, x, c, 2, 5, noise), pred, atol=1e-5, rtol=1e-4)
        assert not torch.equal(pred, m.predict(x, c, 2, 5, [noise[0], noise[1], -noise[2]]))  # the 16x16 level acts
        torch.manual_seed(3)
        a = m.predict(x, c, 2, 5, noise[0])  # the global noise alone: the spatial levels' is drawn
        torch.manual_seed(3)
        b = m.predict(x, c, 2, 5, noise[:1])
        assert torch.equal(a, b) and not torch.equal(a, pred)


def test_learned_prior_is_stepped_through_the_given_frames():
    """SVG-LP's prior sees h_{t-1} from the first step on: its KL term is KL(q || p) with p's statistics from
    a per-step loop over the true frames, and prediction samples z_t = mu_p + eps sigma_p after n_past."""
    m, x, c, noise = _model(prior="learned")
    with torch.no_grad():
        out = m(x, c, 2, noise=noise)
        state_p, state_q, ref = None, None, []
        for t in range(1, 8):
            mu_p, logvar_p, state_p = m.prior.params(m.encoder(x[:, t - 1])[0], state_p)
            _, mu_q, logvar_q, state_q = m.posterior(m.encoder(x[:, t])[0], state_q, noise[:, t - 1])
            ref.append(kl_divergence(mu_q, logvar_q, mu_p, logvar_p).mean(0))
        torch.testing.assert_close(out["kl"], torch.stack(ref), atol=1e-5, rtol=1e-4)
        # With a learned prior, predictions depend on the prior's mean: zero noise is not zero z.
        fixed = _model(prior="fixed")[0]
        fixed.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("prior.")})
        zero = torch.zeros_like(noise)
        assert not torch.equal(m.predict(x, c, 2, 5, zero), fixed.predict(x, c, 2, 5, zero))


def test_inference_copy_folds_batch_norm():
    m, x, c, noise = _model()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded = fast.inference_copy(m)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in folded.modules())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert m.training and all(p.requires_grad for p in m.parameters())  # the model itself is untouched
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded.predict(x, c, 2, 6, noise), m.predict(x, c, 2, 6, noise), atol=1e-5, rtol=1e-4)


def test_predictions_are_fed_back_without_teacher_forcing():
    m, x, c, noise = _model()
    m.train()  # batch statistics keep the small freshly initialised network sensitive to its input
    x2 = x.clone()
    x2[:, 3:] = torch.rand_like(x2[:, 3:])  # change frames the model must not see after n_past=3
    with torch.no_grad():
        a = m.predict(x, c, 3, 5, noise)
        assert torch.equal(a, m.predict(x2, c, 3, 5, noise))
        assert torch.equal(a, m.predict(x[:, :3], c, 3, 5, noise))  # only the given frames are needed
        # Training without teacher forcing feeds predictions back too: frames after n_past only reach the
        # prediction through the posterior's z (not at all with the posterior's input removed).
        tf = m(x2, c, 3, teacher_forcing=True, noise=noise)["pred"]
        no_tf = m(x2, c, 3, teacher_forcing=False, noise=noise)["pred"]
        assert torch.equal(tf[:, :3], no_tf[:, :3]) and not torch.equal(tf[:, 3:], no_tf[:, 3:])


def test_condition_t_minus_1_drives_step_t():
    """Step t sees cond_{t-1}: changing cond at the last frame changes nothing, at t-1 it does."""
    m, x, c, noise = _model()
    c_last, c_prev = c.clone(), c.clone()
    c_last[:, -1] += 5
    c_prev[:, 3] += 5
    with torch.no_grad():
        base = m.predict(x, c, 2, 6, noise)  # frames 2..7
        assert torch.equal(base, m.predict(x, c_last, 2, 6, noise))
        changed = m.predict(x, c_prev, 2, 6, noise)  # cond_3 drives step 4 = frame 4 (index 2)
        assert torch.equal(base[:, :2], changed[:, :2]) and not torch.equal(base[:, 2], changed[:, 2])


def test_bench_reference_is_the_same_model():
    """bench.py's reference, which encodes the input and the target frame in separate calls as the course
    sample does, computes CVAE.forward's losses and gradients."""
    import bench
    torch.manual_seed(0)
    m = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    svg = CVAE(g_dim=16, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)
    svg.load_state_dict(m.state_dict())
    # float64: the two sum in different orders, which float32 rounding shows at 1e-4 on some hosts
    m, svg = m.double(), svg.double()
    x, c = torch.rand(4, 6, 3, 64, 64, dtype=torch.float64), torch.randn(4, 6, 7, dtype=torch.float64)
    outs = []
    for forward in (lambda: m(x, c, 2, batched=True), lambda: bench.svg_forward(svg, x, c, 2)):
        torch.manual_seed(5)  # the same posterior noise, drawn first by both
        out = forward()
        (out["mse"] + out["kld"]).backward()
        outs.append(out)
    for k in ("mse", "kld"):  # CVAE.losses sums in float32
        torch.testing.assert_close(outs[0][k].double(), outs[1][k].double())
    for (name, p), q in zip(m.named_parameters(), svg.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_checkpoint_of_the_previous_code_loads_and_predicts_the_same():
    """tests/fixtures/previous_model.pth was written by the code before the plain/fast split (no prior or
    cond flags in its architecture): it loads with weights_only, rebuilds, and predicts and scores as then."""
    import os
    import checkpoints
    path = os.path.join(os.path.dirname(__file__), "fixtures", "previous_model.pth")
    ckpt = checkpoints.load_checkpoint(path)
    m = CVAE.from_config(ckpt["arch"])
    checkpoints.load_model_state(m, ckpt, path)
    ref = ckpt["reference"]
    x = ref["frames"].float() / 255
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.predict(x, ref["conds"], 2, 2, ref["noise"]), ref["pred"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast.predict(fast.inference_copy(m), x, ref["conds"], 2, 2, ref["noise"]), ref["pred"],
                                   atol=1e-5, rtol=1e-4)
        out = m(x, ref["conds"], 2, noise=ref["noise"])
        torch.testing.assert_close(out["mse"], ref["mse"])
        torch.testing.assert_close(out["kld"], ref["kld"])


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_over_a_sequence_is_the_cell_loop(layers):
    """fast._cells (one torch.lstm call) against the LSTMCells stepped one at a time: outputs and gradients in
    float64, from zeros and from a given state; and it runs under bf16 autocast."""
    from models.lstm import lstm
    torch.manual_seed(0)
    net = lstm(12, 6, 10, layers).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    state = tuple((torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)) for _ in range(layers))
    for s in (None, state):
        grads = []
        for f in (fast._cells, fast._cells_per_step):
            net.zero_grad()
            out = f(net, x, s)
            (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)).sum().backward()
            grads.append((out, [p.grad.clone() for p in net.parameters() if p.grad is not None]))
        (a, ga), (b, gb) = grads
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        assert len(ga) == len(gb) == 2 + 4 * layers  # the embedding's and each cell's weights and biases
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast._cells(net.float(), x.float(), None).shape == (3, 5, 10)


def test_layout_changes_hand_gradients_back_in_nchw():
    """What keeps the 8-channel 64x64 layers' backward fast: a channels-last convolution or pooling hands its
    input gradient back in NCHW, as the BatchNorm and LeakyReLU before it ran, and BatchNorm per step returns
    no autograd view, so the in-place LeakyReLU after it is no CopySlices (a clone of the whole gradient). The
    channels-last pooling also takes the same maximum as NCHW's where values tie (bf16 ties often)."""
    conv = torch.nn.Conv2d(8, 8, 3, 1, 1)
    fast.set_conv_layouts(conv, [":conv"])
    x = torch.randn(6, 8, 16, 16, requires_grad=True)
    seen = []
    h = x * 1  # not a leaf: AccumulateGrad would reorder a leaf's gradient to its layout anyway
    h.register_hook(lambda grad: seen.append(grad.is_contiguous()))
    fast.in_layout(conv, "conv", conv, h).sum().backward()
    assert seen == [True]
    bn = torch.nn.BatchNorm2d(8).train()
    y = torch.nn.functional.leaky_relu_(fast.batch_norm_per_step(bn, x, 3), 0.2)
    assert y._base is None and type(y.grad_fn).__name__ == "LeakyReluBackward1"
    ties = torch.randint(0, 3, (4, 8, 16, 16)).to(torch.bfloat16).requires_grad_()
    g = torch.randn(4, 8, 8, 8, dtype=torch.bfloat16)
    grads = []
    for mark in ([], [":pool"]):
        fast.set_conv_layouts(conv, mark)
        out = fast.in_layout(conv, "pool", fast.max_pool2x2, ties)
        grads.append((out, torch.autograd.grad(out, ties, g)[0]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[1][1].is_contiguous() and conv.__dict__.get("_channels_last_pool")


def test_channels_last_convolutions_train_as_nchw():
    """Every convolution and pooling of the batched rollout marked channels-last (as choose_conv_layouts may mark them):
    the same losses, gradients and running statistics as NCHW (in float64, as the test above explains); and
    the choice leaves the model as it was."""
    results = []
    for mark in (False, True):
        m, x, c, noise = _model(cond_conv="film")
        m, x, c, noise = m.double(), x.double(), c.double(), noise.double()
        names = [f"{n}:{r}" for n, mod in m.named_modules() if type(mod) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
                 for r in ("conv", "up")] + [f"encoder.c{i}:pool" for i in range(2, 6)]
        fast.set_conv_layouts(m, names if mark else [])
        m.train()
        out = m(x, c, 2, teacher_forcing=True, noise=noise, batched=True)
        (out["mse"] + out["kld"]).backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}, m.state_dict()))
    (a, ga, sa), (b, gb, sb) = results
    for key in ("pred", "kl"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-3, msg=name)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-6, rtol=1e-5, msg=name)
    m, x, c = m.float(), x.float(), c.float()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    chosen, times = fast.choose_conv_layouts(m, x, c, 2, repeats=1)
    assert set(chosen) <= set(times) and {"encoder.c1.0.0:conv", "decoder.upc5.0.0:up", "encoder.c2:pool"} <= set(times)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
