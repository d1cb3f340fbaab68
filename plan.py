"""Visual model-predictive control with a trained video model (Finn & Levine 2017; Ebert et al. 2018,
"Visual Foresight"), in the simulated scene the data set was recorded in (sim_env.SimEnv).

    python plan.py --model_dir logs/demo/<run> --task reach --episodes 5
    python plan.py --model_dir logs/demo/<run> --task push --episodes 5 --methods model,oracle,noop

At each re-plan the cross-entropy method (CEM; Rubinstein 1999, as used by Finn & Levine 2017 Sec. 4
and Ebert et al. 2018 Sec. 5) samples planar action sequences for the model's horizon (n_future
frames = n_future / 2 actions held 2 frames each), predicts them from the last n_past frames with the
model in one batched rollout, scores each by the distance of its predicted frames to the goal image,
refits a diagonal Gaussian to the elite samples and iterates; the first action(s) of the best
sequence are executed, the new frames observed, and the planner starts again (receding horizon).

Tasks, on scene seeds no data set sequence uses (SimEnv.reset(seed=k)):
  reach  bring the end effector to where the goal image shows it (target 8-15 cm away; success < 3 cm)
  push   bring a chosen object to a target 6-10 cm away (success < 5 cm). The push direction is the
         direction from the end effector to the object, turned by up to 30 degrees, so that the arm
         starts behind the object; the goal image shows the object at its target and the arm behind it.

Costs (--cost) for the model: image, the blurred pixel L2 of the predicted frames to the goal image
(push: the pushed object's pixels optionally weighed up, --object_weight); track (push with a
pixel-motion model, --motion cdna/flow), the designated-pixel cost of Finn & Levine 2017 Sec. 3 and
Ebert et al. 2017: a map over the pixels the pushed object covers in the last frame is moved along
with the predicted frames by the model's own motion output (CVAE.predict(track=...)), read as a
distribution over the table (SimEnv.pixel_to_plane at the object's height), and scored by its
expected distance to the target, plus --arm_weight x the planned arm's distance to the goal image's.
The designated pixels are re-found at each re-plan from the simulator's object mask: a perfect
tracker, where a real robot would need one (Ebert et al. 2017 register the goal image instead).
--max_speed caps each planned step's length (all methods): the model predicts fast arm motion worse
than the data's usual speed, and an optimiser seeks out where a model is wrong. The push recipe
measured in docs/planning.md:

    python plan.py --model_dir RUN --task push --cost track --max_speed 0.05 --init_std 0.03

Methods, run on the same scenes: model (image CEM with the video model), oracle (the same CEM with the
simulator itself as the model, scored by state, not images: exact, no rendering, so affordable),
random (uniform random planar actions) and noop (no motion).

Writes <out>/plan/summary.json (per-episode and summary figures, the host, the arguments) and
<out>/plan/<task>_ep<k>.gif per model episode: goal | executed frame | the plan's prediction of that
frame | the plan's last predicted frame, at each frame, re-planning marked by a red border (with
--cost track the predicted frames show the tracked pixels in green).
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import functools
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import make_sim_dataset as sim
import plots
from models import CVAE, fast
from sim_env import FRAMES_PER_ACTION, SimEnv

METHODS = ("model", "oracle", "random", "noop")
THRESHOLDS = {"reach": 0.03, "push": 0.05}  # success radius (m)
EE_LO, EE_HI = np.array([sim.EE_X[0], sim.EE_Y[0]]), np.array([sim.EE_X[1], sim.EE_Y[1]])


def get_args_parser():
    p = argparse.ArgumentParser("Visual MPC with a trained video model", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="run directory written by train_fixed_prior.py")
    p.add_argument("--checkpoint", default="model.pth", help="file in --model_dir: model.pth (best) or last.pth")
    p.add_argument("--task", default="reach", choices=sorted(THRESHOLDS), help="what to bring to the target")
    p.add_argument("--episodes", type=int, default=5, help="episodes (scenes) per method")
    p.add_argument("--seed", type=int, default=0, help="first environment scene seed (episode k uses the k-th scene from it that has a target for the task)")
    p.add_argument("--steps", type=int, default=6, help="actions executed per episode (each held for 2 frames)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--samples", type=int, default=100,
                   help="CEM samples per iteration (200 in Ebert et al.; 100 fits a shared CPU)")
    p.add_argument("--iters", type=int, default=3, help="CEM iterations per re-plan (3 in Ebert et al.)")
    p.add_argument("--elite_frac", type=float, default=0.1, help="fraction of samples refit as elites (5-10%% in the literature)")
    p.add_argument("--init_std", type=float, default=0.05, help="initial std (m per frame) of the planar actions")
    p.add_argument("--max_speed", type=float, default=None,
                   help="cap (m per frame) on the length of every planned planar step, for all methods; None: only "
                        "the data's per-axis bound (0.075); 0.05, the data's policy speed, for pushing with --cost track "
                        "(docs/planning.md)")
    p.add_argument("--replan_every", type=int, default=1, help="actions executed between re-plans")
    p.add_argument("--last_weight", type=float, default=4.0,
                   help="weight of the last predicted frame in the cost; the others weigh 1 (normalised)")
    p.add_argument("--blur_sigma", type=float, default=2.0,
                   help="std (pixels) of the Gaussian blur applied before the pixel L2 cost (0 = plain L2)")
    p.add_argument("--object_weight", type=float, default=0.0,
                   help="push: extra cost weight of the pixels the pushed object covers now and in the goal "
                        "(blurred; the other pixels weigh 1); 0 = the plain image cost (30 measured no better, "
                        "docs/planning.md)")
    p.add_argument("--cost", default="image", choices=["image", "track"],
                   help="image: the blurred pixel L2 to the goal image; track (push, pixel-motion models only): the "
                        "expected distance of the pushed object's designated pixels, moved by the model's predicted "
                        "motion, to the target, plus --arm_weight x the planned arm's distance to the goal image's arm")
    p.add_argument("--arm_weight", type=float, default=0.5,
                   help="--cost track: weight of the arm term (the oracle's weight); 0 = the object alone")
    p.add_argument("--track_margin", type=int, default=0,
                   help="--cost track: leave out of the designated pixels those within this many pixels of the arm "
                        "(unless none would remain); 0 = the whole visible object")
    p.add_argument("--noise", default="zero", choices=["zero", "sample"],
                   help="model latents: zero (the prior's mode, a deterministic prediction) or one prior "
                        "sample shared by all samples of an iteration (common random numbers)")
    p.add_argument("--oracle_samples", type=int, default=0, help="oracle CEM samples (0 = --samples)")
    p.add_argument("--out", default="", help="output directory (default: --model_dir); results go to <out>/plan")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--no_gif", action="store_true", help="do not write the per-episode GIFs")
    return p


# ----------------------------------------------------------------------------------------------
# The model

def load_model(model_dir, checkpoint, device):
    """The run's model as an inference copy (eval mode, BatchNorm folded), and its n_past, n_future."""
    path = os.path.join(model_dir, checkpoint)
    ckpt = checkpoints.load_checkpoint(path)
    model = CVAE.from_config(ckpt["arch"])
    checkpoints.load_model_state(model, ckpt, path)
    if not model.cond_dim == 7:
        raise checkpoints.CheckpointError(f"{path}: planning needs a model conditioned on actions and end-effector "
                                          f"positions (--cond action_pos); this one has cond_dim={model.cond_dim}")
    model = fast.inference_copy(model.to(device))
    args = ckpt.get("args", {})
    return model, int(args.get("n_past", 2)), int(args.get("n_future", 10))


def open_model(parser, args):
    """load_model for a command line with --model_dir, --checkpoint and --device: errors name the flag.
    Returns (model, n_past, n_future, device)."""
    try:
        device = runtime.choose_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if not os.path.isdir(args.model_dir):
        parser.error(f"--model_dir {args.model_dir}: no such directory")
    try:
        model, n_past, n_future = load_model(args.model_dir, args.checkpoint, device)
    except checkpoints.CheckpointError as e:
        sys.exit(f"error: --model_dir/--checkpoint: {e}")
    if n_future < FRAMES_PER_ACTION or n_future % FRAMES_PER_ACTION:
        sys.exit(f"error: the run's n_future={n_future} is not a whole number of {FRAMES_PER_ACTION}-frame actions")
    return model, n_past, n_future, device


def predict_frames(model, frames, conds, n_future, noise=None, track=None):
    """The model's prediction of n_future frames: frames (B, n_past, 3, 64, 64) in [0, 1], conds
    (B, n_past + n_future, 7), noise (B, n_past + n_future - 1, z_dim), or a list with the spatial latent levels'
    noise too (CVAE.noise_shapes), or None -> (B, n_future, 3, 64, 64); with track (B, M, 64, 64), designated
    pixel maps on the last given frame (pixel-motion models), also the maps moved (B, n_future, M, 64, 64).
    The one place that calls the model (models.fast.predict: CVAE.predict, faster)."""
    with torch.no_grad():
        return fast.predict(model, frames, conds, frames.shape[1], n_future, noise=noise, track=track)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (N, C, H, W) images (reflect padding)."""
    if sigma <= 0:
        return x
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def frame_weights(n, last_weight):
    """Per-frame cost weights: 1 for every predicted frame, last_weight for the last; normalised."""
    w = np.ones(n)
    w[-1] = last_weight
    return w / w.sum()


def image_cost(pred, goal, weights, sigma, pixel_weights=None):
    """Weighted blurred per-pixel L2 of predicted frames (B, T, 3, H, W) to the goal (3, H, W) -> (B,).

    Plain pixel L2 is flat once the predicted arm does not overlap the goal's arm: any miss costs the
    same. Blurring both images first (a Gaussian of `sigma` pixels) spreads each body over its
    neighbourhood, so the cost keeps falling as the arm or object comes closer (as the multi-scale
    and blurred costs of the visual MPC literature do); the model's own blur matters less too.
    pixel_weights (H, W), if given, weighs each pixel's squared error (a weighted mean over pixels)."""
    B, T = pred.shape[:2]
    p = gaussian_blur(pred.reshape(B * T, *pred.shape[2:]).float(), sigma)
    g = gaussian_blur(goal[None].float(), sigma)
    err = (p - g).pow(2)  # (B * T, 3, H, W)
    if pixel_weights is None:
        d = err.mean(dim=(1, 2, 3)).view(B, T)  # (B, T)
    else:
        w = pixel_weights.to(err)
        d = (err * w).sum(dim=(1, 2, 3)).view(B, T) / (err.shape[1] * w.sum())
    return (d * torch.as_tensor(weights, dtype=d.dtype, device=d.device)).sum(1)


def object_pixel_weights(masks, sigma, object_weight):
    """Per-pixel cost weights (H, W) = 1 + object_weight * m, m the union of the boolean masks (the
    pushed object where it is and where the goal shows it), blurred like the images and scaled to
    peak 1. The arm covers several times the object's pixels, so with uniform weights the cheapest
    plan puts the arm where the goal shows it whether or not the object follows; weighing the
    object's pixels (the designated pixels of Ebert et al. 2017, here given by the task) shifts the
    cost towards moving the object (it ranks pushes better, but did not raise push success with the
    long-recipe model: docs/planning.md)."""
    m = torch.from_numpy(np.any(np.stack(masks), 0).astype(np.float32))[None, None]  # (1, 1, H, W)
    m = gaussian_blur(m, sigma)[0, 0]
    return 1.0 + object_weight * m / m.max().clamp_min(1e-8)


def designated_pixels(mask, avoid=None, margin=0):
    """The designated pixels' map (1, 1, H, W): uniform over an object's mask (H, W) in the last frame, less
    the pixels within `margin` pixels (Chebyshev) of the boolean mask `avoid` (the arm), unless that
    leaves none. The predicted motion of a pixel beside the arm is mostly the arm's, so a map there rides
    with the arm whether or not the object is pushed."""
    m = torch.from_numpy(mask).float()
    if avoid is not None and margin > 0:
        near = F.max_pool2d(torch.from_numpy(avoid).float()[None, None], 2 * margin + 1, 1, margin)[0, 0]
        if (m * (1 - near)).sum() > 0:
            m = m * (1 - near)
    return (m / m.sum().clamp_min(1.0))[None, None]


def object_plane(env, i):
    """Each pixel's point (H, W, 2) on the horizontal plane through object i's centre (SimEnv.pixel_to_plane)."""
    return torch.from_numpy(env.pixel_to_plane(env.scene.object_positions()[i, 2])).float()


def track_cost(maps, plane_xy, target, weights):
    """The designated-pixel cost (Finn & Levine 2017; Ebert et al. 2017), in metres on the table: the
    expected distance to the target of a point whose position is a distribution over pixels, weighted
    over frames. maps (B, T, H, W), each summing to 1 (predict's track); plane_xy (H, W, 2), each pixel's
    point on the object's horizontal plane (SimEnv.pixel_to_plane); target (2,) -> (B,).

    Unlike a pixel distance to a goal image it keeps falling as the object comes closer, whatever
    the object looks like and however much it overlaps its goal pixels, and it ignores the arm."""
    d = (plane_xy - torch.as_tensor(target, dtype=plane_xy.dtype, device=plane_xy.device)).norm(dim=-1)  # (H, W)
    per_frame = (maps * d.to(maps)).sum((-2, -1))  # (B, T)
    return (per_frame * torch.as_tensor(weights, dtype=per_frame.dtype, device=per_frame.device)).sum(1)


def tint(frames, maps, colour=(0.0, 1.0, 0.0)):
    """Frames (B, T, 3, H, W) with maps (B, T, H, W) drawn in: each pixel mixed towards colour in proportion
    to its map value relative to the frame's largest (the plan GIF's view of the tracked pixels)."""
    a = 0.8 * (maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12))[:, :, None]  # (B, T, 1, H, W)
    return frames.clamp(0, 1) * (1 - a) + a * torch.tensor(colour, dtype=frames.dtype, device=frames.device)[:, None, None]


def arm_cost(pos, goal_ee, weights):
    """Weighted distance (m) of the planned end effector to where the goal image shows it, over the predicted
    frames: pos (N, >= T + 1, 2) from to_actions (frame 0 is now), weights (T,) -> (N,). No model needed:
    the plan says where the arm goes (it follows to ~0.3 mm)."""
    T = len(weights)
    return (np.linalg.norm(pos[:, 1: T + 1] - np.asarray(goal_ee), axis=-1) * weights).sum(1)


# ----------------------------------------------------------------------------------------------
# CEM

def cem(cost_fn, mean, std, n_samples, n_iters, elite_frac, lo=None, hi=None, rng=None, candidates=None):
    """Cross-entropy method: minimise cost_fn over vectors (Rubinstein 1999; Finn & Levine 2017 Sec. 4).

    Each iteration samples n_samples from N(mean, diag(std^2)) (clipped to [lo, hi]), scores them with
    cost_fn (an (N, D) array -> (N,) costs, in one batched call), and refits mean and std to the
    ceil(elite_frac * n_samples) lowest-cost samples. The previous iteration's elites replace as many
    fresh samples (as iCEM does, Pinneri et al. 2020), so that the best cost never gets worse on a
    deterministic cost. candidates (M, D), if given, replace the first M samples of the first iteration
    (the MPC loop passes the previous plan shifted by the executed actions, and no motion). Returns
    (the lowest-cost sample of the last iteration, its cost, final mean,
    final std, the per-iteration best costs)."""
    rng = rng if rng is not None else np.random.default_rng()
    mean, std = np.array(mean, np.float64), np.array(std, np.float64)
    n_elite = max(1, int(np.ceil(elite_frac * n_samples)))
    history, elite = [], None
    for _ in range(n_iters):
        x = mean + std * rng.standard_normal((n_samples, mean.size))
        if elite is not None:
            x[: min(n_elite, n_samples - 1)] = elite[: n_samples - 1]
        elif candidates is not None:
            cand = np.asarray(candidates, np.float64).reshape(-1, mean.size)[: n_samples - 1]
            x[: len(cand)] = cand
        if lo is not None or hi is not None:
            x = np.clip(x, lo, hi)
        c = np.asarray(cost_fn(x), np.float64)
        order = np.argsort(c, kind="stable")
        elite = x[order[:n_elite]]
        mean, std = elite.mean(0), elite.std(0) + 1e-6
        best, best_cost = x[order[0]], float(c[order[0]])
        history.append(best_cost)
    return best, best_cost, mean, std, history


def to_actions(x, ee_xy, gripper, horizon, max_speed=None):
    """Planar CEM vectors (N, horizon * 2) -> action rows (N, horizon, 4) at pushing height with the
    given gripper command, each displacement's length capped at max_speed (m per frame; None: only the
    per-axis bound MAX_STEP) and clipped so that the end effector stays in the box the
    data's actions keep it in (as make_sim_dataset._Policy does), and the end-effector xy at each of the
    2 * horizon + 1 frames from now (N, 2 * horizon + 1, 2), integrated from the current position:
    in the data the measured position follows the commanded displacement (to ~0.3 mm on average)."""
    N = x.shape[0]
    d = np.clip(x.reshape(N, horizon, 2), -sim.MAX_STEP, sim.MAX_STEP)
    if max_speed is not None:  # keep the plan where the model was trained: faster moves are rare in the data
        d = d * np.minimum(1.0, max_speed / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-12))
    pos = np.zeros((N, FRAMES_PER_ACTION * horizon + 1, 2))
    pos[:, 0] = ee_xy
    for k in range(horizon):
        start = pos[:, FRAMES_PER_ACTION * k]
        end = np.clip(start + FRAMES_PER_ACTION * d[:, k], EE_LO, EE_HI)
        d[:, k] = (end - start) / FRAMES_PER_ACTION
        for f in range(1, FRAMES_PER_ACTION + 1):
            pos[:, FRAMES_PER_ACTION * k + f] = start + f * d[:, k]
    acts = np.zeros((N, horizon, 4))
    acts[..., :2] = d
    acts[..., 3] = gripper  # height command 0: pushing height
    return acts, pos


def model_conds(past_actions, past_ee, acts, pos, n_past, n_future):
    """Conditions (N, n_past + n_future, 7) = [action_t, endeffector_t] per frame t (the data's layout).

    past_actions/past_ee: (n_past - 1, 4)/(n_past, 3) for the given frames (the last given frame's
    action is the plan's first). Future end-effector positions are unknown when planning: they are the
    planned displacements integrated from the measured current position (`pos` from to_actions), at
    pushing height."""
    N = acts.shape[0]
    T = n_past + n_future
    c = np.zeros((N, T, 7))
    c[:, : n_past - 1, :4] = past_actions
    c[:, :n_past, 4:] = past_ee
    per_frame = np.repeat(acts, FRAMES_PER_ACTION, axis=1)  # (N, 2 * horizon, 4)
    n_plan = T - (n_past - 1)
    c[:, n_past - 1:, :4] = per_frame[:, :n_plan] if per_frame.shape[1] >= n_plan else np.concatenate(
        [per_frame, np.repeat(per_frame[:, -1:], n_plan - per_frame.shape[1], 1)], 1)
    c[:, n_past:, 4:6] = pos[:, 1: n_future + 1]
    c[:, n_past:, 6] = sim.Z_LEVELS[0]
    return c


# ----------------------------------------------------------------------------------------------
# Tasks and episodes

class NoTarget(RuntimeError):
    """A scene with no target for the task inside the box the arm keeps to (feasible_scenes skips it)."""


def feasible_scenes(run, first_seed, n):
    """run(seed) on scene seeds first_seed, first_seed + 1, ... until n of them have a target for the task;
    yields (k, seed, run's result) for the k-th such scene and reports each skipped one."""
    k, seed = 0, first_seed
    while k < n:
        try:
            result = run(seed)
        except NoTarget as err:
            print(f"{err}, skipped", flush=True)
        else:
            yield k, seed, result
            k += 1
        seed += 1


def make_task(env, task, episode_seed):
    """Target and goal image for the scene just reset. Returns a dict."""
    rng = np.random.default_rng([episode_seed, 7])
    ee = env.ee.copy()
    objects = env.scene.object_positions()
    for _ in range(1000):
        if task == "reach":
            ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.08, 0.15)
            target = ee[:2] + dist * np.array([np.cos(ang), np.sin(ang)])
            if np.all(target >= EE_LO) and np.all(target <= EE_HI):
                goal = env.render_goal(ee=target)
                return {"kind": "ee", "target": target, "goal_ee": target, "goal": goal}
        else:
            # An object the arm can get behind, pushed away from the arm (turned by up to 30 degrees).
            i = int(rng.integers(len(objects)))
            obj = objects[i, :2]
            away = obj - ee[:2]
            if not 0.04 < np.linalg.norm(away) < 0.25:
                continue
            ang = np.arctan2(away[1], away[0]) + rng.uniform(-np.pi / 6, np.pi / 6)
            u = np.array([np.cos(ang), np.sin(ang)])
            target = obj + rng.uniform(0.06, 0.10) * u
            goal_ee = target - 0.07 * u  # the arm just behind the pushed object
            if np.all(target >= EE_LO) and np.all(target <= EE_HI) and np.all(goal_ee >= EE_LO) and np.all(goal_ee <= EE_HI):
                goal = env.render_goal(ee=goal_ee, objects={i: target})
                return {"kind": "object", "object": i, "target": target, "goal_ee": goal_ee, "goal": goal}
    raise NoTarget(f"no feasible {task} target in scene {episode_seed}")


def distance(task, state, target):
    """xy distance (m) of the task's body to its target; state = (end effector (3,), objects (n, 3))."""
    ee, objects = state
    if task["kind"] == "ee":
        return float(np.linalg.norm(ee[:2] - target))
    return float(np.linalg.norm(objects[task["object"], :2] - target))


def start_episode(env, episode_seed, n_past):
    """Reset the scene and wait without motion until there are n_past frames (the model's context).
    Returns the frames, end-effector positions and actions so far (one per frame) and the gripper."""
    frame, info = env.reset(seed=episode_seed)
    gripper = info["gripper"]
    noop = np.array([0.0, 0.0, 0.0, gripper])
    frames, ees, acts_hist = [frame], [info["ee"]], []
    while len(frames) < n_past + 1:
        frame, _, _, _, info = env.step(noop)
        frames += list(info["frames"])
        ees += list(info["positions"])
        acts_hist += [noop] * FRAMES_PER_ACTION
    return frames, ees, acts_hist, gripper


def run_episode(env, method, args, episode_seed, model=None, n_past=2, n_future=10, device="cpu"):
    """One episode of one method. Returns (record dict, GIF frames or None)."""
    t0 = time.time()
    horizon = n_future // FRAMES_PER_ACTION
    frames, ees, acts_hist, gripper = start_episode(env, episode_seed, n_past)
    noop = np.array([0.0, 0.0, 0.0, gripper])
    task = make_task(env, args.task, episode_seed)
    target = task["target"]
    d0 = distance(task, (env.ee, env.scene.object_positions()), target)
    rng = np.random.default_rng([episode_seed, 11, METHODS.index(method)])
    goal_t = torch.from_numpy(task["goal"]).permute(2, 0, 1).float().div(255).to(device)
    weights = frame_weights(n_future, args.last_weight)
    pixel_weights = None
    if task["kind"] == "object" and args.object_weight > 0:
        i = task["object"]
        masks = [env.object_mask(i), env.object_mask(i, ee=task["goal_ee"], xy=target)]  # now, in the goal
        pixel_weights = object_pixel_weights(masks, args.blur_sigma, args.object_weight).to(device)
    plane_xy = None
    if method == "model" and args.cost == "track":  # each pixel's point on the pushed object's plane
        plane_xy = object_plane(env, task["object"]).to(device)
    warm = np.zeros(horizon * 2)
    lo, hi = -sim.MAX_STEP, sim.MAX_STEP
    gif, plan_pred = [], None
    plan_costs, executed = [], 0
    while executed < args.steps:
        ee_xy = env.ee[:2].copy()
        if method == "noop":
            chosen = np.repeat(noop[None], horizon, 0)
        elif method == "random":
            x = rng.uniform(lo, hi, (1, horizon * 2))
            chosen = to_actions(x, ee_xy, gripper, horizon, args.max_speed)[0][0]
        elif method == "oracle":
            def cost(x):
                a, _ = to_actions(x, ee_xy, gripper, horizon, args.max_speed)
                ee_s, obj_s = env.rollout_states(a)  # (N, 2H, 3), (N, 2H, n, 3)
                d = np.linalg.norm(ee_s[..., :2] - task["goal_ee"], axis=-1)  # the arm, as in the goal image
                if task["kind"] == "object":
                    d = np.linalg.norm(obj_s[:, :, task["object"], :2] - target, axis=-1) + 0.5 * d
                return (d[:, :n_future] * weights).sum(1)
            x, c, _, _, hist = cem(cost, warm, np.full(horizon * 2, args.init_std), args.oracle_samples or args.samples,
                                   args.iters, args.elite_frac, lo, hi, rng, candidates=[warm, 0 * warm])
            chosen = to_actions(x[None], ee_xy, gripper, horizon, args.max_speed)[0][0]
            plan_costs.append(hist)
        else:  # the video model
            past = torch.from_numpy(np.stack(frames[-n_past:])).permute(0, 3, 1, 2).float().div(255).to(device)
            past_actions = np.stack(acts_hist[-(n_past - 1):]) if n_past > 1 else np.zeros((0, 4))
            past_ee = np.stack(ees[-n_past:])
            track = None
            if plane_xy is not None:  # the designated pixels: where the object is in the last frame
                arm = env.arm_mask() if args.track_margin > 0 else None  # a render: only when it is used
                track = designated_pixels(env.object_mask(task["object"]), arm, args.track_margin).to(device)

            def cost(x, keep=None):
                a, pos = to_actions(x, ee_xy, gripper, horizon, args.max_speed)
                c = torch.from_numpy(model_conds(past_actions, past_ee, a, pos, n_past, n_future)).float().to(device)
                N = x.shape[0]
                steps = n_past + n_future - 1
                if args.noise == "zero":  # every latent level at its prior's mode
                    noise = [torch.zeros(N, steps, *shape, device=device) for shape in model.noise_shapes()]
                else:  # one prior sample for every candidate: their costs differ by the actions only
                    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
                    noise = [torch.randn(1, steps, *shape, generator=gen).expand(N, *[-1] * (1 + len(shape))).to(device)
                             for shape in model.noise_shapes()]
                if track is None:
                    pred = predict_frames(model, past.expand(N, -1, -1, -1, -1), c, n_future, noise)
                    total = image_cost(pred, goal_t, weights, args.blur_sigma, pixel_weights).cpu().numpy()
                else:
                    pred, maps = predict_frames(model, past.expand(N, -1, -1, -1, -1), c, n_future, noise,
                                                track.expand(N, -1, -1, -1))
                    total = track_cost(maps[:, :, 0], plane_xy, target, weights).cpu().numpy()
                    total = total + args.arm_weight * arm_cost(pos, task["goal_ee"], weights)
                if keep is not None:  # for the GIF: the tracked pixels drawn in
                    keep.append(pred if track is None else tint(pred, maps[:, :, 0]))
                return total
            x, c, _, _, hist = cem(cost, warm, np.full(horizon * 2, args.init_std), args.samples, args.iters,
                                   args.elite_frac, lo, hi, rng, candidates=[warm, 0 * warm])
            keep = []
            cost(x[None], keep)
            plan_pred = (keep[0][0].clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            chosen = to_actions(x[None], ee_xy, gripper, horizon, args.max_speed)[0][0]
            plan_costs.append(hist)
        # Warm start of the next re-plan: this plan shifted by the executed actions (receding horizon),
        # the sampling mean and one candidate, beside the candidate of no motion.
        k = min(args.replan_every, args.steps - executed)
        if method in ("model", "oracle"):
            warm = np.concatenate([x[2 * k:], np.zeros(2 * k)])
        for j in range(k):
            frame, _, _, _, info = env.step(chosen[j])
            frames += list(info["frames"])
            ees += list(info["positions"])
            acts_hist += [chosen[j]] * FRAMES_PER_ACTION
            if plan_pred is not None:
                for f in range(FRAMES_PER_ACTION):
                    gif.append((task["goal"], info["frames"][f], plan_pred[FRAMES_PER_ACTION * j + f], plan_pred[-1],
                                j == 0 and f == 0))
        executed += k
    d_final = distance(task, (env.ee, env.scene.object_positions()), target)
    rec = {"seed": episode_seed, "method": method, "initial_distance": d0, "final_distance": d_final,
           "success": bool(d_final < THRESHOLDS[args.task]), "seconds": time.time() - t0,
           "target": target.tolist(), "final_ee": env.ee.tolist()}
    if task["kind"] == "object":
        rec["object"] = task["object"]
    if plan_costs:
        rec["cem_best_cost_per_iter_first_plan"] = plan_costs[0]
    return rec, gif or None


def write_gif(path, rows, scale=2):
    import imageio.v2 as imageio
    out = []
    gap = np.full((sim.IMAGE_SIZE, 2, 3), 255, np.uint8)
    for goal, real, pred, last, replan in rows:
        panels = [goal, real, plots._frame_border(pred, (220, 0, 0)) if replan else pred, last]
        img = np.concatenate(sum([[p, gap] for p in panels], [])[:-1], 1)
        out.append(img.repeat(scale, 0).repeat(scale, 1))
    imageio.mimsave(path, out, duration=1000 / 4, loop=0)


def summarise(records, threshold):
    by = {}
    noop = {r["seed"]: r["final_distance"] for r in records if r["method"] == "noop"}
    for m in METHODS:
        rs = [r for r in records if r["method"] == m]
        if not rs:
            continue
        s = {"episodes": len(rs), "success_rate": float(np.mean([r["success"] for r in rs])),
             "final_distance_mean": float(np.mean([r["final_distance"] for r in rs])),
             "final_distance_median": float(np.median([r["final_distance"] for r in rs])),
             "initial_distance_mean": float(np.mean([r["initial_distance"] for r in rs])),
             "seconds_per_episode": float(np.mean([r["seconds"] for r in rs])), "threshold_m": threshold}
        if noop:
            s["distance_reduction_vs_noop_mean"] = float(np.mean([noop[r["seed"]] - r["final_distance"] for r in rs
                                                                  if r["seed"] in noop]))
        by[m] = s
    return by


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods {args.methods}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(METHODS)}")
    for name, lo in (("episodes", 1), ("steps", 1), ("samples", 2), ("iters", 1), ("replan_every", 1), ("oracle_samples", 0)):
        if getattr(args, name) < lo:
            parser.error(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    if not 0 < args.elite_frac <= 1:
        parser.error(f"--elite_frac must be in (0, 1], got {args.elite_frac}")
    if args.init_std <= 0 or args.last_weight <= 0 or args.blur_sigma < 0 or args.object_weight < 0 or args.arm_weight < 0:
        parser.error("--init_std and --last_weight must be > 0, --blur_sigma, --object_weight and --arm_weight >= 0")
    if args.track_margin < 0:
        parser.error(f"--track_margin must be >= 0 (pixels), got {args.track_margin}")
    if args.max_speed is not None and args.max_speed <= 0:
        parser.error(f"--max_speed must be > 0 (m per frame), got {args.max_speed}")
    if args.cost == "track" and args.task != "push":
        parser.error(f"--cost track follows the pushed object's pixels: it needs --task push, not {args.task}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    model, n_past, n_future, device = open_model(parser, args)
    if args.cost == "track" and "model" in methods and model.motion is None:
        parser.error(f"--cost track: the model in {args.model_dir} has no pixel-motion output to move the designated "
                     f"pixels with (train it with --motion cdna or --motion flow)")
    if args.replan_every > n_future // FRAMES_PER_ACTION:
        parser.error(f"--replan_every {args.replan_every}: the horizon has only {n_future // FRAMES_PER_ACTION} actions")
    out = os.path.join(args.out or args.model_dir, "plan")
    os.makedirs(out, exist_ok=True)
    env = SimEnv()
    records = []
    print(f"{args.task}: {args.episodes} episodes x {', '.join(methods)}; horizon {n_future} frames "
          f"({n_future // FRAMES_PER_ACTION} actions), {args.steps} actions per episode, CEM {args.samples} x {args.iters}")
    # The task is drawn before any action, so a scene without one fails at its first method.
    first_method = functools.partial(run_episode, env, methods[0], args, model=model, n_past=n_past, n_future=n_future,
                                     device=device)
    for e, seed, first in feasible_scenes(first_method, args.seed, args.episodes):
        for m in methods:
            rec, gif = first if m == methods[0] else run_episode(env, m, args, seed, model, n_past, n_future, device)
            records.append(rec)
            if gif and not args.no_gif:
                write_gif(os.path.join(out, f"{args.task}_ep{e}.gif"), gif)
            print(f"  episode {e} (scene {seed}) {m:>6}: distance {100 * rec['initial_distance']:5.1f} -> "
                  f"{100 * rec['final_distance']:5.1f} cm  {'success' if rec['success'] else 'fail   '}  "
                  f"{rec['seconds']:6.1f} s", flush=True)
    summary = summarise(records, THRESHOLDS[args.task])
    print(f"\n{args.task}: success within {100 * THRESHOLDS[args.task]:.0f} cm, final distance (cm), "
          f"reduction vs no-op (cm), seconds per episode")
    for m, s in summary.items():
        red = s.get("distance_reduction_vs_noop_mean", float("nan"))
        print(f"  {m:>6}: success {100 * s['success_rate']:5.1f}%  final {100 * s['final_distance_mean']:5.1f} "
              f"(median {100 * s['final_distance_median']:5.1f})  reduction {100 * red:+5.1f}  {s['seconds_per_episode']:6.1f} s")
    host = {"node": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "torch": torch.__version__}
    result = {"task": args.task, "summary": summary, "episodes": records, "args": vars(args),
              "n_past": n_past, "n_future": n_future, "host": host}
    checkpoints.write_json(os.path.join(out, "summary.json"), result)
    print(f"wrote {os.path.join(out, 'summary.json')}")
    return result


if __name__ == "__main__":
    main()
