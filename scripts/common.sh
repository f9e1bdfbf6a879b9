# Shared by the scripts in this directory: where build outputs are cached,
# and installing what a fresh machine lacks. Source it; do not run it.

EMBER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Build outputs live outside the repository, so a fresh clone reuses them.
EMBER_CACHE_DIR="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}"
export EMBER_ROOT EMBER_CACHE_DIR

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The Rust toolchain, components and targets rust-toolchain.toml names;
# asks rustup (a network round trip) only when something is missing.
ensure_rust() {
    # Host builds need a C linker; rustup's installer needs curl.
    ensure_packages cc:gcc curl:curl
    if ! command -v rustup >/dev/null 2>&1; then
        say "installing rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --default-toolchain none >&2
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    local channel sysroot
    channel="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$EMBER_ROOT/rust-toolchain.toml")"
    sysroot="$(rustup run "$channel" rustc --print sysroot 2>/dev/null || true)"
    if [ -n "$sysroot" ] \
        && [ -d "$sysroot/lib/rustlib/x86_64-unknown-none" ] \
        && [ -d "$sysroot/lib/rustlib/wasm32-wasip1" ] \
        && [ -x "$sysroot/bin/rustfmt" ] && [ -x "$sysroot/bin/cargo-clippy" ]; then
        return
    fi
    say "installing Rust $channel with its targets"
    rustup toolchain install "$channel" --profile minimal \
        --component rustfmt --component clippy \
        --target x86_64-unknown-none --target wasm32-wasip1 >&2
}

# Debian packages, installed only when a command is missing.
ensure_packages() {
    local missing=()
    local pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

# Installs Debian packages (as root, or through sudo).
apt_install() {
    say "installing $*"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

# Debian's clang, lld, wasi-libc and compiler-rt for wasm32: C to wasm32-wasi.
ensure_wasm_c() {
    if command -v clang >/dev/null 2>&1 && command -v wasm-ld >/dev/null 2>&1 \
        && [ -f /usr/lib/wasm32-wasi/crt1-command.o ] \
        && ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1; then
        return
    fi
    apt_install clang lld wasi-libc libclang-rt-dev-wasm32
}

# build_release CARGO_ARGS...: a release build of the host workspace that
# remembers the executables cargo reports it made (fresh or rebuilt), so a
# script runs only what this build made: never a stale binary that another
# build left in the target directory.
build_release() {
    ensure_packages jq:jq
    EMBER_BUILT="$(cargo build --release --locked "$@" --message-format=json-render-diagnostics \
        | jq -r 'select(.reason == "compiler-artifact" and .executable != null) | .executable')"
}

# built_binary NAME: the path of NAME made by the last build_release; fails,
# saying so, if it made none.
built_binary() {
    local path
    path="$(grep "/$1\$" <<<"${EMBER_BUILT:-}" || true)"
    [ -n "$path" ] || { echo "$(basename "$0"): the build did not produce $1" >&2; return 1; }
    echo "$path"
}

# /dev/kvm must be usable for the demo and the KVM tests.
kvm_usable() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ]
}
