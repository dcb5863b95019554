"""Peak of live CPU tensor bytes, from PyTorch's CPU allocator's own allocation and free events.

Used by ``ct_loss.py`` and ``training.py`` as the CPU counterpart of ``torch.cuda.max_memory_allocated``.

Why this and not the process's peak RSS: glibc keeps freed arenas and fragments, so VmHWM records the
allocator's history (the same configuration gave +1.4 % and +12.1 % over its baseline in two runs).
With ``torch.profiler.profile(profile_memory=True)`` every block that c10's CPU allocator hands out or
takes back while the profiler runs is reported as a ``[memory]`` event carrying its exact size (+ on
allocation, − on free, the size the allocator recorded for that pointer). Tensor storages all come from
that allocator, so the running sum of the events in time order is the number of live tensor bytes
allocated since the profiler started — exact, independent of glibc, of the other processes and of
the order of configurations in one process. Not counted: memory outside c10 (numpy arrays, BLAS /
oneDNN scratch, Python objects).

One rule makes it exact: everything the measured code holds must be allocated *after* the profiler
starts (build the model, optimiser and inputs inside it). A block allocated before is not in the
allocator's size table, so its free is not reported (torch logs "Memory block of unknown size was
allocated before the profiling started") and the sum would drift. ``end_bytes`` — the sum when the
profiler stops, after the caller has dropped what it built — is the check: ≈ 0 means no event was missed.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_MARK = "ctseg.cpu_memory.window"


class LiveTensorBytes:
    """Context manager: profile CPU allocations; :meth:`window` marks the span whose peak is wanted.

    After exit: ``peak_bytes`` (max of live bytes over all windows, including the value each window
    starts with), ``start_bytes`` (live bytes when the first window opened: the persistent state, e.g.
    weights, optimiser state, inputs) and ``end_bytes`` (live bytes at exit; see the module docstring).
    """

    def __init__(self) -> None:
        # record_shapes off: only sizes and times are needed, and shape recording slows every op.
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self.peak_bytes = self.start_bytes = self.end_bytes = 0

    def __enter__(self) -> LiveTensorBytes:
        self._prof.__enter__()
        return self

    def window(self) -> record_function:
        """A ``with`` block whose allocations count toward ``peak_bytes`` (may be entered several times)."""
        return record_function(_MARK)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._prof.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._summarise()

    def _summarise(self) -> None:
        events = self._prof.profiler.kineto_results.events()
        # Memory events and the window annotations are stamped by the same profiler clock.
        cpu = torch._C._autograd.DeviceType.CPU
        mem = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu
        )
        windows = sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == _MARK)
        if not windows:
            raise RuntimeError("LiveTensorBytes: no window() was entered inside the profiled block")
        live, peak, i = 0, 0, 0
        first = True
        for start, end in windows:
            while i < len(mem) and mem[i][0] < start:
                live += mem[i][1]
                i += 1
            if first:
                self.start_bytes, first = live, False
            peak = max(peak, live)
            while i < len(mem) and mem[i][0] <= end:
                live += mem[i][1]
                peak = max(peak, live)
                i += 1
        self.peak_bytes = peak
        self.end_bytes = live + sum(n for _, n in mem[i:])


if __name__ == "__main__":  # self-check (``make bench`` runs every script): known sizes give known sums
    before = torch.empty(1 << 20, dtype=torch.uint8)  # allocated before: its free must not count
    with LiveTensorBytes() as meter:
        kept = torch.empty(1000, dtype=torch.uint8)
        with meter.window():
            tmp = torch.empty(5000, dtype=torch.uint8)
            del tmp
            small = torch.empty(300, dtype=torch.uint8)
        del before, kept, small
    got = (meter.start_bytes, meter.peak_bytes, meter.end_bytes)
    assert got == (1000, 6000, 0), got
    print(f"cpu_memory self-check ok: start, peak, end = {got} bytes")
