# make book  -> environment (if missing), notebooks whose inputs changed (Snakefile), HTML book
# make test  -> environment (if missing), test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: env book notebooks test check-book clean clean-all

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so pip takes the local CPU wheel instead of a CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Debian's Chromium for the browser test of the book (as root; elsewhere that test is skipped)
	if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true; \
	  fi; \
	  command -v chromium >/dev/null || echo "chromium not installed: the browser test of the book will be skipped"; \
	fi
	touch $(STAMP)

# Snakemake runs the notebooks whose inputs changed, two at a time where the graph allows, then the book
CORES  ?= 2
SNAKE  := $(BIN)/snakemake --cores $(CORES) --rerun-incomplete --max-checksum-file-size 50MB

book: $(STAMP)
	$(SNAKE)

notebooks: $(STAMP)
	$(SNAKE) $(foreach n,zoo mad_auc quirkiness drift perturb benchmarks,book/generated/$(n).ipynb)

test: $(STAMP)
	$(BIN)/python -m pytest -q

check-book: $(STAMP)
	$(BIN)/python -m madlib.workflow.browsercheck _build/html

clean:
	rm -rf _build/html _build/.doctrees _build/stamps _build/workflow book/generated

clean-all: clean
	rm -rf _build $(VENV)
