#!/bin/sh
# Installs diffusers (for bench_cuda.py's diffusers_* modes) from the wheels in .whl/, offline, into a
# separate folder (default /tmp/benchdeps) that the benchmark then finds through PYTHONPATH:
#
#   sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/bench_cuda.py
#
# --target leaves the machine's own packages alone (and works where pip refuses to touch a system Python).
# diffusers 0.42.1 needs huggingface_hub >= 1.32 at import; where the installed hub is older it falls back
# to diffusers 0.40.0 (.whl/fallback/), whose group offloading is the same code. It never fails the
# command: without diffusers the benchmark reports those modes as errors and runs the rest.
T="${1:-/tmp/benchdeps}"
PY="${PYTHON:-python3}"
rm -rf "$T"
if ! "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$T" .whl/*.whl; then
    echo "install_gpu_deps: pip install from .whl/ failed; diffusers modes will report errors" >&2
    exit 0
fi
if ! PYTHONPATH="$T" "$PY" -c "import diffusers.hooks" 2>/dev/null; then
    echo "install_gpu_deps: diffusers 0.42.1 does not import here; using .whl/fallback/diffusers-0.40.0" >&2
    rm -rf "$T"/diffusers "$T"/diffusers-*.dist-info "$T"/bin
    "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$T" .whl/fallback/diffusers-*.whl \
        || echo "install_gpu_deps: fallback install failed" >&2
fi
PYTHONPATH="$T" "$PY" -c "import diffusers, huggingface_hub; from diffusers.hooks import apply_group_offloading; print('install_gpu_deps: diffusers', diffusers.__version__, 'with huggingface_hub', huggingface_hub.__version__)" \
    || echo "install_gpu_deps: diffusers is not importable; diffusers modes will report errors" >&2
exit 0
