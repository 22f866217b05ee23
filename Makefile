# imgpipe: `make` (or `make help`) lists the tasks.
.DEFAULT_GOAL := help
SHELL := /bin/bash

export UV_PYTHON_DOWNLOADS := never
# uv from PATH, or installed from PyPI on first use (ops/uv.sh) into .tools/uv, which the recipes
# (and the lint scripts they run) then find on PATH.
UV ?= $$(bash ops/uv.sh)
export PATH := $(CURDIR)/.tools/uv/bin:$(PATH)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Local development: services against local RabbitMQ/Redis and an S3 endpoint.
DEV_S3_PORT ?= 9000
DEV_ENV := IMGPIPE_ENV=local \
	IMGPIPE_S3_ENDPOINT_URL=$${IMGPIPE_S3_ENDPOINT_URL:-http://127.0.0.1:$(DEV_S3_PORT)} \
	IMGPIPE_S3_FORCE_PATH_STYLE=true \
	AWS_ACCESS_KEY_ID=$${AWS_ACCESS_KEY_ID:-dev} AWS_SECRET_ACCESS_KEY=$${AWS_SECRET_ACCESS_KEY:-devsecret}

.PHONY: help
help: ## List the tasks
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: install
# --inexact: what `make bench` added (its group) stays; a fresh checkout installs exactly the lock.
install: ## Install every package and the dev tools into .venv (from uv.lock)
	@$(UV) sync --all-packages --frozen --inexact

.PHONY: test
test: install ## Run the whole test suite (needs RabbitMQ and Redis on localhost)
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: lint
lint: install ## Check style and imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: format
format: install ## Format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: dev
dev: install ## Run api :8000, status :8001, worker :8002, reconciler :8003 locally (+ a local S3 on :9000)
	@mkdir -p .dev; trap 'trap - EXIT INT TERM; kill 0' EXIT INT TERM; \
	if [ -z "$$IMGPIPE_S3_ENDPOINT_URL" ]; then \
		$(BIN)/python -m tests.s3server $(DEV_S3_PORT) > .dev/s3.log 2>&1 & \
		for i in $$(seq 50); do curl -fs http://127.0.0.1:$(DEV_S3_PORT)/ >/dev/null && break; sleep 0.2; done; \
		$(DEV_ENV) $(BIN)/python -c "import asyncio; from imgpipe.settings import S3Settings, load; from imgpipe.storage import Storage; asyncio.run(Storage(load(S3Settings)).ensure_bucket())"; \
	fi; \
	$(DEV_ENV) $(BIN)/imgpipe-api --host 127.0.0.1 --port 8000 & \
	$(DEV_ENV) $(BIN)/imgpipe-status --host 127.0.0.1 --port 8001 & \
	$(DEV_ENV) $(BIN)/imgpipe-worker --host 127.0.0.1 --port 8002 & \
	$(DEV_ENV) $(BIN)/imgpipe-reconciler --host 127.0.0.1 --port 8003 & \
	wait

.PHONY: token
token: install ## Print a development token: make token SUB=alice [SCOPE=admin]
	@IMGPIPE_ENV=local $(BIN)/imgpipe-token --sub "$${SUB:-dev}" --scope "$${SCOPE:-}"

.PHONY: reconcile
reconcile: install ## One reconciliation against `make dev`'s stores, a dry run (APPLY=1: for real)
	@$(DEV_ENV) $(BIN)/imgpipe-reconcile $(if $(APPLY),,--dry-run)

.PHONY: dead-letters
dead-letters: install ## Dead letters of `make dev`: make dead-letters [ARGS="replay --all"] (default: list)
	@$(DEV_ENV) $(BIN)/imgpipe-dead-letters $(or $(ARGS),list)

# The Docker stack (compose.yaml). `make logs S=worker` follows one service; `make down VOLUMES=1` also
# deletes the stack's data.
COMPOSE ?= docker compose

.PHONY: up
up: ## Build and start everything in Docker: gateway :8080, Grafana :3000, MinIO :9000/:9001
	$(COMPOSE) up -d --build --remove-orphans --wait
	@echo "gateway    http://localhost:8080   (POST /uploads, POST /jobs, GET /jobs/{id}[/events])"
	@echo "grafana    http://localhost:3000   (admin/admin; anonymous viewers allowed)"
	@echo "prometheus http://localhost:9090   rabbitmq http://localhost:15672 (imgpipe/imgpipe-dev)"
	@echo "minio      http://localhost:9001   (imgpipe/imgpipe-dev-secret; S3 API on :9000)"

.PHONY: down
down: ## Stop the Docker stack (VOLUMES=1 also deletes its data)
	$(COMPOSE) down --remove-orphans $(if $(VOLUMES),--volumes)

.PHONY: logs
logs: ## Follow the Docker stack's logs (S=worker for one service)
	$(COMPOSE) logs -f --tail=200 $(S)

.PHONY: ps
ps: ## Show the Docker stack's containers and their health
	$(COMPOSE) ps -a

.PHONY: lint-deploy
lint-deploy: install ## Validate the deployment (Dockerfiles, compose, gateway, rules, dashboards, ...) without Docker
	bash ops/tools.sh
	@failed=""; for script in ops/lint/*.sh; do \
		echo "== $$script"; bash "$$script" || failed="$$failed $$script"; \
	done; \
	if [ -n "$$failed" ]; then echo "lint-deploy FAILED:$$failed"; exit 1; fi; \
	echo "lint-deploy: every check passed"

.PHONY: bench
bench: ## Benchmarks against raw libvips, Pillow and thumbor (needs wrk; BENCH_ARGS=--quick for a short run)
	@# Compiled bytecode, as in the images (UV_COMPILE_BYTECODE=1): without it, where
	@# PYTHONDONTWRITEBYTECODE is set, every process compiles every module it imports as it starts.
	$(UV) sync --all-packages --group bench --frozen --compile-bytecode
	$(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .dev
