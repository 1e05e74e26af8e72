"""Native TensorRT: one deserialized plan per component, run on its own CUDA stream with device buffers
from cuda-python (no PyTorch).

A call picks the plan profile that fits its shapes (`plans.choose_profile`: a static size first), pads
the batch to a bucket when that is cheap (`plans.padded_batch`), copies the feeds in, runs, and copies
the outputs out. Shapes of static profiles recur, so the first run of each is captured as a CUDA graph
and later runs replay it. A call that no profile fits (a size without plans, a very long prompt) runs
on ONNX Runtime for that component instead (CUDA where it works, else CPU), logged once per shape: the
request still renders, only slower.

The backend is only created when `plans.select` finds plans built for this GPU and TensorRT version;
otherwise it raises EngineFailure with the reason, and "auto" moves on to ONNX Runtime.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engines import gpu, plans
from engines import manifest as mf
from engines.backends import ort
from engines.backends.base import Backend, Session
from engines.errors import EngineFailure

log = logging.getLogger("sdserve.engines")

Fallback = Callable[[], Session]
PLAN, FALLBACK = "TensorRT plan", "fallback:"  # where a call ran, as `Session.ran_on` counts it


class TensorRtSession(Session):
    """One component's plan: an execution context, device buffers sized for the largest profile, a
    stream, and the CUDA graphs captured so far. Calls are serialized: a context runs one call at a time."""

    def __init__(self, name: str, component: mf.Component, engine: Any, profiles: list[plans.ShapeProfile],
                 fallback: Fallback, memory: ContextMemory) -> None:
        super().__init__(name, component)
        self._cuda, self._engine, self._profiles, self._make_fallback = gpu.cudart(), engine, profiles, fallback
        self._fallback: Session | None = None
        self.max_rows = max((p.batch[2] for p in profiles), default=None)  # beyond: ONNX Runtime, slower
        self._batched = plans.batch_inputs(component)  # the inputs a padded call pads; never LoRA's nor 0-d ones
        self._memory = memory
        self._lock = memory.lock  # the contexts of one model share their activation memory: one call at a time
        self._buffers: dict[str, int] = {}
        self._graphs: dict[tuple[Any, ...], Any] = {}
        self._graphs_work = True
        self._last_shapes: tuple[Any, ...] | None = None  # of the last call the context ran
        self._reported: set[tuple[Any, ...]] = set()
        self._stream = None
        self._context = None
        try:
            self._setup()
        except Exception:
            self.close()
            raise

    def _setup(self) -> None:
        trt, engine = gpu.tensorrt(), self._engine
        if engine.num_optimization_profiles != len(self._profiles):
            raise EngineFailure(f"{self.name}: the plan has {engine.num_optimization_profiles} profiles, the "
                                f"manifest's plan set implies {len(self._profiles)}; rebuild the plans")
        self._context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self._context is None:
            raise EngineFailure(f"{self.name}: TensorRT cannot create an execution context (out of GPU memory?)")
        self._memory.attach(self._context, int(engine.device_memory_size_v2))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._plan_dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._stream = gpu.call(self._cuda.cudaStreamCreateWithFlags(self._cuda.cudaStreamNonBlocking))
        self._active = 0
        for tensor, size in self._largest_sizes(names).items():
            self._buffers[tensor] = gpu.call(self._cuda.cudaMalloc(size))

    def _largest_sizes(self, names: list[str]) -> dict[str, int]:
        """Bytes per tensor over every profile at its max shapes, so that one set of buffers (and fixed
        addresses, which captured graphs need) serves every call."""
        sizes = dict.fromkeys(names, 1)
        for index in range(len(self._profiles)):
            self._select_profile(index)
            for name in self._inputs:
                self._context.set_input_shape(name, self._engine.get_tensor_profile_shape(name, index)[2])
            for name in names:
                volume = math.prod(max(int(d), 1) for d in self._context.get_tensor_shape(name))
                sizes[name] = max(sizes[name], volume * self._plan_dtypes[name].itemsize)
        return sizes

    def _select_profile(self, index: int) -> None:
        if not self._context.set_optimization_profile_async(index, int(self._stream)):
            raise EngineFailure(f"{self.name}: TensorRT refused optimization profile {index}")
        self._active = index

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feeds = self.cast(feeds)
        shapes = {name: array.shape for name, array in feeds.items()}
        index = plans.choose_profile(self._profiles, shapes)
        with self._lock:
            if index is None:
                return self._run_fallback(feeds, outputs, shapes)
            try:
                return self._run_plan(index, feeds, outputs)
            except EngineFailure:
                raise
            except Exception as exc:  # TensorRT's and cuda-python's own errors
                raise EngineFailure(f"{self.name} failed in TensorRT: {type(exc).__name__}: {exc}") from exc

    def _run_plan(self, index: int, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        profile = self._profiles[index]
        rows = plans.call_rows(feeds, self._batched)
        padded = plans.padded_batch(rows, profile)
        if index != self._active:
            self._select_profile(index)
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise EngineFailure(f"{self.name}: the plan needs inputs the pipeline does not feed: {', '.join(missing)}")
        # asarray, not ascontiguousarray: that one turns a 0-d input (a scalar timestep) into shape (1,)
        host = {name: np.asarray(array, dtype=self._plan_dtypes[name], order="C")
                for name, array in plans.pad_rows({n: feeds[n] for n in self._inputs}, self._batched, padded).items()}
        for name, array in host.items():
            if not self._context.set_input_shape(name, array.shape):
                raise EngineFailure(f"{self.name}: TensorRT rejects {name} of shape {array.shape}")
            self._copy(self._buffers[name], array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice")
        for name, address in self._buffers.items():
            self._context.set_tensor_address(name, address)
        self._execute(profile.static, (index, *((n, a.shape) for n, a in host.items())))
        results = {}
        for name in outputs:
            if name not in self._plan_dtypes:
                raise EngineFailure(f"{self.name}: the plan has no output {name!r}")
            out = np.empty(tuple(self._context.get_tensor_shape(name)), self._plan_dtypes[name])
            self._copy(out.ctypes.data, self._buffers[name], out.nbytes, "cudaMemcpyDeviceToHost")
            results[name] = out
        gpu.call(self._cuda.cudaStreamSynchronize(self._stream))
        self.ran_on[PLAN] += 1
        return {name: (out[:rows].astype(np.float32) if out.dtype == np.float16 else out[:rows])
                for name, out in results.items()}

    def _copy(self, destination: int, source: int, size: int, kind: str) -> None:
        direction = getattr(self._cuda.cudaMemcpyKind, kind)
        gpu.call(self._cuda.cudaMemcpyAsync(destination, source, size, direction, self._stream))

    def _execute(self, static: bool, shapes: tuple[Any, ...]) -> None:
        """Run once; for a static profile replay the shape's CUDA graph, capturing it after its first run
        (which also flushes TensorRT's per-shape setup, which must not land in the graph). A graph is
        only valid under the context state it was captured in, so it is replayed only when the previous
        call ran the same shapes (the steps of one render do); after other shapes, a plain run first."""
        repeat = shapes == self._last_shapes
        self._last_shapes = shapes
        graph = self._graphs.get(shapes) if static and self._graphs_work and repeat else None
        if graph is not None:
            gpu.call(self._cuda.cudaGraphLaunch(graph, self._stream))
            return
        self._enqueue()
        if static and self._graphs_work and shapes not in self._graphs:
            self._graphs[shapes] = self._capture()

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineFailure(f"{self.name}: TensorRT execution failed")

    def _capture(self) -> Any:
        """The graph of one run, or None (graphs then stay off for this session: some plans cannot be
        captured, and they still run launch by launch). Whatever fails on the way, capture ends and the
        captured graph is destroyed; the call's outputs come from the plain run before."""
        cuda = self._cuda
        begun = cuda.cudaStreamBeginCapture(self._stream, cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        begun = begun[0] if isinstance(begun, tuple) else begun  # cuda-python answers (error,)
        if begun != cuda.cudaError_t.cudaSuccess:
            return self._no_graphs(begun)
        failure = None
        try:
            if not self._context.execute_async_v3(int(self._stream)):
                failure = "TensorRT's enqueue failed while capturing"
        except Exception as exc:  # capture is an optimization: any failure turns it off, none fails the call
            failure = f"{type(exc).__name__}: {exc}"
        ended, graph = cuda.cudaStreamEndCapture(self._stream)  # always: never leave the stream capturing
        try:
            if failure is not None or ended != cuda.cudaError_t.cudaSuccess or graph is None:
                return self._no_graphs(failure or ended)
            instantiated, executable = cuda.cudaGraphInstantiate(graph, 0)
            return executable if instantiated == cuda.cudaError_t.cudaSuccess else self._no_graphs(instantiated)
        finally:
            if graph is not None:
                cuda.cudaGraphDestroy(graph)

    def _no_graphs(self, error: Any) -> None:
        self._graphs_work = False
        log.warning("%s: CUDA graph capture failed (%s); running without graphs", self.name, gpu.error_name(error))

    def _run_fallback(self, feeds: dict[str, np.ndarray], outputs: list[str],
                      shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        key = tuple(sorted(shapes.items()))
        if key not in self._reported:
            self._reported.add(key)
            log.info("%s: no TensorRT profile fits %s; running this shape on ONNX Runtime", self.name,
                     ", ".join(f"{n} {list(s)}" for n, s in shapes.items()))
        if self._fallback is None:
            self._fallback = self._make_fallback()
        results = self._fallback.run(feeds, outputs)
        self.ran_on[f"{FALLBACK} {getattr(self._fallback, 'engine', 'ONNX Runtime')}"] += 1
        return results

    def close(self) -> None:
        cuda = self._cuda
        for graph in self._graphs.values():
            if graph is not None:
                cuda.cudaGraphExecDestroy(graph)
        for address in self._buffers.values():
            cuda.cudaFree(address)
        if self._stream is not None:
            cuda.cudaStreamDestroy(self._stream)
        if self._context is not None:
            self._memory.detach(self._context)
        self._graphs, self._buffers, self._stream, self._context = {}, {}, None, None
        if self._fallback is not None:
            self._fallback.close()


class ContextMemory:
    """One device block for the activations of every execution context of a model, sized to the largest
    (user-managed allocation, as NVIDIA's diffusion demo does): the pipeline runs one component at a
    time, so the text encoders, UNet and VAE need not each hold their own. Grown as contexts attach."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._cuda = gpu.cudart()
        self._address, self._size = 0, 0
        self._contexts: list[Any] = []

    def attach(self, context: Any, size: int) -> None:
        with self.lock:
            if size > self._size:
                address = gpu.call(self._cuda.cudaMalloc(size))
                if self._address:
                    self._cuda.cudaFree(self._address)
                self._address, self._size = address, size
                for other in self._contexts:
                    other.set_device_memory(self._address, self._size)
            context.set_device_memory(self._address, self._size)
            self._contexts.append(context)

    def detach(self, context: Any) -> None:
        with self.lock:
            self._contexts = [c for c in self._contexts if c is not context]
            if not self._contexts and self._address:
                self._cuda.cudaFree(self._address)
                self._address, self._size = 0, 0

    @property
    def size(self) -> int:
        return self._size


class TensorRtBackend(Backend):
    name = "tensorrt"

    def __init__(self, root: Path, manifest: mf.Manifest, threads: int | None = None, device_id: int = 0,
                 verify: bool = True) -> None:
        self.gpu = gpu.probe(device_id)
        self.plan_set = plans.select(root, manifest, self.gpu.tensorrt_version, self.gpu.compute_capability, verify)
        self.root, self.manifest, self.threads, self.device_id = root, manifest, threads, device_id
        self.device = f"{self.gpu.name} (TensorRT {self.gpu.tensorrt_version})"
        gpu.call(gpu.cudart().cudaSetDevice(device_id))
        self._logger = gpu.logger()  # TensorRT keeps a pointer to it: it must live as long as the runtime
        self._runtime = gpu.tensorrt().Runtime(self._logger)
        self._fallback: ort.OrtBackend | None = None
        self.memory = ContextMemory()
        log.info("%s: TensorRT plans %s (%s)", root.name, self.plan_set.key,
                 ", ".join(p.label for p in self.plan_set.profiles))

    def open(self, name: str, component: mf.Component) -> TensorRtSession:
        """One component's plan; every failure (TensorRT's RuntimeError or TypeError, an OSError) is an
        EngineFailure, so that loading falls back to ONNX Runtime."""
        path = self.root / self.plan_set.plans[name].path
        try:
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineFailure(f"{name}: TensorRT cannot load {path}: {self._logger.last_error()}")
            profiles = plans.component_profiles(self.manifest, name, self.plan_set.profiles)
            return TensorRtSession(name, component, engine, profiles, lambda: self._open_fallback(name, component),
                                   self.memory)
        except EngineFailure:
            raise
        except Exception as exc:
            raise EngineFailure(f"{name}: TensorRT failed loading {path}: {type(exc).__name__}: {exc}") from exc

    def _open_fallback(self, name: str, component: mf.Component) -> Session:
        """ONNX Runtime for the calls no profile fits: the first of CUDA and CPU that loads."""
        if self._fallback is not None:
            return self._fallback.open(name, component)
        failures = []
        for provider in [p for p in ("cuda", "cpu") if p in ort.available()]:
            backend = ort.OrtBackend(self.root, provider, self.manifest, threads=self.threads, device_id=self.device_id)
            try:
                session = backend.open(name, component)
            except EngineFailure as exc:
                failures.append(f"{provider}: {exc}")
                continue
            self._fallback = backend
            log.info("%s: shapes without TensorRT plans run on ONNX Runtime (%s)", self.root.name, provider)
            return session
        raise EngineFailure(f"{name}: no TensorRT profile fits and ONNX Runtime cannot run it ({'; '.join(failures)})")
