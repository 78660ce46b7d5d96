"""The main job on the embedded world: DLM-Scope's core experiments in minutes on a CPU.

``dlmscope demo --out runs/demo`` (``make demo``):

1. harvests resid_post activations of every demo layer of the embedded LLaDA-format DLM under the ``mask``
   and ``unmask`` policies, and of its AR twin on clean text (one truncated forward per LM batch feeds all
   layers; the activations are cached on disk for the per-layer trainers, then deleted);
2. trains a k sweep of Top-K SAEs per (model, policy, layer), all k of a layer in one grouped trainer, plus
   ``sae_seeds - 1`` more SAEs at ``k_ref`` from other init seeds in the same trainer (FVE, gaps and concept
   margins at ``k_ref`` as mean and min–max over seeds; failed SAEs flagged and kept out of means);
3. evaluates each SAE on held-out text of the same policy: FVE / L0 / dead, the DLM ΔLM loss (mask and
   unmask variants, docs/reference.md §4) or the AR ΔLM loss, each with the fraction of loss recovered vs
   zero-ablation, and the planted-concept F1 of its best latents (:mod:`dlmscope.interp.concepts`) beside
   untrained SAEs with the trained b_dec and the best single residual dimension (:mod:`dlmscope.interp.baselines`);
4. steers every planted concept's best latent during generation at a few layers, the DLM against its AR twin
   at the paper's and at matched strengths, with random-latent and random-direction controls (:mod:`.steering`);
5. fills the world's order-sensitive tasks under several decoding orders, SAE-guided ones included
   (:mod:`.orders`), and applies the base DLM's SAEs to the instruct twin (:mod:`.transfer`);
6. writes ``results.json``, PNG plots and ``report.md`` comparing what it found with the paper's findings.

Every number in the report is computed by this run; the findings section states, for each paper claim,
whether the embedded world reproduces it ("reproduced" only where the paper's metric and a null agree; "consistent
with" where the paper gives no number to compare with).

Modules: :mod:`.config` (settings), :mod:`.run` (the job), :mod:`.findings` (the paper's claims checked on the
numbers), :mod:`.seeds` (spreads over SAE init seeds), :mod:`.steering`, :mod:`.orders`, :mod:`.transfer`,
:mod:`.plots`, :mod:`.report` (``report.md``, one
function per section), :mod:`.cli` (the ``dlmscope demo`` subcommand: its options onto :class:`DemoConfig`);
:mod:`.synthetic` is the model-free known-dictionary check (``make demo-synthetic``).
"""
from .config import RUNS, DemoConfig
from .findings import findings, observations
from .run import WORLD_MODELS, load_world_model, run_demo, train_layer_saes

__all__ = ["DemoConfig", "RUNS", "WORLD_MODELS", "run_demo", "train_layer_saes", "load_world_model", "findings",
           "observations"]
