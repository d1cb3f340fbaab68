"""A gymnasium environment of the simulated robot-pushing scene that make_sim_dataset.py records.

The scene is built, stepped and rendered by make_sim_dataset.SimScene, the same code that writes the
data set, so a data set sequence replayed here from its seed gives the same frames and CSV rows
(tests/test_sim_env.py checks it byte for byte).

    python sim_env.py --seed 3 --steps 5      # a few random actions; prints positions, writes a GIF
    python sim_env.py --replay data/sim_data   # how often a data set's sequences move an object

Observation: the 64x64x3 uint8 RGB frame. Action: the data's 4-vector (dx, dy in metres per frame,
height command 0/1/2, gripper command 0 open / 1 closed), held for 2 frames as in BAIR, so `step`
returns after 2 frames: the last one as the observation, both in info["frames"] (2, 64, 64, 3) with
their end-effector positions in info["positions"] (2, 3). info also holds "ee" (the end effector's
(x, y, z) now), "objects" (n, 3) object centres, "cmd" (the commanded pusher position), "gripper"
(the initial gripper state), "t" (frames so far) and "seed_words".

Seeds: reset(seed=k) builds the scene from the seed words (ENV_SEED_CODE, k), which no data set
sequence uses (those are (seed, split code 0..2, index)); reset(options={"seed_words": (seed,
split code, index)}) rebuilds a data set sequence's scene (make_sim_dataset.SPLIT_CODE).

Goal images: render_goal(ee=..., objects={i: (x, y)}) teleports the arm and/or objects in a saved
copy of the physics state (pybullet saveState), renders, and restores the state exactly, so the
episode goes on as if nothing happened; object_mask(i) gives the pixels object i covers, the same
way, and pixel_to_plane(z) where each pixel's line of sight meets the plane at height z.
clone_state/restore_state/release_state and rollout_states let a planner use the simulator itself as
its model (plan.py's oracle).

Only one SimEnv per process: the scene lives in this process's pybullet clients (make_sim_dataset._sim).
"""
import argparse
import json
import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import make_sim_dataset as sim

ENV_SEED_CODE = 3  # second seed word of environment scenes; the data set's splits use 0, 1, 2
FRAMES_PER_ACTION = 2  # BAIR holds each action row for 2 frames
OUT_OF_VIEW = 10.0  # metres: an xy the camera does not see (object_mask hides an object there)


class SimEnv(gym.Env):
    """The simulated tray, arm and toys; see the module docstring for the API."""
    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}  # a frame is 1/15 s of physics

    def __init__(self, max_steps=None, render_mode="rgb_array"):
        """max_steps: actions after which step() reports truncated=True (None: never)."""
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        self.max_steps, self.render_mode = max_steps, render_mode
        n = sim.IMAGE_SIZE
        self.observation_space = spaces.Box(0, 255, (n, n, 3), np.uint8)
        self.action_space = spaces.Box(np.array([-sim.MAX_STEP, -sim.MAX_STEP, 0, 0]),
                                       np.array([sim.MAX_STEP, sim.MAX_STEP, 2, 1]), dtype=np.float64)
        self.scene = None
        self.goal = None
        self._states = []

    # ------------------------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        """Build a new scene. seed: int (environment scenes) or None (drawn from self.np_random);
        options: {"seed_words": (seed, split code, index)} to rebuild a data set sequence's scene,
        {"goal": {"ee": (x, y)} or {"object": i, "position": (x, y)}} to set the reward's target.
        Returns (frame (64, 64, 3) uint8, info)."""
        options = dict(options or {})
        if "seed_words" in options:
            words = [int(w) for w in options["seed_words"]]
            super().reset(seed=None)
        else:
            if seed is not None and (int(seed) != seed or seed < 0):
                raise ValueError(f"seed must be an integer >= 0, got {seed}")
            super().reset(seed=seed)
            words = [ENV_SEED_CODE, int(seed) if seed is not None else int(self.np_random.integers(2 ** 31))]
        for s in self._states:  # saved states belong to the old scene
            self.scene.p.removeState(s[0])
        self._states = []
        rng = np.random.default_rng(np.random.SeedSequence(words))
        self.scene = sim.SimScene(rng)
        self.seed_words, self.t, self.n_actions = tuple(words), 0, 0
        self.goal = options.get("goal")
        frame, ee = self.scene.observe()
        self.frame, self.ee = frame, ee
        return frame, self._info(frames=frame[None], positions=ee[None])

    def step(self, action):
        if self.scene is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (4,) or not np.all(np.isfinite(a)):
            raise ValueError(f"an action is 4 finite numbers (dx, dy, height, gripper), got {action!r}")
        a[:2] = np.clip(a[:2], -sim.MAX_STEP, sim.MAX_STEP)
        a[2], a[3] = np.clip(np.rint(a[2]), 0, 2), np.clip(np.rint(a[3]), 0, 1)
        frames, positions = [], []
        for _ in range(FRAMES_PER_ACTION):  # the action acts between each frame and the next
            self.scene.apply(a)
            frame, ee = self.scene.observe()
            frames.append(frame)
            positions.append(ee)
        self.frame, self.ee = frame, ee
        self.t += FRAMES_PER_ACTION
        self.n_actions += 1
        info = self._info(frames=np.stack(frames), positions=np.stack(positions))
        truncated = self.max_steps is not None and self.n_actions >= self.max_steps
        return frame, self.reward(info), False, truncated, info

    def render(self):
        return None if self.frame is None else self.frame.copy()

    def close(self):
        if self.scene is not None:
            for s in self._states:
                self.scene.p.removeState(s[0])
        self._states = []

    # ------------------------------------------------------------------------------------------
    def _info(self, **extra):
        return {"ee": self.ee.copy(), "objects": self.scene.object_positions(), "cmd": self.scene.cmd.copy(),
                "gripper": self.scene.gripper, "t": self.t, "seed_words": self.seed_words, **extra}

    def reward(self, info):
        """Minus the xy distance (m) of the goal's body to its target; 0 without a goal."""
        if not self.goal:
            return 0.0
        if "ee" in self.goal:
            return -float(np.linalg.norm(info["ee"][:2] - np.asarray(self.goal["ee"][:2])))
        return -float(np.linalg.norm(info["objects"][self.goal["object"], :2] - np.asarray(self.goal["position"][:2])))

    def clone_state(self):
        """A handle to the current physics and controller state (pybullet saveState)."""
        sc = self.scene
        s = (sc.p.saveState(), sc.cmd.copy(), list(sc.arm.q), self.frame, self.ee.copy(), self.t, self.n_actions)
        self._states.append(s)
        return s

    def restore_state(self, s):
        """Return to a state from clone_state (exactly: saveState keeps the contact points too)."""
        sc = self.scene
        sc.p.restoreState(s[0])
        sc.cmd, sc.arm.q = s[1].copy(), list(s[2])
        self.frame, self.ee, self.t, self.n_actions = s[3], s[4].copy(), s[5], s[6]

    def release_state(self, s):
        self.scene.p.removeState(s[0])
        self._states.remove(s)

    def render_goal(self, ee=None, objects=None):
        """The frame of the scene with the end effector teleported to ee ((x, y) at the current height,
        or (x, y, z)) and objects {index: (x, y)} teleported (their height and orientation kept),
        rendered in a cloned state that is then restored. Returns (64, 64, 3) uint8."""
        sc = self.scene
        p = sc.p
        s = self.clone_state()
        try:
            for i, xy in (objects or {}).items():
                if not 0 <= int(i) < len(sc.objects):
                    raise ValueError(f"object index {i}: the scene has {len(sc.objects)} objects")
                pos, orn = p.getBasePositionAndOrientation(sc.objects[int(i)])
                p.resetBasePositionAndOrientation(sc.objects[int(i)], [float(xy[0]), float(xy[1]), pos[2]], orn)
            if ee is not None:
                pos, orn = p.getBasePositionAndOrientation(sc.pusher)
                z = float(ee[2]) if len(ee) > 2 else pos[2]
                p.resetBasePositionAndOrientation(sc.pusher, [float(ee[0]), float(ee[1]), z], orn)
            frame, _ = sc.observe()
        finally:
            self.restore_state(s)
            self.release_state(s)
        return frame

    def object_mask(self, i, ee=None, xy=None):
        """Where object i covers the frame: (64, 64) bool, True where the frame rendered with the object
        (at xy, or where it is) differs from the same frame without it (moved out of view); the arm at
        ee (as render_goal) may hide part of it. A planner's designated pixels (Ebert et al. 2017)."""
        objects = {i: xy} if xy is not None else {}
        with_it = self.render_goal(ee=ee, objects=objects).astype(np.int16)
        without = self.render_goal(ee=ee, objects={i: (OUT_OF_VIEW, OUT_OF_VIEW)}).astype(np.int16)
        return np.abs(with_it - without).max(-1) > 8  # of 255: only a clear difference counts

    def arm_mask(self):
        """Where the arm (the drawn robot and the pusher) covers the last observed frame: (64, 64) bool, from
        the renderer's segmentation buffer (the frames themselves are rendered without one). A planner
        keeps its designated pixels off it: the motion predicted there is the arm's."""
        sc = self.scene
        return np.isin(sc.segmentation(), [sc.handles["robot"], sc.pusher])

    def pixel_to_plane(self, z):
        """Where each pixel's line of sight meets the horizontal plane at height z: (64, 64, 2) xy in metres
        (row 0 the top of the frame). A planner reads a map over pixels as a distribution over the table
        (plan.track_cost); the camera is the one the frames are rendered with."""
        n = self.scene.render_size
        # pybullet's matrices are column-major 4x4 lists: clip = P V world; the inverse takes an NDC point back
        inv = np.linalg.inv(np.reshape(self.scene.proj, (4, 4)).T @ np.reshape(self.scene.view, (4, 4)).T)
        c = (np.arange(n) + 0.5) / n * 2 - 1  # pixel centres in NDC
        x, y = np.meshgrid(c, -c)  # NDC y points up, rows go down
        ends = [inv @ np.stack([x.ravel(), y.ravel(), np.full(n * n, d), np.ones(n * n)]) for d in (-1.0, 1.0)]
        near, far = (e[:3] / e[3] for e in ends)  # (3, n * n) on the near and far clipping planes
        s = (z - near[2]) / (far[2] - near[2])
        return (near[:2] + s * (far[:2] - near[:2])).T.reshape(n, n, 2)

    def rollout_states(self, action_seqs):
        """Simulate each action sequence (N, K, 4) from the current state without rendering (the drawn
        arm collides with nothing, so skipping it changes no physics), then restore the state.
        Returns pusher positions (N, K * 2, 3) and object centres (N, K * 2, n_objects, 3), one per frame."""
        sc = self.scene
        action_seqs = np.asarray(action_seqs, np.float64)
        N, K = action_seqs.shape[:2]
        ee = np.zeros((N, K * FRAMES_PER_ACTION, 3))
        obj = np.zeros((N, K * FRAMES_PER_ACTION, len(sc.objects), 3))
        s = self.clone_state()
        try:
            for n in range(N):
                self.restore_state(s)
                for k in range(K):
                    for f in range(FRAMES_PER_ACTION):
                        sc.apply(action_seqs[n, k])
                        ee[n, k * FRAMES_PER_ACTION + f] = sc.pusher_position()
                        obj[n, k * FRAMES_PER_ACTION + f] = sc.object_positions()
        finally:
            self.restore_state(s)
            self.release_state(s)
        return ee, obj


def object_displacements(env, data_root, split="train", n=200, planar=True):
    """How much a data set's arm pushes: replays the first n sequences of `split` from their seeds and
    actions (physics only, no rendering; planar=False zeroes dx, dy: the scenes left alone) and returns
    (n, SEQ_LEN) metres, the largest xy displacement of any object from where it started, per frame."""
    with open(os.path.join(data_root, "dataset_info.json")) as f:
        info = json.load(f)
    seed, count = int(info["seed"]), int(info["counts"][split])
    out = []
    for index, shard, k in sim.split_plan(split, count)[:n]:  # shard names depend on the split's size
        path = os.path.join(data_root, split, shard, str(k), "actions.csv")
        actions = np.loadtxt(path, delimiter=",", ndmin=2)
        if actions.shape != (sim.SEQ_LEN, 4):
            raise ValueError(f"{path}: expected {sim.SEQ_LEN} rows of 4 actions, got shape {actions.shape}")
        if not planar:
            actions[:, :2] = 0
        env.reset(options={"seed_words": (seed, sim.SPLIT_CODE[split], index)})
        start = env.scene.object_positions()[:, :2].copy()
        d = [0.0]
        for a in actions[:-1]:  # the action of frame t leads to frame t + 1
            env.scene.apply(a)
            d.append(float(np.linalg.norm(env.scene.object_positions()[:, :2] - start, axis=-1).max()))
        out.append(d)
    return np.array(out)


def get_args_parser():
    p = argparse.ArgumentParser("Run the simulated pushing environment with random actions",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="environment scene seed")
    p.add_argument("--steps", type=int, default=5, help="random actions to take (each held for 2 frames)")
    p.add_argument("--gif", default="sim_env.gif", help="where to write the frames as a GIF ('' for none)")
    p.add_argument("--replay", default="", metavar="DATA_ROOT",
                   help="instead: replay this data set's first --sequences training sequences and report how often "
                        "the arm moves an object, against the same scenes without arm motion")
    p.add_argument("--sequences", type=int, default=200, help="--replay: sequences to replay")
    p.add_argument("--frames", type=int, default=12, help="--replay: frames a model trains on (n_past + n_future)")
    return p


def report_displacements(env, args):
    if args.sequences < 1 or not 2 <= args.frames <= sim.SEQ_LEN:
        raise SystemExit(f"--sequences must be >= 1 and --frames in [2, {sim.SEQ_LEN}]")
    try:
        res = {"with the data's actions": object_displacements(env, args.replay, n=args.sequences),
               "without planar motion": object_displacements(env, args.replay, n=args.sequences, planar=False)}
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"--replay {args.replay}: {e}")
    print(f"{args.sequences} training sequences: share in which some object moves more than 1 / 3 cm")
    for name, d in res.items():
        first, whole = d[:, args.frames - 1], d[:, -1]
        print(f"  {name:<24} within {args.frames} frames {np.mean(first > 0.01):.2f} / {np.mean(first > 0.03):.2f}; "
              f"within {sim.SEQ_LEN} {np.mean(whole > 0.01):.2f} / {np.mean(whole > 0.03):.2f}")
    return res


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.replay:
        return report_displacements(SimEnv(), args)
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    env = SimEnv()
    frame, info = env.reset(seed=args.seed)
    frames = [frame]
    print(f"t=0 ee {np.round(info['ee'], 3)} objects {len(info['objects'])}")
    for _ in range(args.steps):
        frame, _, _, _, info = env.step(env.action_space.sample() * np.array([1, 1, 0, 0]))
        frames += list(info["frames"])
        print(f"t={info['t']} ee {np.round(info['ee'], 3)}")
    if args.gif:
        import imageio.v2 as imageio
        imageio.mimsave(args.gif, [f.repeat(2, 0).repeat(2, 1) for f in frames], duration=1000 / 7.5, loop=0)
        print(f"wrote {args.gif}")


if __name__ == "__main__":
    main()
