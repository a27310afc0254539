"""Decode-attention and promotion benchmark: the same script as gpu_check_kernels.py (checks first,
then times); kept under this name for discoverability.

    PYTHONUNBUFFERED=1 python benchmarks/bench_attention.py 2>&1 | tee $OUT/log.txt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_kernels import main  # noqa: E402

if __name__ == "__main__":
    main()
