"""CUDA graphs of T3's decode step: every one captured at load, safely.

`capture_steps` records the step over rows [0, n) for every size n and
attention span the decoder will replay, once, when the model loads (never
lazily under traffic): on the decoder's own device (a device guard, and a
capture stream made on that device: with `--device cuda:1` nothing may be
recorded on GPU 0), all graphs sharing one memory pool, each after one warm-up
run on the same stream. `StepGraphs.replay` runs one under the same guard.

A failed capture leaves PyTorch (2.6 to 2.8) broken unless it is cleaned up:
`torch.cuda.graph`'s __exit__ raises inside `capture_end()`, so the capture
stream stays the thread's current stream, the device's default generator
stays in capture mode (every later eager random draw, T3's sampler as S3Gen's
noise, fails with "Offset increment outside graph capture encountered
unexpectedly") and the caching allocator keeps a routing entry that points at
the graph. Here the stream is always restored (the capture runs inside our
own stream context, not torch.cuda.graph) and `recover` ends the routing,
takes the generator out of capture mode with a capture that completes, and
checks that eager random draws work again.

`CUDA` is the torch.cuda surface this uses: a seam, so that tests can run the
whole protocol on the CPU (tests/fake_cuda.py).
"""

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

_LOGGER = logging.getLogger(__name__)

# Graphs whose capture failed. Never freed: the caching allocator may still
# hold a routing filter that points at one (if ending it failed).
_FAILED: List[Any] = []


class CaptureFailed(Exception):
    """Capturing failed; PyTorch's state was recovered (str: why it failed)."""


class TorchCuda:
    """The parts of torch.cuda the capture protocol uses."""

    def is_gpu(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def index(self, device: torch.device) -> int:
        return device.index if device.index is not None else torch.cuda.current_device()

    def device(self, device: torch.device) -> Any:
        return torch.cuda.device(device)

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    @contextlib.contextmanager
    def use_stream(self, stream: Any, device: torch.device) -> Iterator[None]:
        """Work on `stream`, ordered after the device's current stream and
        before what follows on it; the current stream is restored on exit."""
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            current.wait_stream(stream)

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def record(self, graph: Any, body: Callable[[], None]) -> None:
        """Run `body` between graph.capture_begin and capture_end: its kernels
        go into the graph (a fake graph keeps the body itself)."""
        body()

    def pool_handle(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def reserved(self, device: torch.device) -> int:
        return int(torch.cuda.memory_reserved(device))

    def free_memory(self, device: torch.device) -> int:
        """Free device memory, PyTorch's cached blocks counted as free."""
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device
        )
        return int(free + cached)

    def end_allocate_to_pool(self, index: int, pool: Any) -> None:
        """Drop the caching allocator's routing of allocations to `pool` (its
        name changed between PyTorch 2.6 and 2.8)."""
        for name in ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"):
            end = getattr(torch._C, name, None)
            if end is not None:
                end(index, pool)
                return
        raise RuntimeError("this PyTorch has no way to end a graph pool's routing")

    def scratch(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(1, device=device)

    def random_draws(self, device: torch.device) -> None:
        """Eager random numbers as T3's sampler and S3Gen draw them."""
        torch.empty(8, device=device).exponential_()
        torch.randn(8, device=device)
        torch.cuda.synchronize(device)


CUDA: TorchCuda = TorchCuda()


class StepGraphs:
    """The captured decode steps of one step pool, by (rows, span)."""

    def __init__(
        self,
        graphs: Dict[Tuple[int, int], Any],
        device: torch.device,
        seconds: float,
        memory: int,
    ) -> None:
        self._graphs = graphs
        self.device = device
        self.seconds = seconds  # capture time, warm-up runs included
        self.memory = memory  # device memory the capture reserved

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> List[Tuple[int, int]]:
        return sorted(self._graphs)

    def replay(self, n: int, span: int) -> bool:
        """Run the step over rows [0, n) attending over `span`; False if no
        such graph was captured (the caller then steps eagerly)."""
        graph = self._graphs.get((n, span))
        if graph is None:
            return False
        with CUDA.device(self.device):
            graph.replay()
        return True

    def close(self) -> None:
        self._graphs.clear()


def capture_steps(
    body_for: Callable[[int, int], Callable[[], None]],
    sizes: Sequence[int],
    spans: Sequence[int],
    device: torch.device,
) -> StepGraphs:
    """Capture body_for(n, span)() for every n in `sizes` and span in `spans`.
    Raises CaptureFailed (after `recover`) if any capture fails, or
    RuntimeError if even recovery left eager random draws failing."""
    cuda = CUDA
    started = time.monotonic()
    graphs: Dict[Tuple[int, int], Any] = {}
    with cuda.device(device):
        cuda.synchronize(device)
        before = cuda.reserved(device)
        stream = cuda.new_stream(device)
        pool = cuda.pool_handle()
        try:
            for n in sizes:
                for span in spans:
                    graphs[(n, span)] = _capture(
                        cuda, body_for(n, span), stream, pool, device
                    )
        except Exception as err:  # pylint: disable=broad-except
            graphs.clear()
            recover(device, pool)
            raise CaptureFailed(f"{type(err).__name__}: {err}") from err
        cuda.synchronize(device)
        memory = cuda.reserved(device) - before
    return StepGraphs(graphs, device, time.monotonic() - started, memory)


def _capture(
    cuda: TorchCuda,
    body: Callable[[], None],
    stream: Any,
    pool: Any,
    device: torch.device,
) -> Any:
    """One graph of `body`, after a warm-up run on the capture stream (lazy
    initialisation, e.g. of cuBLAS workspaces, must happen outside capture)."""
    graph = cuda.new_graph()
    with cuda.use_stream(stream, device):
        body()
        graph.capture_begin(pool=pool)
        try:
            cuda.record(graph, body)
        except BaseException:
            _FAILED.append(graph)
            with contextlib.suppress(Exception):
                graph.capture_end()  # ends the stream's capture, if it can
            raise
        try:
            graph.capture_end()
        except BaseException:
            _FAILED.append(graph)
            raise
    return graph


def recover(device: torch.device, pool: Any) -> None:
    """Undo what a failed capture on `device` into `pool` left behind (see the
    module doc); RuntimeError if eager random draws still fail after it."""
    cuda = CUDA
    index = cuda.index(device)
    try:
        cuda.end_allocate_to_pool(index, pool)
    except Exception:  # pylint: disable=broad-except
        # Already ended (the failure came later in capture_end).
        _LOGGER.debug("No allocator routing to end after the failed capture")
    try:
        with cuda.device(device):
            # capture_begin puts the device's default generator in capture
            # mode and only a completed capture_end takes it out: complete one.
            scratch = cuda.scratch(device)

            def touch() -> None:
                scratch.add_(1)

            graph = cuda.new_graph()
            with cuda.use_stream(cuda.new_stream(device), device):
                graph.capture_begin()
                cuda.record(graph, touch)
                graph.capture_end()
            del graph
            cuda.random_draws(device)
    except Exception as err:
        raise RuntimeError(
            "a failed CUDA graph capture left PyTorch unable to draw random "
            f"numbers on {device} ({type(err).__name__}: {err})"
        ) from err
