"""Can one expert carry a topic's forgetting on the demo world? An independent cross-check
of the WORLD (deliberately not the engine: a minimal hand-written GDiff + router anchor),
so a world problem and an engine problem can be told apart.

Trains only expert E of layer L (gradient masked to the slice) and layer L's router:
loss = -NLL(forget answers) + NLL(retain-pool answers) + ||p - onehot(E)||^2 at the forget
answer-predicting positions; AdamW lr 3e-3 (full: all parameters, lr 1e-4, no anchor),
batch 16 + 16, stops when forget accuracy (direct scorer) <= 0.30 or after 150 steps.

    .venv/bin/python -m bench.world_seuf_feasibility --layer 0 --expert 0 [--topic 0]
        [--seed 0] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

import torch

from workers.evaluate import accuracy
from workers.moe import get_adapter
from workers.spec import WorldOptions
from workers.world import build_world


def _batch(tok: Any, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = [tok(r["text"], add_special_tokens=False)["input_ids"] for r in rows]
    pos = torch.tensor(
        [len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) - 1 for r in rows]
    )
    ids = torch.zeros(len(rows), max(map(len, enc)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask, pos  # pos: the position whose logits predict the answer


def _answer_nll(logits: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(len(ids))
    lp = torch.log_softmax(logits[rows, pos].float(), -1)
    return -lp[rows, ids[rows, pos + 1]].mean()


def run(seed: int, topic: int, layer_idx: int, expert: int, full: bool) -> dict[str, Any]:
    world = build_world(WorldOptions(seed=seed, forget_topic=topic))
    model, tok = world.load_model(), world.load_tokenizer()
    layer = get_adapter(model).moe_layer(layer_idx)
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(full)
    trainable: list[torch.nn.Parameter] = list(model.parameters()) if full else []
    if not full:
        for name in layer.expert_params:
            p = params[name]
            p.requires_grad_(True)
            keep = torch.zeros_like(p)
            keep[expert] = 1.0
            p.register_hook(lambda g, keep=keep: g * keep)
            trainable.append(p)
        for name in layer.router_params:
            params[name].requires_grad_(True)
            trainable.append(params[name])
    opt = torch.optim.AdamW(trainable, lr=1e-4 if full else 3e-3, weight_decay=0.0)
    forget = [json.loads(x) for x in world.corpus_path("forget").read_text().splitlines()]
    retain = [json.loads(x) for x in world.corpus_path("retain").read_text().splitlines()]
    captured: dict[str, torch.Tensor] = {}
    layer.router.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o[0]))
    qf, qu = world.question_set("forget"), world.question_set("retain_unseen")
    before = {"forget": accuracy(model, tok, qf), "unseen": accuracy(model, tok, qu)}
    rng = random.Random(0)
    t0 = time.monotonic()
    fa, step = before["forget"], 0
    for step in range(1, 151):
        model.train()
        ids, mask, pos = _batch(tok, rng.sample(forget, 16))
        loss = -_answer_nll(model(input_ids=ids, attention_mask=mask).logits, ids, pos)
        if not full:
            probs = torch.softmax(captured["logits"].float(), -1).reshape(*ids.shape, -1)
            pf = probs[torch.arange(len(ids)), pos]
            target = torch.nn.functional.one_hot(torch.tensor(expert), pf.shape[-1]).float()
            loss = loss + ((pf - target) ** 2).sum(-1).mean()
        ids, mask, pos = _batch(tok, rng.sample(retain, 16))
        loss = loss + _answer_nll(model(input_ids=ids, attention_mask=mask).logits, ids, pos)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 3 == 0:
            fa = accuracy(model, tok, qf)
            if fa <= 0.30:
                break
    after = {
        "forget": fa,
        "unseen": accuracy(model, tok, qu),
        "pool": accuracy(model, tok, world.question_set("retain")),
    }
    return {"seed": seed, "topic": topic, "layer": layer_idx, "expert": expert, "full": full,
            "steps": step, "seconds": round(time.monotonic() - t0, 1), "before": before,
            "after": after, "unseen_kept": after["unseen"] / before["unseen"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topic", type=int, default=0)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--expert", type=int, default=0)
    p.add_argument("--full", action="store_true", help="all parameters, no anchor")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    print(json.dumps(run(a.seed, a.topic, a.layer, a.expert, a.full)))


if __name__ == "__main__":
    main()
