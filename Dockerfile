FROM python:3.11-slim
WORKDIR /app
# torch first and pinned: PyPI's Linux build carries CUDA, which the GPU workers need.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY gemma_batch gemma_batch
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install --no-cache-dir .
CMD ["gemma-batch", "--help"]
