"""Replay a fixed-shape GPU function as one CUDA graph: one launch per call instead of hundreds of small ones.

Generating a 64-frame window at batch 1 is launch-bound (the GPU finishes each small kernel before the CPU has
issued the next); captured once, the same kernels replay back to back.
"""
import functools

import torch

N_BRANCHES = 4  # the most functions run_parallel runs as parallel branches of a graph


@functools.lru_cache(maxsize=None)
def graph_streams(device):
    """The streams that generation's graphs are warmed up and captured on and that it queues work on, kept for the
    process, per device: "capture" (GraphedFunction's default), "condition" (the conditioning graphs, which replay
    beside the window steps' on another stream), "side" (where those replay), "face" (the face branch, eager, beside
    the window steps) and run_parallel's "branches".

    Why not torch.cuda.graph's shared capture stream, or a fresh torch.cuda.Stream() each time: a graph's matrix
    products keep the cuBLAS workspace of the stream they were captured on, and an eager product uses its stream's
    (PyTorch keeps one per stream); split-K kernels keep partial sums there, so work that can run at the same time
    must not share a stream's workspace. PyTorch hands streams out round-robin from a pool of 32 per priority: a
    fresh draw can be a stream that a graph was captured on; drawn together, these are distinct from each other."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    streams = [torch.cuda.Stream(device) for _ in range(4 + N_BRANCHES)]
    return {"capture": streams[0], "condition": streams[1], "side": streams[2], "face": streams[3],
            "branches": streams[4:]}


class GraphedFunction:
    """`fn(*tensors) -> tuple of tensors`, captured for the shapes, dtypes and devices of `example`.

    A call copies its inputs into the captured input buffers, replays the graph and returns copies of the outputs
    (the captured output buffers are overwritten by the next replay). `fn` must not synchronise with the host
    (no .item(), no boolean indexing, no indices built from Python lists) and must be deterministic apart from
    its inputs; parameters it reads are read at replay time, so in-place weight updates are seen.

    capture_stream: where to warm up and capture (default graph_streams' "capture"). Graphs that can replay at the
    same time on different streams need different capture streams (graph_streams says why).
    """

    def __init__(self, fn, example, warmup=2, capture_stream=None):
        self.inputs = [t.clone() for t in example]
        stream = capture_stream if capture_stream is not None else graph_streams(example[0].device)["capture"]
        # warm-up on the capture stream, as capture requires: kernel selection, Triton compilation, lazy allocations
        # (the stream's cuBLAS workspace among them)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.outputs = tuple(fn(*self.inputs))

    def __call__(self, *tensors):
        for buf, t in zip(self.inputs, tensors):
            if t.shape != buf.shape or t.dtype != buf.dtype:
                raise ValueError(f"captured for {tuple(buf.shape)} {buf.dtype}, called with {tuple(t.shape)} {t.dtype}")
            if t is not buf:
                buf.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


class NotCapturable(RuntimeError):
    """The step synchronises with the host, so it cannot be captured; found before capture, nothing was changed."""


class GraphedTrainStep:
    """A trainer's whole training step (forward, losses, backward, clipping, optimiser step) captured once as one
    CUDA graph and replayed for later batches of the same shapes: CUDA graphs without torch.compile (the launch
    cost of thousands of kernels per step goes; no minutes of compilation).

    Needs: a capturable Adam (torch.optim.Adam(..., capturable=True)); `trainer.compute_losses` free of host
    synchronisation; the batch shapes and the learning rate fixed at capture (capture again when they change). A
    value that changes between replays (MambaTalk's per-epoch mask ratio) must be read from a device tensor that the
    caller refills before each call. A step that synchronises with the host raises NotCapturable from its last
    warm-up step, before any capture. The warm-up steps that capture requires run on `batch`; the weights, buffers
    and optimiser state and the CUDA random stream are then put back (also when warm-up or capture fails): a replay
    draws the random numbers of the eager step it stands for (the graph reads the generator's offset at replay).
    Unlike Trainer.train_step, the losses are checked for finiteness after the step (one graph); apply_gradients has
    skipped the update on the device by then.
    """

    def __init__(self, trainer, batch, warmup=3):
        self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        optimizer, model = trainer.optimizer, trainer.model
        saved = training_state(trainer.raw_model, optimizer)
        device = next(trainer.raw_model.parameters()).device
        rng = torch.cuda.get_rng_state(device)

        def step():
            losses = trainer.compute_losses(model, self.batch, trainer.epoch)
            total = sum(losses.values())
            total.backward()
            trainer.apply_gradients()  # clipping, and the update skipped on the device for non-finite gradients
            return losses, total

        # Warm-up on a side stream, as capture requires (optimiser state, Triton compilation, library handles). A
        # failure anywhere leaves weights, optimiser state and random stream as they were (the caller may go on).
        # (Nothing replays beside a training step, so it may share torch.cuda.graph's capture stream.)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(warmup):
                    optimizer.zero_grad(set_to_none=True)
                    if i < warmup - 1:
                        step()
                        continue
                    # A host sync inside the capture would fail it and leave PyTorch's CUDA random generator in
                    # capture mode (no eager step could draw afterwards): the last warm-up step, past the lazy
                    # initialisations, refuses syncs instead.
                    mode = torch.cuda.get_sync_debug_mode()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        step()
                    except RuntimeError as e:
                        if "synchroniz" not in str(e):  # e.g. out of memory: not a question of capturing
                            raise
                        raise NotCapturable(str(e).splitlines()[0]) from e
                    finally:
                        torch.cuda.set_sync_debug_mode(mode)
            torch.cuda.current_stream().wait_stream(stream)
            restore_training_state(saved, optimizer)  # undo the warm-up
            torch.cuda.set_rng_state(rng, device)  # the first replay draws what an eager first step would
            trainer.skipped_steps.zero_()
            optimizer.zero_grad(set_to_none=True)  # backward in the graph writes fresh gradients on every replay
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.losses, self.total = step()
        except BaseException:
            torch.cuda.synchronize()
            restore_training_state(saved, optimizer)
            torch.cuda.set_rng_state(rng, device)
            optimizer.zero_grad(set_to_none=True)
            raise

    def __call__(self, batch):
        for k, v in batch.items():
            if torch.is_tensor(v):
                self.batch[k].copy_(v, non_blocking=True)
        self.graph.replay()
        if not torch.isfinite(self.total):
            bad = [k for k, v in self.losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"non-finite loss {bad} in a graphed training step")
        return {k: v.detach().clone() for k, v in self.losses.items()} | {"total": self.total.detach().clone()}


def training_state(model, optimizer):
    """Copies of a model's parameters and buffers and of an optimiser's state tensors, for restore_training_state."""
    tensors = list(model.parameters()) + list(model.buffers())
    state = {id(t): t.detach().clone() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)}
    return [(t, t.detach().clone()) for t in tensors], state


@torch.no_grad()
def restore_training_state(saved, optimizer):
    """Put back what training_state copied, in place (the tensors keep their memory, as a captured graph needs);
    optimiser state created since then is reset to Adam's initial value, zero (moments and step counts)."""
    tensors, state = saved
    for t, value in tensors:
        t.copy_(value)
    for st in optimizer.state.values():
        for t in st.values():
            if torch.is_tensor(t) and id(t) in state:
                t.copy_(state[id(t)])
            elif torch.is_tensor(t):
                t.zero_()


def run_parallel(fns):
    """Call independent functions and return their results in order. While a CUDA graph is being captured on the
    current stream, each runs on a side stream forked from it and joined back, so their kernels become parallel
    branches of the graph: at batch 1 a kernel fills a few of the GPU's SMs, and branches side by side take about as
    long as the longest. Anywhere else (CPU, eager GPU, tracing by torch.compile) they run one after another on the
    current stream: the same kernels, the same results.

    Every tensor a function reads must stay referenced by the caller until this returns (a block freed on the main
    stream could otherwise be handed out again while a side stream still reads it)."""
    if torch.compiler.is_compiling() or not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
        return [fn() for fn in fns]
    if len(fns) > N_BRANCHES:
        raise ValueError(f"run_parallel: at most {N_BRANCHES} branches, got {len(fns)}")
    main = torch.cuda.current_stream()
    streams = graph_streams(main.device)["branches"]  # a graph keeps using the streams it forked
    results = []
    for fn, stream in zip(fns, streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            results.append(fn())
    for stream in streams[:len(fns)]:
        main.wait_stream(stream)
    return results
