"""The deployment speed report (issue 8): ``mobilenets bench`` and, by default, the README table.

Images/s at batch 1 and 32 and p50/p90 latency at batch 1 for 1.0 MobileNet-224 and 0.25 MobileNet-128:
PyTorch eager (NCHW, channels_last), our inference mode, torch.compile, ONNX Runtime fp32 and int8, beside
timm's ``mobilenetv1_100`` eager; then Google's official MobileNet v1 files (α 0.25/0.5/0.75/1.0 at 128/160/
192/224, 1.0 body only) in LiteRT beside our ONNX Runtime fp32 and int8 exports of the same weights, at batch
1 on 1 and 2 threads (``--peer litert`` for that part alone; the files are read from
``../shared/weights/tflite`` or ``--tflite-dir``). Writes the table between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` in README.md (only that text, atomically), with the date and the machine.

Targets (2-core CPU, 1.0 MobileNet-224): ONNX fp32 ≥ 130 img/s and int8 ≥ 300 img/s at batch 1, int8
top-1 agreement with float ≥ 99% on held-out images.

    .venv/bin/python benchmarks/deploy.py [--readme README.md] [--no-readme] [--no-compile] [--threads 2]
        [--peer all|timm|litert] [--tflite-dir DIR] [--litert-threads 1,2]
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
