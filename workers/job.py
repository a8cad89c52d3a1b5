"""What every stage of a job shares: the loaded job (model, tokenizer, adapter, corpora),
tokenization, attribution's calibration batches, evaluation and the stop check. Used by
the one pipeline (workers/pipeline.py) on every runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from workers.data import Batch, TokenizedCorpus, read_corpus, tokenize
from workers.mapped import pages_released_while_loading
from workers.model_source import (
    PATCH_FILE,
    ModelSource,
    is_patch_output,
    read_base_ref,
    resolve,
)
from workers.moe import get_adapter
from workers.moe.base import MoEAdapter
from workers.partitioned import state_tensors
from workers.spec import CorpusRef, JobSpec
from workers.train import forget_loss_check

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


class JobCancelled(Exception):
    """The job was asked to stop; nothing was written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled at step {step}")
        self.step = step


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
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # what the weights were loaded (and trained) in
    revision: str | None = None  # what reloads the same weights (a hub id's pinned commit)
    model_commit: str | None = None  # the resolved commit the results record

    @property
    def base_dtype(self) -> torch.dtype:
        """The checkpoint's own dtype: what the outputs are written in."""
        return getattr(self.model, "base_dtype", self.dtype)

    def tokenized(self, records: list, loss_tokens: str) -> TokenizedCorpus:
        corpus = tokenize(records, self.tokenizer, self.spec.training.max_length, loss_tokens)
        corpus.device = str(self.device)  # batches, probes and references on the worker's device
        return corpus

    def training_corpora(self) -> tuple[TokenizedCorpus, TokenizedCorpus | None]:
        """The forget and retain corpora (None: no retain data) as the objective trains on
        them (its loss tokens)."""
        tokens = self.spec.objective.loss_tokens
        forget = self.tokenized(self.forget_records, tokens)
        retain = (
            self.tokenized(self.retain_records, tokens) if self.retain_records is not None else None
        )
        return forget, retain


def overlap_probe(corpus: TokenizedCorpus, batch_size: int) -> list[Batch]:
    """The corpus's first OVERLAP_SAMPLES, in order: the batches routing overlap and the
    evaluation's per-token NLL are measured on, the same before and after unlearning."""
    return corpus.in_order(batch_size)[: max(1, OVERLAP_SAMPLES // batch_size)]


def corpus_path(ref: CorpusRef, world: Any, resolver: CorpusResolver | None) -> Path:
    if ref.demo is not None:
        return Path(world.corpus_path(ref.demo))
    if ref.corpus_id is not None:
        if resolver is None:
            raise ValueError("corpus_id needs the service's corpus store (use a path instead)")
        return resolver(ref.corpus_id)
    assert ref.path is not None
    return Path(ref.path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _base_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint is stored in (config.json's dtype / torch_dtype; float32 if
    it says nothing): what the unlearned model and the expert patch are written in."""
    raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(raw, torch.dtype):
        return raw
    if isinstance(raw, str) and isinstance(getattr(torch, raw, None), torch.dtype):
        return getattr(torch, raw)
    return torch.float32


def _refuse_pickle(model_ref: str) -> None:
    """Weights load from safetensors only: a pickle checkpoint can run code when read."""
    folder = Path(model_ref)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"model {model_ref!r} has only pickle weights ({', '.join(pickles[:3])}); "
            "they are refused (loading one can run code): convert it to safetensors"
        )


def _refuse_quantized(model_ref: str, config: Any) -> None:
    """A quantised checkpoint (GPT-OSS ships its experts in MXFP4) cannot train its slices
    in place, and dequantising the whole model would hold it in bfloat16 anyway: refused,
    with the way out."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    raise ValueError(
        f"model {model_ref!r} is quantised ({method or 'unknown method'}; GPT-OSS ships its "
        "experts in MXFP4): unlearning trains expert slices in bfloat16 or float32, so "
        "dequantise the checkpoint to bfloat16 first (e.g. transformers' Mxfp4Config("
        "dequantize=True), then save_pretrained) and name that copy"
    )


def device_map_for(where: torch.device) -> dict[str, torch.device] | None:
    """from_pretrained's device_map: straight onto an accelerator; None on the CPU, and
    under a ZeRO-3 sharded load (zero.Init places each partition on the accelerator
    itself, and transformers refuses a device_map there)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if where.type == "cpu" or is_deepspeed_zero3_enabled():
        return None
    return {"": where}


def load_model(
    model_ref: str,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | None = None,
    revision: str | None = None,
) -> tuple[nn.Module, Any]:
    """A causal LM (eval mode) loaded once, in `dtype` (None: the checkpoint's own), straight
    onto `device`, from safetensors only and never with remote code, and its tokenizer (pad
    = eos if it has none). The model's `base_dtype` attribute is the dtype its checkpoint
    is stored in. `revision` goes to every from_pretrained (pin it: `open_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _refuse_pickle(model_ref)
    where = device or torch.device("cpu")
    try:
        config = AutoConfig.from_pretrained(model_ref, revision=revision, trust_remote_code=False)
        _refuse_quantized(model_ref, config)
        base_dtype = _base_dtype(config)
        dtype = dtype or base_dtype
        tokenizer = AutoTokenizer.from_pretrained(
            model_ref, revision=revision, trust_remote_code=False
        )
        with pages_released_while_loading():  # the file's pages are not held twice
            model = AutoModelForCausalLM.from_pretrained(
                model_ref,
                config=config,
                revision=revision,
                dtype=dtype,
                device_map=device_map_for(where),
                use_safetensors=True,
                trust_remote_code=False,
            )
    except OSError as e:
        raise ValueError(f"model {model_ref!r} could not be loaded: {e}") from e
    model.eval()
    model.base_dtype = base_dtype
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# A chain of patch-only outputs (each job's base is the previous job's output) longer than
# this is refused: bounded work per load (service.lineage cuts its walk there too).
MAX_PATCH_CHAIN = 64


def open_model(
    model_ref: str,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[nn.Module, Any, ModelSource]:
    """`load_model` of a resolved source (a hub id pinned to the commit `revision` names),
    or of a patch-only job's output: its base (followed back through earlier patch-only
    outputs) with every patch applied, each checked against its base and patched SHA-256."""
    folder = Path(model_ref)
    if not (folder.is_dir() and is_patch_output(folder)):
        src = resolve(model_ref, revision)
        model, tokenizer = load_model(src.ref, dtype, device, src.revision)
        return model, tokenizer, src
    if revision is not None:
        raise ValueError(
            f"model {model_ref!r} is a patch-only job output (its base is pinned already): "
            "drop `revision`"
        )
    return _patched(folder, dtype, device)


def _patched(
    folder: Path, dtype: torch.dtype, device: torch.device | None
) -> tuple[nn.Module, Any, ModelSource]:
    from workers.patch import apply_patch, state_sha256

    links: list[tuple[Path, dict[str, Any]]] = []
    named = str(folder)
    while is_patch_output(folder):
        if len(links) == MAX_PATCH_CHAIN:
            raise ValueError(f"more than {MAX_PATCH_CHAIN} patch-only outputs in a chain")
        ref = read_base_ref(folder)
        links.append((folder, ref))
        folder = Path(ref["model"])
    links.reverse()  # the root base first
    root = links[0][1]
    src = resolve(root["model"], root["revision"])
    # In the checkpoint's own dtype: the patch's hashes are of that dtype's bytes.
    model, tokenizer = load_model(src.ref, None, None, src.revision)
    state = model.state_dict()
    have = state_sha256(state)
    for out, ref in links:
        if have != ref["base_model_sha256"]:
            raise ValueError(
                f"{out}: its base model has SHA-256 {have[:12]}, the patch was made for "
                f"{ref['base_model_sha256'][:12]}: the base changed since"
            )
        patch = apply_patch(state, out / PATCH_FILE)
        have = state_sha256(state)
        if have != patch.patched_model_sha256 or have != ref["patched_model_sha256"]:
            raise ValueError(f"{out}: the patched model's SHA-256 differs from the recorded one")
    model.to(device or torch.device("cpu"), dtype)
    # Reloaded by its own name (no revision); the commit recorded is the root base's.
    return model, tokenizer, ModelSource(named, None, src.commit)


def load_job(
    spec: JobSpec,
    corpus_resolver: CorpusResolver | None = None,
    world_progress: Callable[[str], None] | None = None,
) -> LoadedJob:
    """Load the model and read the corpora. User errors raise ValueError."""
    world = None
    if spec.model == "demo":
        from workers.world import build_world

        world = build_world(spec.world, progress=world_progress)
        model_ref = str(world.model_dir)
    else:
        model_ref = spec.model
    from workers.devices import resolve_device, resolve_dtype

    device = resolve_device(spec.distributed.device)
    dtype = resolve_dtype(spec.training.dtype, device)
    model, tokenizer, src = open_model(model_ref, spec.revision, dtype, device)
    adapter = get_adapter(model)

    def records(ref: CorpusRef, name: str) -> list:
        path = corpus_path(ref, world, corpus_resolver)
        try:
            return read_corpus(path, ref.format, ref.text_field, ref.max_records)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e

    forget = records(spec.forget, "forget")
    retain = records(spec.retain, "retain") if spec.retain is not None else None
    return LoadedJob(
        spec, model, tokenizer, adapter, model_ref, forget, retain, world, device, dtype,
        revision=src.revision, model_commit=src.commit,
    )


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


def attribution_batches(job: LoadedJob) -> tuple[list[dict], list[dict] | None]:
    """The forget (and retain) calibration batches attribution reads, in the seeded order
    whose prefix fits the token budget (the same on every rank of a distributed run)."""
    spec, tr = job.spec, job.spec.training
    positions = spec.seuf.attribution_positions
    f_attr = job.tokenized(job.forget_records, _attribution_tokens(job.forget_records, positions))
    r_attr = (
        job.tokenized(job.retain_records, _attribution_tokens(job.retain_records, positions))
        if job.retain_records is not None
        else None
    )
    f_batches = _sampled_batches(f_attr, tr.batch_size, tr.seed)
    r_batches = _sampled_batches(r_attr, tr.batch_size, tr.seed) if r_attr else None
    return f_batches, r_batches


def evaluate(
    job: LoadedJob, forget: TokenizedCorpus, retain: TokenizedCorpus | None
) -> dict[str, Any]:
    """Forget and utility scores of the model as it is now: the demo world's question
    accuracies, any lm-eval tasks, and always the per-token NLL of (a sample of) the
    forget and retain corpora."""
    ev = job.spec.evaluation
    bs = job.spec.training.batch_size
    out: dict[str, Any] = {
        "forget_nll": forget_loss_check(overlap_probe(forget, bs))(job.model)["forget_loss"]
    }
    if retain is not None:
        check = forget_loss_check(overlap_probe(retain, bs))
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
        if not scores:  # a lockstep rank: rank 0 has the scores (workers.evaluate)
            return out
        if ev.forget_tasks and "forget_accuracy" not in out:
            out["forget_accuracy"] = sum(scores[t] for t in ev.forget_tasks) / len(ev.forget_tasks)
        if ev.tasks and "utility_accuracy" not in out:
            out["utility_accuracy"] = sum(scores[t] for t in ev.tasks) / len(ev.tasks)
    return out


def stop_check_for(
    job: LoadedJob, forget_train: TokenizedCorpus, retain_train: TokenizedCorpus | None = None
) -> Callable[[nn.Module], dict[str, float]] | None:
    """Forget accuracy on the world's forget questions (demo), else the forget NLL. With
    the utility guard (training.stop.utility_drop_tolerance) also what it reads: utility
    accuracy on (a sample of) the demo world's retain-pool questions, what the retain data
    covers (never the unseen questions: those are the evaluation's held-out set), and the
    retain NLL on a few fixed retain batches when there is retain data."""
    stop, bs = job.spec.training.stop, job.spec.training.batch_size
    if stop.forget_accuracy_target is None and stop.forget_loss_target is None:
        return None
    if stop.forget_accuracy_target is not None and job.world is None:
        raise ValueError(
            "training.stop.forget_accuracy_target needs the demo world's questions; "
            "use forget_loss_target for other models"
        )
    from workers.evaluate import score_questions

    forget_loss = forget_loss_check(forget_train.in_order(bs)[:8])
    guarded = stop.utility_drop_tolerance is not None
    retain_loss = (
        forget_loss_check(retain_train.in_order(bs)[:8])
        if guarded and retain_train is not None
        else None
    )
    forget_q = job.world.question_set("forget") if stop.forget_accuracy_target is not None else []
    utility_q = _spread(job.world.question_set("retain"), OVERLAP_SAMPLES) if (
        guarded and job.world is not None) else []  # fmt: skip
    if guarded and retain_loss is None and not utility_q:
        raise ValueError(
            "training.stop.utility_drop_tolerance needs retain data or the demo world's "
            "retain questions"
        )

    def accuracy(model: nn.Module, questions: list[dict[str, Any]]) -> float:
        hits = score_questions(model, job.tokenizer, questions, job.spec.evaluation.batch_size)
        return sum(hits) / len(hits)

    def check(model: nn.Module) -> dict[str, float]:
        out = forget_loss(model)
        if forget_q:
            out["forget_accuracy"] = accuracy(model, forget_q)
        if utility_q:
            out["utility_accuracy"] = accuracy(model, utility_q)
        if retain_loss is not None:
            out["retain_loss"] = retain_loss(model)["forget_loss"]
        return out

    return check


def _spread(items: list[Any], n: int) -> list[Any]:
    """At most n items, evenly spaced (every topic of a topic-ordered list keeps its share)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named tensors (a fused expert tensor wired by workers.scope keeps its
    name and its values until the scope is baked)."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in names}


def snapshot_regions(
    model: nn.Module,
    regions: list[Any],
    keep: bool = True,
    read: Callable[[list[str]], Iterator[tuple[str, torch.Tensor]]] | None = None,
) -> dict[tuple[str, int | None], torch.Tensor]:
    """Copies of the scope's regions only (workers.scope.Region: an expert's slice of a fused
    tensor, or a whole tensor): for SEUF a few slices, never the whole fused tensors. Read
    one tensor at a time (a partitioned one gathered for its turn: collective) from the
    model's state dict, or from `read(names)` (a TrainableScope.baked_tensors: the trained
    state without baking); keep=False takes part in the gathers and keeps nothing (the
    other ranks)."""
    by_name: dict[str, list[Any]] = {}
    for r in regions:
        by_name.setdefault(r.name, []).append(r)
    out: dict[tuple[str, int | None], torch.Tensor] = {}
    tensors = read or (lambda names: state_tensors(model, names))
    for name, t in tensors(list(by_name)):
        for r in by_name[name] if keep else []:
            out[(r.name, r.expert)] = (t if r.expert is None else t[r.expert]).clone()
    return out


def scalars(d: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}
