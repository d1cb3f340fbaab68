"""Generate a physically simulated robot-pushing data set in the lab's BAIR `processed_data` layout.

A Franka Panda arm (pybullet_data) pushes 3 to 8 toys of varied shapes, sizes and colours around a
wooden tray; a camera in front of and above the tray renders 64x64 RGB frames with pybullet's
software renderer. Every sequence has 30 frames, `actions.csv` (30x4) and `endeffector_positions.csv`
(30x3), written exactly like the course's processed BAIR data, so the training code cannot tell the
difference except by looking. Useful when the real data is unavailable, for tests, and for checks.

    python make_sim_dataset.py --data_root data/sim_data    # 2000/256/256 sequences: ~310 CPU-s, ~3 min on 2 cores
    python make_sim_dataset.py --realism_only data/processed_data/test   # change figures of any lab-layout split
    python make_sim_dataset.py --montage docs/sim_montage.png

Actions (row t is applied between frame t and t+1, each row held for 2 frames as in BAIR):
  0-1  commanded end-effector displacement (dx, dy) in metres per frame, about +-0.07
  2    height command: 0 = pushing height (z 0.20), 1 = lifted (z 0.255), 2 = high (z 0.31)
  3    gripper command: 0 = open, 1 = closed
End-effector positions: (x, y, z) in metres of the point between the fingertips, measured on the
simulated arm at each frame, in a frame with x away from the robot (down the image), y to its left
(image right), z up, the robot base at (0.10, -0.05, 0) and the tray top at z 0.185, placed so
that the ranges resemble BAIR's (x 0.44..0.74, y -0.25..0.15, z 0.20..0.31).
"""
import argparse
import atexit
import contextlib
import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

GENERATOR_VERSION = "1.1"  # 1.1: the physics runs on the float32 actions stored in the CSV
SEQ_LEN = 30
IMAGE_SIZE = 64
SHARD = 256  # sequences per .tfrecords folder, as in BAIR
SPLITS = ("train", "validate", "test")
SPLIT_CODE = {"train": 0, "validate": 1, "test": 2}  # part of every sequence's seed
SPLIT_OFFSET = {"train": 0, "validate": 256, "test": 0}  # the lab's first index per split

# Scene geometry (metres, world frame = the reported end-effector frame).
TABLE_Z = 0.185                          # tray surface height
TRAY_X, TRAY_Y = (0.36, 0.82), (-0.33, 0.23)  # tray interior
EE_X, EE_Y = (0.44, 0.74), (-0.25, 0.15)  # where the actions keep the end effector
Z_LEVELS = (0.20, 0.255, 0.31)           # end-effector height per height command
ROBOT_BASE = (0.10, -0.05, 0.0)          # behind the tray, so the arm enters from the top of the image
MAX_STEP = 0.075                         # |dx|, |dy| per frame
FINGER_STRETCH = 2.2                     # Panda finger length factor (see _sim)
FINGER_HALF = (0.0143, 0.017, 0.05)     # half extents of a finger's collision box (Panda finger x 1.3, 10 cm tall)
FINGER_OPEN = 0.04                       # finger joint travel when open (the Panda's)

# Physics: 6 steps of 1/90 s per frame (1/15 s). With fewer, the pusher (up to 7.5 cm a frame) would
# jump too far into small objects in one step.
DT, SUBSTEPS = 1.0 / 90.0, 6

# Camera in front of the tray, looking down and back at the robot.
CAM_EYE, CAM_TARGET, CAM_FOV = (1.16, -0.05, 1.0), (0.62, -0.05, 0.14), 37.0

# Real BAIR figures (realism_stats on ../shared/bair_real: lab_layout/.../175 and actions_only/.../0).
REAL_BAIR_REFERENCE = {
    "lab_layout/175": {"mean_abs_change": 0.01213, "changed_fraction": 0.03040, "copy_last_psnr": 24.043},
    "actions_only/0": {"mean_abs_change": 0.01866, "changed_fraction": 0.05152, "copy_last_psnr": 14.789},
}

OBJECT_COLORS = np.array([  # toy-like colours, plus a few greys and whites
    [0.85, 0.15, 0.12], [0.95, 0.55, 0.10], [0.95, 0.85, 0.15], [0.25, 0.70, 0.20], [0.15, 0.45, 0.85],
    [0.45, 0.25, 0.70], [0.90, 0.45, 0.60], [0.10, 0.65, 0.65], [0.55, 0.35, 0.20], [0.92, 0.92, 0.90],
    [0.45, 0.45, 0.48], [0.15, 0.15, 0.18], [0.60, 0.85, 0.30], [0.30, 0.80, 0.90]])


# ----------------------------------------------------------------------------------------------
# Simulation (two pybullet clients per process, created on first use and reused)

_SIM = {}


def _sim():
    """This process's pybullet clients, built once.

    `phys` simulates the static scene (invisible there), the arm, the pusher and the objects; `bg`
    only draws the static tray, walls and floor. The software renderer pays for every pixel its
    triangles cover, and the static scene covers them all: it is rendered once per sequence, and the
    moving bodies, rendered alone every frame, are composited over it by depth.
    """
    if not _SIM:
        import pybullet as p
        import pybullet_data
        from pybullet_utils.bullet_client import BulletClient
        data = pybullet_data.getDataPath()
        tmp = tempfile.mkdtemp(prefix="sim_bair_")
        # The Panda's visual meshes have ~100k triangles, which dominate rendering time; its
        # collision meshes (~3k) look the same at 64x64.
        with open(os.path.join(data, "franka_panda", "panda.urdf")) as f:
            urdf = f.read().replace("meshes/visual/", "meshes/collision/")
        urdf = urdf.replace("package://meshes", os.path.join(data, "franka_panda", "meshes"))
        # Longer fingers, like the Sawyer gripper's in BAIR: the Panda's are hidden under its hand at
        # 64x64. The grasp-target link (the reported end effector) moves to the new fingertip centre.
        urdf = urdf.replace('collision/finger.obj"/>', f'collision/finger.obj" scale="1.3 1.3 {FINGER_STRETCH}"/>')
        urdf = urdf.replace('collision/hand.obj"/>', 'collision/hand.obj" scale="1 0.6 1"/>')  # a slimmer hand
        urdf = urdf.replace('<origin rpy="0 0 0" xyz="0 0 0.105"/>', f'<origin rpy="0 0 0" xyz="0 0 {0.0584 + 0.054 * FINGER_STRETCH - 0.005:.4f}"/>')
        robot_urdf = os.path.join(tmp, "panda_lowpoly.urdf")
        with open(robot_urdf, "w") as f:
            f.write(urdf)
        wood = os.path.join(tmp, "wood.png")
        Image.open(os.path.join(data, "table", "table.png")).convert("RGB").resize((128, 128), Image.BILINEAR).save(wood)
        class Client(BulletClient):
            def __getattr__(self, name):  # BulletClient's lookup costs a few us a call: do it once
                attr = super().__getattr__(name)
                setattr(self, name, attr)
                return attr

        with _quiet_stdout():  # pybullet's C code prints its argv on connect
            bg, phys = Client(connection_mode=p.DIRECT), Client(connection_mode=p.DIRECT)
        tray = _static_scene(bg, visual=True, texture=bg.loadTexture(wood))
        meshes = [k for k in range(1000) if k != 168]  # random_urdfs/168 has no usable vertices
        robot = _physics_world(phys, robot_urdf)
        shutil.rmtree(tmp)  # both files are parsed on load
        _SIM.update(p=p, phys=phys, bg=bg, bg_tray=tray, robot=robot, moving=[], data=data, meshes=meshes)
        atexit.register(_disconnect, p, (bg, phys))
    return _SIM


def _disconnect(p, clients):
    """Close the simulator connections while pybullet is still loaded: left to BulletClient.__del__ at
    interpreter shutdown, they print a TypeError from a half torn-down module."""
    for c in clients:
        if c._client >= 0:
            p.disconnect(physicsClientId=c._client)
            c._client = -1


@contextlib.contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@functools.lru_cache(maxsize=None)
def _mesh_bounds(path):
    """Axis-aligned bounds of an OBJ file's vertices (to size the object and its collision box)."""
    v = [list(map(float, line.split()[1:4])) for line in open(path) if line.startswith("v ")]
    v = np.array(v)
    return v.min(0), v.max(0)


def _hide(c, body, link=-1):
    # A body without a visual shape is drawn as its collision shape; a transparent one is skipped.
    c.changeVisualShape(body, link, rgbaColor=[0, 0, 0, 0])


def _box(c, half, pos, rgba, visual):
    col = c.createCollisionShape(c.GEOM_BOX, halfExtents=half)
    vis = c.createVisualShape(c.GEOM_BOX, halfExtents=half, rgbaColor=rgba) if visual else -1
    body = c.createMultiBody(0, col, vis, basePosition=pos)
    if not visual:
        _hide(c, body)
    return body


def _static_scene(c, visual, texture=None):
    """Tray, walls, front edge, floor and back wall; returns the tray's body id."""
    cx, cy = np.mean(TRAY_X), np.mean(TRAY_Y)
    hx, hy = (TRAY_X[1] - TRAY_X[0]) / 2, (TRAY_Y[1] - TRAY_Y[0]) / 2
    tray = _box(c, [hx + 0.03, hy + 0.03, 0.02], [cx, cy, TABLE_Z - 0.02], [0.92, 0.9, 0.8, 1], visual)
    if texture is not None:
        c.changeVisualShape(tray, -1, textureUniqueId=texture)
    wall = [0.78, 0.8, 0.82, 1]
    _box(c, [hx + 0.03, 0.015, 0.035], [cx, TRAY_Y[0] - 0.015, TABLE_Z + 0.035], wall, visual)
    _box(c, [hx + 0.03, 0.015, 0.035], [cx, TRAY_Y[1] + 0.015, TABLE_Z + 0.035], wall, visual)
    _box(c, [0.015, hy + 0.03, 0.035], [TRAY_X[0] - 0.015, cy, TABLE_Z + 0.035], wall, visual)
    # BAIR's tray has a broad white front edge and a brown table below it.
    _box(c, [0.04, hy + 0.15, 0.03], [TRAY_X[1] + 0.04, cy, TABLE_Z + 0.005], [0.93, 0.95, 0.97, 1], visual)
    if visual:  # floor and back wall only as large as the camera sees
        _box(c, [0.15, 0.6, 0.01], [TRAY_X[1] + 0.23, cy, TABLE_Z - 0.01], [0.36, 0.26, 0.12, 1], visual)
        _box(c, [0.01, 0.6, 0.3], [TRAY_X[0] - 0.1, cy, TABLE_Z + 0.3], [0.58, 0.64, 0.68, 1], visual)
    for body in range(c.getNumBodies()):
        c.changeDynamics(body, -1, lateralFriction=0.6)
    return tray


def _physics_world(p, robot_urdf):
    """The parts of the physics world that every sequence shares: the static scene (invisible here,
    it is drawn by the `bg` client) and the arm. Returns the robot's body id."""
    p.setPhysicsEngineParameter(fixedTimeStep=DT, numSolverIterations=10, deterministicOverlappingPairs=1)
    p.setGravity(0, 0, -9.81)
    _static_scene(p, visual=False)
    # The arm is visual only (no collisions): inverse kinematics puts its fingertips on the pusher,
    # a hidden rigid body that the actions drive and that does the pushing.
    robot = p.loadURDF(robot_urdf, ROBOT_BASE, useFixedBase=True)
    dark, grey, red = [0.1, 0.1, 0.11, 1], [0.3, 0.3, 0.32, 1], [0.6, 0.1, 0.08, 1]
    for j in range(-1, p.getNumJoints(robot)):
        p.setCollisionFilterGroupMask(robot, j, 0, 0)
        p.changeVisualShape(robot, j, rgbaColor={6: red, 7: dark, 8: dark, 9: dark, 10: dark}.get(j, grey))
    for j in (-1, 0, 1, 2, 3):  # base, shoulder, upper arm: never in view over the workspace (checked)
        _hide(p, robot, j)
    return robot


def _build_scene(rng):
    """Replace the previous sequence's objects and pusher by new ones. Returns handles."""
    S = _sim()
    p = S["phys"]
    # Removing the moving bodies is 3x cheaper than rebuilding the world. Each sequence still depends
    # only on its seed (the remaining bodies are static or collision-free, and contact pairs are
    # processed in a deterministic order): that is what makes --workers irrelevant (tested).
    for body in S["moving"]:
        p.removeBody(body)
    start = np.array([rng.uniform(*EE_X), rng.uniform(*EE_Y), Z_LEVELS[0]])
    objects = _add_objects(p, rng, keep_out=(start[0], start[1], 0.06))
    pusher = _make_pusher(p, start)
    S["moving"] = objects + [pusher]
    return dict(robot=S["robot"], pusher=pusher, objects=objects, start=start)


def _make_pusher(p, pos):
    """The physical gripper: two finger boxes on prismatic joints (opening along y, as the drawn
    Panda's do) under an invisible base at the fingertip centre. Only its fingers collide."""
    hx, hy, hz = FINGER_HALF
    finger = p.createCollisionShape(p.GEOM_BOX, halfExtents=FINGER_HALF)
    body = p.createMultiBody(
        baseMass=1.0, baseCollisionShapeIndex=-1, baseVisualShapeIndex=-1, basePosition=list(pos),
        linkMasses=[0.1, 0.1], linkCollisionShapeIndices=[finger, finger], linkVisualShapeIndices=[-1, -1],
        linkPositions=[[0, hy, hz - 0.005], [0, -hy, hz - 0.005]], linkOrientations=[[0, 0, 0, 1]] * 2,
        linkInertialFramePositions=[[0, 0, 0]] * 2, linkInertialFrameOrientations=[[0, 0, 0, 1]] * 2,
        linkParentIndices=[0, 0], linkJointTypes=[p.JOINT_PRISMATIC] * 2, linkJointAxis=[[0, 1, 0], [0, -1, 0]])
    for link in (-1, 0, 1):
        p.changeDynamics(body, link, lateralFriction=0.8)
        _hide(p, body, link)
    return body


def _drive(p, pusher, target, gripper):
    """One physics step moving the pusher toward target: its velocity is set so that it would arrive
    in this step (plus gravity compensation); contacts can still slow it, so it stays physical."""
    pos = np.array(p.getBasePositionAndOrientation(pusher)[0])
    v = (np.asarray(target) - pos) / DT
    v[2] += 9.81 * DT
    p.resetBasePositionAndOrientation(pusher, pos.tolist(), [0, 0, 0, 1])  # keep it upright
    p.resetBaseVelocity(pusher, v.tolist(), [0, 0, 0])
    for j in (0, 1):
        p.setJointMotorControl2(pusher, j, p.POSITION_CONTROL, targetPosition=0.0 if gripper else FINGER_OPEN,
                                force=40, maxVelocity=1.0)
    p.stepSimulation()


def _add_objects(p, rng, keep_out):
    """3..8 objects at non-overlapping random places on the tray, clear of keep_out (x, y, radius)."""
    S = _sim()
    n = int(rng.integers(3, 9))
    placed = [keep_out]  # (x, y, radius)
    bodies = []
    for _ in range(n):
        kind = rng.choice(["mesh", "mesh", "mesh", "box", "cylinder", "sphere"])
        rgba = list(np.clip(OBJECT_COLORS[rng.integers(len(OBJECT_COLORS))] * rng.uniform(0.85, 1.1), 0, 1)) + [1]
        size = rng.uniform(0.08, 0.13)  # largest horizontal extent
        yaw = rng.uniform(0, 2 * np.pi)
        if kind == "mesh":
            k = S["meshes"][rng.integers(len(S["meshes"]))]
            path = os.path.join(S["data"], "random_urdfs", f"{k:03d}", f"{k:03d}.obj")
            lo, hi = _mesh_bounds(path)
            s = size / max(hi[0] - lo[0], hi[1] - lo[1])
            half = np.maximum((hi - lo) * s / 2, 0.008)
            vis = p.createVisualShape(p.GEOM_MESH, fileName=path, meshScale=[s] * 3, rgbaColor=rgba,
                                      visualFramePosition=list(-(hi + lo) * s / 2))
            # A box around the mesh: mesh collision shapes cost ~10x more per physics step.
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half.tolist())
        elif kind == "box":
            half = np.array([size / 2, rng.uniform(0.4, 1.0) * size / 2, rng.uniform(0.018, 0.035)])
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half.tolist(), rgbaColor=rgba)
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half.tolist())
        elif kind == "cylinder":
            r, h = size / 2 * 0.8, rng.uniform(0.03, 0.07)
            half = np.array([r, r, h / 2])
            vis = p.createVisualShape(p.GEOM_CYLINDER, radius=r, length=h, rgbaColor=rgba)
            col = p.createCollisionShape(p.GEOM_CYLINDER, radius=r, height=h)
        else:  # sphere
            r = size / 2 * 0.7
            half = np.array([r, r, r])
            vis = p.createVisualShape(p.GEOM_SPHERE, radius=r, rgbaColor=rgba)
            col = p.createCollisionShape(p.GEOM_SPHERE, radius=r)
        radius = float(np.hypot(half[0], half[1]))
        for _ in range(50):  # rejection sampling; give up on this object if the tray is full
            x = rng.uniform(TRAY_X[0] + radius, TRAY_X[1] - radius)
            y = rng.uniform(TRAY_Y[0] + radius, TRAY_Y[1] - radius)
            if all(np.hypot(x - a, y - b) > radius + r2 + 0.005 for a, b, r2 in placed):
                break
        else:
            continue
        placed.append((x, y, radius))
        body = p.createMultiBody(float(rng.uniform(0.05, 0.25)), col, vis, [x, y, TABLE_Z + half[2] + 0.001],
                                 p.getQuaternionFromEuler([0, 0, yaw]))
        p.changeDynamics(body, -1, lateralFriction=float(rng.uniform(0.4, 0.8)), rollingFriction=0.005,
                         spinningFriction=0.002)
        bodies.append(body)
    return bodies


class _Arm:
    """Keeps the (visual) Panda's fingertips on the pusher by inverse kinematics."""
    EE_LINK, FINGERS, N = 11, (9, 10), 7
    REST = [0.0, 0.3, 0.0, -2.0, 0.0, 2.3, 0.785]

    def __init__(self, p, robot):
        self.p, self.robot = p, robot
        self.lower = [p.getJointInfo(robot, j)[8] for j in range(self.N)]
        self.upper = [p.getJointInfo(robot, j)[9] for j in range(self.N)]
        self.ranges = [u - l for l, u in zip(self.lower, self.upper)]
        # Fingers pointing down, closing along y (across the image), so that the gripper command shows.
        self.down = p.getQuaternionFromEuler([np.pi, 0, 0])
        self.q = list(self.REST)

    def move(self, target, opening, iterations=100):
        p = self.p
        # The physics steps nudge the arm's joints (it is a multibody, with motor state carried over
        # from earlier sequences): start the solver from our own last solution so that the result
        # depends on this sequence only.
        for j in range(self.N):
            p.resetJointState(self.robot, j, self.q[j])
        q = p.calculateInverseKinematics(self.robot, self.EE_LINK, list(target), self.down, self.lower, self.upper,
                                         self.ranges, self.REST, maxNumIterations=iterations, residualThreshold=5e-4)
        self.q = list(q[:self.N])
        for j in range(self.N):
            p.resetJointState(self.robot, j, self.q[j])
        for j, q in zip(self.FINGERS, opening):
            p.resetJointState(self.robot, j, q)
        return np.array(p.getLinkState(self.robot, self.EE_LINK, computeForwardKinematics=True)[4])


class _Policy:
    """Random exploration that often pushes things: head for an object (and through it), sometimes
    for a random point, with momentum and noise; occasional lifts and gripper changes."""

    def __init__(self, rng, gripper):
        self.rng = rng
        self.goal = None
        self.ttl = 0
        self.vel = np.zeros(2)
        self.height = 0
        self.gripper = gripper  # the scene's initial gripper state (drawn by SimScene)

    def act(self, cmd, object_xy):
        rng = self.rng
        if self.goal is None or self.ttl <= 0 or np.linalg.norm(self.goal - cmd) < 0.02:
            if len(object_xy) and rng.random() < 0.75:
                obj = object_xy[rng.integers(len(object_xy))]
                d = obj - cmd
                self.goal = obj + 0.06 * d / (np.linalg.norm(d) + 1e-6)  # aim past the object to push it
            else:
                self.goal = np.array([rng.uniform(*EE_X), rng.uniform(*EE_Y)])
            self.ttl = int(rng.integers(2, 6))
        self.ttl -= 1
        # Per-frame step toward the goal (an action row is applied for 2 frames).
        want = (self.goal - cmd) / 2
        want *= min(1.0, 0.05 / (np.linalg.norm(want) + 1e-9))
        self.vel = 0.5 * self.vel + 0.5 * want + rng.normal(0, 0.015, 2)
        step = np.clip(self.vel, -MAX_STEP, MAX_STEP)
        # Keep the end effector in its box for both frames of the pair.
        lo, hi = np.array([EE_X[0], EE_Y[0]]), np.array([EE_X[1], EE_Y[1]])
        step = (np.clip(cmd + 2 * step, lo, hi) - cmd) / 2
        self.vel = step
        if rng.random() < 0.12:
            self.height = int(rng.choice(3, p=[0.5, 0.25, 0.25])) if self.height == 0 else 0
        if rng.random() < 0.1:
            self.gripper = 1 - self.gripper
        return np.array([step[0], step[1], self.height, self.gripper])


class SimScene:
    """One simulated scene, built from a random generator: the one code path that builds the scene,
    steps the physics and renders frames, for the data set (simulate_sequence) and for the gymnasium
    environment (sim_env.py), so that both produce identical frames.

    The constructor draws, in this order, the scene (start position, objects), the initial gripper
    state, the light and the tray tone from rng; then it renders the static background and lets the
    objects settle. Per frame: `observe()` gives the frame and the end-effector position, `apply(action)`
    runs the physics of one frame under an action row. Only one scene per process is live: building a
    new one removes the previous one's moving bodies (they share this process's pybullet clients).
    """

    def __init__(self, rng, render_size=IMAGE_SIZE):
        S = _sim()
        self.S, self.p, self.bg, self.render_size = S, S["phys"], S["bg"], render_size
        p = self.p
        self.handles = _build_scene(rng)
        self.pusher, self.objects = self.handles["pusher"], self.handles["objects"]
        self.arm = _Arm(p, self.handles["robot"])
        self.gripper = int(rng.integers(2))  # initial gripper state: 0 open, 1 closed
        for j in (0, 1):
            p.resetJointState(self.pusher, j, 0.0 if self.gripper else FINGER_OPEN)
        tone = rng.uniform(0.9, 1.0)  # small per-sequence variation of light and tray colour
        self.bg.changeVisualShape(S["bg_tray"], -1, rgbaColor=[0.92 * tone, 0.9 * tone, 0.8 * tone, 1])
        self.light = [rng.uniform(-0.6, 0.2), rng.uniform(-0.6, 0.6), 2.0]
        self.view = p.computeViewMatrix(CAM_EYE, CAM_TARGET, [0, 0, 1])
        self.proj = p.computeProjectionMatrixFOV(CAM_FOV, 1.0, 0.1, 4.0)
        self.back_rgb, self.back_depth = self._render(self.bg)
        for _ in range(4):  # let the objects settle
            p.stepSimulation()
        self.cmd = self.handles["start"].copy()  # the commanded pusher position

    def _camera(self, client, **options):
        """One image of the scene's camera in client: getCameraImage's (width, height, rgba, depth, segmentation)."""
        n = self.render_size
        return client.getCameraImage(n, n, self.view, self.proj, renderer=self.S["p"].ER_TINY_RENDERER, shadow=0, **options)

    def _render(self, client):
        n = self.render_size
        _, _, rgb, depth, _ = self._camera(
            client, lightDirection=self.light, lightAmbientCoeff=0.62, lightDiffuseCoeff=0.45, lightSpecularCoeff=0.05,
            flags=self.S["p"].ER_NO_SEGMENTATION_MASK)
        rgb = np.reshape(np.asarray(rgb, np.uint8), (n, n, 4))[:, :, :3]
        return rgb, np.reshape(np.asarray(depth, np.float32), (n, n))

    def segmentation(self):
        """The body id seen at each pixel of the physics scene as last drawn, (H, W) int (-1: none)."""
        n = self.render_size
        return np.reshape(np.asarray(self._camera(self.p)[4]), (n, n))

    def pusher_position(self):
        return np.array(self.p.getBasePositionAndOrientation(self.pusher)[0])

    def object_positions(self):
        """(n_objects, 3) positions of the objects' centres."""
        return np.array([self.p.getBasePositionAndOrientation(b)[0] for b in self.objects]).reshape(-1, 3)

    def observe(self):
        """Put the drawn arm on the pusher and render. Returns (frame (H, W, 3) uint8, end-effector (3,))."""
        p = self.p
        # The drawn hand points down (its y axis is world -y): its finger 2 is the pusher's finger 0.
        opening = [p.getJointState(self.pusher, j)[0] for j in (1, 0)]
        position = self.arm.move(self.pusher_position(), opening)
        rgb, depth = self._render(p)
        return np.where((depth < self.back_depth)[..., None], rgb, self.back_rgb), position

    def apply(self, action):
        """The physics of one frame under an action row (dx, dy, height command, gripper command): the
        pusher follows a straight line to the new command over the frame's physics steps."""
        cmd = self.cmd
        new = np.array([cmd[0] + action[0], cmd[1] + action[1], Z_LEVELS[int(action[2])]])
        for i in range(1, SUBSTEPS + 1):
            _drive(self.p, self.pusher, cmd + (new - cmd) * i / SUBSTEPS, int(action[3]))
        self.cmd = new


def simulate_sequence(seed_words, render_size=IMAGE_SIZE):
    """Simulate one sequence from its seed. Returns frames (30,H,W,3) uint8, actions (30,4), positions (30,3)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(seed_words)))
    scene = SimScene(rng, render_size)
    policy = _Policy(rng, scene.gripper)
    frames = np.zeros((SEQ_LEN, render_size, render_size, 3), np.uint8)
    actions = np.zeros((SEQ_LEN, 4))
    positions = np.zeros((SEQ_LEN, 3))
    for t in range(SEQ_LEN):
        frames[t], positions[t] = scene.observe()
        if t % 2 == 0:
            # The physics runs on the action exactly as the CSV stores it (float32, like BAIR), so that
            # replaying a sequence's CSV in sim_env.SimEnv reproduces its frames and positions exactly.
            action = policy.act(scene.cmd[:2], [xyz[:2] for xyz in scene.object_positions()])
            action = action.astype(np.float32).astype(np.float64)
        actions[t] = action
        # Action t acts between frame t and t+1 (the last row has no next frame, as in BAIR).
        scene.apply(action)
    # BAIR stores float32; keep the same precision in the CSVs.
    return frames, actions.astype(np.float32).astype(np.float64), positions.astype(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Layout and writing

def shard_name(first, last):
    return f"traj_{first}_to_{last}.tfrecords"


def split_plan(split, n):
    """[(index in split, shard folder name, k)] for n sequences, shards of 256 as in BAIR."""
    off = SPLIT_OFFSET[split]
    plan = []
    for i in range(n):
        a = (i // SHARD) * SHARD
        b = min(a + SHARD, n) - 1
        plan.append((i, shard_name(off + a, off + b), i - a))
    return plan


def _write_png(path, frame):
    Image.fromarray(frame, "RGB").save(path, format="PNG", compress_level=1)  # fast; still lossless


def _make_one(job):
    """Worker task: simulate one sequence and write it. Returns (split, index, actions, positions)."""
    data_root, seed, split, index, shard, k = job
    frames, actions, positions = simulate_sequence((seed, SPLIT_CODE[split], index))
    d = os.path.join(data_root, split, shard, str(k))
    os.makedirs(d, exist_ok=True)
    for t in range(SEQ_LEN):
        _write_png(os.path.join(d, f"{t}.png"), frames[t])
    np.savetxt(os.path.join(d, "actions.csv"), actions, delimiter=",")
    np.savetxt(os.path.join(d, "endeffector_positions.csv"), positions, delimiter=",")
    return split, index, actions, positions


def _column_stats(x):
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "min": x.min(0).tolist(), "max": x.max(0).tolist()}


def generate(data_root, n_train=2000, n_validate=256, n_test=256, seed=0, workers=None, progress=True, overwrite=False):
    """Write a simulated data set in the lab layout under data_root; return (and write) its info dict.

    workers: processes to use (None = os.cpu_count(), 0 = this process). Output bytes do not depend on it.
    """
    for name, n in (("n_train", n_train), ("n_validate", n_validate), ("n_test", n_test)):
        if int(n) != n or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed}")
    workers = os.cpu_count() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    existing = [s for s in SPLITS if os.path.exists(os.path.join(data_root, s))]
    if existing and not overwrite:
        raise FileExistsError(f"{data_root} already holds {', '.join(existing)}; pass --overwrite to replace them")
    for s in existing:
        shutil.rmtree(os.path.join(data_root, s))
    os.makedirs(data_root, exist_ok=True)

    t0 = time.time()
    counts = {"train": n_train, "validate": n_validate, "test": n_test}
    jobs = [(data_root, seed, s, i, shard, k) for s in SPLITS for i, shard, k in split_plan(s, counts[s])]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="simulating", unit="seq", smoothing=0.05)
    train_a, train_p = [], []

    def collect(results):
        for split, _, actions, positions in results:  # in job order, so the statistics are deterministic
            if split == "train":
                train_a.append(actions)
                train_p.append(positions)
            if bar is not None:
                bar.update(1)

    try:
        if workers == 0:
            collect(map(_make_one, jobs))
        else:
            # spawn: fresh interpreters, no pybullet state inherited from this process.
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                collect(pool.imap(_make_one, jobs, chunksize=4))
    finally:
        if bar is not None:
            bar.close()

    train_a, train_p = np.concatenate(train_a), np.concatenate(train_p)
    info = {
        "generator": "make_sim_dataset.py",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "counts": counts,
        "seq_len": SEQ_LEN,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE, 3],
        "actions": "dx, dy (m per frame), height command (0 low/pushing, 1 lifted, 2 high), gripper (0 open, 1 closed)",
        "endeffector_positions": "x, y, z (m) of the fingertip centre, measured on the simulated arm",
        "train_stats": {"actions": _column_stats(train_a), "endeffector_positions": _column_stats(train_p)},
        "realism_test": realism_stats(os.path.join(data_root, "test")),
        "realism_definition": "see realism_stats(): mean |x[t+1]-x[t]| (pixels in [0,1]); fraction of pixels whose "
                              "channel-mean change > 0.05; PSNR of frames 2..11 predicted by frame 1",
        "realism_real_bair_reference": REAL_BAIR_REFERENCE,
    }
    info["wall_time_s"] = round(time.time() - t0, 1)  # the only field that differs between runs
    with open(os.path.join(data_root, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return info


# ----------------------------------------------------------------------------------------------
# Realism figures and the montage

def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in name.replace("_", " ").replace(".", " ").split()]


def _sequence_dirs(split_dir):
    """Sequence folders of a lab-layout split (or a single sequence folder), in natural order."""
    if os.path.exists(os.path.join(split_dir, "0.png")):
        return [split_dir]
    key = _natural_key
    out = []
    for shard in sorted(os.listdir(split_dir), key=key):
        sd = os.path.join(split_dir, shard)
        if os.path.isdir(sd):
            out += [os.path.join(sd, k) for k in sorted(os.listdir(sd), key=key) if os.path.isdir(os.path.join(sd, k))]
    return out


def _load_frames(seq_dir):
    return np.stack([np.asarray(Image.open(os.path.join(seq_dir, f"{t}.png")).convert("RGB"), np.float64) / 255.0
                     for t in range(SEQ_LEN)])


def realism_stats(split_dir):
    """How much the frames change, on a lab-layout split (or one sequence folder); pixel values in [0, 1].

    mean_abs_change: mean |x[t+1] - x[t]| over all 30 frames, pixels and channels.
    changed_fraction: fraction of pixels whose change, averaged over the 3 channels, exceeds 0.05.
    copy_last_psnr: PSNR of predicting frames 2..11 by frame 1 (per channel, data range 1, averaged over
        channels, then frames and sequences): the score of a model that predicts no motion.
    """
    seqs = _sequence_dirs(split_dir)
    if not seqs:
        raise FileNotFoundError(f"no sequences under {split_dir}")
    mac, frac, psnr = [], [], []
    for d in seqs:
        x = _load_frames(d)
        diff = np.abs(np.diff(x, axis=0))
        mac.append(diff.mean())
        frac.append((diff.mean(-1) > 0.05).mean())
        mse = ((x[2:12] - x[1]) ** 2).mean(axis=(1, 2))  # (10 frames, 3 channels)
        psnr.append((-10 * np.log10(np.maximum(mse, 1e-10))).mean())
    return {"sequences": len(seqs), "mean_abs_change": round(float(np.mean(mac)), 5),
            "changed_fraction": round(float(np.mean(frac)), 5), "copy_last_psnr": round(float(np.mean(psnr)), 3)}


def make_montage(path, n_seq=6, first=0, frames=tuple(range(0, 20, 2)), seed=0, scale=2):
    """Rows of simulated sequences (the test split's first ones for this seed), every other frame,
    upscaled x scale (nearest neighbour) so that they are readable."""
    rows = []
    for i in range(first, first + n_seq):
        seq = simulate_sequence((seed, SPLIT_CODE["test"], i))[0]
        gap = np.full((IMAGE_SIZE, 2, 3), 255, np.uint8)
        rows.append(np.concatenate(sum([[seq[t], gap] for t in frames], [])[:-1], 1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    img = np.concatenate(rows[:-1], 0)
    img = img.repeat(scale, 0).repeat(scale, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(img).save(path)
    return img


# ----------------------------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser(description="Generate a simulated BAIR-like robot-pushing data set in the lab layout.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_root", default="./data/sim_data", help="output directory (gets train/, validate/, test/)")
    parser.add_argument("--n_train", type=int, default=2000, help="training sequences")
    parser.add_argument("--n_validate", type=int, default=256, help="validation sequences")
    parser.add_argument("--n_test", type=int, default=256, help="test sequences")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed and counts give byte-identical files")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (0 = this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/validate/test folders in --data_root")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--realism_only", default="", metavar="DIR",
                        help="only print the realism figures of DIR (a lab-layout split or sequence folder) and exit")
    parser.add_argument("--montage", default="", metavar="PNG", help="only write a montage of simulated sequences to PNG and exit")
    return parser


def main(args):
    if args.realism_only:
        if not os.path.isdir(args.realism_only):
            sys.exit(f"--realism_only {args.realism_only}: directory not found")
        print(json.dumps(realism_stats(args.realism_only), indent=2))
        return
    if args.montage:
        make_montage(args.montage, seed=args.seed)
        print(f"wrote {args.montage}")
        return
    for name in ("n_train", "n_validate", "n_test"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        sys.exit(f"--workers must be >= 0, got {args.workers}")
    if args.seed < 0:
        sys.exit(f"--seed must be >= 0, got {args.seed}")
    try:
        info = generate(args.data_root, args.n_train, args.n_validate, args.n_test, args.seed, args.workers,
                        progress=not args.no_progress, overwrite=args.overwrite)
    except FileExistsError as e:
        sys.exit(str(e))
    n = sum(info["counts"].values())
    print(f"wrote {n} sequences ({n * SEQ_LEN} frames) to {args.data_root} in {info['wall_time_s']:.1f} s")
    r = info["realism_test"]
    print(f"realism (test split): mean abs change {r['mean_abs_change']:.4f}, changed fraction "
          f"{100 * r['changed_fraction']:.1f}%, copy-last PSNR {r['copy_last_psnr']:.2f} dB")
    for name, ref in REAL_BAIR_REFERENCE.items():
        print(f"  real BAIR {name}: mean abs change {ref['mean_abs_change']:.4f}, changed fraction "
              f"{100 * ref['changed_fraction']:.1f}%, copy-last PSNR {ref['copy_last_psnr']:.2f} dB")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
