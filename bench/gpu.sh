#!/usr/bin/env bash
# Every GPU check in one unattended run: `make setup && bench/gpu.sh` from a fresh clone on a CUDA machine
# (results in bench/results/gpu-*.txt; see bench/gpu.py). `bench/gpu.sh --dry-run` checks the plumbing on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
exec .venv/bin/python bench/gpu.py "$@"
