"""The deployment speed report (issue 8): ``mobilenets bench`` and, by default, the README table.

Images/s at batch 1 and 32 and p50/p90 latency at batch 1 for 1.0 MobileNet-224 and 0.25 MobileNet-128:
PyTorch eager (NCHW, channels_last), our inference mode, torch.compile, ONNX Runtime fp32 and int8, beside
timm's ``mobilenetv1_100`` eager. Writes the table between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in README.md (only that text, atomically), with the date and the machine.

Targets (2-core CPU, 1.0 MobileNet-224): ONNX fp32 ≥ 130 img/s and int8 ≥ 300 img/s at batch 1, int8
top-1 agreement with float ≥ 99% on held-out images.

    .venv/bin/python benchmarks/deploy.py [--readme README.md] [--no-readme] [--no-compile] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

from mobilenets.tasks.cli.bench import main as bench_main

README = Path(__file__).resolve().parent.parent / "README.md"
TARGETS = "targets for 1.0 MobileNet-224: ONNX fp32 ≥ 130 img/s b1, int8 ≥ 300 img/s b1, agreement ≥ 0.99"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--no-readme" in argv:
        argv.remove("--no-readme")
    elif "--readme" not in argv:
        argv += ["--readme", str(README)]
    print(TARGETS)
    sys.exit(bench_main(argv))
