"""Which compiled forms of a network run without the GIL? The question behind ``ParallelEnsemble(trace=True)``.

    python benchmarks/_gil_release_probe.py

``ParallelEnsemble(trace=True)`` uses ``torch.jit.trace`` because the TorchScript executor releases the GIL for
the whole graph, so members in worker threads really run at the same time at batch 1. torch deprecates
``torch.jit.trace``. This probe checks whether a supported form does the same: a worker thread makes one
call while this thread takes the GIL back and holds it for 2 s (``sys.setswitchinterval(1000)``). A form
that runs without the GIL finishes during the hold; one that needs the GIL between operations finishes
after it; one that holds the GIL for the whole call keeps this thread from even starting its hold. An
investigation with a verdict per form, not a speed ratio, so it is not one of the benchmarks
``tests/test_benchmarks.py`` runs (the leading underscore). The results and their machine are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def probe(run: Callable[[torch.Tensor], Any], x: torch.Tensor, hold: float = 2.0) -> dict[str, Any]:
    """One call of ``run`` in a worker thread while this thread holds the GIL for ``hold`` seconds."""
    with torch.no_grad():
        run(x)
        t0 = time.perf_counter()
        run(x)
        alone = time.perf_counter() - t0
    finished: list[float] = []

    def work() -> None:
        with torch.no_grad():
            run(x)  # one call: a form that runs without the GIL releases it once, here
        finished.append(time.perf_counter())

    thread = threading.Thread(target=work)
    interval = sys.getswitchinterval()
    start = time.perf_counter()
    thread.start()
    time.sleep(0.02)
    sys.setswitchinterval(1000.0)  # no switch to another Python thread while this one holds the GIL
    hold_start = time.perf_counter() - start  # when this thread got the GIL back
    end = time.monotonic() + hold
    while time.monotonic() < end:
        pass
    sys.setswitchinterval(interval)
    thread.join()
    after = finished[0] - start
    if hold_start > 0.5 * alone:
        verdict = "holds the GIL while it runs"
    elif after < hold_start + hold + 0.5 * alone:
        verdict = "runs without the GIL"
    else:
        verdict = "needs the GIL between operations"
    return {
        "alone_s": round(alone, 2),
        "hold_s": hold,
        "hold_started_s": round(hold_start, 2),
        "finished_after_s": round(after, 2),
        "verdict": verdict,
    }


def main() -> dict[str, Any]:
    """Probe eager, ``torch.jit.trace``, ``torch.export``, AOTInductor and ``torch.compile``; print the JSON."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(60)]).eval()
    x = torch.randn(256, 1024)
    out: dict[str, Any] = {"torch": torch.__version__, "eager": probe(model, x)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace's FutureWarning: known, beside the point here
        out["jit.trace"] = probe(torch.jit.trace(model, x), x)
    program = torch.export.export(model, (x,))
    out["torch.export .module()"] = probe(program.module(), x)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(folder, "m.pt2")
            )
            out["AOTInductor (aoti_load_package)"] = probe(torch._inductor.aoti_load_package(path), x)
    except Exception as err:  # a missing compiler, say: recorded, the other forms still count
        out["AOTInductor (aoti_load_package)"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    try:
        out["torch.compile"] = probe(torch.compile(model), x)
    except Exception as err:
        out["torch.compile"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
