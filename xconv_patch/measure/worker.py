"""The worker-process protocol: each task of a profile runs in a fresh Python process.

The parent starts `python -P -c <import worker_main>` with the task name and a result path as
arguments and the ProfileSpec as JSON on stdin; the worker writes {"ok", "result"} or {"ok": False,
"kind", "message", "traceback"} to the result path and progress lines (prefixed, on stderr) as it
goes. `-P` keeps the working directory off sys.path: run from a source checkout, its xconv_patch/
folder would otherwise shadow the installed package. A worker imports only what its task uses: never
the FakeTensorMode predictor, the profile's orchestration, Rich or the CLI.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..models import LoadedModel
from .batch import Batch, TrainingStep
from .building import build, patch
from .compare import gradient_errors, layer_weights, minibatch_noise, time_steps
from .errors import OutOfMemoryError, ProfileError, first_line, out_of_memory_as_error
from .spec import DTYPES, ProfileSpec

PROGRESS_PREFIX = "\x1exconv-progress "
_WORKER_CODE = "import sys; from xconv_patch.measure.worker import worker_main; sys.exit(worker_main(sys.argv[1:]))"


def _memory_task(spec: ProfileSpec, patched: bool) -> dict[str, Any]:
    """Peak and saved-activation memory of the exact or the patched model's training step."""
    from .step_memory import measure_memory  # MemTracker imports torch._dynamo: only this task needs it

    loaded, shape = _built(spec)
    if patched:
        _emit("converting")
    model = patch(loaded.model, spec, loaded.family, shape) if patched else loaded.model
    figures = measure_memory(
        model, loaded.family, spec.batch_size, shape,
        device=spec.torch_device, dtype=DTYPES[spec.dtype], amp=spec.amp, seed=spec.seed, progress=_emit,
    )
    return asdict(figures)


def _compare_task(spec: ProfileSpec) -> dict[str, Any]:
    """Gradient fidelity on the first step (same weights, same batch) beside the minibatch noise (the
    exact gradient of a second, independent batch of the same size, same weights), then interleaved timing."""
    loaded, shape = _built(spec)
    device, dtype = spec.torch_device, DTYPES[spec.dtype]
    exact = loaded.model.to(device=device, dtype=dtype)
    _emit("converting")
    patched = patch(copy.deepcopy(exact), spec, loaded.family, shape)
    names = [layer.name for layer in patched.xconv_report.layers]
    steps = {"exact": TrainingStep(exact, amp=spec.amp), "xconv": TrainingStep(patched, amp=spec.amp)}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    with out_of_memory_as_error(spec.batch_size):
        batch = Batch(loaded.family, spec.batch_size, shape, device, dtype, spec.seed)
        other = Batch(loaded.family, spec.batch_size, shape, device, dtype, spec.seed + 1)
        _emit("gradients of a second batch (minibatch noise)")
        torch.manual_seed(spec.seed + 1)  # its own dropout masks too
        exact_weights = layer_weights(exact, names)
        steps["exact"](other, before_update=lambda: grads.__setitem__("other", _grads(exact_weights)), update=False)
        for name, step in steps.items():
            _emit(f"gradients ({name})")
            weights = layer_weights(step.model, names)
            torch.manual_seed(spec.seed)
            step(batch, before_update=lambda n=name, w=weights: grads.__setitem__(n, _grads(w)))
        synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        calls = {name: partial(step, batch) for name, step in steps.items()}
        times = time_steps(calls, spec.steps, synchronize, progress=_emit)
    errors = gradient_errors(grads["exact"], grads["xconv"])
    return {
        "times": times,
        "gradients": {name: asdict(error) for name, error in errors.items()},
        "sgd_noise": minibatch_noise(grads["exact"], grads["other"]),
    }


def _built(spec: ProfileSpec) -> tuple[LoadedModel, tuple[int, ...]]:
    _emit("building the model")
    return build(spec)


def _grads(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: weight.grad.detach().clone() for name, weight in weights.items() if weight.grad is not None}


TASKS: dict[str, Callable[[ProfileSpec], dict[str, Any]]] = {
    "exact": partial(_memory_task, patched=False),
    "xconv": partial(_memory_task, patched=True),
    "compare": _compare_task,
}


def _emit(stage: str) -> None:
    """A progress event for the parent process (worker side)."""
    print(f"{PROGRESS_PREFIX}{json.dumps({'stage': stage})}", file=sys.stderr, flush=True)


def worker_command(task: str, result_path: Path | str) -> list[str]:
    """The command line of a worker process; `-P`: the working directory never shadows xconv_patch."""
    return [sys.executable, "-P", "-c", _WORKER_CODE, task, str(result_path)]


def run_worker(task: str, spec: ProfileSpec, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one task ('exact', 'xconv' or 'compare') in a fresh Python process and return its result."""
    if task not in TASKS:
        raise ValueError(f"unknown worker task {task!r}; expected one of {', '.join(TASKS)}")
    with tempfile.TemporaryDirectory(prefix="xconv-") as directory:
        result_path = Path(directory) / "result.json"
        process = subprocess.Popen(
            worker_command(task, result_path),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        output: list[str] = []
        try:
            process.stdin.write(json.dumps(spec.to_dict()))
            process.stdin.close()
            for line in process.stdout:
                if not line.startswith(PROGRESS_PREFIX):
                    output.append(line)
                elif progress is not None:
                    progress(json.loads(line[len(PROGRESS_PREFIX):])["stage"])
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if not result_path.exists():
            reason = f"was killed by signal {-code} (out of memory?)" if code < 0 else f"exited with status {code}"
            raise ProfileError(f"the {task} run {reason}: {''.join(output[-1:]).strip()}")
        payload = json.loads(result_path.read_text())
    if payload["ok"]:
        return payload["result"]
    error_class = OutOfMemoryError if payload["kind"] == "out_of_memory" else ProfileError
    error = error_class(f"the {task} run failed: {payload['message']}")
    error.worker_traceback = payload["traceback"]
    raise error


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: task name and result path in argv, the spec on stdin."""
    task, result_path = argv
    spec = ProfileSpec.from_dict(json.loads(sys.stdin.read()))
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        payload = {"ok": True, "result": TASKS[task](spec)}
    except Exception as error:
        kind = "out_of_memory" if isinstance(error, OutOfMemoryError) else type(error).__name__
        message = str(error) if isinstance(error, ProfileError) else f"{type(error).__name__}: {first_line(error)}"
        payload = {"ok": False, "kind": kind, "message": message, "traceback": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(payload))
    return 0
