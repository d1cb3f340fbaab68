"""Does a planning cost rank pushes, on the model's frames and on the true ones? A diagnostic for plan.py.

    python rank_costs.py --model_dir logs/long/<run> --scenes 6

A planner can only pick a good push if its cost, computed on the model's predicted frames, orders the
candidate action sequences as the pushes' true outcomes do. For each push scene of plan.py (same seeds,
same tasks) this scores one set of candidates, without re-planning: draws from the CEM's initial
Gaussian, uniform draws, and straight runs towards the target at speeds up to the data's largest step.
Each candidate is simulated (the object's true distance to its target after the horizon, and the true
rendered frames) and predicted by the model in one batched rollout (zero latents, as plan.py). Every
cost is computed on both frame sets; the script prints, per cost and frame set, the Spearman rank
correlation of cost and true distance and the mean true distance of the 10 cheapest candidates, and
writes <out>/plan/rank_costs.json. Low correlation on true frames means the cost is short; a drop from
true to model frames is the model's. It also prints how well the model predicts the candidates (PSNR of
predicted against true frames), apart for those whose steps keep to --max_speed and the faster ones.

Costs: plan.image_cost (blurred pixel L2 to the goal image), with the pushed object's pixels weighed
by each of --object_weights (plan.object_pixel_weights), and `centroid`: the distance from the goal
position of the centroid of the pixels coloured like the pushed object (its designated pixels in the
current frame give the colour, a stand-in for a tracker that works with any model). Costs that read
no frames: `arm`, the distance of the planned end effector to the goal image's (the plan alone says
where the arm goes), and for a pixel-motion model (--motion cdna/flow) `track`, the pushed object's
designated pixels moved by the model's predicted motion (Finn & Levine 2017; Ebert et al. 2017;
plan.track_cost), alone and plus --arm_weight x `arm`. They have no true-frame column ("-"): on true
frames the object's position is the answer itself.
"""
import runtime  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import functools
import os

import numpy as np
import torch

import checkpoints
import make_sim_dataset as sim
import metrics
import plan
from sim_env import SimEnv


def get_args_parser():
    p = argparse.ArgumentParser("Rank candidate pushes by planning costs on model and true frames",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="run directory written by train_fixed_prior.py")
    p.add_argument("--checkpoint", default="model.pth", help="file in --model_dir: model.pth (best) or last.pth")
    p.add_argument("--scenes", type=int, default=6, help="push scenes: plan.py's, from scene seed --seed on, those with a target")
    p.add_argument("--seed", type=int, default=0, help="first scene seed")
    p.add_argument("--candidates", type=int, default=250,
                   help="candidates per scene: 60%% Gaussian (--init_std), 20%% uniform, 20%% straight to the target")
    p.add_argument("--init_std", type=float, default=0.05, help="std (m per frame) of the Gaussian candidates, as plan.py")
    p.add_argument("--last_weight", type=float, default=4.0, help="weight of the last predicted frame, as plan.py")
    p.add_argument("--blur_sigma", type=float, default=2.0, help="image cost blur (pixels), as plan.py")
    p.add_argument("--object_weights", default="10,30,300", help="comma-separated --object_weight values to rank too")
    p.add_argument("--colour_tau", type=float, default=0.1,
                   help="centroid cost: colour distance (RGB in [0, 1]) at which a pixel's match falls to exp(-1/2)")
    p.add_argument("--window", type=float, default=12,
                   help="centroid cost: count only pixels within this many pixels of the object's or its goal's centre (0 = all)")
    p.add_argument("--arm_weight", type=float, default=0.5, help="weight of the arm term in `track + arm`, as plan.py")
    p.add_argument("--max_speed", type=float, default=0.05,
                   help="the prediction PSNR is reported apart for candidates whose every step is at most this long "
                        "(m per frame) and for the faster ones (plan.py --max_speed)")
    p.add_argument("--out", default="", help="output directory (default: --model_dir); results go to <out>/plan")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    return p


def to_float(a):
    """uint8 array -> float tensor in [0, 1] (same layout)."""
    return torch.from_numpy(np.asarray(a)).float().div(255)


def spearman(a, b):
    """Spearman rank correlation of two 1-D arrays (no ties expected in continuous costs)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def centroid_cost(frames, colour, goal_yx, weights, tau, region=None):
    """Distance (pixels) of the colour-matched centroid to goal_yx, weighted over frames.

    frames (B, T, 3, H, W) in [0, 1]; colour (3,); goal_yx (2,); region (H, W) bool or None. Each
    pixel inside the region weighs exp(-|pixel - colour|^2 / (2 tau^2)), outside it 0 (the tracker's
    search window: other toys of a similar colour stay out); the centroid is the weighted mean pixel
    position. -> (B,)"""
    B, T, _, H, W = frames.shape
    m = torch.exp(-(frames.float() - colour.view(1, 1, 3, 1, 1)).pow(2).sum(2) / (2 * tau ** 2))  # (B, T, H, W)
    if region is not None:
        m = m * region.to(m)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=m.dtype), torch.arange(W, dtype=m.dtype), indexing="ij")
    mass = m.sum((-1, -2)).clamp_min(1e-6)
    cy, cx = (m * yy).sum((-1, -2)) / mass, (m * xx).sum((-1, -2)) / mass  # (B, T)
    d = ((cy - goal_yx[0]) ** 2 + (cx - goal_yx[1]) ** 2).sqrt()
    return (d * torch.as_tensor(weights, dtype=d.dtype)).sum(1)


def fmt(values, key, spec):
    """values[key] formatted by spec, or "-" (right-aligned to spec's width) where values or it is None
    (a cost with no true-frames form)."""
    v = None if values is None else values[key]
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def candidates(rng, n, horizon, init_std, direction):
    """Planar candidate vectors (n, 2 * horizon): Gaussian, uniform, straight along direction (2,)."""
    n_gauss, n_unif = int(0.6 * n), int(0.2 * n)
    n_line = n - n_gauss - n_unif
    x = [rng.normal(0, init_std, (n_gauss, 2 * horizon)), rng.uniform(-sim.MAX_STEP, sim.MAX_STEP, (n_unif, 2 * horizon))]
    u = direction / max(np.linalg.norm(direction), 1e-9)
    speeds = np.linspace(0.005, sim.MAX_STEP, n_line)[:, None]
    x.append(np.tile(u, horizon)[None] * speeds + rng.normal(0, 0.005, (n_line, 2 * horizon)))
    return np.clip(np.concatenate(x), -sim.MAX_STEP, sim.MAX_STEP)


def rank_scene(env, model, args, seed, n_past, n_future, device):
    """Costs of one scene's candidates on model and true frames -> {cost: {frames: (rho, top10 cm)}}, info."""
    horizon = n_future // plan.FRAMES_PER_ACTION
    frames, ees, acts_hist, gripper = plan.start_episode(env, seed, n_past)
    task = plan.make_task(env, "push", seed)
    i, target = task["object"], task["target"]
    rng = np.random.default_rng([seed, 13])
    x = candidates(rng, args.candidates, horizon, args.init_std, target - env.ee[:2])
    acts, pos = plan.to_actions(x, env.ee[:2].copy(), gripper, horizon)
    _, obj = env.rollout_states(acts)
    true_dist = np.linalg.norm(obj[:, n_future - 1, i, :2] - target, axis=-1)
    # The simulator's rendered frames of every candidate (rollout_states skips rendering).
    state, real = env.clone_state(), []
    for a in acts:
        env.restore_state(state)
        real.append(np.concatenate([env.step(a_k)[4]["frames"] for a_k in a]))
    env.restore_state(state)
    env.release_state(state)
    real = to_float(np.stack(real)).permute(0, 1, 4, 2, 3)  # (N, T, 3, H, W)
    past = to_float(np.stack(frames[-n_past:])).permute(0, 3, 1, 2).to(device)
    c = plan.model_conds(np.stack(acts_hist[-(n_past - 1):]) if n_past > 1 else np.zeros((0, 4)),
                         np.stack(ees[-n_past:]), acts, pos, n_past, n_future)
    N = len(x)
    noise = [torch.zeros(N, n_past + n_future - 1, *s, device=device) for s in model.noise_shapes()]
    masks = [env.object_mask(i), env.object_mask(i, ee=task["goal_ee"], xy=target)]  # now, in the goal
    track = None
    if model.motion is not None:  # the designated pixels, moved by the model's motion (plan.py --cost track)
        track = plan.designated_pixels(masks[0]).expand(N, -1, -1, -1).to(device)
    pred = plan.predict_frames(model, past.expand(N, -1, -1, -1, -1), torch.from_numpy(c).float().to(device),
                               n_future, noise, track)
    pred, maps = pred if track is not None else (pred, None)
    pred = pred.clamp(0, 1).cpu()
    goal = to_float(task["goal"]).permute(2, 0, 1)
    weights = plan.frame_weights(n_future, args.last_weight)
    colour = to_float(frames[-1])[torch.from_numpy(masks[0])].mean(0)  # the designated pixels' mean colour
    now_yx, goal_yx = (np.argwhere(m).mean(0) for m in masks)  # the object's centre now and in the goal (pixels)
    yy, xx = np.mgrid[:sim.IMAGE_SIZE, :sim.IMAGE_SIZE]
    near = np.minimum(np.hypot(yy - now_yx[0], xx - now_yx[1]), np.hypot(yy - goal_yx[0], xx - goal_yx[1]))
    region = torch.from_numpy(near < args.window) if args.window > 0 else None
    goal_yx = torch.from_numpy(goal_yx).float()
    costs = {"image": lambda f: plan.image_cost(f, goal, weights, args.blur_sigma)}
    for w in args.weights:
        pw = plan.object_pixel_weights(masks, args.blur_sigma, w)
        costs[f"image, object weight {w:g}"] = lambda f, pw=pw: plan.image_cost(f, goal, weights, args.blur_sigma, pw)
    costs["centroid"] = lambda f: centroid_cost(f, colour, goal_yx, weights, args.colour_tau, region)
    # Costs that read no frames: the arm alone (where the plan puts it), and the tracked designated pixels
    # with and without it (model only; on true frames the object's position is the answer itself).
    arm = plan.arm_cost(pos, task["goal_ee"], weights)
    direct = {"arm": arm}
    if maps is not None:
        tracked = plan.track_cost(maps[:, :, 0].cpu(), plan.object_plane(env, i), target, weights).numpy()
        direct.update({"track": tracked, f"track + {args.arm_weight:g} arm": tracked + args.arm_weight * arm})
    out = {}
    for name, fn in costs.items():
        out[name] = {}
        for which, f in (("model", pred), ("true", real)):
            c = fn(f).numpy()
            out[name][which] = (spearman(c, true_dist), float(true_dist[np.argsort(c)[:10]].mean()))
    for name, c in direct.items():
        ranked = (spearman(c, true_dist), float(true_dist[np.argsort(c)[:10]].mean()))
        out[name] = {"model": ranked, "true": ranked if name == "arm" else None}
    # How well the model predicts each candidate, against how fast its arm moves: its fastest step's length.
    psnr = metrics.batch_psnr(real, pred).mean(1).numpy()  # (N,): the test's per-frame PSNR, averaged over frames
    fast = np.linalg.norm(acts[..., :2], axis=-1).max(1) > args.max_speed
    info = {"seed": seed, "true_distance_min": float(true_dist.min()), "true_distance_median": float(np.median(true_dist)),
            "psnr_slow": float(psnr[~fast].mean()) if (~fast).any() else None,
            "psnr_fast": float(psnr[fast].mean()) if fast.any() else None}
    return out, info


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        args.weights = [float(w) for w in args.object_weights.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--object_weights {args.object_weights!r}: expected comma-separated numbers")
    if any(w < 0 for w in args.weights):
        parser.error(f"--object_weights {args.object_weights}: weights must be >= 0")
    if args.scenes < 1 or args.candidates < 20 or args.seed < 0:
        parser.error("--scenes must be >= 1, --candidates >= 20, --seed >= 0")
    if args.init_std <= 0 or args.last_weight <= 0 or args.blur_sigma < 0 or args.colour_tau <= 0 or args.window < 0 \
            or args.max_speed <= 0:
        parser.error("--init_std, --last_weight, --colour_tau and --max_speed must be > 0, --blur_sigma and --window >= 0")
    model, n_past, n_future, device = plan.open_model(parser, args)
    env = SimEnv()
    scenes, per_cost = [], {}
    rank = functools.partial(rank_scene, env, model, args, n_past=n_past, n_future=n_future, device=device)
    for _, seed, (res, info) in plan.feasible_scenes(rank, args.seed, args.scenes):
        scenes.append({**info, "costs": res})
        for name, r in res.items():
            per_cost.setdefault(name, []).append(r)
        print(f"scene {seed}: true distance min {100 * info['true_distance_min']:.1f} cm, median "
              f"{100 * info['true_distance_median']:.1f}; rank correlation model/true "
              + ", ".join(f"{n} {r['model'][0]:+.2f}/{fmt(r['true'], 0, '+.2f')}" for n, r in res.items())
              + f"; prediction PSNR slow/fast {fmt(info, 'psnr_slow', '.2f')}/{fmt(info, 'psnr_fast', '.2f')} dB", flush=True)
    summary, prediction = {}, {}
    for k in ("psnr_slow", "psnr_fast"):
        v = [s[k] for s in scenes if s[k] is not None]
        prediction[k] = float(np.mean(v)) if v else None
    print(f"\nPSNR of the model's predictions against the true frames: steps at most {args.max_speed:g} m per frame "
          f"{fmt(prediction, 'psnr_slow', '.2f')} dB, faster {fmt(prediction, 'psnr_fast', '.2f')} dB")
    print(f"\nover {args.scenes} scenes x {args.candidates} candidates: rank correlation of cost and true "
          "object distance; true distance (cm) of the 10 cheapest")
    print(f"  {'cost':<26} {'model':>7} {'true':>7} {'model cm':>9} {'true cm':>8}")
    for name, rs in per_cost.items():
        s = {f"{which}_{k}": None if rs[0][which] is None else float(np.mean([r[which][j] for r in rs]))
             for which in ("model", "true") for j, k in enumerate(("spearman", "top10_distance"))}
        summary[name] = s
        cm = {k: None if v is None else 100 * v for k, v in s.items()}
        print(f"  {name:<26} {s['model_spearman']:+7.2f} {fmt(s, 'true_spearman', '+7.2f')} "
              f"{cm['model_top10_distance']:9.1f} {fmt(cm, 'true_top10_distance', '8.1f')}")
    out = os.path.join(args.out or args.model_dir, "plan")
    os.makedirs(out, exist_ok=True)
    result = {"summary": summary, "prediction_psnr": prediction, "scenes": scenes, "args": {k: v for k, v in vars(args).items() if k != "weights"}}
    checkpoints.write_json(os.path.join(out, "rank_costs.json"), result)
    print(f"wrote {os.path.join(out, 'rank_costs.json')}")
    return result


if __name__ == "__main__":
    main()
