"""``ema_device="cpu"``: the update of offloaded shadows runs behind the next training step.

After the inner step of step k, each offloaded group's params are copied into host staging
buffers (pinned, in the params' dtype) on a side CUDA stream that first waits for the
training stream, so the copies see step k's weights; nothing waits on the host. A background
thread waits for those copies and then folds the staged values into the shadows with the CPU
foreach kernels, while the forward and backward passes of step k+1 run. At the start of step
k+1, before anything changes, the host waits for that fold (it blocks only if the fold took
longer than the forward and backward); the fold waited for the copies, so they are done and
the inner step may change the params.

When the shadows are consistent: everything that reads or writes them (the next update,
``swap_ema_weights()``, ``state_dict()``, ``load_state_dict()``, copy and pickle) first waits
on the host for the pending update. Without CUDA the copies are plain synchronous copies and
only the fold runs in the background.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence, cast

import torch
from torch import Tensor

from . import _kernels
from ._kernels import Group, Weight


class Offload:
    """The update in flight for the offloaded groups of one optimizer (at most one)."""

    def __init__(self) -> None:
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.active = False  # launched at least once: the optimizer then waits at every step

    @torch.compiler.disable
    def launch(self, groups: list[Group], weights: Optional[Sequence[Weight]]) -> None:
        """Stage the params of ``groups`` now and fold them into the shadows in the background:
        ``lerp_`` with ``weights`` (one per shadow), or ``copy_`` when ``weights`` is None."""
        self.wait()
        self.active = True
        events: list[Copies] = []
        staged = [_staged(g) for g in groups]
        for g, s in zip(groups, staged):
            self._stage(g.params, s.params, events)
        if weights is not None and isinstance(weights[0], Tensor):  # own copies: the caller may refill them
            tensors = cast(Sequence[Tensor], weights)  # a step's weights are all floats or all tensors
            hosts = [torch.empty((), dtype=w.dtype, pin_memory=w.is_cuda) for w in tensors]
            self._stage(list(tensors), hosts, events, temporary=True)
            weights = hosts
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema_optim")
        self._pending = self._executor.submit(_fold, staged, events, weights)

    def _stage(
        self,
        sources: list[Tensor],
        bufs: list[Tensor],
        events: list[Copies],
        temporary: bool = False,
    ) -> None:
        device = sources[0].device
        if device.type != "cuda":
            for b, t in zip(bufs, sources):
                b.copy_(t)
            return
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # see this step's values
        with torch.cuda.stream(stream):
            for b, t in zip(bufs, sources):
                b.copy_(t, non_blocking=True)
                if temporary:  # made on the training stream: keep its memory until copied
                    t.record_stream(stream)
            done = torch.cuda.Event(blocking=True)  # the fold thread sleeps, not spins, on it
            done.record(stream)
        # The fold holds the sources until their copies are done; detach() keeps each one's
        # memory as it is now, even if a param gets new memory (``p.data = ...``) meanwhile.
        events.append((device, done, [t.detach() for t in sources]))

    @torch.compiler.disable
    def wait(self) -> None:
        """Block until the pending update is folded in (its copies are then done too);
        re-raise its error, if any. The optimizer calls it at the start of every step, so a
        failure stops that step before it changes anything."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as e:
            raise RuntimeError(
                "the background update of the offloaded EMA shadows (ema_device) failed; "
                "the shadows may be partly updated"
            ) from e


# The staging copies on one CUDA device: their stream's event, and the tensors they read.
Copies = tuple[torch.device, torch.cuda.Event, list[Tensor]]


def _fold(groups: list[Group], events: list[Copies], weights: Optional[Sequence[Weight]]) -> None:
    for device, done, _ in events:
        with torch.cuda.device(device):  # a new thread is on GPU 0: no stray context there
            done.synchronize()  # blocks this thread only (a blocking event: no spinning)
    with torch.no_grad():
        if weights is None:
            _kernels.copy_(groups)
        else:
            _kernels.lerp_(groups, weights)


def _staged(g: Group) -> Group:
    """The staged form of an offloaded group (every group this class sees has one)."""
    if g.staged is None:
        raise TypeError("an EMA group without offloaded shadows reached the offload pipeline")
    return g.staged
