"""sim_env.py: the gymnasium API, determinism, exact replay of data set sequences, goal images and
cloned states that leave the episode untouched."""
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import make_sim_dataset as sim  # noqa: E402
import sim_env  # noqa: E402
from sim_env import SimEnv  # noqa: E402

ACTIONS = [np.array([0.03, -0.02, 0, 1]), np.array([-0.01, 0.04, 0, 1]), np.array([0.02, 0.02, 1, 0])]


@pytest.fixture(scope="module")
def env():
    e = SimEnv()
    yield e
    e.close()


def run(env, seed, actions, **reset):
    frame, info = env.reset(seed=seed, **reset)
    frames, positions = [frame], [info["ee"]]
    for a in actions:
        frame, reward, terminated, truncated, info = env.step(a)
        assert info["frames"].shape == (2, 64, 64, 3) and np.array_equal(info["frames"][-1], frame)
        frames += list(info["frames"])
        positions += list(info["positions"])
    return np.stack(frames), np.stack(positions)


def test_spaces_and_step_api(env):
    frame, info = env.reset(seed=1)
    assert env.observation_space.contains(frame) and frame.dtype == np.uint8 and frame.shape == (64, 64, 3)
    assert set(info) >= {"ee", "objects", "gripper", "t"} and info["objects"].shape[1] == 3
    assert 3 <= len(info["objects"]) <= 8 and info["t"] == 0
    out = env.step(ACTIONS[0])
    assert len(out) == 5 and out[0].shape == (64, 64, 3) and out[2] is False and out[3] is False
    assert out[4]["t"] == 2 and out[4]["positions"].shape == (2, 3)
    with pytest.raises(ValueError, match="4 finite numbers"):
        env.step([0.0, 0.0])


def test_same_seed_same_frames_other_seed_other_scene(env):
    f1, p1 = run(env, 4, ACTIONS)
    f2, p2 = run(env, 4, ACTIONS)
    assert np.array_equal(f1, f2) and np.array_equal(p1, p2)
    f3, _ = run(env, 5, ACTIONS)
    assert not np.array_equal(f1[0], f3[0])


def test_actions_move_the_end_effector(env):
    _, p = run(env, 2, [np.array([0.03, -0.02, 0, 1])] * 3)
    step = np.diff(p[1:, :2], axis=0)  # after the first frame (the arm settles on the tray at reset)
    assert np.allclose(step, [0.03, -0.02], atol=0.004)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "sim"
    sim.generate(str(root), n_train=2, n_validate=1, n_test=1, seed=3, workers=0, progress=False)
    return root


def test_replaying_a_data_set_sequence_reproduces_its_files(tiny_set, env):
    """Frames and CSV bytes of every sequence of a tiny set, replayed from its seed and actions."""
    root = tiny_set
    n = 0
    for split in sim.SPLITS:
        for index, shard, k in sim.split_plan(split, {"train": 2, "validate": 1, "test": 1}[split]):
            d = root / split / shard / str(k)
            actions = np.loadtxt(d / "actions.csv", delimiter=",")
            frame, info = env.reset(options={"seed_words": (3, sim.SPLIT_CODE[split], index)})
            frames, positions = [frame], [info["ee"]]
            for t in range(0, sim.SEQ_LEN, 2):  # rows come in pairs: one action per 2 frames
                assert np.array_equal(actions[t], actions[t + 1])
                _, _, _, _, info = env.step(actions[t])
                frames += list(info["frames"])
                positions += list(info["positions"])
            for t in range(sim.SEQ_LEN):
                assert np.array_equal(np.asarray(Image.open(d / f"{t}.png")), frames[t]), (d, t)
            buf = io.BytesIO()
            np.savetxt(buf, np.asarray(positions[:sim.SEQ_LEN], np.float32).astype(np.float64), delimiter=",")
            assert buf.getvalue() == (d / "endeffector_positions.csv").read_bytes(), d
            n += 1
    assert n == 4


def test_object_displacements_of_a_data_set(tiny_set, env):
    """The replayed pushes: per frame, the largest object displacement; none without planar arm motion."""
    d = sim_env.object_displacements(env, str(tiny_set), n=2)
    still = sim_env.object_displacements(env, str(tiny_set), n=2, planar=False)
    assert d.shape == still.shape == (2, sim.SEQ_LEN) and np.all(d[:, 0] == 0) and np.all(d >= 0)
    assert still.max() < 0.005 and d.max() > still.max()
    res = sim_env.main(["--replay", str(tiny_set), "--sequences", "2"])
    assert np.array_equal(res["with the data's actions"], d)
    with pytest.raises(SystemExit, match="--replay"):
        sim_env.main(["--replay", str(tiny_set / "nowhere"), "--sequences", "1"])


def test_goal_image_and_cloned_states_leave_the_episode_untouched(env):
    f_plain, p_plain = run(env, 6, ACTIONS)
    frame, info = env.reset(seed=6)
    target = info["ee"][:2] + [0.08, 0.05]
    goal = env.render_goal(ee=target, objects={0: info["objects"][0, :2] + [0.05, 0.0]})
    assert goal.shape == (64, 64, 3) and not np.array_equal(goal, frame)
    assert np.array_equal(env.render(), frame)
    ee, obj = env.rollout_states(np.stack([np.stack(ACTIONS)] * 2))
    assert ee.shape == (2, 6, 3) and obj.shape[:2] == (2, 6) and np.array_equal(ee[0], ee[1])
    frames, positions = [frame], [info["ee"]]
    for a in ACTIONS:
        _, _, _, _, i = env.step(a)
        frames += list(i["frames"])
        positions += list(i["positions"])
    assert np.array_equal(np.stack(frames), f_plain) and np.array_equal(np.stack(positions), p_plain)
    # the state rollout followed the pusher that the drawn arm then tracked
    assert np.allclose(ee[0, :, :2], np.stack(positions)[1:, :2], atol=2e-3)
    with pytest.raises(ValueError, match="object index"):
        env.render_goal(objects={99: (0.5, 0.0)})


def test_object_masks_cover_each_object_and_leave_the_episode_untouched(env):
    frame, info = env.reset(seed=5)  # seven objects, none hidden behind the arm
    masks = [env.object_mask(i) for i in range(len(info["objects"]))]
    assert all(m.shape == (64, 64) and m.dtype == bool and 10 < m.sum() < 600 for m in masks)
    assert not (masks[0] & masks[1]).any()  # objects stand apart on the tray
    moved = env.object_mask(0, xy=info["objects"][0, :2] + [0.0, 0.08])
    assert 10 < moved.sum() and (moved & masks[0]).sum() < masks[0].sum() / 2
    assert np.array_equal(env.render(), frame)
    _, _, _, _, after = env.step(ACTIONS[0])
    assert np.allclose(after["objects"][2:], info["objects"][2:], atol=1e-3)


def test_arm_mask_is_where_the_arm_is(env):
    frame, info = env.reset(seed=5)
    arm = env.arm_mask()
    assert arm.shape == (64, 64) and arm.dtype == bool and 100 < arm.sum() < 2000
    away = env.render_goal(ee=(sim.EE_X[1], sim.EE_Y[0]) if info["ee"][0] < 0.6 else (sim.EE_X[0], sim.EE_Y[1]))
    changed = np.abs(away.astype(int) - frame.astype(int)).max(-1) > 8  # the arm moved far: its old pixels change
    assert (changed & arm).sum() > 0.9 * arm.sum()
    assert all(not (env.object_mask(i) & arm).any() for i in range(len(info["objects"])))  # none hidden by the arm
    assert np.array_equal(env.render(), frame)


def test_reward_is_minus_the_distance_to_the_goal(env):
    frame, info = env.reset(seed=1, options={"goal": {"ee": (0.6, 0.0)}})
    _, r, _, _, info = env.step(np.array([0.0, 0.0, 0, 0]))
    assert r == pytest.approx(-np.linalg.norm(info["ee"][:2] - [0.6, 0.0]))
    env.max_steps = 1
    try:
        env.reset(seed=1)
        assert env.step(np.zeros(4))[3] is True
    finally:
        env.max_steps = None


def test_pixels_map_to_the_table_where_the_objects_stand(env):
    _, info = env.reset(seed=5)
    objects = info["objects"]
    errors = []
    for i in range(len(objects)):
        plane = env.pixel_to_plane(objects[i, 2])  # (64, 64, 2)
        errors.append(np.linalg.norm(plane[env.object_mask(i)].mean(0) - objects[i, :2]))
    # a mask's mean is its visible surface's centre, so a little off where the object is partly hidden
    assert np.median(errors) < 0.015 and max(errors) < 0.04, errors
    corners = env.pixel_to_plane(objects[0, 2])[[0, -1]][:, [0, -1]]  # the view is wider at its far edge
    assert np.linalg.norm(corners[0, 0] - corners[0, 1]) != pytest.approx(np.linalg.norm(corners[1, 0] - corners[1, 1]))
