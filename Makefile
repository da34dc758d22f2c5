# Two commands a newcomer needs: `make demo` and `make test`. Both install on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: install demo test bench bench-quick lint clean fuzz

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch/torchvision pinned as a pair: torchvision from the registry needs this CUDA build of torch.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[train,dev,bench]'
	touch $(STAMP)

demo: install
	mkdir -p out
	$(BIN)/onnxecc compress models/digits_resdw.onnx --budget 0.3 --metric macs --data digits -o out/digits_resdw_macs30.onnx --report out/digits_resdw_macs30.json
	$(BIN)/onnxecc validate models/digits_resdw.onnx out/digits_resdw_macs30.onnx --data digits

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m bench --quick

fuzz: install
	ONNXECC_FUZZ_EXAMPLES=$${ONNXECC_FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest tests/test_fuzz_ingest.py -q

lint: install
	$(BIN)/ruff check onnxecc tests models bench tools

clean:
	rm -rf $(VENV) .pytest_cache
