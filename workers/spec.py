"""The job spec: one pydantic model, used by `moe-unlearn run`, the REST API and the database.

No torch import here: the API process loads this module to validate requests.
Every field is documented where it is defined; `JobSpec.model_dump(mode="json")` is the
fully resolved form (all defaults filled in) that the service stores and hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from workers.spec_checks import EvaluationOptions, MembershipCheck
from workers.spec_types import (
    MAX_LAYER,
    MAX_STEPS,
    REVISION_PATTERN,
    Algorithm,
    AnchorReduction,
    AttributionMethod,
    Backend,
    CorpusRef,
    ExpertRef,
    LossTokens,
    NonNegInt,
    Scope,
    Seed,
    SelectionMode,
    Steps,
    Strict,
    Weight,
    WorldArch,
    WorldSize,
)


class WorldOptions(Strict):
    """The built-in demo world (used when `model` is "demo" or a corpus names a demo split)."""

    seed: NonNegInt = Field(0, description="Seed of the world generator and its pretraining.")
    topics: Annotated[int, Field(ge=2, le=32)] = Field(6, description="Number of topics.")
    facts_per_topic: Annotated[int, Field(ge=4, le=2000)] = Field(
        100, description="Facts per topic."
    )
    arch: WorldArch = Field("qwen2_moe", description="MoE family of the tiny model (a model_type).")
    forget_topic: NonNegInt = Field(0, description="Index of the topic to forget.")
    retain_topics: Annotated[int, Field(ge=1, le=31)] | None = Field(
        None,
        description="How many of the non-forget topics the demo retain corpus covers: the "
        "first k in topic order (null: all of them). Utility is then also reported on the "
        "topics it never covers (utility_accuracy_uncovered_topics). Needs retain: "
        "{demo: retain}; at most topics - 1.",
    )
    # An integer: a client picks from 65 worlds per (seed, topics, ...), not unboundedly many.
    topic_router_margin: Annotated[int, Field(ge=0, le=64)] | None = Field(
        None,
        description="How strongly pretraining seeds one expert per topic: the router rows of "
        "expert (topic mod E) start aligned with the topic's embedding direction, adding "
        "about this much to its logit on the topic's words (null: the size preset's, 8). "
        "Larger values build worlds whose knowledge sits in one expert per topic "
        "(localised, the case SEUF is for: at 24 most topics' best expert carries >= 0.7 "
        "of the topic's gate mass); 0 seeds nothing.",
    )
    size: WorldSize = Field(
        "full",
        description="full: the demo model (hidden 256, 4 layers, 8 experts); small: a hidden-64, "
        "2-layer, 8-expert model that pretrains in seconds on one CPU core (tests, quick "
        "demos; with facts_per_topic >= 50 every question set still has >= 50 questions). "
        "Both stop pretraining on an epoch count, never a wall clock.",
    )

    @model_validator(mode="after")
    def _topic_in_range(self) -> WorldOptions:
        if self.forget_topic >= self.topics:
            raise ValueError(
                f"forget_topic {self.forget_topic} out of range: the world has {self.topics} topics"
            )
        if self.retain_topics is not None and self.retain_topics > self.topics - 1:
            raise ValueError(
                f"retain_topics {self.retain_topics} out of range: the world has "
                f"{self.topics - 1} topics besides the forget topic"
            )
        return self


# seuf.retain_routing_weight auto, chosen on the quality sweep (README "Worlds nobody tuned
# it on"). Training selected experts: 100 (one expert, 3 worlds: overlap 0.965-0.975; 1000
# added <= 0.02 at 1.4-2.4x the steps, 120 of the examples' 150 on the demo world). Under
# auto's full fallback, where every parameter below a router moves what it reads: 1000
# held overlap >= 0.95 on 5-6 of 6 sweep worlds where 100 held 4, utility as kept, at 1.6x
# the steps.
RETAIN_ROUTING_WEIGHT = 100.0
RETAIN_ROUTING_WEIGHT_FALLBACK = 1000.0
# RMU, selected experts or its projected fallback: 1000. Its steering moves forget states far
# on purpose; what that also moves of retain routing, the loss charges back. One expert (the
# four localised sweep worlds where auto picks one): overlap 0.979-0.987 where weight 0 held
# 0.946-0.979, unseen and uncovered-topic utility as kept or better. The fallback (six sweep
# worlds): overlap up 0.01-0.02 on three, the same to two places on the rest, the target
# met on all six as with 0 (README "RMU and the retain routing loss").
RMU_RETAIN_ROUTING_WEIGHT = 1000.0
# seuf.fallback_rmu_patience: steps without progress (a new low of forget accuracy, else a
# new high of the forget loss) before RMU's projected fallback steers one layer higher
# (workers/rmu_climb.py). Well over the longest plateau a logged run crossed on its way to
# the target (78 steps; the flat start: 60), so it climbs only where forgetting has
# stopped (README "RMU climbs a layer").
RMU_PATIENCE = 200


class SeufOptions(Strict):
    """Selected-expert unlearning: which experts, how they are found, the router anchor."""

    num_experts: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="M: how many experts to unlearn (the paper uses 1), or auto (the default "
        "with selection top_m; other selection modes default to 1): experts by "
        "contrastive score until they carry `auto_min_share` of the forget gate mass at a "
        "forget/retain ratio >= `auto_min_ratio` (across layers if needed) within "
        "`parameter_budget`; when none qualifies, `fallback` decides (workers/selection.py).",
    )
    auto_min_share: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.7,
        description="auto: forget gate mass the selected experts must carry (one layer: their "
        "share of it; several: 1 - prod(1 - share per layer)). METHOD.md: one expert "
        "sufficed from ~0.7.",
    )
    auto_min_ratio: Annotated[float, Field(ge=1.0, le=1e6)] = Field(
        40.0,
        description="auto: forget/retain gate-mass ratio every selected expert must reach "
        "(METHOD.md: one expert sufficed from ~15x with a retain set covering every other "
        "topic; on the sweep, with retain data covering half the topics, experts at 22x and "
        "31x qualified and also served the uncovered topics (SEUF kept 0.91-0.94 of them "
        "where full parameters kept 0.995-1.00), while 48x (the tests' small world) and "
        "63-85x worked: the retain set is a proxy, and the margin is for what it does not "
        "cover).",
    )
    parameter_budget: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.1,
        description="auto: most trainable parameters (selected expert slices + their layers' "
        "routers) as a fraction of all parameters.",
    )
    fallback: Literal["widen", "full", "stop"] = Field(
        "full",
        description="auto, when no expert set within the budget qualifies (the job reports "
        "`selection_warning`): widen = the best-scoring experts that fill the budget; "
        "full = unlearn all parameters instead (at lr <= 1e-4; when the planner says that "
        "does not fit the worker, the job stops instead); stop = end the job before training.",
    )
    fallback_lr: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] = Field(
        "auto",
        description="The step size of the full fallback: all parameters need a smaller "
        "one than a few experts. auto: min(training.lr, the fallback's measured step size "
        "for the algorithm: 1e-4, RMU 1e-3; workers/seuf_plan.py).",
    )
    router_projection: Literal["auto", "none", "nullspace"] = Field(
        "auto",
        description="nullspace: project the trained routers' updates onto the null space of "
        "the retain hidden states at their layer (GRIP), so retain routing cannot move; "
        "auto: nullspace where it can run (a retain corpus, one worker, a scope that trains "
        "a router, after selection), else none; result.json's selection says which ran.",
    )
    router_projection_energy: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.99,
        description="nullspace: share of the retain hidden states' energy (squared singular "
        "values) whose directions the router may not change.",
    )
    fallback_projection: Literal["auto", "routers", "all"] = Field(
        "auto",
        description="auto's full fallback: routers = only the routers' updates are "
        "projected (router_projection decides); all = every matrix's update is projected "
        "onto the null space of the retain inputs it reads, and what no projector covers "
        "(embeddings, norms, the experts' down projections, biases) is held "
        "(workers/projected_fallback.py), so retain activations and routing hold at every "
        "layer; auto = all for RMU (on the sweep its fallback kept retain routing at "
        "0.93-0.99 where routers alone kept 0.71-0.83), routers otherwise (their fallback "
        "holds routing with the retain routing loss). all runs where router_projection "
        "nullspace can (a retain corpus, one worker, not ZeRO-3); auto falls back to "
        "routers elsewhere.",
    )
    fallback_rmu_patience: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        RMU_PATIENCE,
        description="RMU under fallback_projection all: after this many steps without "
        "progress (a new low of forget accuracy; where the check measures none, a new high "
        "of the forget loss), steer the next layer up (workers/rmu_climb.py); 0: never. "
        "Only where the fallback chose the layer (no objective.rmu_layer).",
    )
    rmu_second_attempt: bool = Field(
        True,
        description="RMU with num_experts auto, when its first attempt ends without "
        "meeting the forget target: put the original weights back and try the other kind "
        "of plan (after the projected fallback, the top expert as num_experts 1 on the "
        "spec's training; after qualified experts, the projected fallback where fallback "
        "full allows it); the job keeps the attempt that met the target, else the one "
        "closer to it (workers/attempt.py). Not under DeepSpeed.",
    )
    selection: SelectionMode = Field(
        "top_m",
        description="top_m: global top-M; in_layer: top-M within `layer`; per_layer: top-1 "
        "of every MoE layer; random: seeded random expert(s); manual: `experts`.",
    )
    layer: Annotated[int, Field(ge=0, le=MAX_LAYER)] | None = Field(
        None, description="Layer for selection=in_layer."
    )
    experts: list[ExpertRef] = Field(
        default_factory=list, max_length=1024, description="Experts for selection=manual."
    )
    attribution: AttributionMethod = Field(
        "auto",
        description="auto: contrastive when retain data is given, else the paper's affinity; "
        "affinity: mean gate score (paper); contrastive: forget minus retain gate mass at the "
        "loss positions; frequency: selection count (diagnostic).",
    )
    token_budget: Annotated[int, Field(gt=0, le=10_000_000)] = Field(
        100_000, description="Calibration tokens sampled from the forget corpus."
    )
    attribution_positions: Literal["auto", "answer", "all"] = Field(
        "auto",
        description="Token positions scored by attribution: auto = the answer-predicting "
        "positions of prompt/answer records (all tokens of text records); all = every token.",
    )
    anchor_weight: Weight = Field(1.0, description="alpha of the router anchor loss.")
    retain_routing_weight: Weight | Literal["auto"] = Field(
        "auto",
        description="w_rr of the retain routing loss: KL of every retain token's routing "
        "(its original top-K experts' gate probabilities and the rest of the mass) from the "
        "original model's, at every MoE layer from the lowest trained one up "
        "(workers/retain_routing.py); 0 = off. auto, with a retain corpus when the job asked "
        "for SEUF (scope seuf or router): 100, and 1000 when auto falls back to full "
        "parameters; for RMU 1000 on selected experts and under its projected fallback "
        "(fallback_projection all), off under an unprojected one; off for a job that asked "
        "for scope full or experts (the baselines).",
    )
    anchor_reduction: AnchorReduction = Field(
        "sum",
        description="sum: the paper's squared L2 over experts; mean: divided by E "
        "(what the authors' code computed).",
    )
    router_aux_loss: bool = Field(
        False, description="Keep the model's load-balancing aux loss during unlearning."
    )
    seed: Seed = Field(0, description="Seed of selection=random.")

    @model_validator(mode="after")
    def _mode_fields(self) -> SeufOptions:
        if self.selection == "in_layer" and self.layer is None:
            raise ValueError("selection 'in_layer' needs `layer`")
        if self.selection == "manual" and not self.experts:
            raise ValueError("selection 'manual' needs a non-empty `experts` list")
        if self.selection != "manual" and self.experts:
            raise ValueError("`experts` is only used with selection 'manual'")
        if self.num_experts == "auto" and self.selection != "top_m":
            if "num_experts" in self.model_fields_set:
                raise ValueError("num_experts 'auto' works with selection 'top_m' only")
            # The default follows the mode: auto picks by diagnostics, the other modes
            # name their experts, so their count defaults to the paper's one.
            self.num_experts = 1
        return self


class ObjectiveOptions(Strict):
    """Settings of the base unlearning objective (GA, GDiff, NPO, SimNPO, RMU)."""

    retain_weight: Weight = Field(
        1.0,
        description="lambda: weight of the retain NLL term (GDiff; NPO and SimNPO when a "
        "retain corpus is given). RMU weighs its retain term with rmu_alpha.",
    )
    beta: Annotated[float, Field(gt=0.0, le=1000.0)] = Field(
        0.1, description="NPO / SimNPO inverse temperature (paper: 0.001 on summed NLL)."
    )
    simnpo_delta: Annotated[float, Field(ge=-1000.0, le=1000.0)] = Field(
        0.0, description="SimNPO reward margin delta."
    )
    loss_tokens: LossTokens = Field(
        "all", description="all tokens, or only the answer tokens of prompt/answer records."
    )
    rmu_steering_coeff: Annotated[float, Field(gt=0.0, le=10_000.0)] = Field(
        20.0, description="RMU c: norm of the random steering target."
    )
    rmu_alpha: Weight = Field(
        100.0, description="RMU alpha_r: weight of the retain activation term."
    )
    rmu_layer: Annotated[int, Field(ge=0, le=MAX_LAYER)] | None = Field(
        None,
        description="RMU layer (default: the SEUF target layer plus rmu_layer_offset; the "
        "middle layer for scope full; a quarter of the way up under auto's full fallback "
        "with fallback_projection all: n_layers // 4, about the RMU paper's depth, layer 7 of 32).",
    )
    rmu_layer_offset: Annotated[int, Field(ge=0, le=MAX_LAYER)] = Field(
        0,
        description="Steer this many layers above the SEUF target layer (capped at the last "
        "layer). 1 lets one trained expert steer every answer position through the next "
        "layer's attention, not only the tokens routed to it.",
    )
    rmu_positions: Literal["all", "answer"] = Field(
        "all",
        description="Forget positions RMU steers: every real token, or the positions that "
        "predict an answer token (prompt/answer records).",
    )
    rmu_coeff_relative: bool = Field(
        False,
        description="True: the steering norm is rmu_steering_coeff times the steered block's "
        "mean output norm on the retain reference (comparable across models); False: "
        "rmu_steering_coeff itself.",
    )
    rmu_directions: Literal["shared", "per_sample"] = Field(
        "shared",
        description="RMU's steering target: one random direction for every forget sample (the "
        "RMU paper's), or a random direction per forget sample (seeded by the sample), so the "
        "steered output is no question-independent bias that leaves the answers' ranking.",
    )


class StopRule(Strict):
    """When training stops: the step budget, or a forget target reached (checked every
    `eval_every` steps), whichever comes first."""

    forget_accuracy_target: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="Stop when forget accuracy <= this (e.g. chance + 0.05)."
    )
    forget_loss_target: Annotated[float, Field(ge=0.0, le=1000.0)] | None = Field(
        None, description="Stop when the forget NLL (per token) >= this."
    )
    eval_every: Steps = Field(5, description="Steps between stop-rule checks.")
    utility_drop_tolerance: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None,
        description="The utility guard (needs a forget target): stop when utility has "
        "fallen by more than this since the start, measured with every stop check: the "
        "absolute drop of utility accuracy on the demo world's retain-pool questions, else "
        "the relative rise of the retain NLL. When training ends on the guard or the step "
        "budget, the best state that met the target (else the most forgetting within the "
        "tolerance, else the start) is put back; stopped_by 'utility_guard'.",
    )


class TrainingOptions(Strict):
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1e-4, description="AdamW learning rate.")
    batch_size: Annotated[int, Field(gt=0, le=4096)] = Field(
        16, description="Forget (and retain) samples per step."
    )
    max_steps: Steps = Field(100, description="Step budget.")
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = Field(
        0, description="Linear warmup steps."
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR schedule after warmup."
    )
    lr_policy: Literal["constant", "decay"] = Field(
        "constant",
        description="constant: the schedule's lr; decay (needs a forget target): at each stop "
        "check the lr is multiplied by a factor that falls linearly from 1 at the start to "
        "0.2 at the forget target (workers.guard.lr_scale), so the last steps cannot "
        "overshoot.",
    )
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        0.0, description="AdamW weight decay (trainable only)."
    )
    grad_clip: Annotated[float, Field(ge=0.0, le=10_000.0)] = Field(
        1.0, description="Max gradient norm (0 = off)."
    )
    max_length: Annotated[int, Field(gt=0, le=32_768)] = Field(
        128, description="Truncate samples to this many tokens."
    )
    seed: Seed = Field(0, description="Seed of data order and initialisation.")
    activation_cache: bool = Field(
        True,
        description="Compute the hidden states entering the lowest trainable layer once and "
        "run only that layer and the ones above it in each step (same results, faster).",
    )
    activation_cache_max_mb: Annotated[int, Field(gt=0, le=1_048_576)] = Field(
        256, description="Memory for cached activations; beyond it they spill to disk."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype the weights load in (auto: bfloat16 on CUDA, float32 on CPU). The "
        "trainable slices keep float32 master weights and optimizer state; losses are "
        "computed in float32; outputs are written in the base model's dtype.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the activations of the layers above the target in the "
        "backward pass instead of keeping them (less memory, one more forward per step).",
    )
    stop: StopRule = Field(default_factory=StopRule)


class DistributedOptions(Strict):
    num_workers: Annotated[int, Field(ge=1, le=256)] = Field(
        1, description="Workers (one CPU each); more than one: Ray Train, data parallel."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where workers run: auto = cuda when the Ray cluster (or this machine) "
        "advertises GPUs, else cpu. Decided before placement, so a GPU job asks Ray for GPUs.",
    )
    backend: Backend = Field("ddp", description="ddp, or deepspeed (ZeRO).")
    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    checkpoint_every: Steps = Field(
        20, description="Steps between checkpoints (Ray Train jobs; a retry resumes there)."
    )

    @property
    def uses_ray_train(self) -> bool:
        """Several workers or DeepSpeed: a Ray Train TorchTrainer runs the job (sharded,
        checkpointed). One DDP worker runs in one process: no trainer set-up to pay for,
        and a retry starts over."""
        return self.num_workers > 1 or self.backend == "deepspeed"


class OutputOptions(Strict):
    model: Literal["full", "patch"] = Field(
        "full",
        description="full: write the unlearned model (model/) beside the expert patch; "
        "patch: write only the expert patch and the base model's reference "
        "(base_model.json: model, resolved revision, SHA-256 before and after), for models "
        "too large to write whole. A later job (`model: job:<id>`) applies the patch to "
        "the base at load, checking both hashes.",
    )


class JobSpec(Strict):
    """An unlearning request: the body of POST /v1/jobs and the file `moe-unlearn run` reads."""

    model: str = Field(
        "demo",
        min_length=1,
        max_length=512,
        description="'demo' (the built-in world's tiny MoE), a local directory, or a hub id.",
    )
    revision: str | None = Field(
        None,
        max_length=128,
        pattern=REVISION_PATTERN,
        description="Hub revision of `model`: a branch, tag or 40-hex commit (default: main). "
        "It is resolved to its commit once and every load uses that commit; the results and "
        "the certificate record it. For a local directory only a hub cache snapshot "
        "(.../snapshots/<commit>/) can be checked; other directories refuse a revision.",
    )
    world: WorldOptions = Field(default_factory=WorldOptions)
    forget: CorpusRef = Field(description="The data to forget.")
    retain: CorpusRef | None = Field(None, description="Data whose knowledge must be kept.")
    algorithm: Algorithm = Field("gdiff", description="Base unlearning algorithm.")
    scope: Scope = Field(
        "seuf",
        description="seuf: selected experts + target router; full: all parameters; "
        "experts: selected experts only; router: target router only.",
    )
    seuf: SeufOptions = Field(default_factory=SeufOptions)
    objective: ObjectiveOptions = Field(default_factory=ObjectiveOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    distributed: DistributedOptions = Field(default_factory=DistributedOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        rev = self.revision
        if rev is not None and (".." in rev or "//" in rev or rev.endswith("/")):
            raise ValueError(
                "revision must be a branch, tag or commit (no '..', '//', trailing '/')"
            )
        if rev is not None and (self.model == "demo" or self.model.startswith("job:")):
            raise ValueError(
                "revision is for a hub model (or a hub cache snapshot): "
                f"{'job:<id>' if self.model.startswith('job:') else 'demo'} has no revisions"
            )
        if self.algorithm in ("gdiff", "rmu") and self.retain is None:
            raise ValueError(f"algorithm '{self.algorithm}' needs a retain corpus")
        uses_demo = any(ref.demo is not None for _, ref in self.corpus_refs())
        if uses_demo and self.model != "demo":
            raise ValueError("demo corpora can only be used with model 'demo'")
        if self.world.topic_router_margin is not None and self.model != "demo" and not uses_demo:
            # Only the demo world is pretrained: accepted, it would be silently ignored.
            raise ValueError("world.topic_router_margin needs the demo world (model 'demo')")
        if self.world.retain_topics is not None and (
            self.retain is None or self.retain.demo != "retain"
        ):
            # It shapes the demo retain corpus only: with any other retain data it would be
            # accepted and ignored.
            raise ValueError("world.retain_topics needs retain: {demo: retain}")
        o = self.objective
        if o.rmu_layer_offset and (o.rmu_layer is not None or self.scope == "full"):
            raise ValueError(
                "objective.rmu_layer_offset counts from the SEUF target layer: it needs a scope "
                "that selects experts and no explicit rmu_layer"
            )
        if self.algorithm != "rmu" and (
            o.rmu_layer_offset
            or o.rmu_positions != "all"
            or o.rmu_coeff_relative
            or o.rmu_directions != "shared"
        ):
            raise ValueError("objective.rmu_* settings apply to algorithm 'rmu' only")
        if self.seuf.attribution == "contrastive" and self.retain is None:
            raise ValueError("attribution 'contrastive' needs a retain corpus")
        self._guard_supported()
        if self.seuf.router_projection == "nullspace":
            # Refused here, not after hours of loading and evaluation in the worker.
            if self.retain is None:
                raise ValueError("seuf.router_projection 'nullspace' needs a retain corpus")
            if self.scope not in ("seuf", "router"):
                raise ValueError(
                    "seuf.router_projection 'nullspace' projects a trained router's update: "
                    "use scope seuf or router"
                )
            if self.distributed.num_workers > 1:
                raise ValueError("seuf.router_projection 'nullspace' runs on one worker for now")
            if self.distributed.backend == "deepspeed" and self.distributed.zero_stage == 3:
                raise ValueError(
                    "seuf.router_projection 'nullspace' does not run under ZeRO-3 (the router "
                    "is partitioned): use router_projection none or zero_stage 1 or 2"
                )
        rmu_fallback = self.rmu_projected_fallback_runs()
        if self.seuf.fallback_rmu_patience != RMU_PATIENCE and not rmu_fallback:
            raise ValueError(
                "seuf.fallback_rmu_patience moves the layer RMU's projected fallback chose: "
                "it needs algorithm rmu, no objective.rmu_layer, a SEUF scope with "
                "num_experts auto and fallback full, fallback_projection auto or all, "
                "router_projection not none, and one worker (not ZeRO-3)"
            )
        if not self.seuf.rmu_second_attempt and not rmu_fallback:
            raise ValueError(
                "seuf.rmu_second_attempt false changes nothing here: a second attempt needs "
                "the conditions seuf.fallback_rmu_patience needs (algorithm rmu, no "
                "objective.rmu_layer, num_experts auto with fallback full, one worker)"
            )
        if self.seuf.fallback_projection == "all" and (why := self.projected_fallback_refusal()):
            raise ValueError(f"seuf.fallback_projection 'all' {why}")
        return self

    def projected_fallback_refusal(self) -> str | None:
        """Why num_experts auto's full fallback cannot project every matrix
        (workers/projected_fallback.py) for this spec, None where it can: the one rule
        behind the `fallback_projection: all` refusal, the RMU climb's patience check and
        auto's run-time choice (seuf_plan.fallback_projection_mode)."""
        s, d = self.seuf, self.distributed
        if s.num_experts != "auto" or s.fallback != "full" or self.scope == "full":
            return (
                "acts on num_experts auto's full fallback only: it needs num_experts auto, "
                "fallback full and a SEUF scope"
            )
        if s.router_projection == "none":
            return "projects the routers too: it cannot run with router_projection none"
        if self.retain is None:
            return "needs a retain corpus"
        if d.num_workers > 1 or (d.backend == "deepspeed" and d.zero_stage == 3):
            return (
                "runs on one worker, not under ZeRO-3 (it projects whole weights): use "
                "fallback_projection auto or routers"
            )
        return None

    def rmu_projected_fallback_runs(self) -> bool:
        """Whether RMU's projected fallback can run for this spec: where the layer climb
        acts and RMU's second attempt (workers/attempt.py) can follow either kind of plan;
        where not, a patience or a second-attempt setting would be ignored."""
        return (
            self.algorithm == "rmu"
            and self.objective.rmu_layer is None
            and self.seuf.fallback_projection != "routers"
            and self.projected_fallback_refusal() is None
        )

    def _guard_supported(self) -> None:
        """The utility guard and lr_policy decay act at the forget check: refused where
        they could not act (issue 13)."""
        stop = self.training.stop
        has_target = stop.forget_accuracy_target is not None or stop.forget_loss_target is not None
        guarded = stop.utility_drop_tolerance is not None
        if self.training.lr_policy == "decay" and not has_target:
            raise ValueError(
                "training.lr_policy 'decay' needs a forget target "
                "(training.stop.forget_accuracy_target or forget_loss_target)"
            )
        if not guarded:
            return
        if not has_target:
            raise ValueError(
                "training.stop.utility_drop_tolerance needs a forget target "
                "(training.stop.forget_accuracy_target or forget_loss_target)"
            )
        if self.retain is None and self.model != "demo":
            raise ValueError(
                "training.stop.utility_drop_tolerance measures utility on retain data: give a "
                "retain corpus (or use model 'demo', whose retain questions it reads)"
            )
        if self.distributed.backend == "deepspeed":
            raise ValueError(
                "training.stop.utility_drop_tolerance cannot restore a state under DeepSpeed "
                "(ZeRO partitions the weights and keeps its own masters): use backend ddp"
            )

    def corpus_refs(self) -> list[tuple[str, CorpusRef]]:
        """Every corpus the job reads, with its field path: forget, retain and the
        membership check's holdout (`evaluation.robustness[i].holdout`)."""
        refs = [("forget", self.forget)]
        if self.retain is not None:
            refs.append(("retain", self.retain))
        for i, check in enumerate(self.evaluation.robustness):
            if isinstance(check, MembershipCheck) and check.holdout is not None:
                refs.append((f"evaluation.robustness[{i}].holdout", check.holdout))
        return refs

    def retain_routing_weight(
        self, scope_run: str | None = None, fallback_projection: str | None = None
    ) -> float:
        """The retain routing loss's weight that runs (torch-free: the planner reads it):
        the spec's, or for `auto` when the job asked for SEUF (scope seuf or router)
        RETAIN_ROUTING_WEIGHT, and RETAIN_ROUTING_WEIGHT_FALLBACK when auto's plan ended on
        full parameters (`scope_run` "full"), for RMU RMU_RETAIN_ROUTING_WEIGHT on selected
        experts and under its projected fallback (`fallback_projection` "all": without the
        projection the loss held back the forget states RMU must move); 0 without a retain
        corpus and, under auto, for the full and experts baselines."""
        w = self.seuf.retain_routing_weight
        if self.retain is None:
            return 0.0
        if w != "auto":
            return float(w)
        if self.scope not in ("seuf", "router"):
            return 0.0
        if self.algorithm == "rmu":
            projected = scope_run != "full" or fallback_projection == "all"
            return RMU_RETAIN_ROUTING_WEIGHT if projected else 0.0
        return RETAIN_ROUTING_WEIGHT_FALLBACK if scope_run == "full" else RETAIN_ROUTING_WEIGHT

    def resolved(self) -> dict[str, Any]:
        """The fully resolved spec (every default filled in) as plain JSON data."""
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON of the resolved spec."""
        return hashlib.sha256(canonical_json(self.resolved()).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 kept (used for every hash)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML or JSON spec file (JSON is YAML); relative corpus paths resolve against
    the spec's folder. Raises ValueError / pydantic.ValidationError on bad input."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"spec file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"spec {p} is not valid YAML/JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"spec {p} must be a mapping at the top level")
    ev = data.get("evaluation")
    checks = ev.get("robustness") if isinstance(ev, dict) else None
    holdouts = (
        [c.get("holdout") for c in checks if isinstance(c, dict)]
        if isinstance(checks, list)
        else []
    )
    for ref in [data.get("forget"), data.get("retain"), *holdouts]:
        if isinstance(ref, dict) and isinstance(ref.get("path"), str):
            cp = Path(ref["path"])
            if not cp.is_absolute():
                ref["path"] = str((p.parent / cp).resolve())
    return JobSpec.model_validate(data)
