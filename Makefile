# The README's two commands: `make demo` and `make test`. Both install what they
# need into .venv, idempotently (the install re-runs only when pyproject.toml changes).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv test test-fast coverage lint demo demo-scan image clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

test: venv
	VENV=$(VENV) scripts/test

lint: venv
	VENV=$(VENV) scripts/lint

# The tier a maintainer works with: lint, then the unit tests (the loop on the in-memory API
# and a fake host included). No root, no cluster; about 20 s.
test-fast: venv
	VENV=$(VENV) scripts/lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

# The unit tests again, with coverage per module (tracing makes them about half again slower).
coverage: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider --cov --cov-report=term tests/unit

demo: venv
	$(VENV)/bin/python scripts/demo

# The same discovery without a cluster: what `localpv-agent scan` sees on three loop devices.
demo-scan: venv
	VENV=$(VENV) scripts/demo-scan

# The agent's image from the Dockerfile, with buildah (as root), offline: scripts/build-images.
IMAGE ?= localpv-agent:dev
image:
	scripts/install-system-deps
	IMAGE=$(IMAGE) scripts/build-images

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
