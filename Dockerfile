# protperf for GPU training: CUDA PyTorch from the base image, protperf on top, `protperf` as the
# entry point, a non-root user, prepared data and runs as volumes.
#
#   docker build -t protperf .
#   docker run --gpus all --shm-size 16g -v "$PWD/data:/workspace/data" \
#       -v "$PWD/runs:/workspace/runs" protperf train --concat --data data/trembl
#
# The base image's torch must satisfy pyproject.toml's range (tests/test_dockerfile.py checks it);
# pip is constrained to that exact build, so installing protperf never replaces the CUDA wheel.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    MPLCONFIGDIR=/tmp/matplotlib

# Dependencies first (a layer that survives code edits), then the package itself.
WORKDIR /opt/protperf
COPY pyproject.toml README.md ./
COPY protperf ./protperf
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
    && python -m pip install --constraint /tmp/constraints.txt . \
    && rm /tmp/constraints.txt \
    && protperf --version \
    && python -c "import torch, protperf.model; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Non-root user; runs and datasets live in volumes under its working directory, which are
# also protperf's defaults (data/<release>, runs/<config>-<mode>).
ARG UID=1000
RUN useradd --create-home --uid ${UID} --shell /bin/bash protperf \
    && mkdir -p /workspace/data /workspace/runs \
    && chown -R protperf:protperf /workspace
COPY --chown=protperf:protperf configs /workspace/configs
USER protperf
WORKDIR /workspace
VOLUME ["/workspace/data", "/workspace/runs"]

ENTRYPOINT ["protperf"]
CMD ["--help"]
