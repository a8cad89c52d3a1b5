"""Shared helpers of the benchmarks: models built from config, random padded corpora,
timing (warm-up, interleaved rounds, medians), peak memory of a fresh child process,
machine load, tables and JSON results.

Timing rule: every ratio a benchmark reports compares configurations measured side by side
in ONE process, interleaved in rounds (A B C A B C ...), so a load change on the shared
machine hits every configuration alike; the figure is the median of all timed repeats.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from workers.data import Sample, TokenizedCorpus
from workers.devices import cpu_facts

RESULTS = Path(__file__).resolve().parent / "results"


# --- models ---------------------------------------------------------------------------
def demo_config() -> PretrainedConfig:
    """The demo world's model (Qwen2-MoE, hidden 256, 4 layers, 8 experts, top-2) with a
    ~2000-word vocabulary, as workers.world builds it."""
    from workers.world.pretrain import PretrainSettings, world_model_config

    return world_model_config("qwen2_moe", 2000, PretrainSettings())


def large_config() -> PretrainedConfig:
    """A ~117M-parameter Qwen2-MoE (hidden 512, 8 layers, 16 experts of width 512, top-2,
    vocab 8000): big enough that the step is compute-bound, small enough for a CPU run."""
    from workers.moe.tiny import tiny_config

    return tiny_config(
        "qwen2_moe",
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=0,
        max_position_embeddings=256,
        initializer_range=0.02,
        output_router_logits=False,
    )


SIZES: dict[str, Callable[[], PretrainedConfig]] = {"demo": demo_config, "large": large_config}
# Batch shape per size: (samples, min length, max length); lengths vary so batches pad.
BATCH: dict[str, tuple[int, int, int]] = {"demo": (16, 24, 32), "large": (8, 48, 64)}


def build_model(size: str, seed: int = 0) -> PreTrainedModel:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    cfg = SIZES[size]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_corpus(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> TokenizedCorpus:
    """n random token sequences with lengths in [min_len, max_len] (every token after the
    first a target), so a batch of them is right padded like a real one."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        samples.append(Sample(ids, [False] + [True] * (length - 1)))
    return TokenizedCorpus(samples, pad_id=0)


def size_corpus(size: str, model: PreTrainedModel, seed: int = 0) -> TokenizedCorpus:
    b, lo, hi = BATCH[size]
    return random_corpus(b, lo, hi, int(model.config.vocab_size), seed)


# --- timing ---------------------------------------------------------------------------
def interleaved(
    setups: dict[str, Callable[[], tuple[Callable[[], None], Callable[[], None]]]],
    rounds: int = 3,
    reps: int = 2,
    warmup: int = 1,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time configurations side by side. setups[name]() -> (run_once, teardown); each round
    sets every configuration up in turn, runs `warmup` untimed calls then `reps` timed
    ones, and tears it down. Returns (wall seconds, process CPU seconds) per name.

    Why CPU time too: on a shared, oversubscribed machine wall time mostly measures how
    often the scheduler preempted us (the same step varied 3x in wall time here); with one
    torch thread the process CPU time is the work the step did, far less noisy. Ratios are
    computed from CPU time when torch runs one thread (see `ratio_basis`)."""
    wall: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            run, teardown = setup()
            try:
                for _ in range(warmup):
                    run()
                for _ in range(reps):
                    c0, t0 = time.process_time(), time.perf_counter()
                    run()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            finally:
                teardown()
    return wall, cpu


def ratio_basis() -> str:
    """'cpu' with one torch thread (CPU time = work), else 'wall' (CPU time would add up
    the threads)."""
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --- memory ---------------------------------------------------------------------------
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def release_free_memory() -> None:
    """Give freed heap pages back to the kernel (glibc malloc_trim), so RSS is live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then include freed pages (overstates, never understates)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status()["VmRSS"]


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last reset_peak_rss (or since start)."""
    return _status()["VmHWM"]


# --- reporting --------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Load and set-up, recorded with every result (the machine is shared)."""
    return {
        "loadavg": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **cpu_facts(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of the given columns."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
