"""A CPU stand-in for CUDA graphs, so that the engine's capture path (``lvae.training.loop.Stepper._capture`` and the
replays in ``Stepper.step``) runs in CI without a GPU, with the checks a real capture fails on -- or, worse,
silently goes wrong on.

:meth:`CudaStandin.install` replaces, for one test (``monkeypatch``), ``torch.cuda.CUDAGraph``, ``torch.cuda.graph``,
``torch.cuda.Stream`` / ``stream`` / ``current_stream`` / ``device`` and ``lvae.training.loop.graphed`` (the CPU plays
``cuda:0``: a step is captured when ``cuda_graph=True`` and not compiled), and lets PyTorch's capturable Adam run on
the CPU. What the stand-in does and checks:

* **Capture** (``with torch.cuda.graph(g)``) runs the step once under a recording dispatch mode: every ATen op with
  its very argument and output tensors. On exit the step is **undone** (every tensor that existed before the capture
  and was written is restored), and the outputs the capture allocated are poisoned with NaN until the first replay,
  as a real capture launches no kernel.
* **Replay** re-runs the recorded ops on the same tensors, writing fresh results into the output tensors recorded
  at capture (a CUDA graph's private pool). It first checks that the step's static inputs, parameters, gradients,
  Adam state and buffers (:func:`graph_tensors`) are the very tensors seen at capture, at the same address, and that
  no tensor the graph reads or writes was moved (``.data =``, ``set_``): a real replay would use stale memory.
* **Refused during a capture**: a host sync (``.item()``, data-dependent shapes), a random draw (the step must read
  its noise from static tensors), an optimizer step with ``capturable=False`` (PyTorch's own health check, which
  only runs on a real accelerator), a capture on a device other than the step's, and -- under the default
  ``capture_error_mode="global"`` -- any work of another thread: work handed to ``lvae.training.loop.ThreadPoolExecutor``
  (the prefetch of the next epoch's inputs) counts as possibly running until the training loop has waited for its
  result (on a GPU it copies ~188 MB and draws ~1,175 noise tensors), and each op such a thread runs while a capture
  is under way fails, as CUDA's "operation not permitted when stream is capturing".
"""
from __future__ import annotations

import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lvae.training.loop

HOST_SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
             torch.ops.aten.is_nonzero.default}


class CaptureError(RuntimeError):
    """What a real CUDA-graph capture or replay would fail on (or silently get wrong)."""


def graph_tensors(stepper: lvae.training.loop.Stepper) -> dict[str, torch.Tensor]:
    """The tensors a stepper's captured graph reads and writes in place, by name: static inputs, beta and the
    learning rate, parameters, the flat parameters and gradients, the Adam moments and step counter, the buffers."""
    out = {"static input x": stepper._x, "beta": stepper.beta}
    lr = stepper.optimizer._inner.param_groups[0]["lr"]
    if isinstance(lr, torch.Tensor):
        out["learning rate"] = lr
    out.update({f"static noise {i}": e for i, e in enumerate(stepper._eps)})
    params = (stepper.params.items() if isinstance(stepper, lvae.training.loop.GridTrainer)
              else stepper.models[0].named_parameters())
    out.update({f"parameter {k}": p for k, p in params})
    names = ("flat parameters", "flat gradients", "Adam exp_avg", "Adam exp_avg_sq", "Adam step")
    out.update(dict(zip(names, stepper.optimizer.state_tensors())))
    out.update({f"buffer {i}": b for i, b in enumerate(stepper.buffers())})
    return out


def _index(device, current: int) -> int:
    """The CUDA index a device stands for: the CPU plays cuda:0; "cuda" is the current device."""
    if device is None:
        return current
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type == "cpu":
        return 0
    return current if d.index is None else d.index


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes (``Tensor(a!)`` arguments: in-place, ``out=``)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        out.extend(t for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor))
    return out


def _outputs(func, out) -> list[tuple[Any, bool]]:
    """(output, fresh) for each output leaf of an op: fresh when the schema says it aliases no input."""
    rets = func._schema.returns
    if not rets:
        return []
    pairs = [(out, rets[0])] if len(rets) == 1 else list(zip(out, rets))
    leaves = []
    for value, ret in pairs:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            leaves.append((v, ret.alias_info is None))
    return leaves


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    outputs: list[tuple[Any, bool]]


class _Recorder(TorchDispatchMode):
    """Records every op of a capture, with the tensors it reads and writes; refuses host syncs and random draws."""

    def __init__(self):
        super().__init__()
        self.ops: list[_Op] = []
        self.produced: set[int] = set()  # storages the capture allocated
        self.external: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (tensor from before the capture, data_ptr)
        self.external_storages: set[int] = set()
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value before the first write)
        self._snapped: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNC or torch.Tag.dynamic_output_shape in func.tags:
            raise CaptureError(f"{func} inside a CUDA-graph capture: a host sync (.item(), bool(), a data-dependent "
                               f"shape) is not allowed while a stream captures; keep the step on the device")
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise CaptureError(f"{func} inside a CUDA-graph capture: a random draw in the step; draw the noise "
                               f"before the step into static tensors (lvae.training.loop.epoch_inputs)")
        leaves, _ = tree_flatten((args, kwargs))
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self.produced:
                self.external.setdefault(id(t), (t, t.data_ptr()))
                self.external_storages.add(_storage(t))
        for t in _written(func, args, kwargs):
            if t.numel() and _storage(t) not in self.produced and id(t) not in self._snapped:
                self._snapped.add(id(t))
                self.snapshots.append((t, t.detach().clone()))
        out = func(*args, **kwargs)
        outputs = _outputs(func, out)
        for t, fresh in outputs:
            if fresh and isinstance(t, torch.Tensor) and t.numel():
                if _storage(t) not in self.external_storages:
                    self.produced.add(_storage(t))
        self.ops.append(_Op(func, args, kwargs, outputs))
        return out


@dataclass
class _Capture:
    graph: StandinGraph
    device: int
    mode: str
    thread: int
    recorder: _Recorder


@dataclass
class _Handle:
    """A future of :class:`lvae.training.loop.ThreadPoolExecutor`: its work counts as running until ``result()``."""

    future: Any
    held: threading.Event
    name: str

    def result(self, timeout=None):
        self.held.set()
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        return self.future.cancel()


class StandinGraph:
    """``torch.cuda.CUDAGraph``: filled by a capture, re-run by :meth:`replay`."""

    def __init__(self, standin: CudaStandin):
        self.standin = standin
        self.ops: list[_Op] | None = None
        self.device: int | None = None
        self.external: dict[int, tuple[torch.Tensor, int]] = {}
        self.storages: set[int] = set()
        self.bound: Callable[[], dict[str, torch.Tensor]] | None = None
        self.at_capture: dict[str, tuple[torch.Tensor, int]] = {}
        self.replays = 0

    def bind(self, live: Callable[[], dict[str, torch.Tensor]]) -> None:
        """The tensors the engine keeps using for this graph (:func:`graph_tensors`), as they are just after the
        capture: each must be read or written by the captured step, and stay the same tensor at every replay."""
        self.bound = live
        self.at_capture = {name: (t, t.data_ptr()) for name, t in live().items()}
        missed = [name for name, (t, _) in self.at_capture.items() if t.numel() and _storage(t) not in self.storages]
        if missed:
            raise CaptureError(f"the captured step neither reads nor writes {missed[:4]}: a replay would leave them "
                               f"stale (was the step captured in the wrong mode, or on other tensors?)")

    def replay(self) -> None:
        st = self.standin
        if self.ops is None:
            raise CaptureError("replay of a CUDA graph that holds no capture")
        if st.capture is not None:
            raise CaptureError("replay while a capture is under way")
        if st.device != self.device:
            raise CaptureError(f"replay with cuda:{st.device} current of a graph captured on cuda:{self.device}")
        for t, ptr in self.external.values():
            if t.data_ptr() != ptr:
                raise CaptureError(f"a tensor {tuple(t.shape)} the graph reads or writes moved since the capture "
                                   f"(.data = or set_): a replay would use the memory it had then")
        if self.bound is not None:
            for name, t in self.bound().items():
                then, ptr = self.at_capture.get(name, (None, None))
                if t is not then or t.data_ptr() != ptr:
                    raise CaptureError(f"replay: the engine's {name} is not the tensor captured (same object, same "
                                       f"address): the graph would read and write the old one")
        with torch.no_grad():
            for op in self.ops:
                out = op.func(*op.args, **op.kwargs)
                for (rec, fresh), (new, _) in zip(op.outputs, _outputs(op.func, out)):
                    if fresh and isinstance(rec, torch.Tensor) and rec is not new and rec.numel():
                        rec.copy_(new)
        self.replays += 1


class CudaStandin:
    """The stand-in's state (current device, the capture under way, work on other threads) and its patches."""

    def __init__(self):
        self.device = 0  # the current CUDA device
        self.capture: _Capture | None = None
        self.handles: list[_Handle] = []
        self.graphs: list[StandinGraph] = []
        self.expected: int | None = None  # the device of the step being captured

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.graphs)

    # -- capture ------------------------------------------------------------------------------------------------
    def begin(self, graph: StandinGraph, device: int, mode: str) -> None:
        if self.capture is not None:
            raise CaptureError("a second capture while one is under way")
        if self.expected is not None and device != self.expected:
            raise CaptureError(f"the capture stream is on cuda:{device} but the step's tensors are on "
                               f"cuda:{self.expected}: their kernels would run eagerly, outside the capture, and every "
                               f"replay would return the capture's stale loss (PyTorch issue 87794); capture inside "
                               f"torch.cuda.device(...) on a stream of the step's device")
        if mode == "global":
            busy = [h.name for h in self.handles if not h.done()]
            if busy:
                raise CaptureError(f"operation not permitted when stream is capturing: {busy[0]} was handed to another "
                                   f"thread and may run CUDA work during the capture, which capture_error_mode="
                                   f"'global' forbids; wait for its result before capturing")
        self.graphs.append(graph)
        rec = _Recorder()
        self.capture = _Capture(graph, device, mode, threading.get_ident(), rec)
        rec.__enter__()

    def end(self) -> None:
        cap, self.capture = self.capture, None
        rec = cap.recorder
        rec.__exit__(None, None, None)
        with torch.no_grad():
            for t, value in reversed(rec.snapshots):  # undo: the capture ran nothing
                t.copy_(value)
            for op in rec.ops:  # what the capture allocated holds garbage until the first replay
                for t, fresh in op.outputs:
                    if fresh and isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() \
                            and _storage(t) in rec.produced:
                        t.fill_(float("nan"))
        g = cap.graph
        g.ops, g.device, g.external = rec.ops, cap.device, rec.external
        g.storages = rec.external_storages | rec.produced

    # -- the patches --------------------------------------------------------------------------------------------
    def install(self, monkeypatch) -> CudaStandin:
        standin = self

        class Stream:
            def __init__(self, device=None, priority=0):
                self.device_index = _index(device, standin.device)

            def wait_stream(self, other):
                pass

            def synchronize(self):
                pass

        @dataclass
        class _Context:
            index: int
            before: list[int] = field(default_factory=list)

            def __enter__(self):
                self.before.append(standin.device)
                standin.device = self.index

            def __exit__(self, *exc):
                standin.device = self.before.pop()

        class graph:
            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global", **kwargs):
                self.cuda_graph, self.stream, self.mode = cuda_graph, stream, capture_error_mode
                self._ctx = None

            def __enter__(self):
                # without a stream, torch.cuda.graph captures on its default capture stream (current device)
                dev = standin.device if self.stream is None else self.stream.device_index
                self._ctx = _Context(dev)
                self._ctx.__enter__()
                try:
                    standin.begin(self.cuda_graph, dev, self.mode)
                except BaseException:
                    self._ctx.__exit__(None, None, None)
                    raise

            def __exit__(self, *exc):
                try:
                    standin.end()
                finally:
                    self._ctx.__exit__(*exc)

        def health_check(opt):  # torch.optim.Optimizer._accelerator_graph_capture_health_check, on the stand-in
            cap = standin.capture
            if cap is not None and cap.thread == threading.get_ident() \
                    and not all(g["capturable"] for g in opt.param_groups):
                raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of "
                                   f"{type(opt).__name__} but param_groups' capturable is False.")

        class OtherThread(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                cap = standin.capture
                if cap is not None and cap.mode == "global":
                    raise CaptureError(f"operation not permitted when stream is capturing: {func} on another thread "
                                       f"during a capture (capture_error_mode='global')")
                return func(*args, **(kwargs or {}))

        class Executor(ThreadPoolExecutor):
            def submit(self, fn, /, *args, **kwargs):
                name = getattr(fn, "__name__", repr(fn))
                if standin.capture is not None:
                    raise CaptureError(f"{name} handed to another thread during a capture")
                held = threading.Event()

                def work():
                    with OtherThread():
                        out = fn(*args, **kwargs)
                    held.wait()  # it may still be copying to the device until the loop waits for it
                    return out

                handle = _Handle(super().submit(work), held, f"{name} (another thread)")
                standin.handles.append(handle)
                return handle

            def shutdown(self, wait=True, *, cancel_futures=False):
                for h in standin.handles:
                    h.held.set()
                super().shutdown(wait, cancel_futures=cancel_futures)

        capture = lvae.training.loop.Stepper._capture

        def bound_capture(stepper, x, eps):
            standin.expected = _index(stepper.device, standin.device)
            try:
                capture(stepper, x, eps)
            finally:
                standin.expected = None
            stepper._graph.bind(lambda: graph_tensors(stepper))

        adam = importlib.import_module("torch.optim.adam")  # the module, which torch.optim's Adam shadows
        supported = adam._get_capturable_supported_devices
        monkeypatch.setattr(adam, "_get_capturable_supported_devices",
                            lambda supports_xla=True: [*supported(supports_xla), "cpu"])
        monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", health_check)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: StandinGraph(standin))
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
        monkeypatch.setattr(torch.cuda, "stream", lambda s: _Context(standin.device if s is None else s.device_index))
        monkeypatch.setattr(torch.cuda, "device", lambda d: _Context(_index(d, standin.device)))
        monkeypatch.setattr(lvae.training.loop, "graphed",  # the CPU plays the GPU
                            lambda cuda_graph, device, compile: bool(cuda_graph) and not compile)
        monkeypatch.setattr(lvae.training.loop, "ThreadPoolExecutor", Executor)
        monkeypatch.setattr(lvae.training.loop.Stepper, "_capture", bound_capture)
        return self
