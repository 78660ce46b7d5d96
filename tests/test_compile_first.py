"""``torch.compile(sae, fullgraph=True)`` works as the very first call in a fresh process, before any eager call has
imported the backend (tests/test_ops.py compiles only after eager calls)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

#: In one fresh process, for the default backend and then for one named explicitly: a tiny TopKSAE compiled with
#: fullgraph=True is called before the backend module was ever imported, then compared with the eager module.
_COMPILE_FIRST_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from dlmscope.sae.topk import TopKSAE

    def backend_modules():
        return {m for m in sys.modules if m.startswith("dlmscope.backends.") and m.endswith("_backend")}

    for name in ("auto", "torch"):  # auto: the default backend (cpu where built), imported first
        fresh = not backend_modules() if name == "auto" else f"dlmscope.backends.{name}_backend" not in sys.modules
        torch.manual_seed(0)
        sae = TopKSAE(8, 32, 4, backend=None if name == "auto" else name)
        x = torch.randn(6, 8)
        compiled = torch.compile(sae, fullgraph=True)
        with torch.no_grad():  # the forward trace is where the backend is resolved; test_ops compiles backwards
            torch.testing.assert_close(compiled(x), sae(x))
        print(name, "compiled first" if fresh else "imported before")
""")


def test_21_9_compile_fullgraph_first_call_in_fresh_process(tmp_path):
    """Each backend's first call is the compiled one (its module not yet imported), and it computes what eager
    does."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    env.pop("DLMSCOPE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FIRST_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.stdout.splitlines() == ["auto compiled first", "torch compiled first"]
