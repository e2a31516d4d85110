# Shortcuts for the commands README.md documents. `make` alone lists them.
.DEFAULT_GOAL := help
.PHONY: help demo test bench soak deb install

# apt needs root; sudo only when not root already (a fresh Debian may have no sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  make \1\t/' | expand -t 16

demo: ## as root: install what it needs, then show holepunch publishing a Service (no cluster or router needed)
	HOLEPUNCH_RERUN="make demo" scripts/dev-deps --demo
	scripts/demo

test: ## as root: install what the tests need, then run every tier (cargo test --locked --features lab)
	HOLEPUNCH_RERUN="make test" scripts/test

bench: ## the benchmark table (as root)
	scripts/bench

soak: ## the soak run: holepunch under Service churn for an hour (as root)
	scripts/soak

deb: ## build the Debian package into target/debian/
	packaging/build-deb

install: ## build the Debian package and install it (apt starts the daemon)
	packaging/build-deb && $(SUDO) apt install ./target/debian/holepunch_*.deb
