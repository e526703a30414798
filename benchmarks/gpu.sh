#!/usr/bin/env bash
# segmask's first CUDA run, in one call of the device tool: exactness of every MAS route against float64
# dense SDPA (cuda-flash, eager, flex; bf16, fp16, fp32), generation against the CPU, one LoRA step of a
# 1B-shape model (segmask train and TRL), then speed against causal. The steps are benchmarks/gpu/run.py's.
#
# 1. Here, once (network to PyPI; fills the ignored folders .whl/ and .carry/):
#        benchmarks/gpu.sh prepare
#    downloads, for the device's Python 3.12 (manylinux x86_64), the wheels its image lacks or has too old,
#    at requirements/lock.txt's versions (transformers: 5.17 there, below segmask's 5.18; trl, datasets, dill,
#    multiprocess: missing; peft, regex, fsspec: versions unchecked there), as
#        pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 ... -d .whl NAME==VERSION ...
#    and copies stories260K (../shared/models/stories260K; ../shared does not travel) to .carry/stories260K.
# 2. Here, before any device time: the same steps on CPU with tiny sizes (tests/benchmarks/test_gpu_script.py
#    runs it):
#        benchmarks/gpu.sh --dry-run
# 3. On the device, one call of about 8 minutes (the steps start no case after 400 s, each step no case after
#    its share of them; the wheels install in 10-20 s first):
#        run(command="benchmarks/gpu.sh", carry=[".whl", ".carry"], timeout_s=480)
#    With the machine's start (1-2 minutes) that leaves about 5 of the lease's 15 minutes. A machine goes back
#    30 s after a call, and none starts with under 4 minutes left: read the reply at once, fix, and rerun only
#    the steps that failed, on a fresh machine:
#        run(command="benchmarks/gpu.sh --steps training --budget-s 120", carry=[".whl", ".carry"],
#            timeout_s=170)
#    or give the machine back (give_back) if no rerun follows.
#
# Everything lands under $OUT (default runs/gpu): gpu.log (this output), results.json (every check, record
# and step timing), summary.txt. Other arguments go to benchmarks/gpu/run.py (--help there). Exit status:
# 0 when every step is ok, 1 when a check failed or a step raised, 2 without CUDA (and no --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ "${1:-}" = prepare ]; then
    WHEELS=(transformers trl datasets dill multiprocess peft regex fsspec)
    pins=()
    for name in "${WHEELS[@]}"; do
        pin=$(grep -i "^${name}==" requirements/lock.txt) || { echo "gpu.sh: $name is not in requirements/lock.txt" >&2; exit 2; }
        pins+=("$pin")
    done
    rm -rf .whl && mkdir -p .whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
    STORIES="${STORIES:-../shared/models/stories260K}"
    rm -rf .carry/stories260K && mkdir -p .carry
    cp -rL --no-preserve=mode "$STORIES" .carry/stories260K
    du -sh .whl .carry
    ls .whl
    exit 0
fi

OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export OUT
case " $* " in *" --dry-run "*) dry=1 ;; *) dry=0 ;; esac
if [ "$dry" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device here; benchmarks/gpu.sh --dry-run runs every step on CPU" >&2
    exit 2
fi
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        echo "installing $(ls .whl | wc -l) carried wheels into /tmp/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the carried wheels are for Python 3.12: not installed here"
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # segmask from this checkout (not installed there)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" benchmarks/gpu/run.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
