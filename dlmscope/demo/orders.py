"""The demo's decoding-order section: the world DLM fills its multi-answer tasks under every order.

The Mask-SAEs at ``k_ref`` of ``cfg.order_layers`` replay the runs (the guide of the SAE-guided orders reads the
middle one); tasks are the world's order-sensitive kinds (two- and three-step chains, counting), in-distribution
and held out (:func:`dlmscope.jobs.order.run_order`).
"""
from __future__ import annotations


from dlmscope.jobs.order import ORDERS, STEPS, OrderSpec, run_order
from dlmscope.world import asset
from dlmscope.world.tasks import load_tasks
from .config import DemoConfig

__all__ = ["ORDER_KINDS", "run_orders"]

#: the task kinds whose answers span several positions, so that the order matters
ORDER_KINDS = ("arith_chain", "count", "chain3")


def run_orders(adapter, saes: dict, cfg: DemoConfig) -> dict:
    """:func:`run_order` on the order-sensitive world tasks (``cfg.order_tasks`` per kind) with ``saes``
    (``{layer: SAE}``)."""
    tasks, heldout = load_tasks(asset("tasks.jsonl"))
    keep = [i for kind in ORDER_KINDS for i in [j for j, t in enumerate(tasks) if t.kind == kind][:cfg.order_tasks]]
    layers = sorted(saes)
    spec = OrderSpec(orders=ORDERS, steps=STEPS, seeds=cfg.order_seeds, guide_layer=layers[len(layers) // 2],
                     top_k=min(8, cfg.k_ref))
    return run_order(adapter, saes, [tasks[i] for i in keep], [heldout[i] for i in keep], spec)
