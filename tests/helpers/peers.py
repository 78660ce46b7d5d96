"""Running a snippet of the peer libraries' own code on our exports, in the peer python (``DLMSCOPE_PEER_PYTHON``).

:func:`run_peer` writes nothing itself: the caller has saved ``root/x.safetensors`` (key ``x``) and one checkpoint
folder per case under ``root``. In the peer python, for each case, ``body`` runs with ``case``, ``path`` (=
``root / case``), ``x`` and ``torch`` in scope, under ``torch.no_grad()``; it must set ``out`` (a dict of tensors,
saved to ``root/<case>.out.safetensors``) and ``name`` (what the report holds for the case). A case that raises
reports ``"error: "`` and its traceback instead.
"""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

_TEMPLATE = '''
import json, sys, traceback
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

root = Path(sys.argv[1])
x = load_file(str(root / "x.safetensors"))["x"]
report = {}
for case in sys.argv[2:]:
    path = root / case
    try:
        with torch.no_grad():
%s
        save_file({k: v.contiguous() for k, v in out.items()}, str(root / f"{case}.out.safetensors"))
        report[case] = name
    except Exception:
        report[case] = "error: " + traceback.format_exc()
print(json.dumps(report))
'''


def run_peer(python: str, root: Path, body: str, cases: list[str], timeout: int = 600) -> dict:
    """``{case: name or error}`` from running ``body`` (see the module doc) for each of ``cases`` in ``python``."""
    script = _TEMPLATE % textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 12)
    proc = subprocess.run([python, "-c", script, str(root), *cases], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
