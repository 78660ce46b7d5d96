"""One full Top-K SAE training step per variant, and the bare encoder GEMM, in one benchmark group.

Variants (see steps.py): gemm (the floor), one per dlmscope backend on the device, dense (the paper's
plain-PyTorch step), dense_compiled (torch.compile; GPU by default).
"""
import steps


def test_step(bench_runner, bench_config, step_variant):
    bench_runner.run("step", step_variant, lambda: steps.build_step(bench_config, step_variant))
