"""Load time of the fetched source (GGUF, dequantized by transformers) vs the converted safetensors model.

    python benchmarks/load_time.py [FETCHED_DIR] [BASE_DIR]     # after `dvc repro convert`

Each load runs in a fresh process, three times, so import and file-cache effects are the same for both;
the figure is the median wall time of `from_pretrained` alone.
"""

import statistics
import subprocess
import sys
from pathlib import Path

LOAD = """
import sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
path = Path(sys.argv[1])
kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
started = time.perf_counter()
AutoModelForCausalLM.from_pretrained(path.parent if path.suffix == ".gguf" else path, dtype=torch.float32, **kwargs)
print(time.perf_counter() - started)
"""


def median_load_seconds(path: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, check=True)
        times.append(float(result.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def main() -> None:
    fetched = Path(sys.argv[1] if len(sys.argv) > 1 else "models/fetched")
    base = Path(sys.argv[2] if len(sys.argv) > 2 else "models/base")
    source = next(fetched.glob("*.gguf"), fetched)
    source_seconds = median_load_seconds(source)
    converted_seconds = median_load_seconds(base)
    print(f"source    {source.name:<40} {source_seconds:6.2f} s")
    print(f"converted {base.name:<40} {converted_seconds:6.2f} s")
    print(f"speed-up  {source_seconds / converted_seconds:6.1f}x")


if __name__ == "__main__":
    main()
