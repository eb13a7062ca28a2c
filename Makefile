# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PY := .venv/bin/python

.PHONY: demo test lint setup bench-setup bench-w1 bench-w2 bench-w3 bench-ingest bench-gpu bench-e2e bench-w5 bench-w6 bench-quant bench-dispatch

setup:
	scripts/bootstrap.sh demo

demo: setup
	$(PY) -m gemma_batch demo

test:
	scripts/bootstrap.sh test
	$(PY) -m gemma_batch model prepare gemma-3-270m
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff, and the import contracts in pyproject.toml (docs/architecture.md draws them).
lint:
	scripts/bootstrap.sh install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

# Benchmarks (docs/benchmarks.md): one command per workload.
# llama.cpp builds for the CPU it is on; on a CPU with AMX its AMX matmul crashed on the packaged
# GGUF (a segfault in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36), so there it is built for
# AVX-512 without AMX.
LLAMA_CMAKE_ARGS := $(if $(shell grep -s -m1 -o -w amx_int8 /proc/cpuinfo),-DGGML_NATIVE=OFF \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)

bench-setup: setup
	$(PY) -m gemma_batch model prepare gemma-3-270m
	$(if $(LLAMA_CMAKE_ARGS),CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS") \
		$(PY) -m pip install -q -e ".[bench]" \
		|| echo "llama-cpp-python did not install: the benchmarks skip it"

bench-w1: bench-setup
	$(PY) -m bench.w1_generate

bench-w2: bench-setup
	$(PY) -m bench.w2_label

bench-w3: bench-setup
	$(PY) -m bench.w3_mixed

bench-dispatch: bench-setup
	scripts/bootstrap.sh test
	$(PY) -m bench.dispatch

bench-ingest: bench-setup
	scripts/bootstrap.sh test
	$(PY) -m bench.ingest

bench-e2e: bench-setup
	$(PY) -m bench.e2e

bench-w5: bench-setup
	$(PY) -m bench.w5_sync

bench-w6: bench-setup
	$(PY) -m bench.w6_adapters

# The torchao modes against bf16 fit the device's time; nf4 and int8 (bitsandbytes) are memory
# savers, measured with --precisions when wanted. Then the real stack on the GPU against its
# engine alone, 1,024 items in 16 jobs.
bench-gpu: bench-setup
	$(PY) -m bench.gpu --precisions bf16,int8-wo,int4-wo,fp8 --out bench-gpu.json
	$(PY) -m bench.e2e --device cuda --items 1024 --jobs 16 --runs 2

bench-quant: bench-setup
	$(PY) -m bench.quant_cpu
