#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml's ranges (uv, a dev dependency):
#   requirements.lock       the runtime: what the images and `pip install moe-unlearn` get
#   requirements-dev.lock   runtime + plot/bench + dev tools: what `make` installs for CI
# Linux x86_64, Python 3.11. torch is left out of both (--no-emit-package): it is pinned
# exactly in pyproject.toml and installed first from the index of the wanted build (CPU or
# CUDA), so one lock serves both images. Extra arguments go to uv (e.g. --find-links DIR
# where a local CPU torch wheel lies, as /opt/wheels on the project's machines, and
# --constraint FILE with a tested venv's `pip freeze` to lock exactly what was tested:
# the committed locks were made with both, so they equal the venv the suite ran in).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package torch
        --no-header --quiet "$@")
"$UV" pip compile pyproject.toml "${common[@]}" -o requirements.lock
"$UV" pip compile pyproject.toml --extra dev "${common[@]}" -o requirements-dev.lock
