# podvisor: `make demo` and `make test` work on a fresh Debian 12 machine.
SHELL := /bin/bash
CARGO ?= cargo
OUT := target/release
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/release/podvisor-agent
export PODVISOR_CACHE ?= $(HOME)/.cache/podvisor

.PHONY: all deps build host agent kernel initrd rootfs demo podvisord test lint fuzz bench bench-quick clean install

all: build

deps:
	@scripts/install-deps.sh
	@scripts/e2b-venv.sh
	@scripts/e2b-node.sh >/dev/null

# Host binaries, guest kernel and initramfs, and a busybox rootfs, all in $(OUT).
build: deps host kernel initrd rootfs

host:
	$(CARGO) build --release --bin podvisor --bin containerd-shim-podvisor-v2 --bin podvisord

# The agent is PID 1 of an initramfs with nothing else in it: fully static.
agent:
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
	  $(CARGO) build --release --target $(AGENT_TARGET) -p podvisor-agent

initrd: agent
	@mkdir -p $(OUT)
	scripts/mkinitrd.sh $(AGENT_BIN) $(OUT)/podvisor-initrd.cpio

kernel:
	@mkdir -p $(OUT)
	@k=$$(guest/kernel/build.sh) && cp -f "$$k" $(OUT)/vmlinux && echo "guest kernel: $$k"

rootfs: deps
	@mkdir -p $(OUT)
	@[ -x $(OUT)/rootfs/bin/busybox ] || scripts/busybox-rootfs.sh $(OUT)/rootfs

demo: build
	$(OUT)/podvisor check
	@echo '--- podvisor sandbox run -- sh -c "..." (a busybox container in its own micro-VM)'
	$(OUT)/podvisor sandbox run --timings -- sh -c 'echo "hello from $$(hostname), guest kernel $$(uname -r), host kernel '"$$(uname -r)"'"; id; ls /'

# podvisord on 127.0.0.1:3000, state in /var/lib/podvisord (docs/podvisord.md); the
# first start builds the base template's Debian root (about a minute, cached).
podvisord: build
	@mkdir -p /var/lib/podvisord
	$(OUT)/podvisord --listen 127.0.0.1:3000 --state-dir /var/lib/podvisord \
	  --admin-token-file /var/lib/podvisord/admin.token

# cargo-nextest (on the machine image; installed if missing): every test in its own
# process, two at a time (VM tests under TCG are CPU-bound), each killed if it hangs.
test: build
	@cargo nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --release --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Fuzzing (docs/fuzzing.md): builds every target in fuzz/ and runs each for
# FUZZ_SECONDS; fails if one finds a crash, leak, hang or OOM.
FUZZ_SECONDS ?= 20
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) CARGO=$(CARGO) scripts/fuzz.sh

bench: build
	bench/sandbox_run.py
	bench/template.py
	bench/oci.py
	bench/pod.py
	bench/jail.py
	bench/image.py
	bench/podvisord.py
	bench/snapshot.py

# Every benchmark once, small (one run each): CI runs it so that a change that
# breaks a benchmark cannot land. Its numbers are no measurement.
bench-quick: build
	bench/sandbox_run.py --quick
	bench/template.py --quick
	bench/oci.py --quick
	bench/pod.py --quick
	bench/jail.py --quick
	bench/image.py --quick
	bench/podvisord.py --quick
	bench/snapshot.py --quick

install: build
	install -D -m 0755 $(OUT)/podvisor /usr/local/bin/podvisor
	install -D -m 0755 $(OUT)/containerd-shim-podvisor-v2 /usr/local/bin/containerd-shim-podvisor-v2
	install -D -m 0644 $(OUT)/vmlinux /usr/local/lib/podvisor/vmlinux
	install -D -m 0644 $(OUT)/podvisor-initrd.cpio /usr/local/lib/podvisor/podvisor-initrd.cpio

clean:
	$(CARGO) clean
