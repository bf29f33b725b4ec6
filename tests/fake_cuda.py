"""The torch.cuda surface of cuda_graphs, faked on the CPU.

A "captured" graph holds the body that ran between capture_begin and
capture_end and replays it on the CPU: the step a CUDA graph would replay,
with fixed shapes and no host-known length. Every call is recorded with the
device and stream current at the time, so tests can check the protocol:
device guards, the capture stream, the shared pool, and the recovery after a
failed capture.
"""

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch


class FakeStream:
    def __init__(self, device: torch.device, name: str) -> None:
        self.device = device
        self.name = name

    def __repr__(self) -> str:
        return f"<stream {self.name} on {self.device}>"


class FakeGraph:
    def __init__(self, cuda: "FakeCuda") -> None:
        self._cuda = cuda
        self.body: Optional[Callable[[], None]] = None
        self.device: Optional[int] = None
        self.replays = 0
        self.captured = False

    def capture_begin(self, pool: Any = None) -> None:
        cuda = self._cuda
        cuda.log("capture_begin", pool=pool)
        if cuda.stream is None:
            raise RuntimeError("CUDA graphs must be captured on a non-default stream")
        cuda.generator_capturing = True  # as CUDAGeneratorState.capture_prologue
        self.device = cuda.current_device
        cuda.capturing = self

    def capture_end(self) -> None:
        cuda = self._cuda
        cuda.log("capture_end")
        cuda.capturing = None  # cudaStreamEndCapture ends it, even on error
        if cuda.fail_next_end:
            cuda.fail_next_end -= 1
            raise RuntimeError(
                "CUDA error: operation failed due to a previous error during capture"
            )
        cuda.generator_capturing = False  # capture_epilogue
        self.captured = True

    def replay(self) -> None:
        cuda = self._cuda
        assert self.captured and self.body is not None
        assert cuda.current_device == self.device, "replayed off its device"
        self.replays += 1
        cuda.replays.append(self)
        if cuda.replay_fault is not None:
            cuda.replay_fault(self)
        else:
            self.body()


class FakeCuda:
    """cuda_graphs.TorchCuda on the CPU: the decoder's cpu device plays GPU
    `index`."""

    def __init__(self, index: int = 0) -> None:
        self.default_index = index
        self.current_device: Optional[int] = None
        self.stream: Optional[FakeStream] = None
        self.capturing: Optional[FakeGraph] = None
        self.generator_capturing = False
        self.events: List[Tuple[str, Optional[int], Optional[str], dict]] = []
        self.graphs: List[FakeGraph] = []
        self.replays: List[FakeGraph] = []
        self.pools: List[object] = []
        self.fail_next_end = 0  # capture_end raises this many times
        self.fail_after = -1  # the capture_end of graph number this raises
        self.replay_fault: Optional[Callable[[FakeGraph], None]] = None
        self.free = 80 * 2**30
        self._streams = 0

    def log(self, what: str, **details: Any) -> None:
        stream = self.stream.name if self.stream is not None else None
        self.events.append((what, self.current_device, stream, details))

    def names(self) -> List[str]:
        return [event[0] for event in self.events]

    # --- TorchCuda ---

    def is_gpu(self, device: torch.device) -> bool:
        return True

    def index(self, device: torch.device) -> int:
        return device.index if device.index is not None else self.default_index

    @contextlib.contextmanager
    def device(self, device: torch.device) -> Iterator[None]:
        before = self.current_device
        self.current_device = self.index(device)
        try:
            yield
        finally:
            self.current_device = before

    def new_stream(self, device: torch.device) -> FakeStream:
        self._streams += 1
        return FakeStream(device, f"s{self._streams}")

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream, device: torch.device) -> Iterator[None]:
        assert self.index(stream.device) == self.current_device, "stream off device"
        before = self.stream
        self.stream = stream
        try:
            yield
        finally:
            self.stream = before

    def new_graph(self) -> FakeGraph:
        graph = FakeGraph(self)
        if self.fail_after >= 0 and len(self.graphs) >= self.fail_after:
            self.fail_next_end, self.fail_after = 1, -1
        self.graphs.append(graph)
        return graph

    def record(self, graph: FakeGraph, body: Callable[[], None]) -> None:
        graph.body = body
        body()

    def pool_handle(self) -> object:
        pool = object()
        self.pools.append(pool)
        return pool

    def synchronize(self, device: torch.device) -> None:
        self.log("synchronize")

    def reserved(self, device: torch.device) -> int:
        return 1000 * len(self.graphs)

    def free_memory(self, device: torch.device) -> int:
        return self.free

    def end_allocate_to_pool(self, index: int, pool: Any) -> None:
        self.log("end_allocate_to_pool", index=index, pool=pool)

    def scratch(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(1)

    def random_draws(self, device: torch.device) -> None:
        self.log("random_draws")
        if self.generator_capturing:
            raise RuntimeError(
                "Offset increment outside graph capture encountered unexpectedly."
            )
