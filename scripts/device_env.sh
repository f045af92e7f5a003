# Sourced by the device scripts: put protperf (this checkout) on PYTHONPATH and, on the device,
# install the wheels carried in .whl (packages its image lacks) into /tmp/protperf-site first.
# Needs DEVICE, PYTHON and OUT set; the pip log goes to "$OUT/$1"; returns pip's exit status.
if [ "$DEVICE" != cpu ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels for the device's Python
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/protperf-site .whl/*.whl >"$OUT/$1" 2>&1
    wheels_status=$?
    export PYTHONPATH="/tmp/protperf-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    return "$wheels_status"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
