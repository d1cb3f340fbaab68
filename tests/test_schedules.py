"""KL-weight, teacher-forcing and learning-rate schedules: values, the sample's iterative rule, and resume safety."""
import math

import pytest

from kl_annealing import kl_weight, learning_rate, teacher_forcing_ratio


def test_monotonic_kl_weight():
    w = [kl_weight(s, niter=10, epoch_size=10, beta_max=1.0, ratio=0.5) for s in range(100)]
    assert w[0] == 0 and w[25] == pytest.approx(0.5) and w[50:] == [1.0] * 50
    assert all(b >= a for a, b in zip(w, w[1:]))
    assert kl_weight(10_000, 10, 10) == 1.0  # past the planned end


def test_cyclical_kl_weight():
    w = [kl_weight(s, 9, 10, beta_max=2.0, cyclical=True, n_cycles=3, ratio=0.5) for s in range(90)]
    assert [w[0], w[30], w[60]] == [0, 0, 0]
    assert w[15] == w[45] == w[75] == 2.0
    assert w[7] == pytest.approx(2.0 * 7 / 15)
    assert max(w) == 2.0 and len(set(w[:30])) > 10  # rises every iteration, not every epoch


def test_tfr_matches_the_sample_loop():
    tfr, seen = 1.0, []
    for epoch in range(40):
        seen.append(tfr)
        if epoch >= 5:  # the sample's rule, applied after each epoch
            tfr = max(tfr - 0.03, 0.2)
    got = [teacher_forcing_ratio(e, 1.0, 5, 0.03, 0.2) for e in range(40)]
    assert got == pytest.approx(seen)


def test_cosine_learning_rate():
    assert [learning_rate(s, 100, 0.002) for s in (0, 50, 500)] == [0.002] * 3  # constant: the sample's
    lr = [learning_rate(s, 100, 1.0, "cosine", warmup=10, min_ratio=0.1) for s in range(100)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert lr[10] == 1.0 and lr[-1] == pytest.approx(0.1)  # peak right after the warm-up, floor at the end
    assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))  # half a cosine between
    assert all(b <= a for a, b in zip(lr[10:], lr[11:]))
    assert learning_rate(10_000, 100, 1.0, "cosine", min_ratio=0.1) == pytest.approx(0.1)  # past the planned end


def test_schedules_depend_on_counters_only():
    """A resumed run recomputes the same values from (epoch, step): no state, any call order."""
    steps = [57, 3, 199, 57, 120]
    assert [kl_weight(s, 20, 10, cyclical=True) for s in steps] == \
           [kl_weight(s, 20, 10, cyclical=True) for s in reversed(steps)][::-1]
    # A run resumed at epoch 6 restarts the sample's per-epoch rule from the ratio recomputed out of the
    # counter, and reaches the same ratio at every later epoch as the uninterrupted run.
    uninterrupted, tfr = [], 1.0
    for epoch in range(12):
        uninterrupted.append(tfr)
        tfr = max(tfr - 0.07, 0.1) if epoch >= 2 else tfr
    resumed, tfr = [], teacher_forcing_ratio(6, 1.0, 2, 0.07, 0.1)
    for epoch in range(6, 12):
        resumed.append(tfr)
        tfr = max(tfr - 0.07, 0.1)
    assert resumed == pytest.approx(uninterrupted[6:]) and resumed[0] < 1.0


def test_recipes_are_valid_flag_sets(sim_root):
    """demo.py's recipes and experiments.py's sets: flags train_fixed_prior.py knows, with valid values."""
    import demo
    import experiments
    import train_fixed_prior as train
    parser = train.get_args_parser()
    flag_sets = [list(r) for r in demo.RECIPES.values()]
    flag_sets += [demo.RECIPES[experiments.BASE] + flags for s in experiments.SETS.values() for _, flags in s["configs"]]
    for flags in flag_sets:
        _, unknown = parser.parse_known_args(flags)
        assert unknown == [], (flags, unknown)
        args, _, _ = train.resolve_args(parser, flags + ["--data_root", sim_root])
        train.check_args(args, parser)  # parser.error would exit
    assert demo.RECIPES["demo"] != demo.RECIPES["long"]
    # The report's comparisons start from the course's model: a base with FiLM would make the extras set's
    # "baseline" a FiLM model.
    base, _, _ = train.resolve_args(parser, demo.RECIPES[experiments.BASE] + ["--data_root", sim_root])
    assert base.cond_conv == "none" and base.lr_schedule == "constant" and base.ema == 0


def test_weight_average_forgets_the_initialisation_and_trails_the_weights():
    import torch
    from kl_annealing import ema_decay
    from train_fixed_prior import update_ema
    assert ema_decay(0, 0.999) == pytest.approx(0.1) and ema_decay(10 ** 6, 0.999) == 0.999 and ema_decay(5, 0) == 0
    assert ema_decay(90, 0.9) == 0.9 and ema_decay(9, 0.9) == pytest.approx(10 / 19)
    avg, live = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    live.train()(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # moves its running statistics, counts one batch
    with torch.no_grad():
        live.weight.fill_(3.0)
    update_ema(avg, live, 0.75)
    assert torch.allclose(avg.weight, torch.full((2,), 1.5)) and torch.allclose(avg.bias, torch.zeros(2))
    assert torch.allclose(avg.running_mean, 0.25 * live.running_mean) and avg.num_batches_tracked.item() == 1
