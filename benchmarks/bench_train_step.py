"""One full Top-K SAE training step per variant, and the bare encoder GEMM, in one benchmark group.

Variants: gemm (the floor) and one per dlmscope backend on the device (workloads.py); dense (the paper's
plain-PyTorch step) and dense_compiled (torch.compile; GPU by default) (baselines.py).
"""
import baselines
import workloads


def test_step(bench_runner, bench_config, step_variant):
    build = baselines.build_step if step_variant in baselines.STEP_VARIANTS else workloads.build_step
    bench_runner.run("step", step_variant, lambda: build(bench_config, step_variant))
