"""kvcached._core.Region, cuda backend, on a real GPU: reserve/map/unmap/release, torch kernels through DLPack,
device memory really leaving and returning, the handle pool, and the shared state across two views."""
from __future__ import annotations

import threading
import time

import pytest

from kvcached import _core

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _core.cuda_available(),
        reason="no CUDA GPU here: the cuda backend needs libcuda.so.1 and a visible NVIDIA device",
    ),
]

MiB = 1 << 20


@pytest.fixture(scope="module")
def gran() -> int:
    return _core.granularity("cuda", 0)


def test_reserve_map_unmap_release(gran: int) -> None:
    region = _core.Region(8 * gran, gran, backend="cuda")
    assert region.backend == "cuda" and region.device == 0
    assert region.address % gran == 0
    assert region.__dlpack_device__() == (2, 0)
    region.map([0, 1, 2])
    assert region.num_mapped == 3 and region.resident_pages() == [0, 1, 2]
    assert region.backing_bytes == 3 * gran
    region.unmap([1])
    assert region.resident_pages() == [0, 2]
    assert region.pool_size == 1  # the handle is kept for the next map
    assert region.sweep() == 0
    region.close()


def test_torch_kernels_read_and_write_mapped_pages(gran: int, torch_cuda) -> None:
    torch = torch_cuda
    region = _core.Region(8 * gran, gran, backend="cuda")
    region.map([2, 3, 4])  # one run of three handles, mapped separately, accessed as one range
    whole = torch.from_dlpack(region)
    assert whole.device == torch.device("cuda", 0) and whole.dtype == torch.int8
    span = torch.from_dlpack(region.dlpack(2 * gran, 3 * gran)).view(torch.float32)
    span.copy_(torch.arange(span.numel(), device="cuda", dtype=torch.float32))
    torch.cuda.synchronize()
    expected = float(span.numel()) * (span.numel() - 1) / 2
    assert float(span.double().sum()) == expected
    assert int(whole[2 * gran : 5 * gran].ne(0).sum()) > 0
    whole[2 * gran : 3 * gran].fill_(7)
    assert int(whole[2 * gran : 3 * gran].to(torch.int64).sum()) == 7 * gran

    del region  # the tensors keep the mapping alive
    whole[4 * gran] = 1
    torch.cuda.synchronize()
    assert int(whole[4 * gran]) == 1


def test_device_memory_leaves_on_map_and_returns_after_unmap_and_trim(gran: int) -> None:
    pages = max(1, (256 * MiB) // gran)
    region = _core.Region(pages * gran, gran, backend="cuda")
    free0, total = _core.cuda_mem_info(0)
    assert 0 < free0 <= total
    region.map(range(pages))
    free_mapped, _ = _core.cuda_mem_info(0)
    assert free0 - free_mapped >= pages * gran - 32 * MiB
    region.set_pool_limit(pages)
    region.unmap(range(pages))
    assert region.pool_size == pages  # still held: pooled handles are physical memory
    assert region.trim_pool() == pages
    free_after, _ = _core.cuda_mem_info(0)
    assert free0 - free_after < 32 * MiB


def test_handle_pool_reuse_and_limit(gran: int) -> None:
    region = _core.Region(8 * gran, gran, backend="cuda")
    region.set_pool_limit(2)
    region.map([0, 1, 2, 3])
    region.unmap([0, 1, 2, 3])
    assert region.pool_size == 2  # two kept, two released
    region.map([5])
    assert region.pool_size == 1  # reused a pooled handle instead of creating one
    assert region.trim_pool(keep=0) == 1
    region.set_pool_limit(0)
    region.unmap([5])
    assert region.pool_size == 0


def test_page_size_must_be_a_multiple_of_the_granularity(gran: int) -> None:
    if gran <= 4096:
        pytest.skip(f"granularity {gran} leaves no smaller valid page size to reject")
    with pytest.raises(ValueError, match="granularity"):
        _core.Region(4 * gran, gran // 2, backend="cuda")
    with pytest.raises(ValueError, match="prefault"):
        _core.Region(4 * gran, gran, backend="cuda", prefault=True)


def test_shared_state_drives_a_second_view(gran: int, tmp_path) -> None:
    path = f"/dev/shm/kvcached-gpu-test-{tmp_path.name}"
    try:
        owner = _core.Region(8 * gran, gran, backend="cuda", path=path)
        follower = _core.Region(8 * gran, gran, backend="cuda", path=path)
        owner.map([0, 1])
        assert follower.num_mapped == 2 and follower.resident_pages() == []
        assert follower.sync() == 2
        assert follower.resident_pages() == [0, 1]
        owner.unmap([0])
        assert follower.sync() == 1
        assert follower.resident_pages() == [1]
    finally:
        import os

        if os.path.exists(path):
            os.unlink(path)


def test_out_of_memory_raises_memory_error_and_rolls_back(gran: int) -> None:
    free0, total = _core.cuda_mem_info(0)
    page = gran * max(1, (256 * MiB) // gran)
    pages = total // page + 2  # more than the whole device
    region = _core.Region(pages * page, page, backend="cuda")
    region.set_pool_limit(0)
    with pytest.raises(MemoryError, match="OUT_OF_MEMORY"):
        region.map(range(pages))
    assert region.num_mapped == 0 and region.resident_pages() == []
    free_after, _ = _core.cuda_mem_info(0)
    assert free0 - free_after < 64 * MiB


def test_state_region_in_a_scheduler_drives_a_cuda_worker(gran: int, tmp_path) -> None:
    import os

    path = f"/dev/shm/kvcached-gpu-state-{tmp_path.name}"
    try:
        worker = _core.Region(8 * gran, gran, backend="cuda", path=path)
        scheduler = _core.Region(8 * gran, gran, backend="state", path=path)
        free0, _ = _core.cuda_mem_info(0)
        scheduler.map([1, 2, 3])
        assert _core.cuda_mem_info(0)[0] >= free0 - gran  # deciding allocates nothing
        assert worker.sync() == 3 and worker.resident_pages() == [1, 2, 3]
        scheduler.unmap([2])
        assert worker.sync() == 1 and worker.resident_pages() == [1, 3]
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_an_unmap_drains_the_device_without_holding_up_a_step(gran: int, torch_cuda) -> None:
    """An unmap waits for kernels queued before it (they may read the pages), but outside the region's lock: an
    engine step's sync() (called before every forward pass) goes on meanwhile. It used to wait for the whole drain,
    a GPU bubble each time idle pages went back under load."""
    torch = torch_cuda
    region = _core.Region(8 * gran, gran, backend="cuda")
    region.map([0, 1])
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(int(3e9))  # a kernel spinning for a second or so, queued ahead of the unmap
    worker = threading.Thread(target=region.unmap, args=([1],))
    worker.start()
    time.sleep(0.2)  # the unmap is now waiting for that kernel
    assert region.sync() == 0, "the view is current: nothing to apply"
    assert not stream.query(), "sync() returned while the kernel queued before the unmap still ran"
    worker.join()
    assert stream.query(), "the unmap returned only after that kernel"
    assert region.resident_pages() == [0]
    region.close()
