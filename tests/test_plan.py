"""plan.py: CEM on a toy cost, the action/condition bookkeeping, the planner with the simulator as
its model, and the script end to end on a tiny randomly initialised model."""
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import make_sim_dataset as sim  # noqa: E402
import plan  # noqa: E402
import rank_costs  # noqa: E402
import checkpoints  # noqa: E402
from models import ARCH_KEYS, CVAE  # noqa: E402
from sim_env import SimEnv  # noqa: E402

TINY_ARCH = dict(g_dim=8, z_dim=4, rnn_size=16, base_channels=4, cond_embed_dim=4)


def save_tiny_run(d, motion="none"):
    """A run directory holding a randomly initialised tiny model, saved as train_fixed_prior.py does."""
    torch.manual_seed(0)
    model = CVAE(**TINY_ARCH, motion=motion, motion_kernels=2)
    arch = dict(TINY_ARCH, predictor_rnn_layers=2, posterior_rnn_layers=1, cond_dim=7, last_frame_skip=False,
                prior="fixed", prior_rnn_layers=1, cond_conv="none", condconv_experts=4,
                latent_levels=1, z_spatial_dim=4, motion=motion, motion_kernels=2, bn_stats="step")
    assert set(arch) == set(ARCH_KEYS)
    checkpoints.save_checkpoint(str(d / "model.pth"), {"model": model.state_dict(), "arch": arch,
                                                 "args": {**arch, "n_past": 2, "n_future": 10}, "epoch": 0, "step": 0})
    return str(d)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def tiny_flow_run(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("flow_run"), motion="flow")


def test_cem_finds_the_optimum_of_a_quadratic():
    rng = np.random.default_rng(0)
    opt = rng.uniform(-0.5, 0.5, 6)
    cost = lambda x: ((x - opt) ** 2).sum(1)  # noqa: E731
    x, c, mean, std, hist = plan.cem(cost, np.zeros(6), np.ones(6), 200, 15, 0.1, -1, 1, rng)
    assert np.abs(x - opt).max() < 0.02 and np.abs(mean - opt).max() < 0.02 and std.max() < 0.02
    assert hist[-1] <= hist[0] and c == pytest.approx(cost(x[None])[0])


def test_actions_stay_in_the_box_and_positions_integrate():
    x = np.array([[0.07, 0.07] * 5, [-0.2, 0.0] * 5])
    acts, pos = plan.to_actions(x, np.array([0.70, 0.10]), gripper=1, horizon=5)
    assert acts.shape == (2, 5, 4) and pos.shape == (2, 11, 2)
    assert np.all(pos >= plan.EE_LO - 1e-12) and np.all(pos <= plan.EE_HI + 1e-12)
    assert np.allclose(np.diff(pos, axis=1), np.repeat(acts[..., :2], 2, axis=1))
    assert np.all(np.abs(acts[..., :2]) <= sim.MAX_STEP + 1e-12) and np.all(acts[..., 2] == 0) and np.all(acts[..., 3] == 1)
    back_and_forth = [0.06, 0.08, -0.06, -0.08] * 2 + [0.06, 0.08]  # stays inside the box
    capped, _ = plan.to_actions(np.array([back_and_forth, [0.01, 0.0] * 5]), np.array([0.6, -0.05]), 1, 5, max_speed=0.05)
    speed = np.linalg.norm(capped[..., :2], axis=-1)
    assert np.allclose(speed[0], 0.05) and np.allclose(speed[1], 0.01)  # long steps shortened, short ones kept
    assert np.allclose(capped[0, 0, :2] / 0.05, np.array([0.06, 0.075]) / np.hypot(0.06, 0.075))  # direction kept


def test_conditions_follow_the_data_layout():
    acts, pos = plan.to_actions(np.full((3, 10), 0.01), np.array([0.6, 0.0]), 0, 5)
    past_a, past_ee = np.array([[0, 0, 0, 0.0]]), np.array([[0.6, 0.0, 0.2], [0.6, 0.0, 0.2]])
    c = plan.model_conds(past_a, past_ee, acts, pos, 2, 10)
    assert c.shape == (3, 12, 7)
    assert np.array_equal(c[:, 0, :4], np.zeros((3, 4))) and np.allclose(c[:, 1, :2], 0.01)  # cond_1 = first action
    assert np.allclose(c[:, :2, 4:], past_ee) and np.allclose(c[:, 2, 4:6], [0.61, 0.01])
    assert np.allclose(c[:, -1, 4:6], [0.6 + 0.1, 0.1])


def test_predict_frames_uses_model_predict_when_it_exists(tiny_run):
    model, n_past, n_future = plan.load_model(tiny_run, "model.pth", "cpu")
    frames, conds = torch.rand(3, 2, 3, 64, 64), torch.rand(3, 12, 7)
    noise = torch.zeros(3, 11, 4)
    out = plan.predict_frames(model, frames, conds, 10, noise)
    assert out.shape == (3, 10, 3, 64, 64)

    class WithPredict(torch.nn.Module):
        def predict(self, frames, conds, n_past, n_future, noise=None):
            return torch.full((frames.shape[0], n_future, 3, 64, 64), 0.5)
    if not hasattr(model, "predict"):
        assert torch.equal(plan.predict_frames(WithPredict(), frames, conds, 10, noise), torch.full_like(out, 0.5))


def test_blurred_cost_decreases_as_a_blob_approaches_the_goal():
    goal = torch.zeros(3, 64, 64)
    goal[:, 30:34, 40:44] = 1
    costs = []
    for x in (4, 16, 28, 40):
        pred = torch.zeros(1, 1, 3, 64, 64)
        pred[..., 30:34, x:x + 4] = 1
        costs.append(plan.image_cost(pred, goal, np.ones(1), 2.0).item())
    assert costs == sorted(costs, reverse=True) and costs[-1] == pytest.approx(0, abs=1e-7)


def test_object_weights_make_the_object_region_decide_the_cost():
    goal = torch.zeros(3, 64, 64)
    goal[:, 10:16, 10:16] = 1  # the object
    goal[:, 40:52, 40:52] = 1  # the arm, 4x larger (in the simulator about 3x)
    obj_right = goal.clone()
    obj_right[:, 40:52, 40:52] = 0  # object where the goal shows it, arm missing
    arm_right = goal.clone()
    arm_right[:, 10:16, 10:16] = 0  # arm where the goal shows it, object missing
    pred = torch.stack([obj_right, arm_right])[:, None]  # (2, 1, 3, 64, 64)
    mask = np.zeros((64, 64), bool)
    mask[10:16, 10:16] = True
    plain = plan.image_cost(pred, goal, np.ones(1), 2.0)
    w = plan.object_pixel_weights([mask, mask], 2.0, 30.0)
    assert w.shape == (64, 64) and w.max().item() == pytest.approx(31) and w.min().item() == 1
    weighted = plan.image_cost(pred, goal, np.ones(1), 2.0, w)
    assert plain[1] < plain[0] and weighted[0] < weighted[1]
    same = plan.image_cost(pred, goal, np.ones(1), 2.0, torch.ones(64, 64))
    assert torch.allclose(same, plain)


def test_centroid_cost_follows_the_coloured_object_and_ignores_the_rest():
    red = torch.tensor([0.9, 0.1, 0.1])
    costs = []
    for x in (4, 16, 28, 40):
        f = torch.full((1, 1, 3, 64, 64), 0.5)
        f[0, 0, :, 30:34, x:x + 4] = red.view(3, 1, 1)
        f[0, 0, :, 0:20, 0:20] = torch.tensor([0.1, 0.1, 0.9]).view(3, 1, 1)  # a large toy of another colour
        costs.append(rank_costs.centroid_cost(f, red, torch.tensor([31.5, 41.5]), np.ones(1), 0.1).item())
    assert costs == sorted(costs, reverse=True) and costs[-1] == pytest.approx(0, abs=0.05)
    f = torch.full((1, 1, 3, 64, 64), 0.5)
    f[0, 0, :, 30:34, 40:44] = red.view(3, 1, 1)
    f[0, 0, :, 0:4, 0:4] = red.view(3, 1, 1)  # a toy of the same colour far away: the window drops it
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[20:44, 30:54] = True
    far = rank_costs.centroid_cost(f, red, torch.tensor([31.5, 41.5]), np.ones(1), 0.1).item()
    near = rank_costs.centroid_cost(f, red, torch.tensor([31.5, 41.5]), np.ones(1), 0.1, region).item()
    assert far > 10 and near == pytest.approx(0, abs=0.05)
    assert rank_costs.spearman(np.array([1.0, 2, 3]), np.array([10.0, 30, 20])) == pytest.approx(0.5)


def test_rank_costs_end_to_end_on_a_tiny_model(tiny_run, tiny_flow_run, tmp_path, capsys):
    res = rank_costs.main(["--model_dir", tiny_run, "--scenes", "1", "--candidates", "20", "--object_weights", "30",
                           "--out", str(tmp_path)])
    s = json.loads((tmp_path / "plan" / "rank_costs.json").read_text())
    assert set(s["summary"]) == {"image", "image, object weight 30", "centroid", "arm"} == set(res["summary"])
    for v in s["summary"].values():
        assert -1 <= v["model_spearman"] <= 1 and -1 <= v["true_spearman"] <= 1 and v["true_top10_distance"] > 0
    psnr = [v for v in s["prediction_psnr"].values() if v is not None]  # candidates split by the speed of their steps
    assert psnr and all(0 < v < 100 for v in psnr)
    flow = rank_costs.main(["--model_dir", tiny_flow_run, "--scenes", "1", "--candidates", "20",
                            "--out", str(tmp_path / "flow")])["summary"]
    assert {"track", "track + 0.5 arm"} <= set(flow) and flow["track"]["true_spearman"] is None
    assert -1 <= flow["track"]["model_spearman"] <= 1 and flow["arm"] == s["summary"]["arm"]  # arm: no model
    for flags, name in ((["--object_weights", "3,x"], "--object_weights"), (["--scenes", "0"], "--scenes")):
        with pytest.raises(SystemExit):
            rank_costs.main(["--model_dir", tiny_run] + flags)
        assert name in capsys.readouterr().err


@pytest.mark.slow
def test_the_simulator_as_model_solves_an_easy_reach():
    args = plan.get_args_parser().parse_args(["--model_dir", ".", "--task", "reach", "--steps", "3",
                                              "--samples", "40", "--iters", "3"])
    env = SimEnv()
    rec, _ = plan.run_episode(env, "oracle", args, episode_seed=1)
    noop, _ = plan.run_episode(env, "noop", args, episode_seed=1)
    assert rec["initial_distance"] > 0.07 and rec["success"], rec
    assert noop["final_distance"] > 0.07


@pytest.mark.parametrize("task, flags", [("reach", []), ("push", ["--object_weight", "30"])])
def test_plan_end_to_end_on_a_tiny_model(tiny_run, tmp_path, task, flags):
    out = tmp_path / "out"
    res = plan.main(["--model_dir", tiny_run, "--task", task, "--episodes", "1", "--steps", "1", "--samples", "4",
                     "--iters", "1", "--methods", "model,random,noop", "--out", str(out)] + flags)
    s = json.loads((out / "plan" / "summary.json").read_text())
    assert set(s["summary"]) == {"model", "random", "noop"} and len(s["episodes"]) == 3
    assert s["summary"]["noop"]["distance_reduction_vs_noop_mean"] == 0 and "host" in s
    assert os.path.getsize(out / "plan" / f"{task}_ep0.gif") > 0
    assert res["summary"]["model"]["episodes"] == 1


def test_scenes_without_a_push_target_are_skipped(tiny_run, tmp_path, capsys):
    res = plan.main(["--model_dir", tiny_run, "--task", "push", "--episodes", "1", "--seed", "10", "--steps", "1",
                     "--methods", "noop", "--no_gif", "--out", str(tmp_path)])
    assert [r["seed"] for r in res["episodes"]] == [11]  # scene 10 has no target inside the arm's box
    assert "no feasible push target in scene 10, skipped" in capsys.readouterr().out


def test_track_cost_is_the_expected_distance_on_the_table():
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    plane_xy = torch.stack([xx, yy], -1) / 100  # 1 cm per pixel
    maps = torch.zeros(2, 2, 8, 8)
    maps[0, :, 0, 1] = 1  # a point 5 cm from the target
    maps[1, 0, 4, 1], maps[1, 0, 4, 7], maps[1, 1, 4, 4] = 0.5, 0.5, 1  # spread, then on the target
    cost = plan.track_cost(maps, plane_xy, (0.04, 0.04), np.array([1.0, 2.0]))
    assert cost.tolist() == pytest.approx([0.15, 0.03])
    drawn = plan.tint(torch.zeros(2, 2, 3, 8, 8), maps)  # the GIF's view: the tracked pixels in green
    assert drawn[0, 0, :, 0, 1].tolist() == pytest.approx([0, 0.8, 0]) and drawn[0, 0].sum() == pytest.approx(0.8)
    pos = np.array([[[0.0, 0.0], [0.03, 0.04], [0.0, 0.0]]])
    assert plan.arm_cost(pos, (0.0, 0.0), np.array([1.0, 2.0])).tolist() == pytest.approx([0.05])


def test_designated_pixels_keep_off_the_arm():
    obj, arm = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    obj[2:6, 1:5], arm[:, 5:] = True, True  # the object's right column touches the arm
    m = plan.designated_pixels(obj, arm, margin=2)[0, 0]
    assert m.sum().item() == pytest.approx(1) and m[2:6, 1:3].min() == pytest.approx(1 / 8) and m[:, 3:].sum() == 0
    assert plan.designated_pixels(obj, arm, margin=0)[0, 0][obj].min() == pytest.approx(1 / 16)  # margin 0: all of it
    assert plan.designated_pixels(obj, np.ones((8, 8), bool), margin=1)[0, 0][obj].min() == pytest.approx(1 / 16)  # none left


def test_plan_with_the_tracked_object_pixels(tiny_flow_run, tmp_path):
    out = tmp_path / "out"
    res = plan.main(["--model_dir", tiny_flow_run, "--task", "push", "--cost", "track", "--episodes", "1",
                     "--steps", "1", "--samples", "4", "--iters", "1", "--methods", "model", "--out", str(out)])
    assert res["summary"]["model"]["episodes"] == 1 and res["args"]["cost"] == "track"
    assert os.path.getsize(out / "plan" / "push_ep0.gif") > 0


@pytest.mark.parametrize("flags, message", [
    (["--methods", "model,magic"], "--methods"), (["--episodes", "0"], "--episodes"),
    (["--elite_frac", "0"], "--elite_frac"), (["--cost", "track", "--task", "reach"], "--task push"),
    (["--cost", "track", "--task", "push"], "--motion"), (["--arm_weight", "-1"], "--arm_weight"),
    (["--max_speed", "0"], "--max_speed"), (["--track_margin", "-1"], "--track_margin")])
def test_bad_flags_are_named(tiny_run, flags, message, capsys):
    with pytest.raises(SystemExit):
        plan.main(["--model_dir", tiny_run] + flags)
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(SystemExit, match="model.pth"):
        plan.main(["--model_dir", str(tmp_path)])
