# syntax=docker/dockerfile:1.7
#
# The svd-serve image: Ray 2.60.0 (Python 3.11, CUDA) plus this project. KubeRay runs it for the
# head and every worker group of the Helm chart (helm/svd-serve); `ray start` is KubeRay's command,
# so the CMD below only matters for `docker run`.
#
#   docker build -t registry.example.com/ml/svd-serve:0.1.0 .
#
# The Ray base image already provides what KubeRay expects of a Ray image (bash, wget for its
# probes, the `ray` CLI) and the non-root user `ray` (uid 1000, gid 100).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

USER ray
WORKDIR /home/ray/svd-serve

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface

# Dependencies first, in their own layer: they change far less often than the code. The
# constraints file pins torch (the Linux wheel of torch==2.13.0 is the CUDA build).
COPY --chown=ray:users pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (no dependency changes: everything above is already installed).
COPY --chown=ray:users README.md ./
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users loadtest ./loadtest
RUN pip install -c constraints.txt . \
    && python -c "import serve.config, pipelines" \
    && svd-serve --help > /dev/null

# Serve HTTP, Ray dashboard, GCS, Ray metrics.
EXPOSE 8000 8265 6379 8080

CMD ["svd-serve", "--help"]
