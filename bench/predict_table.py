"""What printing predict's answers costs, redirected to a file: the table (Rich) against --json, per row,
for several numbers of rows (the cost per row staying flat says it grows linearly). No model runs: the
rows are made up. Prints one JSON object.

    python bench/predict_table.py [--rows 1000 5000 20000]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time

from cifarnet_cli import ui
from cifarnet_cli.predict import Prediction


def _rows(n: int) -> list[Prediction]:
    top = [("airplane", 0.91), ("ship", 0.05), ("bird", 0.02)]
    return [Prediction(f"/data/photos/folder{i // 1000:03d}/image_{i:06d}.jpg", top=top) for i in range(n)]


def measure(n: int) -> dict[str, float | int]:
    rows = _rows(n)
    out = io.StringIO()
    start = time.perf_counter()
    ui.prediction_table(rows, 3, ui._Console(file=out, width=80))  # a file: not a terminal
    table_s = time.perf_counter() - start
    start = time.perf_counter()
    text = json.dumps({"predictions": [p.to_json() for p in rows]})
    json_s = time.perf_counter() - start
    return {
        "rows": n,
        "table_seconds": round(table_s, 3),
        "table_ms_per_row": round(1e3 * table_s / n, 3),
        "json_seconds": round(json_s, 3),
        "json_ms_per_row": round(1e3 * json_s / n, 4),
        "table_bytes": len(out.getvalue()),
        "json_bytes": len(text),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 5000, 20000])
    args = parser.parse_args()
    print(json.dumps({"python": platform.python_version(), "results": [measure(n) for n in args.rows]}, indent=2))


if __name__ == "__main__":
    main()
