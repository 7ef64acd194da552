# Help desk backend: the two commands are `make run` and `make test`.
# Works from a clean clone on Debian with Python 3.11; see `make help`.

SHELL := /bin/bash
.DEFAULT_GOAL := help
# `make token` prints only the token; from another directory use `make -s -C path token ...`
# (-C alone makes make print "Entering directory" on stdout).

VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
AMQP_URI  ?= amqp://guest:guest@localhost:5672/
export AMQP_URI

# python3.11, or python3 when that is 3.11
PYTHON311 := $(shell command -v python3.11 2>/dev/null || \
               (python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && command -v python3))

.PHONY: help venv broker migrate run token test test-quick bench bench-routing clean distclean

help:
	@echo "make run                     venv + RabbitMQ + migrations, then every service (Ctrl-C stops all)"
	@echo "make test                    the whole suite (starts RabbitMQ if needed); PYTEST_ARGS=... passes through"
	@echo "make test-quick              unit tests only: -m 'not integration and not e2e'"
	@echo "make token ROLE=agent SUB=alice [ORG=acme] [ORG_WIDE=1]   print a bearer token"
	@echo "make venv | broker | migrate | bench | bench-routing | clean | distclean"

# --- virtualenv --------------------------------------------------------------------------------
# All output goes to stderr so that `TOKEN=$$(make token ...)` captures only the token.
venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if [ -z "$(PYTHON311)" ]; then \
	    echo "error: Python 3.11 not found (need python3.11, or python3 being 3.11): sudo apt-get install -y python3.11 python3.11-venv" >&2; \
	    exit 1; \
	fi
	@if [ ! -x $(VPY) ]; then \
	    echo "venv: creating $(VENV) with $(PYTHON311)" >&2; \
	    $(PYTHON311) -m venv $(VENV) >&2 || { \
	        rm -rf $(VENV); \
	        echo "error: could not create the virtualenv; on Debian: sudo apt-get install -y python3.11-venv" >&2; \
	        exit 1; }; \
	fi
	@echo "venv: pip install -e '.[test]' (pinned in pyproject.toml and constraints.txt)" >&2
	@$(VPY) -m pip install --disable-pip-version-check -c constraints.txt -e '.[test]' >&2
	@touch $@
	@echo "venv: ready" >&2

# --- services ----------------------------------------------------------------------------------
broker: $(STAMP)
	@PYTHON=$(VPY) deploy/local/ensure-rabbitmq.sh

migrate: $(STAMP)
	@mkdir -p var
	$(VPY) -m servicekit.migrate

run: $(STAMP) broker migrate
	@mkdir -p var
	@echo
	@echo "  API:     http://localhost:8000/v1        docs: http://localhost:8000/v1/docs"
	@echo "  token:   make token ROLE=agent SUB=alice [ORG=acme]"
	@echo "           curl -H \"Authorization: Bearer \$$(make token ROLE=agent SUB=alice)\" http://localhost:8000/v1/..."
	@echo "  metrics: gateway :8000/metrics, tickets :9101/metrics, routing :9102/metrics"
	@echo "  Ctrl-C stops everything."
	@echo
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHONUNBUFFERED=1 \
	    exec $(VENV)/bin/honcho -d "$(CURDIR)" -f deploy/local/Procfile start

# --- tokens ------------------------------------------------------------------------------------
token: $(STAMP)
	@if [ -z "$(ROLE)" ] || [ -z "$(SUB)" ]; then \
	    echo "error: ROLE and SUB are required: make token ROLE=agent SUB=alice [ORG=acme] [ORG_WIDE=1]" >&2; \
	    exit 2; \
	fi
	@$(VPY) -m gateway.token --role '$(ROLE)' --sub '$(SUB)' \
	    $(if $(ORG),--org '$(ORG)') $(if $(filter 1 yes true,$(ORG_WIDE)),--org-wide)

# --- tests -------------------------------------------------------------------------------------
# TEST_POSTGRES_URL is passed through only when the caller set it (.ci/run does when PostgreSQL runs).
test: $(STAMP) broker
	@mkdir -p var
	$(VPY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	@mkdir -p var
	$(VPY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

bench: $(STAMP) broker
	@mkdir -p var
	$(VPY) benchmarks/run.py

bench-routing: $(STAMP) broker
	@mkdir -p var
	$(VPY) benchmarks/routing_chooser.py
	$(VPY) benchmarks/routing_e2e.py

# --- cleanup -----------------------------------------------------------------------------------
clean:
	rm -f var/*.db var/*.db-journal var/*.db-wal var/*.db-shm
	rm -rf .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) var *.egg-info
