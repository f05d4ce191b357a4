"""Replay a fixed-shape GPU function as one CUDA graph: one launch per call instead of hundreds of small ones.

Generating a 64-frame window at batch 1 is launch-bound (the GPU finishes each small kernel before the CPU has
issued the next); captured once, the same kernels replay back to back.
"""
import torch


class GraphedFunction:
    """`fn(*tensors) -> tuple of tensors`, captured for the shapes, dtypes and devices of `example`.

    A call copies its inputs into the captured input buffers, replays the graph and returns copies of the outputs
    (the captured output buffers are overwritten by the next replay). `fn` must not synchronise with the host
    (no .item(), no boolean indexing, no indices built from Python lists) and must be deterministic apart from
    its inputs; parameters it reads are read at replay time, so in-place weight updates are seen.
    """

    def __init__(self, fn, example, warmup=2):
        self.inputs = [t.clone() for t in example]
        # warm-up on a side stream, as capture requires: kernel selection, Triton compilation, lazy allocations
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = tuple(fn(*self.inputs))

    def __call__(self, *tensors):
        for buf, t in zip(self.inputs, tensors):
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise ValueError(f"captured for {tuple(buf.shape)} {buf.dtype}, called with {tuple(t.shape)} {t.dtype}")
            if t is not buf:
                buf.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)
