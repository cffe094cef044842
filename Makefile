# Thin wrapper: tools/setup.sh installs what is missing and builds; Bazel does the rest.
.PHONY: setup build demo test bench clean

setup:
	@tools/setup.sh

build: setup

demo: setup
	@tools/demo.sh

test: setup
	@tools/run-tests.sh

bench: setup
	@bazel run //bench:snapshot_bench
	@bazel run //bench:ec_bench

clean:
	bazel clean
