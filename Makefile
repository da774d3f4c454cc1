# The two commands of the README. Each installs what it needs first (scripts/bootstrap.sh).
.PHONY: serve test lint bench

serve:
	scripts/bootstrap.sh serve
	.venv/bin/paddle-meter serve

test:
	scripts/bootstrap.sh test
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check serving interceptors exporters billing models

bench:
	scripts/bootstrap.sh test
	.venv/bin/python bench
