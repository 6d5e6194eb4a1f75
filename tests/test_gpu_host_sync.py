"""The packed training path's host never waits for the GPU between micro-batches.

A micro-batch's indices are built on the host and copied to the GPU; a copy from pageable
memory waits for all the work already queued, so the host could not prepare the next
micro-batch while the GPU computes this one. These tests queue a long GPU sleep and check
that building and copying a micro-batch returns long before it ends. Marked `gpu`.
"""

from __future__ import annotations

import time

import pytest
import torch

from r1lab.engine import fast_train
from r1lab.engine.grpo_update import TrainBatch, UpdateSettings, micro_batch

pytestmark = pytest.mark.gpu
SLEEP_S = 0.5


def host_seconds_behind_a_gpu_sleep(fn) -> float:
    """Host seconds `fn` takes while the GPU sleeps for about SLEEP_S (measured first)."""
    cycles = int(5e7)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    cycles = int(cycles * SLEEP_S * 1e3 / start.elapsed_time(end))  # the clock of this GPU
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


def test_host_to_device_does_not_wait_for_queued_work(cuda):
    values = torch.arange(100_000)
    assert host_seconds_behind_a_gpu_sleep(lambda: fast_train.host_to_device(values, cuda)) < 0.1
    out = fast_train.host_to_device(values, cuda)
    assert out.device.type == "cuda" and torch.equal(out.cpu(), values)


def test_a_micro_batch_reaches_the_gpu_without_a_host_sync(cuda):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 100, (32,), generator=g).tolist() for _ in range(16)]
    completions = [torch.randint(1, 100, (200 + 10 * i,), generator=g).tolist() for i in range(16)]
    batch = TrainBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        advantages=torch.randn(16, generator=g),
        counted=[True] * 16,
        sampler_logprobs=[[0.0] * len(c) for c in completions],
    )
    settings = UpdateSettings(packed=True)
    held = {}
    seconds = host_seconds_behind_a_gpu_sleep(
        lambda: held.update(mb=micro_batch(batch, list(range(16)), settings, cuda))
    )
    assert seconds < 0.2, f"building a micro-batch waited {seconds:.3f} s for the GPU"
    mb = held["mb"]
    assert mb.pack.input_ids.device.type == "cuda" and mb.mask.device.type == "cuda"
    assert torch.equal(mb.pack.targets.cpu(), torch.tensor([t for c in completions for t in c]))
