"""Peak RSS of every rank of a DeepSpeed ZeRO-3 job on Ray Train (CPU workers, gloo).

    python -m bench.zero3_rss --model demo          # the demo world (8.6M parameters)
    python -m bench.zero3_rss --model large         # LARGE below: random weights,
                                                    # 274M parameters, float32
    python -m bench.zero3_rss --model large --output patch   # nothing gathered after training

The ranks' PIDs come from their `rank_started` events; a thread here reads each rank's
/proc/<pid>/status (VmRSS, and VmHWM: the kernel's high-water mark, so a peak between
samples is not missed) every 0.1 s and puts each sample on the stage rank 0 reported last.
Prints and writes (with --out) per rank: RSS when it started the pipeline (after its
imports), its peak, the peak above that start, and the largest sampled RSS in each stage.
The script uses only run_job_distributed and its events, so the same file measures older
code (run it with PYTHONPATH at that checkout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from workers.spec import JobSpec

MODEL_CACHE = Path.home() / ".cache" / "moe-unlearn" / "bench-zero3"


def _status(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        ln.split(":")[0]: int(ln.split()[1]) * 1024
        for ln in lines
        if ln.startswith(("VmRSS", "VmHWM"))
    }


# Qwen1.5-MoE-A2.7B at its real widths (hidden 2048, expert 1408, shared expert 5632, top-4)
# with 8 of its 60 experts, 2 layers and a word-level vocabulary: 274M parameters, 1.1 GB
# in float32. 8 experts: every expert gets tokens on every rank, so older code without the
# activation-module workaround (workers/runners/deepspeed.py) runs it too.
LARGE = {
    "hidden_size": 2048,
    "num_experts": 8,
    "num_hidden_layers": 2,
    "vocab_size": 8000,
}


def large_model_dir() -> Path:
    """bench/configs/qwen1.5-moe-a2.7b.json with LARGE's sizes, random float32 weights, a
    word-level tokenizer and forget / retain corpora of random words, built once under
    MODEL_CACHE (as bench/real_shape.py builds its models)."""
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.world.tokenizer import build_tokenizer, save_tokenizer

    out = MODEL_CACHE / "qwen1.5-moe-8x-L2"
    if (out / "done").is_file():
        return out
    raw = json.loads((Path(__file__).parent / "configs" / "qwen1.5-moe-a2.7b.json").read_text())
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")} | LARGE
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    words = [f"w{i}" for i in range(config.vocab_size - 16)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(build_tokenizer(words), out)
    rng = random.Random(0)
    half = len(words) // 2
    for split, pool in (("forget", words[:half]), ("retain", words[half:])):
        rows = [json.dumps({"text": " ".join(rng.choice(pool) for _ in range(40))})
                for _ in range(32)]  # fmt: skip
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    (out / "done").write_text("ok\n")
    return out


def spec_for(model: str, steps: int, workers: int, output: str = "full") -> JobSpec:
    dist = {"num_workers": workers, "backend": "deepspeed", "zero_stage": 3}
    training = {"max_steps": steps, "batch_size": 4, "max_length": 64}
    if model == "demo":
        return JobSpec.model_validate(
            {
                "model": "demo",
                "algorithm": "gdiff",
                "forget": {"demo": "forget"},
                "retain": {"demo": "retain"},
                "seuf": {"num_experts": 1},
                "training": training,
                "distributed": dist,
                "output": {"model": output},
            }
        )
    d = large_model_dir()
    return JobSpec.model_validate(
        {
            "model": str(d),
            "algorithm": "gdiff",
            "forget": {"path": str(d / "forget.jsonl"), "max_records": 8},
            "retain": {"path": str(d / "retain.jsonl"), "max_records": 8},
            "training": training,
            "seuf": {"token_budget": 1024, "num_experts": 1},  # random weights: see real_shape
            "distributed": dist,
            "output": {"model": output},
        }
    )


class Watcher:
    """The job's reporter: stages and rank PIDs, and the sampling thread."""

    def __init__(self) -> None:
        self.stage_name = "starting"
        self.pids: dict[int, int] = {}  # rank -> pid
        self.start: dict[int, int] = {}  # rank -> RSS at its first sample
        self.hwm: dict[int, int] = {}
        self.by_stage: dict[int, dict[str, int]] = {}
        self.done = threading.Event()

    def stage(self, name: str) -> None:
        self.stage_name = name

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if kind == "rank_started":
            self.pids[int(payload["rank"])] = int(payload["pid"])

    def sample(self) -> None:
        while not self.done.is_set():
            for rank, pid in list(self.pids.items()):
                try:
                    st = _status(pid)
                    st["VmRSS"], st["VmHWM"]  # noqa: B018 - absent once the process exits
                except (OSError, KeyError, IndexError):
                    continue  # the rank's process has ended
                self.start.setdefault(rank, st["VmRSS"])
                self.hwm[rank] = max(self.hwm.get(rank, 0), st["VmHWM"])
                row = self.by_stage.setdefault(rank, {})
                row[self.stage_name] = max(row.get(self.stage_name, 0), st["VmRSS"])
            self.done.wait(0.1)


def main() -> None:
    import ray

    from workers.runners.ray_train import run_job_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("demo", "large"), default="demo")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output", choices=("full", "patch"), default="full",
                    help="output.model: full gathers the trained model on rank 0, patch not")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    spec = spec_for(args.model, args.steps, args.workers, args.output)
    w = Watcher()
    tmp = Path(tempfile.mkdtemp(prefix="moeu-z3-"))
    ray.init(address="local", num_cpus=args.workers, _temp_dir=str(tmp / "ray"),
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    t0 = time.perf_counter()
    threading.Thread(target=w.sample, daemon=True).start()
    try:
        res = run_job_distributed(spec, tmp / "out", w, None, tmp / "ckpt", run_name="z3")
    finally:
        w.done.set()
        ray.shutdown()
    gib = 2**30
    row = {
        "model": args.model,
        "output": args.output,
        "workers": args.workers,
        "sharded_load": res.distributed.sharded_load if res.distributed else None,
        "total_parameters": res.total_parameters,
        "seconds": round(time.perf_counter() - t0, 1),
        "after": res.after.get("forget_nll"),
        "ranks": {
            str(r): {
                "rss_at_start_gib": round(w.start[r] / gib, 3),
                "peak_rss_gib": round(w.hwm[r] / gib, 3),
                "peak_above_start_gib": round((w.hwm[r] - w.start[r]) / gib, 3),
                "max_rss_by_stage_gib": {k: round(v / gib, 3) for k, v in w.by_stage[r].items()},
            }
            for r in sorted(w.hwm)
        },
    }
    print(json.dumps(row, indent=1))
    if args.out:
        args.out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
