"""How much room GRIP's null-space projection leaves a router, per MoE layer of a demo world.

    python -m bench.router_projection [--worlds 3 ...] [--energies 0.9 0.99 0.999 1.0]

For each of the quality sweep's worlds (bench.quality.draw_worlds; built if missing) and
each MoE layer: the retain hidden states entering the router, the projector at each energy,
and for random router updates G (seeded) the share of the logit change that survives the
projection on retain tokens, ||G P H_r^T|| / ||G H_r^T||, and on forget tokens (the same on
H_f). A good projection keeps the first near 0 and the second large; `ratios` holds
forget_kept / retain_kept per layer and energy. Writes bench/results/router_projection.json.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.common import RESULTS, machine
from bench.quality import draw_worlds, pick_worlds

ENERGIES = (0.9, 0.99, 0.999, 1.0)
DRAWS = 8  # random update directions averaged per layer and energy


def measure(world_block: dict[str, Any], energies: tuple[float, ...]) -> dict[str, Any]:
    import torch

    from workers.attribution import attribute
    from workers.data import read_corpus, tokenize
    from workers.moe import get_adapter
    from workers.router_projection import RouterProjector, router_inputs
    from workers.spec import WorldOptions
    from workers.world import build_world

    world = build_world(WorldOptions(**world_block))
    model, tok = world.load_model(), world.load_tokenizer()
    adapter = get_adapter(model)

    def batches(split: str) -> list[dict]:
        recs = read_corpus(world.corpus_path(split))
        return tokenize(recs, tok, 64, loss_tokens="answer").in_order(16)

    forget, retain = batches("forget"), batches("retain")
    with torch.no_grad():
        emap = attribute(model, adapter, forget, retain_batches=retain, method="contrastive")
    gen = torch.Generator().manual_seed(0)
    layers: dict[str, Any] = {}
    for layer in emap.layers:
        h_r = router_inputs(model, adapter, layer, retain)
        h_f = router_inputs(model, adapter, layer, forget)
        g = torch.randn(DRAWS, adapter.num_experts, h_r.shape[1], generator=gen)
        rows = {}
        for e in energies:
            p = RouterProjector.from_hidden_states(h_r, energy=e)
            pg = p.project(g)
            rk = float(((pg @ h_r.T).norm(dim=(1, 2)) / (g @ h_r.T).norm(dim=(1, 2))).mean())
            fk = float(((pg @ h_f.T).norm(dim=(1, 2)) / (g @ h_f.T).norm(dim=(1, 2))).mean())
            rows[str(e)] = {"rank": p.rank, "dim": p.dim, "retain_kept": rk, "forget_kept": fk}
        layers[str(layer)] = {"retain_tokens": int(h_r.shape[0]), "energies": rows}
    return {
        "world": world_block,
        "target_layer": emap.ranking[0].layer,
        "layers": layers,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", nargs="+", default=None, help="indices or keys of the sweep")
    ap.add_argument("--energies", type=float, nargs="+", default=list(ENERGIES))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    path = RESULTS / "router_projection.json"
    old = json.loads(path.read_text()).get("worlds", {}) if path.is_file() else {}
    for w in pick_worlds(draw_worlds(), args.worlds):
        block = {k: v for k, v in w.items() if k != "key"}
        res = measure(block, tuple(args.energies))
        old[w["key"]] = res
        print(f"== {w['key']} (top expert's layer {res['target_layer']})")
        for layer, d in res["layers"].items():
            for e, row in d["energies"].items():
                print(
                    f"   layer {layer} energy {e}: rank {row['rank']}/{row['dim']}  retain "
                    f"kept {row['retain_kept']:.3f}  forget kept {row['forget_kept']:.3f}"
                )
    ratios = {
        key: {
            layer: {
                e: (row["forget_kept"] / row["retain_kept"] if row["retain_kept"] > 0 else None)
                for e, row in d["energies"].items()
            }
            for layer, d in res["layers"].items()
        }
        for key, res in old.items()
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "router_projection", "machine": machine(), "worlds": old}
    payload["ratios"] = ratios
    path.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
