"""Run directories: writing one as an experiment goes (`Run`), its environment, reading runs back, comparing
them, and their figures (`plots`).

    results/<experiment>/<run-id>/  params.json env.json requests.csv memory.csv summary.json *.png
"""
from kvlab.runs.compare import compare, summary_table
from kvlab.runs.memory_figures import MB, idle_values, memory_summary
from kvlab.runs.reading import RunData, latest_run, load_run
from kvlab.runs.run import Phase, Run, new_run_id, write_json

__all__ = ["MB", "Phase", "Run", "RunData", "compare", "idle_values", "latest_run", "load_run", "memory_summary",
           "new_run_id", "summary_table", "write_json"]
