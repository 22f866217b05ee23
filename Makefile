# imgpipe: `make` (or `make help`) lists the tasks.
.DEFAULT_GOAL := help
SHELL := /bin/bash

export UV_PYTHON_DOWNLOADS := never
UV ?= uv
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# Local development: services against local RabbitMQ/Redis and an S3 endpoint.
DEV_S3_PORT ?= 9000
DEV_ENV := IMGPIPE_ENV=local \
	IMGPIPE_S3_ENDPOINT_URL=$${IMGPIPE_S3_ENDPOINT_URL:-http://127.0.0.1:$(DEV_S3_PORT)} \
	IMGPIPE_S3_FORCE_PATH_STYLE=true \
	AWS_ACCESS_KEY_ID=$${AWS_ACCESS_KEY_ID:-dev} AWS_SECRET_ACCESS_KEY=$${AWS_SECRET_ACCESS_KEY:-devsecret}

.PHONY: help
help: ## List the tasks
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: install
install: ## Install every package and the dev tools into .venv (from uv.lock)
	@command -v $(UV) >/dev/null || python3 -m pip install --quiet 'uv>=0.5'
	$(UV) sync --all-packages --frozen

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
dev: install ## Run api :8000, status :8001 and worker :8002 locally (plus a local S3 on :9000 if none)
	@mkdir -p .dev; trap 'kill 0' EXIT INT TERM; \
	if [ -z "$$IMGPIPE_S3_ENDPOINT_URL" ]; then \
		$(BIN)/python -m moto.server -H 127.0.0.1 -p $(DEV_S3_PORT) > .dev/s3.log 2>&1 & \
		for i in $$(seq 50); do curl -fs http://127.0.0.1:$(DEV_S3_PORT)/moto-api/ >/dev/null && break; sleep 0.2; done; \
		$(DEV_ENV) $(BIN)/python -c "import asyncio; from imgpipe.settings import S3Settings, load; from imgpipe.storage import Storage; asyncio.run(Storage(load(S3Settings)).ensure_bucket())"; \
	fi; \
	$(DEV_ENV) $(BIN)/imgpipe-api --port 8000 & \
	$(DEV_ENV) $(BIN)/imgpipe-status --port 8001 & \
	$(DEV_ENV) $(BIN)/imgpipe-worker --port 8002 & \
	wait

.PHONY: token
token: install ## Print a development token: make token SUB=alice [SCOPE=admin]
	@IMGPIPE_ENV=local $(BIN)/imgpipe-token --sub "$${SUB:-dev}" --scope "$${SCOPE:-}"

.PHONY: up
up: ## Run the whole system in Docker (compose.yaml; arrives with the deployment issue)
	@test -f compose.yaml || { echo "compose.yaml is not there yet: use 'make dev' to run locally"; exit 1; }
	docker compose up -d --build

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .dev
