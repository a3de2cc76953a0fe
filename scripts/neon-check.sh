#!/usr/bin/env bash
# The aarch64 (NEON) kernels on an x86-64 machine: builds infer-kernels' tests for
# aarch64-unknown-linux-gnu and runs them under qemu-user, once on an emulated CPU with the
# dot-product extension (every path: scalar, neon, neon-dotprod) and once on a Cortex-A53, which
# lacks it (detection must fall back to plain NEON). rustup's servers are out of reach here, so the
# cross toolchain is Debian's: a Debian sid tree (mmdebstrap, kept in the cache folder) with rustc,
# cargo, the aarch64 std, the aarch64 gcc and qemu-user, entered with chroot in a private mount
# namespace (needs root; the mounts vanish with the namespace). Set INFER_SKIP_NEON_CHECK=1 to skip it.
#
#   scripts/neon-check.sh             makes the Debian tree if it is missing, then builds and runs the tests
#   scripts/neon-check.sh --prepare   only makes the tree (mostly downloads: scripts/test.sh runs it in
#                                     the background while the main build runs)
#
#   INFER_NEON_ROOT   the Debian tree (default: ~/.cache/infer-neon/sid)
set -euo pipefail
cd "$(dirname "$0")/.."
prepare_only=0
[ "${1:-}" = --prepare ] && prepare_only=1
if [ "${INFER_SKIP_NEON_CHECK:-0}" = 1 ]; then
  echo "neon check: skipped (INFER_SKIP_NEON_CHECK=1)"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! unshare --mount true 2>/dev/null; then
  echo "neon check: skipped (entering the Debian cross toolchain needs root and mount namespaces, which this machine does not grant)"
  exit 0
fi
start=$(date +%s)
root="${INFER_NEON_ROOT:-$HOME/.cache/infer-neon/sid}"
root="$(realpath -m "$root")"
# Never delete or rebuild a tree that has anything mounted inside it (a bind mount of the project
# there would be deleted with it).
if awk -v r="$root/" '{ if (index($2 "/", r) == 1) found = 1 } END { exit !found }' /proc/self/mounts; then
  echo "neon check: something is mounted under $root; unmount it first (see /proc/self/mounts)"
  exit 1
fi
if [ ! -x "$root/usr/bin/cargo" ] || [ ! -d "$root/usr/lib/rustlib/aarch64-unknown-linux-gnu" ]; then
  command -v mmdebstrap >/dev/null || { apt-get update && apt-get install -y mmdebstrap; }
  rm -rf --one-file-system "$root"
  mkdir -p "$(dirname "$root")"
  # Debian's mirror may serve an index past its Valid-Until date (the clock here runs ahead).
  if ! mmdebstrap --mode=root --variant=apt --aptopt='Acquire::Check-Valid-Until "false"' \
    --architectures=amd64,arm64 \
    --include=rustc,cargo,libstd-rust-dev:arm64,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross,qemu-user,ca-certificates \
    sid "$root" http://deb.debian.org/debian; then
    rm -rf --one-file-system "$root"
    echo "neon check: skipped (Debian's sid packages could not be fetched for the cross toolchain; the log above says why)"
    exit 0
  fi
fi
if [ "$prepare_only" = 1 ]; then
  echo "neon check: cross toolchain ready in $root ($(( $(date +%s) - start ))s)"
  exit 0
fi
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
registry="${CARGO_HOME:-$HOME/.cargo}/registry"
mkdir -p "$root/src" "$root/target" "$root/root/.cargo/registry" "$registry"
# The project, the crates cargo already fetched and /proc, mounted only inside this namespace.
unshare --mount --propagation private bash -euo pipefail -c '
  root="$1"; src="$2"; registry="$3"
  mount --bind "$src" "$root/src"
  mount --bind "$registry" "$root/root/.cargo/registry"
  mount -t proc proc "$root/proc"
  chroot "$root" env -i HOME=/root PATH=/usr/bin:/bin CARGO_TERM_COLOR=never CARGO_TARGET_DIR=/target CARGO_PROFILE_DEV_DEBUG=0 \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    bash -euo pipefail -c "
      cd /src
      rustc --version
      run() { # qemu CPU model, what it must detect
        echo \"neon check: tests on an emulated \$1 (expects \$2)\"
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=\"qemu-aarch64 -cpu \$1 -L /usr/aarch64-linux-gnu\" \
          INFER_EXPECT_ISA=\"\$2\" cargo test --locked -p infer-kernels --lib --target aarch64-unknown-linux-gnu
      }
      run max neon-dotprod
      run cortex-a53 neon
    "
' _ "$root" "$PWD" "$registry"
echo "neon check: ok in $(( $(date +%s) - start ))s"
