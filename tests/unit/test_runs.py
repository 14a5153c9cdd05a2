"""A run directory's params record what its engines really ran with."""


def test_a_run_notes_the_dtype_its_engine_really_ran_with(tmp_path):
    """vLLM picks float16 by itself on a GPU without bfloat16 (a T4): the run's params say what it chose, read from
    the engine's own config line. The server here is a TEST DOUBLE carrying only a log."""
    import json

    from kvlab.engines.server import VLLMServer
    from kvlab.runs import Run

    server = VLLMServer("m", name="t4")
    assert server.engine_dtype is None, "nothing logged yet"
    server.log_path = tmp_path / "t4.log"  # what start() sets; the engine's own config line, as vLLM writes it
    server.log_path.write_text("(EngineCore pid=1) INFO [core.py:133] Initializing a V1 LLM engine (v0.32.0) with "
                               "config: model='Qwen/Qwen2.5-0.5B-Instruct', dtype=torch.float16, max_seq_len=4096\n")
    assert server.engine_dtype == "float16"
    run = Run("dtype", {"model": "m"}, root=tmp_path)
    run.note_engine(server)
    assert json.loads(run.params_path.read_text())["engines"] == {"t4": {
        "dtype": "float16", "kvcached": False, "url": server.url, "kvcached_group": None, "kvcached_record": None}}
