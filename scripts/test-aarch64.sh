#!/usr/bin/env bash
# Runs the CPU kernel tests (`cargo test -p pocketlm --lib kernels`) for aarch64 on an x86-64
# host: cross-compiled, linked with the GNU aarch64 toolchain and run under qemu's user-mode
# emulator, whose default CPU has the NEON, `dotprod` and `i8mm` extensions, so both
# `Backend::Neon` and `Backend::NeonDotprod` are tested against the portable kernels.
#
# Needs installed:
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install gcc-aarch64-linux-gnu qemu-user     (Debian/Ubuntu package names)
#
# Extra arguments go to `cargo test` (e.g. `-- --nocapture`). Not part of `.ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
exec cargo test --target aarch64-unknown-linux-gnu -p pocketlm --lib kernels "$@"
