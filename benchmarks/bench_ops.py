"""Op-level benchmarks: each op per backend against the plain-PyTorch reference.

Groups: ``encode`` (forward), ``decode_fwd_bwd`` (forward + backward), ``decoder_norm_step`` (the fused
decoder update; ``adam_foreach`` is what the dense step does: project + torch.optim.Adam + renormalise).
The ``reference`` and ``adam_foreach`` variants are in baselines.py, the backends in workloads.py.
"""
import baselines
import workloads


def test_op(bench_runner, bench_config, op_variant):
    op, variant = op_variant
    build = baselines.build_op if variant in baselines.OP_VARIANTS else workloads.build_op
    bench_runner.run(op, variant, lambda: build(bench_config, op, variant), {"op": op})
