"""Test-only backends and conversion functions, registered through the real
registry (GEOMGEN_BACKENDS="instant=tests.plugins:InstantBackend,...") and
GEOMGEN_CONVERT_FN="tests.plugins:selectable_convert"; they stand in for GPU
models and for native-code failures that cannot be produced on demand."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from pathlib import Path

from geomgen.backends.base import Backend, GenerationInput, GenerationOutput
from geomgen.errors import BackendUnavailable, GenerateError, InputError
from geomgen.optionspec import OptionSpec

# Captured at import: proves the worker set CUDA_VISIBLE_DEVICES before it
# imported any backend module (where a real backend would import torch).
CUDA_VISIBLE_DEVICES_AT_IMPORT = os.environ.get("CUDA_VISIBLE_DEVICES")

BOX_EXTENTS_M = (0.2, 0.3, 0.1)  # x, y (up), z of the box every test backend returns


@functools.lru_cache(maxsize=1)
def box_glb() -> bytes:
    """A tiny closed box as GLB, in geomgen's conventions: +Y up, metres,
    resting on y = 0, centred in x and z."""
    import trimesh

    box = trimesh.creation.box(extents=BOX_EXTENTS_M)
    box.apply_translation([0.0, BOX_EXTENTS_M[1] / 2.0, 0.0])
    return box.export(file_type="glb")


def _seconds(options: dict, name: str, default_s: float) -> float:
    raw = options.get(name, default_s)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number of seconds, got {raw!r}", code="bad_option") from None
    if value < 0:
        raise InputError(f"{name} must be >= 0 seconds, got {value}", code="bad_option")
    return value


class InstantBackend(Backend):
    """Returns a GLB at once: the input itself when it is a binary glTF, else a
    small box. Option ``delay_s`` (worker-wide or per request) waits that long
    first, a synthetic GPU time."""

    name = "instant"
    input_kind = "mesh"
    default_delay_s = 0.0

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.delay_s = _seconds(self.options, "delay_s", self.default_delay_s)
        self.loaded = False

    def load(self) -> None:
        box_glb()  # pay trimesh's import before READY, like a model load
        self.loaded = True

    def generate(self, job: GenerationInput) -> GenerationOutput:
        if not self.loaded:
            raise GenerateError("generate() was called before load()")
        delay_s = _seconds(job.options, "delay_s", self.delay_s)
        if delay_s > 0:
            job.progress(f"waiting {delay_s:g} s")
            # Event.wait rather than sleep: nothing to wake it, it only holds the thread.
            threading.Event().wait(delay_s)
        glb = job.input_data if job.input_data[:4] == b"glTF" else box_glb()
        info = {
            "backend": self.name,
            "delay_s": delay_s,
            "pid": os.getpid(),
            "cuda_visible_devices": CUDA_VISIBLE_DEVICES_AT_IMPORT,
            "work_dir": str(job.work_dir),
            "work_dir_existed": job.work_dir.is_dir(),
        }
        return GenerationOutput(glb=glb, info=info)


class SlowBackend(InstantBackend):
    """InstantBackend with a default delay of 1 s (option ``delay_s``), for
    heartbeat, busy and kill-mid-job tests."""

    name = "slow"
    default_delay_s = 1.0


class FailingBackend(InstantBackend):
    """Raises inside generate. Per-request option ``fail``: ``runtime`` (default,
    a plain RuntimeError), ``input`` (InputError code bad_image), ``generate``
    (GenerateError), ``exit`` (SystemExit) or ``no`` (succeeds like Instant)."""

    name = "failing"

    def generate(self, job: GenerationInput) -> GenerationOutput:
        mode = str(job.options.get("fail", self.options.get("fail", "runtime")))
        if mode == "runtime":
            raise RuntimeError("synthetic failure inside the backend")
        if mode == "input":
            raise InputError("the image is not an image (synthetic)", code="bad_image")
        if mode == "generate":
            raise GenerateError("the model produced an empty mesh (synthetic)", code="empty_mesh")
        if mode == "exit":
            raise SystemExit(3)
        return super().generate(job)


class CrashingBackend(InstantBackend):
    """Kills its own process inside generate (SIGKILL), like a worker lost to
    the OOM killer or a driver fault. Option ``after_s`` waits first; per
    request, ``crash=no`` succeeds like InstantBackend instead."""

    name = "crashing"

    def generate(self, job: GenerationInput) -> GenerationOutput:
        if job.options.get("crash") == "no":  # per request: serve like InstantBackend
            return super().generate(job)
        after_s = _seconds(job.options, "after_s", _seconds(self.options, "after_s", 0.0))
        if after_s > 0:
            threading.Event().wait(after_s)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: the process was killed")


class HangingBackend(InstantBackend):
    """A generate() that never returns, like a model stuck in a driver call.
    Per request, ``hang=no`` succeeds like InstantBackend (its info has the
    backend process's pid). Option ``load_s`` makes load() take that long, so a
    test can watch a reload; option ``loads_file`` names a file that load()
    appends its pid to, one line per load; with it, option ``max_loads`` makes
    every load after that many fail (BackendUnavailable), like a GPU lost
    between two loads."""

    name = "hanging"

    def load(self) -> None:
        load_s = _seconds(self.options, "load_s", 0.0)
        if load_s > 0:
            threading.Event().wait(load_s)
        loads_file = self.options.get("loads_file")
        if loads_file:
            done = Path(loads_file).read_text().count("\n") if Path(loads_file).exists() else 0
            if done >= int(self.options.get("max_loads", done + 1)):
                raise BackendUnavailable(f"backend 'hanging' may load {done} times only (synthetic)")
            with open(loads_file, "a") as loads:
                loads.write(f"{os.getpid()}\n")
        super().load()

    def generate(self, job: GenerationInput) -> GenerationOutput:
        if job.options.get("hang") == "no":
            return super().generate(job)
        job.progress("hanging")
        threading.Event().wait()
        raise AssertionError("unreachable: nothing sets the event")


class UnavailableBackend(Backend):
    """A backend whose load() fails the way a GPU backend without its extra does."""

    name = "unavailable"
    extra = "unavailable-extra"

    def load(self) -> None:
        raise BackendUnavailable(
            "backend 'unavailable' needs the package 'nonexistent_model_pkg'; "
            "install it with: pip install 'geomgen[unavailable-extra]'"
        )

    def generate(self, job: GenerationInput) -> GenerationOutput:
        raise AssertionError("never loaded")


# --- conversion functions for the SDF worker's child (GEOMGEN_CONVERT_FN) -----


def _native_crash(*_args) -> list:
    """Stands in for CoACD dying in native code: last words on stderr, then a
    read of address 0 (SIGSEGV inside C, not a Python exception)."""
    import ctypes
    import sys

    print("coacd: synthetic native failure", file=sys.stderr, flush=True)
    ctypes.string_at(0)
    raise AssertionError("unreachable: the process was killed")


def _native_hang(*_args) -> list:
    """Stands in for CoACD or V-HACD searching forever."""
    threading.Event().wait()
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _decomposition_replaced(**rungs):
    """Replace decomposition methods in this process (a conversion child) for the block."""
    from geomgen.geometry import decomposition

    saved = dict(decomposition.RUNGS)
    decomposition.RUNGS.update(rungs)
    try:
        yield
    finally:
        decomposition.RUNGS.clear()
        decomposition.RUNGS.update(saved)


def selectable_convert(data: bytes, input_name: str, out_dir: Path, name: str, options):
    """Same signature as geomgen.geometry.convert.convert_mesh. The output name
    picks a behaviour: ``segfault*`` dies with SIGSEGV, ``hang*`` never returns,
    ``sleep*`` waits 0.5 s then converts, ``bad_input*`` raises InputError,
    ``bad_convert*`` raises ConvertError, ``oops*`` raises a plain exception,
    ``coacd_crash*`` converts with a CoACD that dies in native code,
    ``decomp_hang*`` with a CoACD and a V-HACD that never return;
    anything else is the real conversion. When GEOMGEN_TEST_PID_DIR is set the
    child writes its pid there as ``<name>.pid`` first, so a test can check it
    was reaped."""
    pid_dir = os.environ.get("GEOMGEN_TEST_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{name}.pid").write_text(str(os.getpid()))
    if name.startswith("segfault"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hang"):
        threading.Event().wait()
    if name.startswith("sleep"):
        threading.Event().wait(0.5)
    if name.startswith("bad_input"):
        raise InputError("the GLB has no faces (synthetic)", code="bad_mesh")
    if name.startswith("bad_convert"):
        from geomgen.errors import ConvertError

        raise ConvertError("every decomposition method failed (synthetic)", code="decomposition_failed")
    if name.startswith("oops"):
        raise ValueError("synthetic bug in the converter")
    from geomgen.geometry.convert import convert_mesh

    if name.startswith("coacd_crash"):
        with _decomposition_replaced(coacd=_native_crash):
            return convert_mesh(data, input_name, out_dir, name, options)
    if name.startswith("decomp_hang"):
        with _decomposition_replaced(coacd=_native_hang, vhacd=_native_hang):
            return convert_mesh(data, input_name, out_dir, name, options)
    return convert_mesh(data, input_name, out_dir, name, options)


class DeclaredBackend(InstantBackend):
    """InstantBackend that declares its options, as a third-party backend may:
    the broker learns the declaration from the worker's READY and refuses a
    misspelt or out-of-range option before the job reaches the worker."""

    name = "declared"
    options_spec = (OptionSpec("delay_s", "number", 0.0, 0.0, 60.0, help="synthetic GPU time, seconds"),)
