"""Memory of a ZeRO-3 load on every rank: the sharded load (zero.Init, what jobs do) against
loading the whole model on each rank and letting DeepSpeed partition it (what they did
before), side by side in one run on the same model.

    python -m bench.zero3_load                 # bench.zero3_rss's LARGE model, 2 ranks
    python -m bench.zero3_load --workers 2 --out bench/results/zero3_load.json

Each mode runs W processes over gloo (torch.multiprocessing, no Ray: the load is what is
measured). Every rank reads /proc/self/status at its start, after the load, after the
fetch hooks (workers/runners/deepspeed.py: for the whole load, this is where DeepSpeed
partitions the model) and after one forward through them, and reports the peak (VmHWM)
and the anonymous memory (RssAnon: file pages of the checkpoint's mapping excluded) above
its start, in GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

GiB = 2**30
MODES = ("whole", "sharded")


def _status() -> dict[str, int]:
    keys = ("VmHWM", "VmRSS", "RssAnon")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in lines if ln.startswith(keys)}


def _rank(rank: int, world: int, port: int, model_dir: str, mode: str, out: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoModelForCausalLM

    from workers.runners.deepspeed import open_fetch_hooks, sharded_load_config, sharded_loading

    start = _status()
    cfg = sharded_load_config(2, world, 1.0, torch.float32)
    points: dict[str, dict[str, int]] = {}
    if mode == "sharded":
        with sharded_loading(cfg):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    points["loaded"] = _status()
    open_fetch_hooks(model, cfg)
    points["partitioned"] = _status()
    with torch.no_grad():
        model(input_ids=torch.randint(0, int(model.config.vocab_size), (4, 64)))
    points["forward"] = _status()
    held = sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())
    out.put(
        {
            "rank": rank,
            "param_elements_held": held,
            **{
                f"{name}_{k}_gib": round((v[k] - start[k]) / GiB, 3)
                for name, v in points.items()
                for k in ("VmHWM", "RssAnon")
            },
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(mode: str, world: int, model_dir: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(
        _rank, args=(world, _free_port(), str(model_dir), mode, q), nprocs=world,
        start_method="spawn",
    )  # fmt: skip
    rows = [q.get() for _ in range(world)]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    from bench.zero3_rss import large_model_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/moe-unlearn/torch_extensions")
    )
    model_dir = large_model_dir()
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    runs = {mode: measure(mode, args.workers, model_dir) for mode in MODES}
    peak = {
        mode: [max(r["loaded_VmHWM_gib"], r["partitioned_VmHWM_gib"]) for r in rows]
        for mode, rows in runs.items()
    }
    result = {
        "command": f"python -m bench.zero3_load --workers {args.workers}",
        "model": str(model_dir.name),
        "model_gib": round(model_bytes / GiB, 3),
        "workers": args.workers,
        "runs": runs,
        "ratios": {
            "sharded_over_whole_load_peak": {
                str(r): round(s / w, 3) if w > 0 else None
                for r, (s, w) in enumerate(zip(peak["sharded"], peak["whole"], strict=True))
            }
        },
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
