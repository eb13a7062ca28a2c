# Two images from one file:
#   docker build --target api .      the API, Flower and migrations: no torch, no CUDA
#   docker build --target worker .   the GPU (or CPU) workers and `model prepare`
FROM python:3.11-slim AS source
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gemma_batch gemma_batch
COPY api api
COPY worker worker
COPY migrations migrations

FROM source AS api
RUN pip install --no-cache-dir ".[api]"
CMD ["gemma-batch", "api", "--host", "0.0.0.0"]

FROM source AS worker
# torch first and pinned: PyPI's Linux build carries CUDA, which the GPU workers need.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir "${TORCH_SPEC}"
RUN pip install --no-cache-dir ".[worker]"
CMD ["gemma-batch", "worker", "--gpus", "all"]
