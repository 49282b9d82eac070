"""Target networks for TD learning: the EMA as a soft target, and a hard target every N steps.

    python examples/target_network.py                  # about 40 s on 2 CPU cores
    python examples/target_network.py --steps 100      # a smoke test, a few seconds
    python examples/target_network.py --plot td.png    # also draw the error curves (matplotlib)

Q-learning with a small MLP on a deterministic chain (no gym): states 0..N-1, actions left
and right; stepping right into the last state pays 1, stepping left into state 0 pays 0.2,
both end the episode. Every (state, action) pair is replayed uniformly (off-policy, with
function approximation and bootstrapping: the setting where a target network matters), and
the exact optimal Q* comes from value iteration, so the error of each run is measured, not
estimated. The target ``r + gamma * max_a Q_target(s', a)`` is computed with:

- online: the network being trained (no target network);
- soft: ``functional_call(q, ema_state_dict(opt, q), (s',))`` with ``decay=0.995``, i.e. the
  Polyak update ``target <- (1 - tau) * target + tau * online`` with ``tau = 0.005`` after
  every optimizer step (SB3's ``polyak_update``, TorchRL's ``SoftUpdate``);
- hard: the same call with ``decay=0.0, update_every=N``: the shadows copy the weights exactly
  on every N-th optimizer step and stay frozen in between (DQN's target network).

The table gives the RMS error of Q against Q* and the share of states whose greedy action is
optimal (median over seeds), and the time per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _plot import plot_curves
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ema_optim import EMAOptimizer, ema_state_dict

STATES, GAMMA = 24, 0.97
LEFT_REWARD, RIGHT_REWARD = 0.2, 1.0


def transitions() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Every (state, action) of the chain's non-terminal states: s, a, r, s', done."""
    s = torch.arange(1, STATES - 1).repeat_interleave(2)
    a = torch.tensor([0, 1]).repeat(STATES - 2)
    s2 = s + 2 * a - 1
    done = (s2 == 0) | (s2 == STATES - 1)
    r = torch.where(s2 == STATES - 1, RIGHT_REWARD, torch.where(s2 == 0, LEFT_REWARD, 0.0))
    return s, a, r, s2, done.float()


def optimal_q() -> Tensor:
    """Q* of the non-terminal states, (STATES - 2, 2), by value iteration in float64."""
    s, a, r, s2, done = transitions()
    q = torch.zeros(STATES, 2, dtype=torch.float64)
    for _ in range(10 * STATES):
        target = r.double() + GAMMA * (1 - done.double()) * q[s2].max(1).values
        q[s, a] = target
    return q[1 : STATES - 1]


def features(s: Tensor) -> Tensor:
    """A smooth encoding of the state (neighbouring states generalise to each other)."""
    x = s.float().unsqueeze(1) / (STATES - 1)
    k = torch.arange(1, 5).float()
    return torch.cat([x, torch.sin(torch.pi * k * x), torch.cos(torch.pi * k * x)], 1)


def build(seed: int, method: str, hard_every: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    q = nn.Sequential(nn.Linear(9, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    inner = torch.optim.Adam(q.parameters(), lr=1e-3)
    if method == "soft":
        return q, EMAOptimizer(inner, decay=0.995)  # tau = 1 - decay = 0.005
    if method == "hard":
        return q, EMAOptimizer(inner, decay=0.0, update_every=hard_every)  # a copy every N steps
    return q, inner


def run(
    seed: int, method: str, steps: int, hard_every: int, every: int
) -> tuple[list[float], float, float, bool]:
    """RMS error of Q vs Q* at every `every` steps, greedy accuracy at the end, seconds per
    step, and (hard) whether the target was an exact copy at each N-th step and frozen between."""
    s, a, r, s2, done = transitions()
    q_star = optimal_q()
    q, opt = build(seed, method, hard_every)
    gen = torch.Generator().manual_seed(seed)
    errors, seconds, exact = [], [], True
    previous: list[Tensor] | None = None
    for step in range(1, steps + 1):
        i = torch.randint(0, len(s), (32,), generator=gen)
        t0 = time.perf_counter()
        with torch.no_grad():
            if isinstance(opt, EMAOptimizer):  # the target network: the average, no copy
                next_q = functional_call(q, ema_state_dict(opt, q), (features(s2[i]),), tie_weights=False)
            else:
                next_q = q(features(s2[i]))
            target = r[i] + GAMMA * (1 - done[i]) * next_q.max(1).values
        pred = q(features(s[i])).gather(1, a[i].unsqueeze(1)).squeeze(1)
        F.smooth_l1_loss(pred, target).backward()
        opt.step()
        opt.zero_grad()
        seconds.append(time.perf_counter() - t0)
        if method == "hard":  # check the claim: exact copies on every N-th step, frozen between
            now = [t.clone() for t in ema_state_dict(opt, q).values()]
            if step % hard_every == 0:
                exact &= all(torch.equal(t, p) for t, p in zip(now, q.parameters()))
            elif previous is not None:
                exact &= all(torch.equal(t, u) for t, u in zip(now, previous))
            previous = now
        if step % every == 0:
            with torch.no_grad():
                q_all = q(features(torch.arange(1, STATES - 1))).double()
            errors.append((q_all - q_star).square().mean().sqrt().item())
    with torch.no_grad():
        greedy = q(features(torch.arange(1, STATES - 1))).argmax(1)
    optimal = q_star.argmax(1)
    return errors, 100.0 * (greedy == optimal).double().mean().item(), statistics.median(seconds), exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--hard-every", type=int, default=100, help="N: optimizer steps between target copies"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="draw the RMS error against steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    every = max(1, args.steps // 8)
    methods = {"online": "no target", "soft": "soft, decay=0.995", "hard": f"hard, every {args.hard_every}"}
    results = {
        m: [run(seed, m, args.steps, args.hard_every, every) for seed in range(args.seeds)] for m in methods
    }

    print(f"chain of {STATES} states, gamma={GAMMA}; RMS error of Q vs Q* (median of {args.seeds} seeds)\n")
    steps = list(range(every, args.steps + 1, every))
    print("| target | " + " | ".join(f"step {n}" for n in steps) + " | greedy optimal (%) | ms/step |")
    print("|---|" + "---:|" * (len(steps) + 2))
    curves = {}
    for m, label in methods.items():
        rows = results[m]
        curve = [statistics.median(r[0][k] for r in rows) for k in range(len(steps))]
        curves[label] = curve
        greedy = statistics.median(r[1] for r in rows)
        ms = 1e3 * statistics.median(r[2] for r in rows)
        print(f"| {label} | " + " | ".join(f"{e:.3f}" for e in curve) + f" | {greedy:.0f} | {ms:.2f} |")
    exact = all(r[3] for r in results["hard"])
    print(f"\nhard target: an exact copy on every {args.hard_every}th step and frozen in between: {exact}")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.plot:
        plot_curves(steps, curves, args.plot, "optimizer step", "RMS error of Q vs Q*", log=True)


if __name__ == "__main__":
    main()
