"""Build and train the demo world's tiny MoE on CPU until it knows every topic.

Model: a transformers MoE built from config only (Qwen2-MoE layout by default, with NO
shared expert: a dense shared path would absorb the facts of every topic and leave
nothing for the routed experts to specialise on). Training: causal LM loss on every token
of the training sentences (all topics), answer token weighted up, AdamW, checked after
each epoch with the direct scorer of `workers.evaluate`; stops once every topic is at
`target_accuracy` on its training-phrasing questions (after `min_epochs`), or after
`max_epochs`. No wall clock: the same settings build the same world on a slow machine.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.moe.tiny import tiny_config
from workers.world.generate import WorldData

Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class PretrainSettings:
    """Model size and training budget; part of the world's cache hash."""

    hidden_size: int = 256
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_size: int = 256  # intermediate size of one routed expert
    num_heads: int = 4
    shared_expert_size: int = 0  # qwen2_moe only; 0 = no shared expert
    lr: float = 3e-3
    batch_size: int = 64
    answer_weight: float = 4.0  # the answer token counts this many times in the loss
    router_aux_coef: float = 0.01  # load balancing during pretraining only
    # Share of a per-topic direction in the initial embedding of the topic's own words
    # (subjects, answers, marker, relation). Real LLMs' embeddings cluster by domain; a
    # random init does not, and routing then follows single facts instead of topics.
    topic_embedding_mix: float = 0.5
    # Router rows of expert (topic % E), every MoE layer, start aligned with the topic's
    # embedding direction, adding about this much to that expert's logit on a topic word
    # (needs topic_embedding_mix > 0). Two minutes of CPU pretraining do not make experts
    # specialise by topic on their own (bench/world_specialisation.py); this seeds it.
    topic_router_margin: float = 8.0
    target_accuracy: float = 0.98  # stop when every topic reaches it (training phrasing)
    min_epochs: int = 4
    max_epochs: int = 60
    threads: int = 1  # 1 thread beats 2 on a shared 2-core box (measured 10x)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Small enough for unit tests (hidden <= 64) but still memorises a 6 x 12 world.
TINY_SETTINGS = PretrainSettings(
    hidden_size=64, num_layers=2, num_experts=4, expert_size=64, num_heads=4, lr=1e-2,
    batch_size=32, min_epochs=3, max_epochs=120,
)  # fmt: skip

# `world.size: small`: the tiny model with one expert per topic of the default 6-topic world
# (so forgetting one topic's expert leaves the other topics' experts alone).
SMALL_SETTINGS = PretrainSettings(
    hidden_size=64, num_layers=2, num_experts=8, expert_size=64, num_heads=4, lr=1e-2,
    batch_size=32, min_epochs=3, max_epochs=120,
)  # fmt: skip
PRESETS: dict[str, PretrainSettings] = {"full": PretrainSettings(), "small": SMALL_SETTINGS}

# Field names of E and the expert width differ per family.
_EXPERT_FIELDS: dict[str, tuple[str, str]] = {
    "qwen2_moe": ("num_experts", "moe_intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
    "mixtral": ("num_local_experts", "intermediate_size"),
    "deepseek_v2": ("n_routed_experts", "moe_intermediate_size"),
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size"),
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(_EXPERT_FIELDS)


def world_model_config(arch: str, vocab_size: int, s: PretrainSettings) -> Any:
    """The config of the world's model for `arch` (a model_type)."""
    if arch not in _EXPERT_FIELDS:
        raise ValueError(
            f"arch {arch!r} is not supported for the demo world; choose one of "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )
    e_field, i_field = _EXPERT_FIELDS[arch]
    over: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_heads,
        "num_experts_per_tok": s.top_k,
        "intermediate_size": 2 * s.hidden_size,
        "initializer_range": 0.02,
        "max_position_embeddings": 128,
        "output_router_logits": False,  # consumers opt in; the aux loss is pretraining-only
        e_field: s.num_experts,
        i_field: s.expert_size,
    }
    if arch == "qwen2_moe":
        over["shared_expert_intermediate_size"] = s.shared_expert_size
    if arch in ("qwen3_moe",):
        over["head_dim"] = s.hidden_size // s.num_heads
    if arch.startswith("deepseek"):
        over.update(
            kv_lora_rank=max(16, s.hidden_size // 4), qk_rope_head_dim=16, qk_nope_head_dim=16,
            v_head_dim=s.hidden_size // s.num_heads, n_shared_experts=0,
        )  # fmt: skip
    return tiny_config(arch, **over)


def _encode(tokenizer: PreTrainedTokenizerBase, world: WorldData) -> list[tuple[list[int], int]]:
    """(token ids, answer position) for every training sentence of every topic."""
    out: list[tuple[list[int], int]] = []
    for t in range(len(world.topics)):
        for rec in world.training_records(t):
            ids = tokenizer(str(rec["text"]), add_special_tokens=False)["input_ids"]
            n_prompt = len(tokenizer(str(rec["prompt"]), add_special_tokens=False)["input_ids"])
            out.append((ids, n_prompt))
    return out


def pretrain_world_model(
    world: WorldData,
    tokenizer: PreTrainedTokenizerBase,
    arch: str,
    settings: PretrainSettings,
    seed: int,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Train a fresh model on every topic; returns (model in eval mode, training stats)."""
    from transformers import AutoModelForCausalLM

    from workers.evaluate import score_questions

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        torch.manual_seed(seed)
        cfg = world_model_config(arch, len(tokenizer), settings)
        with warnings.catch_warnings():
            # qwen2_moe with shared_expert_size 0 builds empty Linear layers: harmless
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            model = AutoModelForCausalLM.from_config(cfg)
        if settings.topic_embedding_mix > 0:
            dirs = _topic_embedding_init(
                model, tokenizer, world, settings.topic_embedding_mix, seed
            )
            if settings.topic_router_margin > 0:
                _topic_router_init(model, dirs, settings.topic_router_margin)
        if hasattr(model, "set_experts_implementation"):
            # grouped_mm: 4x faster than the per-expert loop on CPU, same gradients.
            model.set_experts_implementation("grouped_mm")
        data = _encode(tokenizer, world)
        questions = [
            q for t in range(len(world.topics)) for q in world.question_records(t)
            if q["phrasing"] == "train"
        ]  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(data) / settings.batch_size)
        total = steps_per_epoch * settings.max_epochs
        warm = steps_per_epoch  # one epoch of warmup
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1 - s / total)
        )
        rng = random.Random(seed)
        start = time.monotonic()  # reported only; never a stop rule
        stats: dict[str, Any] = {"epochs": 0, "steps": 0}
        per_topic: dict[int, float] = {}
        for epoch in range(settings.max_epochs):
            model.train()
            order = list(range(len(data)))
            rng.shuffle(order)
            loss_sum = 0.0
            for b in range(0, len(order), settings.batch_size):
                batch = [data[i] for i in order[b : b + settings.batch_size]]
                loss = _batch_loss(model, batch, tokenizer.pad_token_id, settings)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                stats["steps"] += 1
                loss_sum += float(loss.detach())
            stats["epochs"] = epoch + 1
            model.eval()
            correct = score_questions(model, tokenizer, questions, batch_size=256)
            per_topic = _per_topic(questions, correct)
            elapsed = time.monotonic() - start
            if progress is not None:
                progress(
                    "pretrain",
                    {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch,
                     "min_topic_accuracy": min(per_topic.values()), "seconds": elapsed},
                )  # fmt: skip
            done = min(per_topic.values()) >= settings.target_accuracy
            if done and epoch + 1 >= settings.min_epochs:
                break
        stats["seconds"] = round(time.monotonic() - start, 1)
        stats["train_accuracy_per_topic"] = per_topic
        model.eval()
        return model, stats
    finally:
        torch.set_num_threads(prev_threads)


def _topic_embedding_init(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    world: WorldData,
    mix: float,
    seed: int,
) -> torch.Tensor:
    """emb[w] = sqrt(mix) * d_topic + sqrt(1 - mix) * emb[w] for every word of a topic
    (d_topic drawn at the embedding's own scale, so norms are kept on average)."""
    if not 0.0 < mix < 1.0:
        raise ValueError(f"topic_embedding_mix must be in [0, 1) (got {mix})")
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed + 7919)
    scale = float(emb.detach().std())
    vocab = tokenizer.get_vocab()
    dirs: list[torch.Tensor] = []
    with torch.no_grad():
        for topic in world.topics:
            d = torch.randn(emb.shape[1], generator=g) * scale
            words = [topic.style.marker, topic.style.relation]
            # never-pretrained facts too: their words start out like the known ones
            facts = topic.facts + topic.untrained
            words += [w for f in facts for w in (f.subject, f.answer)]
            ids = torch.tensor([vocab[w] for w in words])
            emb[ids] = mix**0.5 * d + (1 - mix) ** 0.5 * emb[ids]
            dirs.append(d / d.norm())
    return torch.stack(dirs)  # [topics, hidden] unit topic directions


def _topic_router_init(model: PreTrainedModel, dirs: torch.Tensor, margin: float) -> None:
    """Add margin * sqrt(mix)-scaled topic direction to the router row of expert t % E in
    every MoE layer. The router sees RMS-normalised states (norm ~ sqrt(hidden)), so a unit
    direction times margin / sqrt(hidden) adds ~margin * sqrt(mix) to the logit."""
    from workers.moe import get_adapter

    adapter = get_adapter(model)
    params = dict(model.named_parameters())
    n_e, hidden = adapter.num_experts, dirs.shape[1]
    with torch.no_grad():
        for layer in adapter.moe_layers():
            for name in layer.router_params:
                w = params[name]
                if tuple(w.shape) != (n_e, hidden):
                    continue  # biases, correction terms
                for t in range(dirs.shape[0]):
                    w[t % n_e] += dirs[t] * margin / hidden**0.5


def _batch_loss(
    model: PreTrainedModel,
    batch: list[tuple[list[int], int]],
    pad_id: int,
    s: PretrainSettings,
) -> torch.Tensor:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weight = torch.zeros((len(batch), width - 1))
    for i, (seq, ans) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        weight[i, : len(seq) - 1] = 1.0
        weight[i, ans - 1] = s.answer_weight  # logits at ans-1 predict the answer token
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=s.router_aux_coef > 0)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = (nll * weight).sum() / weight.sum()
    aux = getattr(out, "aux_loss", None)
    if s.router_aux_coef > 0 and aux is not None:
        loss = loss + s.router_aux_coef * aux
    return loss


def _per_topic(questions: list[dict[str, Any]], correct: list[bool]) -> dict[int, float]:
    hits: dict[int, list[bool]] = {}
    for q, c in zip(questions, correct, strict=True):
        hits.setdefault(int(q["topic"]), []).append(c)
    return {t: sum(v) / len(v) for t, v in sorted(hits.items())}
