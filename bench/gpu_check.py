"""The GPU check (`make gpu-check`): the tests marked `gpu`, then one real-shape SEUF job
(bench/real_shape.py's recipe, OLMoE-1B-7B widths, 2 layers) on one GPU in bfloat16 and the
same job on the CPU in bfloat16, compared: the selected expert must be the same and the
step losses close. Writes bench/results/gpu_check.json.

Without CUDA it says so, checks its own plumbing (the gpu tests are collected and skip, the
device decision and the job spec it would run are valid) and exits 0.

    python -m bench.gpu_check [--family olmoe-1b-7b] [--steps 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 0.05  # bfloat16 on two devices: kernels differ, the trajectory should not


class _Losses:
    """A Reporter that keeps each step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def stage(self, name: str) -> None:
        pass

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if kind == "step":
            self.losses.append(float(payload["loss"]))


def _gpu_tests() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"rc": proc.returncode, "summary": tail[0]}


def _job(model_dir: Path, device: str, steps: int, out: Path) -> dict[str, Any]:
    from bench.real_shape import job_spec
    from workers.run import run_job
    from workers.spec import JobSpec

    spec = job_spec(model_dir, steps)
    spec["distributed"] = {"device": device}
    rep = _Losses()
    t = time.perf_counter()
    res = run_job(JobSpec.model_validate(spec), out, reporter=rep)
    peak = None
    if device == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated()
    return {
        "device": device,
        "selected": [[s["layer"], s["expert"]] for s in res.selected],
        "losses": rep.losses,
        "after": {k: v for k, v in res.after.items() if isinstance(v, float)},
        "precision": res.precision,
        "seconds": round(time.perf_counter() - t, 1),
        "cuda_max_allocated_bytes": peak,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="olmoe-1b-7b")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeu-real-shape"))
    args = ap.parse_args()

    import torch

    from bench.common import machine, write_result
    from workers.planner import device_for_resources

    tests = _gpu_tests()
    payload: dict[str, Any] = {
        "command": "python -m bench.gpu_check " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "cuda": torch.cuda.is_available(),
        "gpu_tests": tests,
    }
    if not torch.cuda.is_available():
        # Plumbing only: the gpu tests were collected and skipped (rc 0), the device decision
        # for a GPU cluster is cuda, and the job spec this check would run is valid.
        from bench.real_shape import job_spec
        from workers.spec import JobSpec

        assert tests["rc"] == 0, tests
        assert device_for_resources("auto", {"CPU": 4, "GPU": 1}) == "cuda"
        spec = job_spec(args.workdir / f"{args.family}-L2", args.steps)
        JobSpec.model_validate({**spec, "distributed": {"device": "cuda"}})
        payload["verdict"] = "no CUDA here: plumbing checked, nothing ran on a GPU"
        print("gpu-check: no CUDA on this machine; plumbing checked, nothing ran on a GPU")
        print(write_result("gpu_check", payload))
        return 0

    from bench.real_shape import build_model

    payload["gpu"] = torch.cuda.get_device_name(0)
    model_dir = build_model(args.family, 2, args.workdir)
    gpu = _job(model_dir, "cuda", args.steps, args.workdir / "gpu-check-cuda")
    cpu = _job(model_dir, "cpu", args.steps, args.workdir / "gpu-check-cpu")
    worst = max(
        (abs(g - c) / max(abs(c), 1e-6) for g, c in zip(gpu["losses"], cpu["losses"], strict=True)),
        default=0.0,
    )
    same_expert = gpu["selected"] == cpu["selected"]
    ok = tests["rc"] == 0 and same_expert and worst <= LOSS_RTOL
    payload.update(
        {
            "family": args.family,
            "cuda_job": gpu,
            "cpu_job": cpu,
            "same_selected_expert": same_expert,
            "max_relative_loss_difference": worst,
            "loss_rtol": LOSS_RTOL,
            "verdict": "pass" if ok else "fail",
        }
    )
    print(
        f"gpu-check: gpu tests {tests['summary']!r}; same expert {same_expert}; "
        f"max relative loss difference {worst:.4f} (<= {LOSS_RTOL}): {payload['verdict']}"
    )
    print(write_result("gpu_check", payload))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
