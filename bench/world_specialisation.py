"""Do the demo world's experts specialise by topic? (decides whether SEUF can work on it)

Per MoE layer, per routed expert: the mean gate score (router probability if the expert
is in the token's top-K, else 0) per topic, at the position that predicts the answer (the
last prompt token) of every training-phrasing question. For each topic it prints the
expert with the best contrastive score (topic mass minus the mean of the other topics'),
its share of the topic's gate mass in its layer, and its topic / other-topics mass ratio.
METHOD.md: one expert sufficed where share >= ~0.70 and ratio >= ~15.

    .venv/bin/python -m bench.world_specialisation [--seed 0] [--topics 6] [--facts 100]
        [--arch qwen2_moe] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from workers.moe import get_adapter
from workers.routing import router_outputs
from workers.spec import WorldOptions
from workers.world import World, build_world


def gate_mass_by_topic(world: World, batch_size: int = 256) -> torch.Tensor:
    """[layers, experts, topics] mean gate score at the answer-predicting position."""
    model, tok = world.load_model(), world.load_tokenizer()
    adapter = get_adapter(model)
    layers = adapter.moe_layer_indices()
    qs = [q for q in world.questions() if q["phrasing"] == "train"]
    n_t = world.num_topics
    mass = torch.zeros(len(layers), adapter.num_experts, n_t)
    count = torch.zeros(n_t)
    for b in range(0, len(qs), batch_size):
        chunk = qs[b : b + batch_size]
        enc = [tok(q["question"], add_special_tokens=False)["input_ids"] for q in chunk]
        width = max(map(len, enc))
        ids = torch.zeros(len(enc), width, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        outs = router_outputs(model, adapter, {"input_ids": ids, "attention_mask": mask})
        last = torch.tensor([len(e) - 1 for e in enc])
        topics = torch.tensor([int(q["topic"]) for q in chunk])
        for li, layer in enumerate(layers):
            o = outs[layer]
            g = adapter.gate_probs(o.logits) * adapter.topk_mask(o)  # [B*S, E]
            g = g.reshape(len(enc), width, -1)[torch.arange(len(enc)), last]  # [B, E]
            mass[li].index_add_(1, topics, g.T)
        count += torch.bincount(topics, minlength=n_t)
    return mass / count


def summarise(mass: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    n_l, n_e, n_t = mass.shape
    rows = []
    for t in range(n_t):
        others = torch.cat([mass[:, :, :t], mass[:, :, t + 1 :]], dim=2).mean(dim=2)
        contrast = mass[:, :, t] - others
        flat = int(contrast.argmax())
        li, e = divmod(flat, n_e)
        share = float(mass[li, e, t] / mass[li, :, t].sum())
        ratio = float(mass[li, e, t] / others[li, e].clamp_min(1e-9))
        rows.append(
            {"topic": t, "name": names[t], "layer_index": li, "expert": e,
             "mass": float(mass[li, e, t]), "share_in_layer": share, "ratio_vs_others": ratio,
             "localisable": share >= 0.7 and ratio >= 15.0}
        )  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topics", type=int, default=6)
    p.add_argument("--facts", type=int, default=100)
    p.add_argument("--arch", default="qwen2_moe")
    p.add_argument("--cache", default=None, help="worlds dir (default: the shared cache)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    opts = WorldOptions(seed=a.seed, topics=a.topics, facts_per_topic=a.facts, arch=a.arch)
    world = build_world(opts, cache_dir=a.cache)
    mass = gate_mass_by_topic(world)
    rows = summarise(mass, world.topic_names)
    print(f"world {world.hash[:16]} ({a.topics}x{a.facts}, {a.arch}, seed {a.seed})")
    print(f"{'topic':<14}{'layer':>6}{'expert':>7}{'share':>8}{'ratio':>9}  localisable")
    for r in rows:
        print(
            f"{r['name']:<14}{r['layer_index']:>6}{r['expert']:>7}{r['share_in_layer']:>8.2f}"
            f"{r['ratio_vs_others']:>9.1f}  {r['localisable']}"
        )
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"world": world.hash, "rows": rows, "mass": mass.tolist()}, f, indent=1)


if __name__ == "__main__":
    main()
