"""`kvlab bench alloc` runs through the budgeted allocator on the real host Region and leaves nothing behind."""
import json

import pytest
from kvcached_testing import core_region_class

from kvcached import budget
from kvlab.cli import main


@pytest.mark.skipif(core_region_class() is None, reason="needs kvcached._core.Region: run `pip install -e .[test]`")
def test_bench_alloc_json(shm_dir, capsys):
    assert main(["bench", "alloc", "--json", "--duration", "0", "--pages", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("map_us", "unmap_us", "memset_us", "hot_memset_us"):
        assert result[key]["n"] >= 2 and result[key]["median"] > 0
    assert result["pass"] == (result["ratio"] <= 1.0)
    assert budget.list_instances() == [], "the benchmark's record is removed when it ends"


def test_bench_alloc_refuses_cuda_without_gpu(shm_dir, capsys):
    from kvcached import _core
    if _core.cuda_available():
        pytest.skip("a CUDA device is present: the refusal path cannot be exercised here")
    assert main(["bench", "alloc", "--backend", "cuda", "--duration", "0"]) == 2
    assert "--backend host" in capsys.readouterr().err
