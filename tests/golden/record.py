"""Record the golden files: run every entry of GOLDEN_RUNS and write tests/golden/<name>.json.

Record from the code before the redesign (see README.md):

    PYTHONPATH=/tmp/golden-base/src /work/main/.venv/bin/python tests/golden/record.py [name ...]

With names, only those goldens are re-recorded. Prints which honed it imported, so a recording
from the wrong tree is seen at once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # tests/ (helpers, chat_helpers) and tests/golden (runs)

import honed  # noqa: E402
import runs  # noqa: E402


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in runs.GOLDEN_RUNS]
    if unknown:
        raise SystemExit(f"unknown golden runs: {', '.join(unknown)}; known: {', '.join(runs.GOLDEN_RUNS)}")
    print(f"recording with honed from {Path(honed.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix="honed-golden-") as tmp:
        runs.use_shared_root(Path(tmp) / "shared")
        total = time.perf_counter()
        for name in names or list(runs.GOLDEN_RUNS):
            folder = Path(tmp) / name
            folder.mkdir()
            started = time.perf_counter()
            metrics, run_dir = runs.execute(name, folder)
            runs.golden_path(name).write_text(runs.dump(runs.golden_record(metrics, run_dir, folder)))
            print(f"{name:24s} {metrics['task']:24s} {time.perf_counter() - started:6.1f} s", flush=True)
        print(f"{'total':49s} {time.perf_counter() - total:6.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
