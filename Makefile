# Quick start:  make run        (train + evaluate the default recipe)
#               make test       (the whole test suite, as CI runs it)
#               make test-fast  (the suite without the end-to-end tests marked slow: the edit-test loop)
# Both create .venv and install what they need on first use; later calls skip the install.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
RECIPE ?= fashion-mnist
ARGS   ?=

.PHONY: run test test-fast setup setup-test data-packages browser-packages db-packages clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# the stamp files make reinstalls happen only when pyproject.toml changes. `make run` installs the
# extras the steps after it need (export, serve and monitor, tune), so they work in the same venv.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[export,serve,tune]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/activate
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed data-packages

setup-test: $(VENV)/.installed-test data-packages browser-packages db-packages

# Debian ships Fashion-MNIST as a package; install it where we can (root + apt-get), otherwise
# cvrecipe falls back to its checksummed download.
data-packages:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	   && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "note: apt-get could not install dataset-fashion-mnist; cvrecipe will download it"; \
	fi

# The web page test drives Debian's chromium through playwright (never `playwright install`);
# without it that test skips with a reason.
browser-packages:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "note: apt-get could not install chromium; the browser test will be skipped"; \
	fi

# The tune test shares a study between two processes through a real PostgreSQL, started by the test
# itself on 127.0.0.1 as the `postgres` user; without the package that test skips with a reason.
db-packages:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null \
	   && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null) \
	    || echo "note: apt-get could not install postgresql; the PostgreSQL tune test will be skipped"; \
	fi

run: setup
	$(VENV)/bin/cvrecipe run $(RECIPE) $(ARGS)

test: setup-test
	$(PY) -m pytest -q $(ARGS)

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
