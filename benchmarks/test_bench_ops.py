"""Op-level benchmarks: each op per backend against the plain-PyTorch reference.

Groups: ``encode`` (forward), ``decode_fwd_bwd`` (forward + backward), ``decoder_norm_step`` (the fused
decoder update; ``adam_foreach`` is what the dense step does: project + torch.optim.Adam + renormalise).
"""
import steps


def test_op(bench_runner, bench_config, op_variant):
    op, variant = op_variant
    bench_runner.run(op, variant, lambda: steps.build_op(bench_config, op, variant), {"op": op})
