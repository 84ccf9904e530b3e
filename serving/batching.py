"""Server-side batching with TF Serving's parameters and limits.

Concurrent requests to one model version and signature are queued; a free batch thread takes the
oldest queue's tasks once they fill `max_batch_size` rows or the oldest task has waited
`batch_timeout_micros`, runs their inputs concatenated along dimension 0 in one call, and splits
the outputs back per request. A full queue (`max_enqueued_batches` batches) rejects with
UNAVAILABLE; a request larger than `max_batch_size` is INVALID_ARGUMENT, as in TF Serving without
large-batch splitting.

Two differences from TF Serving, on purpose:
- The timeout counts while a batch thread is free (TF Serving: since the task was enqueued), and a
  batch closes early once as many rows are queued as the previous batch of that queue had. Clients
  in a request loop come back in waves the size of the last batch: a thread that frees up waits up
  to the timeout for that wave instead of running the few requests queued meanwhile alone, so under
  load batches stay full; a lone client (previous batch: 1 row) never waits at all.
- If a batch fails with INVALID_ARGUMENT (say one request carried undecodable image bytes), each
  of its requests is re-run alone, so only the bad one fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from serving.config import BatchingOptions
from serving.errors import ServingError, internal, invalid_argument, unavailable

log = logging.getLogger("serving.batching")

RunFunction = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]
BatchObserver = Callable[[str, int], None]  # (signature, rows) of each batch run, for the batch-size metric


@dataclass
class _Task:
    signature: str
    inputs: dict[str, np.ndarray]
    rows: int
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, np.ndarray] | None = None
    error: ServingError | None = None


def _shape_key(signature: str, inputs: dict[str, np.ndarray]) -> tuple:
    """Tasks can share a batch only if every input agrees on dtype and on every dimension but the first."""
    return (signature, tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items())))


class BatchScheduler:
    """Batches `run(signature, inputs)` calls for one servable version across `num_batch_threads` threads."""

    def __init__(self, run: RunFunction, options: BatchingOptions, name: str) -> None:
        self._run = run
        self.options = options
        self.name = name
        self._queues: dict[tuple, deque[_Task]] = {}
        self._last_rows: dict[tuple, int] = {}  # rows in the previous batch of each queue: the wave to wait for
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._observe: BatchObserver | None = None
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{name}-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, signature: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> dict:
        """Queue one request and block until its slice of a batch has run."""
        rows = _rows_of(inputs)
        if rows > self.options.max_batch_size:
            raise invalid_argument(
                f"Task size {rows} is larger than maximum input batch size {self.options.max_batch_size}"
            )
        task = _Task(signature, inputs, rows)
        with self._cond:
            if self._stopping:
                raise unavailable(f"Servable {self.name} is unloading")
            capacity = self.options.max_enqueued_batches * self.options.max_batch_size
            if self._queued_rows + rows > capacity:
                raise unavailable("The batch scheduling queue to which this task was submitted is full")
            self._queues.setdefault(_shape_key(signature, inputs), deque()).append(task)
            self._queued_rows += rows
            self._cond.notify()
        if not task.done.wait(timeout_s):
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded while waiting for a batch")
        if task.error is not None:
            raise task.error
        assert task.outputs is not None
        return task.outputs

    def observe_batches(self, observer: BatchObserver) -> None:
        """Call observer(signature, rows) after each batch that runs from now on (not the warmup's, if set after it)."""
        self._observe = observer

    def stop(self) -> None:
        """Finish queued work, then end the batch threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _next_batch(self) -> list[_Task] | None:
        timeout = self.options.batch_timeout_micros / 1e6
        free_since = time.monotonic()
        with self._cond:
            while True:
                waiting = [(q[0].enqueued, key) for key, q in self._queues.items() if q]
                if not waiting:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                oldest, key = min(waiting)
                queue = self._queues[key]
                queued = sum(t.rows for t in queue)
                remaining = max(oldest, free_since) + timeout - time.monotonic()
                expected = min(self._last_rows.get(key, 1), self.options.max_batch_size)
                if queued >= expected or remaining <= 0 or self._stopping:
                    batch: list[_Task] = []
                    rows = 0
                    while queue and rows + queue[0].rows <= self.options.max_batch_size:
                        task = queue.popleft()
                        batch.append(task)
                        rows += task.rows
                    self._queued_rows -= rows
                    self._last_rows[key] = rows
                    if not queue:
                        del self._queues[key]
                    return batch
                self._cond.wait(remaining)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run_batch(batch)
            except Exception as error:  # noqa: BLE001 - a batch thread must never die
                log.exception("batch of %d task(s) failed unexpectedly", len(batch))
                for task in batch:
                    if not task.done.is_set():
                        task.error = internal(f"batch failed: {error}")
                        task.done.set()

    def _run_batch(self, batch: list[_Task]) -> None:
        signature = batch[0].signature
        rows = sum(t.rows for t in batch)
        inputs = {name: np.concatenate([t.inputs[name] for t in batch]) for name in batch[0].inputs}
        padded = _pad_to_allowed(inputs, rows, self.options.allowed_batch_sizes)
        started = time.monotonic()
        try:
            outputs = self._run(signature, padded)
        except ServingError as error:
            if len(batch) > 1 and error.code == grpc.StatusCode.INVALID_ARGUMENT:
                for task in batch:
                    self._run_alone(task)
                return
            for task in batch:
                task.error = error
                task.done.set()
            return
        if self._observe is not None:
            self._observe(signature, rows)
        log.debug(
            "%s: ran %s on %d row(s) from %d request(s) in %.1f ms, oldest waited %.1f ms",
            self.name,
            signature,
            rows,
            len(batch),
            (time.monotonic() - started) * 1000,
            (started - batch[0].enqueued) * 1000,
        )
        start = 0
        for task in batch:
            try:
                task.outputs = {name: _slice(value, start, task.rows, rows, name) for name, value in outputs.items()}
            except ServingError as error:
                task.error = error
            start += task.rows
            task.done.set()

    def _run_alone(self, task: _Task) -> None:
        try:
            task.outputs = self._run(task.signature, task.inputs)
            if self._observe is not None:
                self._observe(task.signature, task.rows)
        except ServingError as error:
            task.error = error
        task.done.set()


def _rows_of(inputs: dict[str, np.ndarray]) -> int:
    sizes = {a.shape[0] for a in inputs.values() if a.ndim > 0}
    if any(a.ndim == 0 for a in inputs.values()):
        raise invalid_argument("Batching Run() input tensors must have at least one dimension")
    if len(sizes) > 1:
        raise invalid_argument("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop() if sizes else 0


def _pad_to_allowed(inputs: dict[str, np.ndarray], rows: int, allowed: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Pad a batch with copies of its first row up to the next allowed size (TF Serving pads the same way)."""
    target = next((size for size in allowed if size >= rows), rows)
    if target == rows or rows == 0:
        return inputs
    return {name: np.concatenate([a, np.repeat(a[:1], target - rows, axis=0)]) for name, a in inputs.items()}


def _slice(value: np.ndarray, start: int, count: int, rows: int, name: str) -> np.ndarray:
    if value.ndim == 0 or value.shape[0] < rows:
        raise internal(f"Batched output tensor {name} has 0th dimension {value.shape[:1]} but the batch had {rows}")
    return value[start : start + count]
