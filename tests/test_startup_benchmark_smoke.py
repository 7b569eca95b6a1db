"""benchmarks/startup.py on a tiny job: the warm run needs the same programs and loads them from the cache."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import startup  # noqa: E402


@pytest.mark.slow  # two fresh `distill-jax run --smoke` processes (about a minute on 2 cores)
def test_warm_cache_serves_most_programs(tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = startup.main(["--jobs", "smoke", "--set", "students=linear-labels", "--set", "explain.methods=('saliency',)",
                         "--append", str(results)], log=lambda _: None)
    cold, warm = rows
    assert (cold["cache"], warm["cache"]) == ("cold", "warm")
    assert cold["compiles"] > 25 and warm["compiles"] == cold["compiles"], rows  # the same programs (36 when written)...
    assert warm["compile_s"] < cold["compile_s"] / 4, rows  # ...loaded, not compiled
    assert "| smoke | warm |" in results.read_text()
