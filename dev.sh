#!/usr/bin/env bash
# The two commands of the README, and the set-up both need.
#
#   ./dev.sh demo     install what is missing, build the guest, run `cma-qemu demo` on virt
#   ./dev.sh test     install what is missing, build the guest, run lint and the whole suite
#   ./dev.sh setup    only the installation (apt packages, .venv, guest images)
#   ./dev.sh fuzz     install like setup, then the fuzz targets at 100,000 cases each
#   ./dev.sh soak     install like setup, then 200 boot/shutdown cycles with a guest session
#                     each: fds, threads, RSS and files must not grow (`--cycles N` for fewer)
#
# Idempotent: every step checks first and does nothing when it is already done.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

APT_PACKAGES=(
    qemu-system-arm            # the emulator (QEMU 7.2 on bookworm)
    gcc-arm-linux-gnueabihf    # cross compiler for the guest stub
    libc6-dev-armhf-cross      # static libc for the stub
    device-tree-compiler       # dtc: tests read back the patched device tree
    cpio                       # initramfs tooling (inspection)
    socat                      # the net channel: QEMU's guestfwd runs one per guest connection
    make                       # the guest kernel module build (kbuild from Debian headers)
    python3-venv               # the .venv
    openssh-server             # sshd: the labgrid farm test reaches its "host" over ssh (own port)
    ca-certificates
)
VENV="$here/.venv"
STAMP="$VENV/.installed-from"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else echo "dev.sh: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

# (Outputs are captured before matching: with pipefail, `cmd | grep -q` fails whenever grep
# exits early and cmd dies of SIGPIPE.)
missing_packages() {
    local p status
    for p in "${APT_PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
        [[ "$status" == *"install ok installed"* ]] || echo "$p"
    done
}

has_candidate() {
    local policy
    policy="$(apt-cache policy "$1" 2>/dev/null || true)"
    [[ "$policy" =~ Candidate:\ [0-9] ]]
}

armhf_ready() {
    local arches
    arches="$(dpkg --print-foreign-architectures)"
    [[ $'\n'"$arches"$'\n' == *$'\n'armhf$'\n'* ]] &&
        has_candidate busybox-static:armhf &&
        has_candidate linux-image-armmp-lpae:armhf &&
        has_candidate linux-image-armmp:armhf
}

setup_apt() {
    local missing
    missing="$(missing_packages)"
    if [ -z "$missing" ] && armhf_ready; then
        return
    fi
    say "apt: armhf architecture and packages: ${missing//$'\n'/ }"
    [[ $'\n'"$(dpkg --print-foreign-architectures)"$'\n' == *$'\n'armhf$'\n'* ]] ||
        as_root dpkg --add-architecture armhf
    # One index can be mid-sync and make `update` exit non-zero; what matters is below.
    as_root apt-get update -q || say "apt-get update reported an error; checking the packages anyway"
    if ! armhf_ready; then
        echo "dev.sh: apt has no armhf kernel or busybox-static:armhf; check /etc/apt/sources.list" >&2
        exit 1
    fi
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
    fi
}

setup_venv() {
    local python want
    python="$(command -v python3)"
    want="$(sha256sum pyproject.toml | cut -d" " -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
    if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return
    fi
    say "python: .venv with cma-qemu and its test tools"
    [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    echo "$want" > "$STAMP"
}

setup_guest() {
    "$VENV/bin/cma-qemu" guest build
}

setup() {
    setup_apt
    setup_venv
    setup_guest
}

# The package as a user gets it: build the sdist and the wheel from it, install the wheel and
# pytest into a fresh venv outside the checkout, and use it from there (board files, replay,
# guest build, and examples/own-project, whose test boots a guest with the plugin's fixtures).
# A subshell, so its EXIT trap removes the scratch directory whatever fails.
check_wheel() (
    set -euo pipefail
    out="$(mktemp -d /tmp/wheel-check.XXXXXX)"
    trap 'rm -rf "$out"' EXIT
    say "wheel: build, install outside the checkout, use it there"
    "$VENV/bin/python" -m build --outdir "$out/dist" "$here" >"$out/build.log" 2>&1 ||
        { cat "$out/build.log" >&2; exit 1; }
    python3 -m venv "$out/venv"
    "$out/venv/bin/python" -m pip install -q "$out"/dist/*.whl pytest
    cp -r "$here/examples/own-project" "$out/project"
    cd "$out/project"
    export PATH="$out/venv/bin:$PATH"
    cma-qemu boards >/dev/null
    replayed="$(echo "a s3c-mfc5/a 1M" | cma-qemu replay - --board aquila)"
    [ "$replayed" = "1: 0x100000@0x55f00000" ] ||
        { echo "dev.sh: replay from the wheel printed: $replayed" >&2; exit 1; }
    cma-qemu guest build
    pytest -q -p no:cacheprovider
)

run_tests() {
    say "lint: ruff and mypy --strict"
    "$VENV/bin/ruff" check cma_qemu tests benchmarks
    "$VENV/bin/ruff" format --check cma_qemu tests benchmarks
    "$VENV/bin/mypy" --strict cma_qemu
    say "tests: unit and end to end (real QEMU, real guest)"
    local status=0
    "$VENV/bin/pytest" "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "dev.sh: pytest collected no tests; that is a failure" >&2
        return 1
    fi
    if [ "$status" -eq 0 ]; then
        check_wheel
    fi
    return "$status"
}

# The fuzz targets of tests/fuzz under the long profile (tests/fuzz/conftest.py); pytest
# arguments pass through (e.g. `./dev.sh fuzz tests/fuzz/test_fuzz_boards.py`). Set
# CMA_QEMU_FUZZ_PROGRESS=DIR to have each target note its case count there as it runs.
run_fuzz() {
    [ "$#" -gt 0 ] || set -- tests/fuzz
    CMA_QEMU_FUZZ_PROFILE=fuzz "$VENV/bin/pytest" -p no:cacheprovider \
        --hypothesis-show-statistics --durations=0 "$@"
}

case "${1:-}" in
    setup) setup ;;
    demo) shift; setup; exec "$VENV/bin/cma-qemu" demo "$@" ;;
    test) shift; setup; run_tests "$@" ;;
    fuzz) shift; setup; run_fuzz "$@" ;;
    soak) shift; setup; exec "$VENV/bin/python" benchmarks/soak.py "$@" ;;
    *) echo "usage: ./dev.sh {demo|test|setup|fuzz|soak}" >&2; exit 2 ;;
esac
