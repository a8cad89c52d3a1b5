"""The job spec's vocabulary: its literal types, bounded numbers, upper bounds, the strict
base model every block derives from, and the references to corpora and experts (torch-free,
like workers/spec.py, which re-exports them)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Algorithm = Literal["ga", "gdiff", "npo", "simnpo", "rmu"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
Scope = Literal["seuf", "full", "experts", "router"]
SelectionMode = Literal["top_m", "in_layer", "per_layer", "random", "manual"]
AttributionMethod = Literal["auto", "affinity", "contrastive", "frequency"]
AnchorReduction = Literal["sum", "mean"]
LossTokens = Literal["all", "answer"]
Backend = Literal["ddp", "deepspeed"]
WorldSize = Literal["full", "small"]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
# Upper bounds (issue 14): a client must not ask for 1e30 steps. The README's bounds table
# lists them; raise one here when a real workload needs more.
MAX_SEED = 2**31 - 1
MAX_STEPS = 100_000
MAX_LAYER = 1024
MAX_EXPERT = 4096
MAX_WEIGHT = 1e6
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS)]
Weight = Annotated[float, Field(ge=0.0, le=MAX_WEIGHT)]
TaskName = Annotated[str, Field(min_length=1, max_length=128)]
# A hub revision: a branch, a tag or a 40-hex commit (git ref characters; JobSpec also
# refuses "..", "//" and a trailing "/", so a revision never climbs out of a refs folder).
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class Strict(BaseModel):
    # Unknown keys are errors: a typo in a spec must not be silently ignored.
    # allow_inf_nan=False: NaN/Infinity would make the spec hash and stored JSON invalid.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# The MoE families with an adapter (workers/moe/; tests check this list equals
# workers.moe.tiny.FAMILIES, written out here so that the spec stays torch-free).
WorldArch = Literal[
    "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"
]


class CorpusRef(Strict):
    """Where a corpus comes from: exactly one of `path`, `corpus_id` or `demo`.

    Records are JSONL objects with a `text` field, or `prompt` + `answer` fields
    (question/answer data: `loss_tokens: answer` trains on the answer only), or plain
    text with one record per non-empty line.
    """

    path: str | None = Field(None, max_length=4096, description="Local JSONL or text file.")
    corpus_id: str | None = Field(
        None, description="SHA-256 of a corpus uploaded with POST /v1/corpora."
    )
    demo: Literal["forget", "retain", "untrained"] | None = Field(
        None,
        description="A split of the demo world: its forget topic, its retain pool, or the "
        "forget topic's never-pretrained facts (membership inference's holdout).",
    )
    format: Literal["auto", "jsonl", "text"] = Field("auto", description="File format.")
    text_field: str = Field(
        "text", min_length=1, max_length=64, description="JSONL field holding the text."
    )
    max_records: Annotated[int, Field(gt=0, le=10_000_000)] | None = Field(
        None, description="Use at most this many records."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> CorpusRef:
        given = [n for n in ("path", "corpus_id", "demo") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of path, corpus_id or demo must be given"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.corpus_id is not None:
            cid = self.corpus_id
            if len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
                raise ValueError("corpus_id must be a lowercase hex SHA-256 (64 characters)")
        return self


class ExpertRef(Strict):
    layer: Annotated[int, Field(ge=0, le=MAX_LAYER)] = Field(
        description="Index of the decoder layer."
    )
    expert: Annotated[int, Field(ge=0, le=MAX_EXPERT)] = Field(
        description="Index of the routed expert within the layer."
    )
