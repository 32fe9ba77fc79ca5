# Two commands do everything (see README):
#   make demo   install what is missing, record the test VMM (testvmm), print the report
#   make test   install what is missing, run the whole test suite
PY := .venv/bin/python
OUT := out

.PHONY: setup demo test doctor clean

setup:
	@scripts/setup

demo: setup
	@mkdir -p $(OUT)
	$(PY) -m kvmtrace.cli record -o $(OUT)/demo.kvt --force -- \
	    $(PY) -m testvmm --scenario demo --report $(OUT)/demo-guest.json
	$(PY) -m kvmtrace.cli report $(OUT)/demo.kvt

test: setup
	$(PY) -m pytest -q -ra --durations=30 tests

doctor: setup
	$(PY) -m kvmtrace.cli doctor

clean:
	rm -rf $(OUT) .pytest_cache
