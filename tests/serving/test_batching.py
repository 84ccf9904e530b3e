"""Server-side batching: concurrent requests share batches, limits answer like TF Serving, bad inputs stay isolated."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.batching import BatchScheduler
from serving.config import BatchingOptions, ConfigError, parse_batching_parameters
from serving.errors import ServingError, invalid_argument


class Doubler:
    """A stand-in model: doubles its input and records every batch size it ran; values < 0 are 'undecodable'."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self.lock:
            self.batches.append(len(x))
        time.sleep(self.delay_s)
        if (x < 0).any():
            raise invalid_argument("negative input")
        return {"y": x * 2}


def run_many(scheduler: BatchScheduler, values: list[float], threads: int = 32) -> list:
    def one(value: float):
        try:
            return float(scheduler.run("s", {"x": np.array([value], np.float32)})["y"][0])
        except ServingError as error:
            return error.code

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, values))


def test_concurrent_requests_run_in_shared_batches_and_get_their_own_rows() -> None:
    model = Doubler(delay_s=0.01)
    scheduler = BatchScheduler(model, BatchingOptions(max_batch_size=8, num_batch_threads=1), "test")
    try:
        values = [float(i) for i in range(64)]
        assert run_many(scheduler, values) == [v * 2 for v in values]
    finally:
        scheduler.stop()
    assert max(model.batches) == 8
    assert len(model.batches) < 64


def test_a_lone_request_does_not_wait_when_the_timeout_is_zero() -> None:
    scheduler = BatchScheduler(Doubler(), BatchingOptions(max_batch_size=32, batch_timeout_micros=0), "test")
    try:
        started = time.monotonic()
        scheduler.run("s", {"x": np.ones([1], np.float32)})
        assert time.monotonic() - started < 0.05
    finally:
        scheduler.stop()


def test_a_free_thread_waits_for_the_wave_the_last_batch_had_but_no_longer_than_the_timeout() -> None:
    model = Doubler()
    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=400_000, num_batch_threads=1)
    scheduler = BatchScheduler(model, options, "test")

    def staggered(count: int, gap_s: float) -> float:
        started = time.monotonic()
        with ThreadPoolExecutor(count) as pool:
            futures = []
            for i in range(count):
                futures.append(pool.submit(scheduler.run, "s", {"x": np.array([float(i)], np.float32)}))
                time.sleep(gap_s)
            for future in futures:
                future.result()
        return time.monotonic() - started

    try:
        scheduler.run("s", {"x": np.ones([3], np.float32)})  # the previous batch had 3 rows
        # Three requests arriving 50 ms apart: the free thread waits for the third, then runs them together.
        assert staggered(3, 0.05) < 0.35
        assert model.batches[-1] == 3
        # One request where three are expected: it runs alone once the timeout is up.
        assert 0.3 < staggered(1, 0.0) < 1.0
        assert model.batches[-1] == 1
    finally:
        scheduler.stop()


def test_a_lone_client_never_waits_for_the_timeout() -> None:
    options = BatchingOptions(max_batch_size=32, batch_timeout_micros=2_000_000, num_batch_threads=1)
    scheduler = BatchScheduler(Doubler(), options, "test")
    try:
        started = time.monotonic()
        for _ in range(5):
            scheduler.run("s", {"x": np.ones([1], np.float32)})
        assert time.monotonic() - started < 0.5
    finally:
        scheduler.stop()


def test_a_request_larger_than_max_batch_size_is_invalid_argument() -> None:
    scheduler = BatchScheduler(Doubler(), BatchingOptions(max_batch_size=4), "test")
    try:
        with pytest.raises(ServingError) as raised:
            scheduler.run("s", {"x": np.ones([5], np.float32)})
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "larger than maximum input batch size 4" in raised.value.message
    finally:
        scheduler.stop()


def test_a_full_queue_sheds_load_with_unavailable() -> None:
    options = BatchingOptions(max_batch_size=1, max_enqueued_batches=2, num_batch_threads=1)
    scheduler = BatchScheduler(Doubler(delay_s=0.2), options, "test")
    try:
        results = run_many(scheduler, [1.0] * 8, threads=8)
    finally:
        scheduler.stop()
    assert grpc.StatusCode.UNAVAILABLE in results
    assert 2.0 in results


def test_one_bad_request_fails_alone_not_its_batch() -> None:
    scheduler = BatchScheduler(Doubler(delay_s=0.01), BatchingOptions(max_batch_size=16, num_batch_threads=1), "test")
    try:
        values = [-1.0 if i % 5 == 0 else float(i) for i in range(40)]
        results = run_many(scheduler, values)
    finally:
        scheduler.stop()
    assert results == [grpc.StatusCode.INVALID_ARGUMENT if v < 0 else v * 2 for v in values]


def test_scalar_inputs_cannot_be_batched() -> None:
    scheduler = BatchScheduler(Doubler(), BatchingOptions(), "test")
    try:
        with pytest.raises(ServingError, match="at least one dimension"):
            scheduler.run("s", {"x": np.array(1.0, np.float32)})
    finally:
        scheduler.stop()


def test_batches_are_padded_to_an_allowed_size() -> None:
    model = Doubler()
    options = BatchingOptions(max_batch_size=8, allowed_batch_sizes=(4, 8), num_batch_threads=1)
    scheduler = BatchScheduler(model, options, "test")
    try:
        out = scheduler.run("s", {"x": np.array([1.0, 2.0, 3.0], np.float32)})
    finally:
        scheduler.stop()
    assert model.batches == [4]
    np.testing.assert_array_equal(out["y"], [2.0, 4.0, 6.0])


def test_batching_file_is_tf_servings_text_format() -> None:
    options = parse_batching_parameters(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 500 }\n"
        "num_batch_threads { value: 3 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\n"
    )
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads) == (16, 500, 3)
    assert options.allowed_batch_sizes == (8, 16)
    assert parse_batching_parameters("").max_enqueued_batches == 10  # BatchingSession's default


@pytest.mark.parametrize(
    "text",
    ["max_batch_size: 16", "no_such_field { value: 1 }", "max_batch_size { value: 16 }\nallowed_batch_sizes: 8"],
)
def test_a_bad_batching_file_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_batching_parameters(text)
