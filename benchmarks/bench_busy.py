"""Training on a busy machine: torch's OpenMP threads waiting actively (spinning, libgomp's default)
against passively (sleeping), idle and beside one other busy process, in one run.

Why: on two cores, torch runs two threads; when another program takes one core, a thread that
spins at a barrier burns the time slice its partner needs, and training crawled 10-70x slower
(fit-prompts at 700 img/s idle fell to 10-50 img/s beside one test process). `clipdistill` sets
OMP_WAIT_POLICY=PASSIVE unless the user set it (cli.py); this prints what that changes. The
arithmetic is the same either way (the weights' checksum column): the policy only says what a
waiting thread does.

The workload: the fit-prompts student (timm resnet10t, 32 px, batch 64, channels-last, AdamW),
forward + backward + step, in a fresh process per cell (the policy is read when OpenMP starts).
The busy neighbour is a Python loop on one core.

    python benchmarks/bench_busy.py [--seconds 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_kind, table  # noqa: E402

HERE = Path(__file__).parent

WORKLOAD = r"""
import hashlib, json, sys, time
import timm, torch
torch.manual_seed(0)
m = timm.create_model("resnet10t", num_classes=64).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), 2e-3)
g = torch.Generator().manual_seed(1)
x = torch.randn(64, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
y = torch.randn(64, 64, generator=g)
def step():
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.step()
for _ in range(10):  # the checksum: the same ten steps under either policy
    step()
digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()[:12]
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[1]):
    step()
    n += 1
print(json.dumps({"img_per_s": n * 64 / (time.perf_counter() - t0), "digest": digest,
                  "threads": torch.get_num_threads()}))
"""


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def cell(policy: str, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("GOMP_SPINCOUNT="):
        env["GOMP_SPINCOUNT"] = policy.split("=")[1]
    elif policy != "libgomp default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", WORKLOAD, str(seconds)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per cell")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds; the table shows the median")
    ap.add_argument("--spins", default="10000,100000", help="GOMP_SPINCOUNT values to try too (spin, then sleep)")
    ap.add_argument("--md", default=str(HERE / "bench_busy.md"))
    args = ap.parse_args()
    policies = ["libgomp default", "PASSIVE", *(f"GOMP_SPINCOUNT={n}" for n in args.spins.split(",") if n)]
    got: dict = {}
    for _ in range(args.repeats):
        for load in ("idle", "one busy neighbour"):
            stop = mp.Event()
            neighbour = mp.Process(target=_spin, args=(stop,), daemon=True) if load != "idle" else None
            if neighbour:
                neighbour.start()
            try:
                for policy in policies:
                    r = cell(policy, args.seconds)
                    got.setdefault((load, policy), []).append(r)
            finally:
                if neighbour:
                    stop.set()
                    neighbour.join()
    rows = []
    for load in ("idle", "one busy neighbour"):
        base = sorted(r["img_per_s"] for r in got[(load, policies[0])])
        for policy in policies:
            rs = got[(load, policy)]
            med = sorted(r["img_per_s"] for r in rs)[len(rs) // 2]
            rows.append({"machine": load, "wait policy": policy, "img/s (median)": f"{med:.0f}",
                         "each run": ", ".join(f"{r['img_per_s']:.0f}" for r in rs),
                         "vs default": f"{med / base[len(base) // 2]:.2f}x",
                         "weights after 10 steps": rs[0]["digest"], "threads": rs[0]["threads"]})
    text = "\n".join([
        "# Training beside another busy process: OpenMP's wait policy", "",
        f"Machine: {machine_kind()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; "
        f"`python benchmarks/bench_busy.py --seconds {args.seconds:g} --repeats {args.repeats}`.", "",
        "The fit-prompts student's training step (resnet10t, 32 px, batch 64), a fresh process per cell; the busy "
        "neighbour is a Python loop on one core. `clipdistill` sets OMP_WAIT_POLICY=PASSIVE unless it is set.", "",
        table(rows, list(rows[0])), ""])
    print(text)
    Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
