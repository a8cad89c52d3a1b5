"""Proof at real layer sizes, on this machine: random-weight MoE models built from published
configurations (bench/configs/: hidden size, expert count, expert width, top-k and vocabulary
unchanged; 2 decoder layers; bfloat16; a small word-level tokenizer saved beside them), each
run through a SEUF GDiff job with `moe-unlearn run` in bfloat16.

Per family it records the model's bytes, the job's peak RSS measured in a subprocess (the
job's peak minus the process's RSS after its imports), the memory planner's estimate for the
same spec, and writes bench/results/real_shape.json with
`ratios.peak_rss_over_model_bytes` and `ratios.planner_over_measured` (objects keyed by
family). Targets: peak RSS <= 1.5x the model's bytes; planner within 25% of measured.
After the job, bench/real_shape_steps.py (another subprocess) times the SEUF training step
against the full-parameter step on the same batch, the latter only where the planner says
it fits this machine's free memory (else `full_step_measured: false` and the planner's
figure); `ratios.full_over_seuf_step` holds the measured ones.

    python -m bench.real_shape                                  # the three default families
    python -m bench.real_shape --families deepseek-v2-lite      # same recipe, another family
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
DEFAULT_FAMILIES = ("qwen1.5-moe-a2.7b", "olmoe-1b-7b", "qwen3-30b-a3b")
VOCAB_WORDS = 2000
RECORD_WORDS = 60


def _words() -> list[str]:
    return [f"w{i}" for i in range(VOCAB_WORDS)]


def build_model(name: str, layers: int, root: Path) -> Path:
    """A random-weight bfloat16 model of `name`'s published widths with `layers` decoder
    layers, its tokenizer and a forget / retain corpus, in root/<name>-L<layers> (reused)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.world.tokenizer import build_tokenizer, save_tokenizer

    out = root / f"{name}-L{layers}"
    if (out / "done").is_file():
        return out
    cfg = {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items()}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["num_hidden_layers"] = layers
    if "first_k_dense_replace" in cfg:  # keep one dense layer below the MoE layer(s)
        cfg["first_k_dense_replace"] = min(int(cfg["first_k_dense_replace"]), layers - 1)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    save_tokenizer(build_tokenizer(_words()), out)
    rng = random.Random(0)
    words = _words()
    for split, pool in (
        ("forget", words[: VOCAB_WORDS // 2]),
        ("retain", words[VOCAB_WORDS // 2 :]),
    ):
        rows = [
            json.dumps({"text": " ".join(rng.choice(pool) for _ in range(RECORD_WORDS))})
            for _ in range(32)
        ]
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    (out / "done").write_text("ok\n")
    return out


def job_spec(model_dir: Path, steps: int) -> dict[str, Any]:
    """The SEUF GDiff job the bench runs: shipped defaults but for size (bfloat16, a short
    budget, batches that fill max_length)."""
    return {
        "model": str(model_dir),
        # 8 records each: memory depends on the batch, not the corpus (and the machine is
        # shared: time is short)
        "forget": {"path": str(model_dir / "forget.jsonl"), "max_records": 8},
        "retain": {"path": str(model_dir / "retain.jsonl"), "max_records": 8},
        "algorithm": "gdiff",
        "scope": "seuf",
        "training": {
            "dtype": "bfloat16",
            "batch_size": 4,
            "max_length": 64,
            "max_steps": steps,
            "lr": 1e-4,
        },
        # One expert, what the figures measure: random weights hold no localised knowledge,
        # so the default (num_experts auto) would fall back to full parameters (or stop).
        "seuf": {"token_budget": 2048, "num_experts": 1},
    }


def probe(spec_file: Path, out_dir: Path, result_file: Path) -> None:
    """Run in the measuring subprocess: imports, then `moe-unlearn run`, then the peak. A
    thread samples RSS (anonymous and file-backed) so the peak can be put on a stage."""
    import threading
    import time

    import api.cli
    import workers.run  # noqa: F401 - imported before the baseline, like the CLI's job does
    from bench.common import peak_rss_bytes, release_free_memory, reset_peak_rss, rss_bytes

    release_free_memory()
    base = rss_bytes()
    reset_peak_rss()
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = Path("/proc/self/status").read_text().splitlines()
            kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status if ln.startswith("Rss")}
            samples.append((time.perf_counter() - t0, kb["RssAnon"] * 1024, kb["RssFile"] * 1024))
            done.wait(0.2)

    t0 = time.perf_counter()
    threading.Thread(target=sample, daemon=True).start()
    rc = api.cli.main(["run", str(spec_file), "--output-dir", str(out_dir)])
    done.set()
    peak = peak_rss_bytes()
    result_file.write_text(
        json.dumps({"rc": rc, "rss_after_imports": base, "peak_rss": peak, "samples": samples})
    )


def stage_peaks(
    samples: list[list[float]], timings: dict[str, float], base: int
) -> dict[str, dict[str, int]]:
    """The largest sampled RSS (above the after-imports baseline) inside each stage, split
    into anonymous memory and file-backed pages (the safetensors file, mapped); stages are
    placed by the job's own timings, counted from the start of the run."""
    out: dict[str, dict[str, int]] = {}
    start = 0.0
    for stage, seconds in timings.items():
        inside = [x for x in samples if start <= x[0] < start + seconds] or samples[:1]
        top = max(inside, key=lambda x: x[1] + x[2])
        out[stage] = {"rss": int(top[1] + top[2] - base), "anon": int(top[1]), "file": int(top[2])}
        start += seconds
    return out


def plan_row(model_dir: Path, steps: int) -> dict[str, Any]:
    """The memory planner's estimate for the bench's job on `model_dir`."""
    from workers.model_shape import shape_from_config
    from workers.planner import estimate
    from workers.spec import JobSpec

    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    plan = estimate(shape, JobSpec.model_validate(job_spec(model_dir, steps)))
    return {"planner_bytes": plan.per_worker_bytes, "planner_parts": dict(plan.parts)}


def measure(name: str, layers: int, steps: int, root: Path) -> dict[str, Any]:
    import yaml

    from workers.model_shape import shape_from_config
    from workers.planner import estimate
    from workers.spec import JobSpec

    model_dir = build_model(name, layers, root)
    spec = job_spec(model_dir, steps)
    spec_file = root / f"{name}-L{layers}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result_file = root / f"{name}-L{layers}.result.json"
    out_dir = root / f"{name}-L{layers}.out"
    shutil.rmtree(out_dir, ignore_errors=True)  # an earlier run's files are not this run's
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.real_shape",
            "--probe",
            str(spec_file),
            str(out_dir),
            str(result_file),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"{name}: the job failed:\n{proc.stderr[-3000:]}")
    measured = json.loads(result_file.read_text())
    config = json.loads((model_dir / "config.json").read_text())
    shape = shape_from_config(config)
    plan = estimate(shape, JobSpec.model_validate(spec))
    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    job_peak = measured["peak_rss"] - measured["rss_after_imports"]
    result = json.loads((out_dir / "result.json").read_text())
    steps_file = root / f"{name}-L{layers}.steps.json"
    steps_file.unlink(missing_ok=True)
    proc = subprocess.run(  # after the job, in its own process: the job's peak stays its own
        [sys.executable, "-m", "bench.real_shape_steps", str(spec_file),
         str(out_dir / "result.json"), str(steps_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0 or not steps_file.is_file():
        raise RuntimeError(f"{name}: the step timing failed:\n{proc.stderr[-3000:]}")
    stages = stage_peaks(measured["samples"], result["timings_s"], measured["rss_after_imports"])
    return {
        "family": name,
        "layers": layers,
        "params": shape.total_params,
        "trainable_params": plan.trainable_params,
        "model_bytes": model_bytes,
        "job_peak_rss_bytes": job_peak,
        "planner_bytes": plan.per_worker_bytes,
        "planner_parts": {k: v for k, v in plan.parts.items()},
        "steps": result.get("steps"),
        "stage_peak_rss_bytes": stages,
        "timings_s": result["timings_s"],
        "precision": result.get("precision"),
        "output_dtype_bytes": sum(
            p.stat().st_size for p in (out_dir / "model").glob("*.safetensors")
        )
        if (out_dir / "model").is_dir()
        else None,
        **json.loads(steps_file.read_text()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moeu-real-shape"))
    ap.add_argument("--name", help="result file name (default: real_shape or real_shape_other)")
    ap.add_argument(
        "--combine",
        nargs="+",
        metavar="NAME",
        help="write real_shape.json from the rows of earlier runs' result files (families run "
        "one at a time, e.g. --name real_shape_olmoe-1b-7b)",
    )
    ap.add_argument("--probe", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(*args.probe)
        return
    from bench.common import machine, table, write_result

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.combine:
        from bench.common import RESULTS

        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.combine]
        rows = [r for part in parts for r in part["rows"]]
        args.families = [r["family"] for r in rows]
        for r in rows:  # the planner as it is now (its constants calibrated on these runs)
            r.update(plan_row(args.workdir / f"{r['family']}-L{r['layers']}", args.steps))
        sys.argv += [f"(combined from {', '.join(p['command'] for p in parts)})"]
    else:
        rows = [measure(n, args.layers, args.steps, args.workdir) for n in args.families]
    for r in rows:
        r["peak_rss_over_model_bytes"] = r["job_peak_rss_bytes"] / r["model_bytes"]
        r["planner_over_measured"] = r["planner_bytes"] / r["job_peak_rss_bytes"]
    print(
        table(
            rows,
            [
                "family",
                "params",
                "model_bytes",
                "job_peak_rss_bytes",
                "planner_bytes",
                "peak_rss_over_model_bytes",
                "planner_over_measured",
                "seuf_step_s",
                "full_step_s",
            ],
        )
    )
    payload = {
        "command": "python -m bench.real_shape " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "rows": rows,
        "ratios": {
            "peak_rss_over_model_bytes": {
                r["family"]: r["peak_rss_over_model_bytes"] for r in rows
            },
            "planner_over_measured": {r["family"]: r["planner_over_measured"] for r in rows},
            # only where the full-parameter step fitted and ran (`full_step_measured`)
            "full_over_seuf_step": {
                r["family"]: r["full_over_seuf_step"] for r in rows if r["full_step_measured"]
            },
        },
        "targets": {"peak_rss_over_model_bytes": "<= 1.5", "planner_over_measured": "0.75-1.25"},
    }
    name = "real_shape" if list(args.families) == list(DEFAULT_FAMILIES) else "real_shape_other"
    print(write_result(args.name or name, payload))


if __name__ == "__main__":
    main()
