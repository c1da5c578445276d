#!/bin/bash
# test_vm_latency.sh: install what the tests need, then run them, or run a live demo.
#
#   sudo ./test_vm_latency.sh            every test: offline, host, VM lab, kernel matrix
#   sudo ./test_vm_latency.sh offline    only the tests that need nothing of the kernel
#   sudo ./test_vm_latency.sh unit       only the tests that need no VM
#   sudo ./test_vm_latency.sh vm         unit + the QEMU VM lab on this kernel
#   sudo ./test_vm_latency.sh kguest [SUITE[,SUITE]]
#                                        only the kernel matrix: the kprobe/OVS lane in
#                                        guest kernels of Debian bullseye (5.10, BCC
#                                        0.18), bookworm (6.1) and trixie (6.12), or some
#   sudo ./test_vm_latency.sh demo [TOOL ARGS...]
#                                        build the lab, start the tracer on it, keep the
#                                        VM pinging until Ctrl-C (default: detailed text)
#   sudo ./test_vm_latency.sh install    only install the dependencies
#   Extra pytest arguments: PYTEST_ARGS="-k filters -x" sudo -E ./test_vm_latency.sh vm
#
# Installs, idempotently: BCC (python3-bpfcc / python3-bcc), bpftool, pahole, kernel
# headers for BCC's compiler, QEMU, busybox, tcpdump, tshark, rsvg-convert, tmux, pytest,
# hypothesis, vermin.
# Everything the tests create (namespaces, taps, bridges, qdiscs, QEMU, probes) is
# removed on success, failure and Ctrl-C.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VNL_CACHE:-/var/cache/vm-network-latency}
MODE=${1:-all}
[ $# -gt 0 ] && shift

log() { echo "test_vm_latency: $*" >&2; }
die() { echo "test_vm_latency: error: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $MODE"

# ----------------------------------------------------------------- dependencies
DEB_PKGS=(python3-bpfcc bpftool dwarves qemu-system-x86 busybox-static cpio gcc libc6-dev
          xz-utils tcpdump iproute2 iputils-ping kmod python3-pytest python3-hypothesis
          python3-venv mmdebstrap e2fsprogs python3-prometheus-client prometheus openssl
          tshark librsvg2-bin tmux)
RPM_PKGS=(python3-bcc bcc-tools bpftool dwarves qemu-kvm cpio gcc glibc-static tcpdump
          iproute iputils kmod python3-pytest python3-hypothesis wireshark-cli librsvg2-tools tmux)

install_debian() {
    local missing=() p st
    for p in "${DEB_PKGS[@]}"; do
        st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        case "$st" in ii*) ;; *) missing+=("$p") ;; esac
    done
    local release headers
    release=$(uname -r)
    if [ ! -e "/lib/modules/$release/build/include/generated/utsrelease.h" ]; then
        if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
            missing+=("linux-headers-$release")
        else
            missing+=(linux-headers-amd64)
        fi
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 -q update >&2
        apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends \
            "${missing[@]}" >&2
    fi
    # BCC's compiler needs kernel headers for its own includes. When the distribution
    # has none for this kernel, point it at the newest it has: the tool takes struct
    # layouts from BTF, never from these headers.
    if [ ! -e "/lib/modules/$release/build/include/generated/utsrelease.h" ]; then
        headers=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
        [ -n "$headers" ] || die "no kernel headers found under /usr/src"
        mkdir -p "/lib/modules/$release"
        ln -sfn "$headers" "/lib/modules/$release/build"
        ln -sfn "${headers%-amd64}-common" "/lib/modules/$release/source"
        log "BCC will compile with $headers (layouts still come from BTF)"
    fi
}

install_rhel() {
    local pm=dnf
    command -v dnf >/dev/null || pm=yum
    "$pm" install -y "${RPM_PKGS[@]}" "kernel-devel-$(uname -r)" >&2
}

install_vermin() {
    # vermin checks the tool still runs on Python 3.6; it lives in its own venv
    if [ ! -x "$CACHE/venv/bin/vermin" ]; then
        log "installing vermin into $CACHE/venv"
        mkdir -p "$CACHE"
        /usr/bin/python3 -m venv "$CACHE/venv" >&2
        "$CACHE/venv/bin/pip" install -q vermin >&2
    fi
    export PATH="$CACHE/venv/bin:$PATH"
}

install_deps() {
    if command -v apt-get >/dev/null; then
        install_debian
    elif command -v dnf >/dev/null || command -v yum >/dev/null; then
        install_rhel
    else
        die "unknown distribution: install BCC's Python bindings, bpftool, pahole, QEMU"
    fi
    install_vermin
    # BCC's kprobes and the tracepoint formats the tests read live in tracefs
    if [ ! -d /sys/kernel/tracing/events ]; then
        mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
    fi
}

# ----------------------------------------------------------------- running
# The suites are pytest markers (pytest.ini, tests/conftest.py): offline (no kernel),
# host (this kernel, no VM), lab (the QEMU VM lab), kguest (the kernel matrix).
cd "$HERE"
PYTEST=(/usr/bin/python3 -m pytest)
read -r -a EXTRA <<< "${PYTEST_ARGS:-}"

case "$MODE" in
install)
    install_deps ;;
offline)
    install_deps
    exec "${PYTEST[@]}" -m offline "${EXTRA[@]}" ;;
unit)
    install_deps
    exec "${PYTEST[@]}" -m "offline or host" "${EXTRA[@]}" ;;
vm)
    install_deps
    exec "${PYTEST[@]}" -m "offline or host or lab" "${EXTRA[@]}" ;;
kguest)
    install_deps
    [ $# -gt 0 ] && export KGUEST_SUITES=$1
    exec "${PYTEST[@]}" -m kguest "${EXTRA[@]}" ;;
all)
    install_deps
    exec "${PYTEST[@]}" "${EXTRA[@]}" ;;
demo)
    install_deps
    exec /usr/bin/python3 -m tests.demo "$@" ;;
*)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2 ;;
esac
