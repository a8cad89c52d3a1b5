"""One unlearning job, start to finish, in one process (library mode, no server):

    load model -> evaluate before -> expert attribution -> select experts
    -> unlearn (only the selected slices + router trainable) -> evaluate after
    -> write the unlearned model, the expert patch, the expert map and result.json

`run_job(spec, output_dir)` is what `moe-unlearn run` calls; the service's runner calls the
same stages. Progress goes to a `Reporter` (stages and per-step events), never to stdout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from workers.attribution import ExpertMap, attribute
from workers.data import TokenizedCorpus, read_corpus, tokenize
from workers.moe import get_adapter
from workers.moe.base import MoEAdapter
from workers.objectives import objective_from_spec, prepare_reference
from workers.patch import state_sha256, write_patch
from workers.routing import collect_topk, routing_overlap
from workers.scope import apply_scope
from workers.selection import select_experts
from workers.spec import CorpusRef, JobSpec
from workers.train import StepInfo, forget_loss_check, train

STAGES = (
    "loading",
    "evaluating_before",
    "attribution",
    "unlearning",
    "evaluating_after",
    "packaging",
)
# Routing overlap and loss checks use at most this many samples: enough for a stable mean.
OVERLAP_SAMPLES = 256


class Reporter(Protocol):
    """Where a job's progress goes (a progress bar, the service's event table...)."""

    def stage(self, name: str) -> None: ...

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None: ...


class SilentReporter:
    def stage(self, name: str) -> None:
        pass

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        pass


CorpusResolver = Callable[[str], Path]  # corpus_id (SHA-256) -> local file


@dataclass
class LoadedJob:
    """Everything the stages share: the model, its tokenizer and adapter, the corpora."""

    spec: JobSpec
    model: nn.Module
    tokenizer: Any
    adapter: MoEAdapter
    model_ref: str  # what was loaded: a path or hub id
    forget_records: list
    retain_records: list | None
    world: Any = None  # workers.world.World for the demo model
    timings: dict[str, float] = field(default_factory=dict)


def _corpus_path(ref: CorpusRef, world: Any, resolver: CorpusResolver | None) -> Path:
    if ref.demo is not None:
        return Path(world.corpus_path(ref.demo))
    if ref.corpus_id is not None:
        if resolver is None:
            raise ValueError("corpus_id needs the service's corpus store (use a path instead)")
        return resolver(ref.corpus_id)
    assert ref.path is not None
    return Path(ref.path)


def load_job(
    spec: JobSpec,
    corpus_resolver: CorpusResolver | None = None,
    world_progress: Callable[[str], None] | None = None,
) -> LoadedJob:
    """Load the model and read the corpora. User errors raise ValueError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = None
    if spec.model == "demo":
        from workers.world import build_world

        world = build_world(spec.world, progress=world_progress)
        model_ref = str(world.model_dir)
    else:
        model_ref = spec.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_ref)
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32)
    except OSError as e:
        raise ValueError(f"model {model_ref!r} could not be loaded: {e}") from e
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = get_adapter(model)

    def records(ref: CorpusRef, name: str) -> list:
        path = _corpus_path(ref, world, corpus_resolver)
        try:
            return read_corpus(path, ref.format, ref.text_field, ref.max_records)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e

    forget = records(spec.forget, "forget")
    retain = records(spec.retain, "retain") if spec.retain is not None else None
    return LoadedJob(spec, model, tokenizer, adapter, model_ref, forget, retain, world)


def _tokenized(job: LoadedJob, records: list, loss_tokens: str) -> TokenizedCorpus:
    return tokenize(records, job.tokenizer, job.spec.training.max_length, loss_tokens)


def _attribution_tokens(records: list, positions: str) -> str:
    if positions == "all":
        return "all"
    has_answers = bool(records) and all(r.has_answer for r in records)
    if positions == "answer" and not has_answers:
        raise ValueError("seuf.attribution_positions 'answer' needs prompt + answer records")
    return "answer" if has_answers else "all"


def _sampled_batches(corpus: TokenizedCorpus, batch_size: int, seed: int) -> list[dict]:
    """The corpus in a seeded random order: attribution's calibration sample is the prefix
    that fits the token budget."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(corpus), generator=g).tolist()
    return [corpus.collate(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def evaluate(
    job: LoadedJob, forget: TokenizedCorpus, retain: TokenizedCorpus | None
) -> dict[str, Any]:
    """Forget and utility scores of the model as it is now: the demo world's question
    accuracies, any lm-eval tasks, and always the per-token NLL of (a sample of) the
    forget and retain corpora."""
    ev = job.spec.evaluation
    bs = job.spec.training.batch_size
    n_batches = max(1, OVERLAP_SAMPLES // bs)
    out: dict[str, Any] = {
        "forget_nll": forget_loss_check(forget.in_order(bs)[:n_batches])(job.model)["forget_loss"]
    }
    if retain is not None:
        check = forget_loss_check(retain.in_order(bs)[:n_batches])
        out["retain_nll"] = check(job.model)["forget_loss"]
    if job.world is not None:
        from workers.evaluate import evaluate_world

        res = evaluate_world(job.model, job.tokenizer, job.world, ev.batch_size, backend=ev.backend)
        out.update(res)
    if ev.tasks or ev.forget_tasks:
        from workers.evaluate import evaluate_tasks

        names = list(dict.fromkeys([*ev.forget_tasks, *ev.tasks]))
        scores = evaluate_tasks(job.model, job.tokenizer, names, ev.limit, ev.batch_size)
        out["tasks"] = scores
        if ev.forget_tasks and "forget_accuracy" not in out:
            out["forget_accuracy"] = sum(scores[t] for t in ev.forget_tasks) / len(ev.forget_tasks)
        if ev.tasks and "utility_accuracy" not in out:
            out["utility_accuracy"] = sum(scores[t] for t in ev.tasks) / len(ev.tasks)
    return out


def run_job(
    spec: JobSpec,
    output_dir: str | Path,
    reporter: Reporter | None = None,
    corpus_resolver: CorpusResolver | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run one unlearning job and write its outputs to `output_dir`. Returns result.json's
    content. `should_stop()` is polled every step (cancellation)."""
    rep = reporter or SilentReporter()
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        if timings:
            timings[list(timings)[-1]] = round(now - clock, 3)
        clock = now
        timings[name] = 0.0
        if name != "done":  # "done" only closes the last stage's timing
            rep.stage(name)

    stage("loading")
    job = load_job(spec, corpus_resolver)
    model, adapter, tr = job.model, job.adapter, spec.training
    forget_train = _tokenized(job, job.forget_records, spec.objective.loss_tokens)
    retain_train = (
        _tokenized(job, job.retain_records, spec.objective.loss_tokens)
        if job.retain_records is not None
        else None
    )
    base_sha = state_sha256(model.state_dict())

    stage("evaluating_before")
    before = evaluate(job, forget_train, retain_train)
    rep.event("evaluation", 0, {"phase": "before", **_scalars(before)})
    probe_forget = forget_train.in_order(tr.batch_size)[: max(1, OVERLAP_SAMPLES // tr.batch_size)]
    probe_retain = (
        retain_train.in_order(tr.batch_size)[: max(1, OVERLAP_SAMPLES // tr.batch_size)]
        if retain_train is not None
        else None
    )
    topk_forget = collect_topk(model, adapter, probe_forget)
    topk_retain = collect_topk(model, adapter, probe_retain) if probe_retain else None

    stage("attribution")
    f_batches, r_batches = attribution_batches(job)
    with torch.no_grad():
        emap = attribute(
            model,
            adapter,
            f_batches,
            retain_batches=r_batches,
            method=spec.seuf.attribution,
            token_budget=spec.seuf.token_budget,
            at_loss_positions=True,
        )
    selected = select_experts(emap, spec.seuf) if spec.scope != "full" else []
    pairs = [(s.layer, s.expert) for s in selected]
    rep.event(
        "experts_selected",
        0,
        {"method": emap.method, "selected": [s._asdict() for s in selected]},
    )

    stage("unlearning")
    layers = adapter.moe_layers()
    scope = apply_scope(model, adapter, spec.scope, pairs)
    touched = sorted({r.name for r in scope.regions})
    before_state = _snapshot(model, touched)
    objective = objective_from_spec(spec, adapter, pairs, layers=layers)
    prepare_reference(objective, model, forget_train, retain_train, seed=tr.seed)
    stop_check = _stop_check(job, forget_train)

    def on_step(info: StepInfo) -> bool:
        rep.event("step", info.step, info.to_json())
        return bool(should_stop and should_stop())

    from workers.activation_cache import build_for_training
    from workers.data import BatchStream

    cache, cache_info = None, None
    if tr.activation_cache:
        corpora = [c for c in (forget_train, retain_train) if c is not None]
        cache, _plan = build_for_training(
            model,
            scope.adapter or adapter,
            objective,
            corpora,
            batch_size=tr.batch_size,
            max_bytes=tr.activation_cache_max_mb * 2**20,
            spill_dir=out_dir,
        )
    try:
        result = train(
            model,
            adapter,
            scope,
            objective,
            BatchStream(forget_train, tr.batch_size, tr.seed),
            BatchStream(retain_train, tr.batch_size, tr.seed + 1) if retain_train else None,
            tr,
            callback=on_step,
            stop_check=stop_check,
            routing_reference=topk_forget,
            routing_batches=probe_forget,
            overlap_every=tr.stop.eval_every,
            activation_cache=cache,
        )
    finally:
        if cache is not None:
            cache_info = {
                "layer": _plan.layer,
                "samples": _plan.cached_samples,
                "memory_bytes": _plan.memory_bytes,
                "disk_bytes": _plan.disk_bytes,
                "hits": cache.stats.hits,
                "misses": cache.stats.misses,
            }
            cache.close()
    trainable, total, ratio = scope.trainable_params, scope.total_params, scope.ratio
    expert_dims = scope.expert_dims()
    scope.bake()
    if result.stopped_by == "callback":
        raise JobCancelled(result.steps)

    stage("evaluating_after")
    after = evaluate(job, forget_train, retain_train)
    rep.event("evaluation", result.steps, {"phase": "after", **_scalars(after)})
    overlap_forget = routing_overlap(model, adapter, probe_forget, topk_forget)
    overlap_retain = (
        routing_overlap(model, adapter, probe_retain, topk_retain)
        if probe_retain and topk_retain is not None
        else None
    )

    stage("packaging")

    def close_timings() -> dict[str, float]:
        stage("done")
        timings.pop("done")
        return timings

    return write_outputs(
        job,
        out_dir,
        emap=emap,
        selected=selected,
        before=before,
        after=after,
        overlap_forget=overlap_forget,
        overlap_retain=overlap_retain,
        before_state=before_state,
        expert_dims=expert_dims,
        base_sha=base_sha,
        counts=(trainable, total, ratio),
        steps=result.steps,
        stopped_by=result.stopped_by,
        cache_info=cache_info,
        close_timings=close_timings,
    )


def attribution_batches(job: LoadedJob) -> tuple[list[dict], list[dict] | None]:
    """The forget (and retain) calibration batches attribution reads, in the seeded order
    whose prefix fits the token budget (the same on every rank of a distributed run)."""
    spec, tr = job.spec, job.spec.training
    positions = spec.seuf.attribution_positions
    f_attr = _tokenized(job, job.forget_records, _attribution_tokens(job.forget_records, positions))
    r_attr = (
        _tokenized(job, job.retain_records, _attribution_tokens(job.retain_records, positions))
        if job.retain_records is not None
        else None
    )
    f_batches = _sampled_batches(f_attr, tr.batch_size, tr.seed)
    r_batches = _sampled_batches(r_attr, tr.batch_size, tr.seed) if r_attr else None
    return f_batches, r_batches


def write_outputs(
    job: LoadedJob,
    out_dir: Path,
    *,
    emap: ExpertMap,
    selected: list,
    before: dict[str, Any],
    after: dict[str, Any],
    overlap_forget: float | None,
    overlap_retain: float | None,
    before_state: dict[str, torch.Tensor],
    expert_dims: dict[str, int],
    base_sha: str,
    counts: tuple[int, int, float],
    steps: int,
    stopped_by: str,
    cache_info: dict[str, Any] | None,
    close_timings: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """The packaging stage: expert patch, unlearned model + tokenizer, expert map, spec and
    result.json, from `job.model` (plain, scope baked). Returns result.json's content.
    `before_state` holds the touched tensors before training (names = the patch's)."""
    spec, model = job.spec, job.model
    state = model.state_dict()
    after_state = {n: state[n].detach().clone() for n in before_state}
    patched_sha = state_sha256(state)
    patch = write_patch(
        out_dir / "expert_patch.safetensors",
        before_state,
        after_state,
        expert_dims,
        base_sha256=base_sha,
        patched_sha256=patched_sha,
    )
    model.save_pretrained(out_dir / "model")
    job.tokenizer.save_pretrained(out_dir / "model")
    (out_dir / "expert_map.json").write_text(json.dumps(emap.to_json(), indent=1))
    (out_dir / "spec.json").write_text(json.dumps(spec.resolved(), indent=1))
    timings = close_timings()
    trainable, total, ratio = counts
    res: dict[str, Any] = {
        "model": job.model_ref,
        "base_model_sha256": base_sha,
        "unlearned_model_sha256": patched_sha,
        "algorithm": spec.algorithm,
        "scope": spec.scope,
        "attribution": emap.method,
        "selected": [s._asdict() for s in selected],
        "diagnostics": [d.__dict__ for d in emap.diagnostics],
        "before": before,
        "after": after,
        "routing_overlap_forget": overlap_forget,
        "routing_overlap_retain": overlap_retain,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "tunable_ratio": ratio,
        "steps": steps,
        "stopped_by": stopped_by,
        "changed": patch.to_json()["regions"],
        "activation_cache": cache_info,
        "timings_s": timings,
        "output_dir": str(out_dir.resolve()),
    }
    (out_dir / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return res


class JobCancelled(Exception):
    """The job was asked to stop; nothing was written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled at step {step}")
        self.step = step


def _stop_check(
    job: LoadedJob, forget_train: TokenizedCorpus
) -> Callable[[nn.Module], dict[str, float]] | None:
    """Forget accuracy on the world's forget questions (demo), else the forget NLL."""
    stop = job.spec.training.stop
    if stop.forget_accuracy_target is None and stop.forget_loss_target is None:
        return None
    loss_check = forget_loss_check(forget_train.in_order(job.spec.training.batch_size)[:8])
    if stop.forget_accuracy_target is None:
        return loss_check
    if job.world is None:
        raise ValueError(
            "training.stop.forget_accuracy_target needs the demo world's questions; "
            "use forget_loss_target for other models"
        )
    from workers.evaluate import score_questions

    questions = job.world.question_set("forget")

    def check(model: nn.Module) -> dict[str, float]:
        hits = score_questions(model, job.tokenizer, questions, job.spec.evaluation.batch_size)
        return {"forget_accuracy": sum(hits) / len(hits), **loss_check(model)}

    return check


def _snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named tensors (a fused expert tensor wired by workers.scope keeps its
    name and its values until the scope is baked)."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in names}


def _scalars(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def expert_map_of(output_dir: str | Path) -> ExpertMap:
    return ExpertMap.from_json(json.loads((Path(output_dir) / "expert_map.json").read_text()))
