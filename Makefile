# The two commands of the README: `make demo` (the main job) and `make test` (what CI runs).
# Both install what they need first (scripts/setup.sh: a project-local torch venv).
CARGO ?= cargo

.PHONY: setup demo test lint build browser

setup:
	./scripts/setup.sh

# Headless Chromium for the dashboard's browser test (tests/watch.rs); installed only when missing.
browser:
	./scripts/install-chromium.sh

build: setup
	$(CARGO) build --workspace --bins --locked

demo: setup
	./deploy/local/demo.sh

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: lint build browser
	$(CARGO) test --workspace --locked
