#!/bin/bash
# build_image.sh [CACHE_DIR] - build (or reuse) the cached Debian guest image of one
# release for the kguest test lane: a QEMU guest whose Debian cloud kernel has kprobes,
# BTF, openvswitch, tun, veth, bridge and sch_netem, so vm_network_latency.py can be
# exercised there, with that release's BCC and Python, on an OVS kernel datapath and a
# Linux bridge.
#
# KGUEST_SUITE picks the release (default bookworm):
#   bullseye  Linux 5.10, BCC 0.18, Python 3.9  (the BCC of Ubuntu 22.04 too)
#   bookworm  Linux 6.1,  BCC 0.26, Python 3.11
#   trixie    Linux 6.12, BCC 0.31, Python 3.13
#
# Produces in CACHE_DIR (default /var/cache/vm-network-latency/kguest/$KGUEST_SUITE):
#   root.img            ext4 image of the Debian root (used by QEMU with snapshot=on)
#   vmlinuz             the guest kernel
#   initramfs-base.cpio busybox initramfs (/init loads virtio + ext4 modules, mounts
#                       /dev/vda, switch_roots into the lane payload's guest_init.sh)
#   kernel-version      the guest kernel's version string (uname -r in the guest)
#   root.stamp / initramfs.stamp   cache keys
#
# Mirrors: the machine's own apt sources (the URIs it uses for its Debian release and
# for its security suite), or KGUEST_MIRROR / KGUEST_SECURITY_MIRROR.
#
# Idempotent: a rerun with an unchanged recipe returns in well under a second and
# downloads nothing. Set KGUEST_REBUILD=1 to force a fresh root (e.g. to pick up a
# newer Debian kernel).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=${KGUEST_SUITE:-bookworm}
CACHE_DIR=${1:-/var/cache/vm-network-latency/kguest/$SUITE}
IMG_SIZE=${KGUEST_IMG_SIZE:-2G}

log() { printf '[build_image %s %s] %s\n' "$SUITE" "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The URIs of the host's own apt sources: the first Debian archive (a suite without
# a dash) and the first security archive (a suite ending in -security). Both formats:
# deb822 .sources files and one-line sources.list entries.
apt_source_uri() { # apt_source_uri main|security
    local want=$1
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
            /^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) print u, $i}
            /^$/ {u=""}'
        grep -hE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -E 's/\[[^]]*\]//' | awk '{print $2, $3}' || true
    } | awk -v want="$want" '
        want == "security" && $2 ~ /-security$/ {print $1; exit}
        want == "main" && $2 !~ /-/ && $1 !~ /security/ {print $1; exit}'
}
MIRROR=${KGUEST_MIRROR:-$(apt_source_uri main)}
SECURITY_MIRROR=${KGUEST_SECURITY_MIRROR:-$(apt_source_uri security)}
[ -n "$MIRROR" ] || die "no Debian archive in this machine's apt sources: set KGUEST_MIRROR"
[ -n "$SECURITY_MIRROR" ] || die "no security archive in this machine's apt sources: set KGUEST_SECURITY_MIRROR"

# The kernel (and bpftool, built from the kernel's source) of each release.
# bullseye's security suite lists the metapackage linux-image-cloud-amd64 and its
# newest bpftool but serves neither (404): the concrete kernel and headers packages
# are pinned, and bpftool to the version of bullseye's main suite.
case "$SUITE" in
bullseye) SUITE_PACKAGES=(linux-image-5.10.0-46-cloud-amd64 linux-headers-5.10.0-46-cloud-amd64
                          bpftool=5.10.223-1) ;;
bookworm|trixie) SUITE_PACKAGES=(linux-image-cloud-amd64 linux-headers-cloud-amd64 bpftool) ;;
*) die "unknown suite $SUITE (bullseye, bookworm or trixie)" ;;
esac

# Everything that changes the root image's content belongs in this recipe: its hash
# is the cache key. The kernel metapackages pull kernel and headers of one version.
ROOT_RECIPE_VERSION=4
# tcpdump: the lane's packet oracle on vnltap0/vnlphy0; bpftool: which BPF programs are
# still loaded after a SIGKILLed tool instance.
ROOT_PACKAGES=(
    "${SUITE_PACKAGES[@]}"
    python3 python3-bpfcc openvswitch-switch
    iproute2 iputils-ping kmod procps ethtool tcpdump
)
HOST_PACKAGES=(mmdebstrap e2fsprogs cpio busybox-static qemu-system-x86 gcc libc6-dev xz-utils zstd)
# Modules the initramfs loads, in this order (dependencies are resolved with modprobe).
INITRD_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
                virtio_blk crc32c_generic ext4)


# On SIGINT/SIGTERM stop the running child (mmdebstrap cleans up after itself) and
# let the EXIT traps remove the half-built work directory.
CHILD=
on_signal() {
    trap '' INT TERM HUP
    if [ -n "$CHILD" ]; then
        kill -TERM -- "-$CHILD" 2>/dev/null || kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    log "interrupted"
    exit 143
}
trap on_signal INT TERM HUP

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap --mode=root, mkfs, modprobe -d)"

# ---------------------------------------------------------------- host dependencies
install_host_deps() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing host packages: ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}" \
        || { apt-get -o DPkg::Lock::Timeout=600 update \
             && apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${missing[@]}"; }
}

hash_of() { sha256sum | cut -c1-16; }

ROOT_KEY=$(printf '%s\n' "v$ROOT_RECIPE_VERSION" "$SUITE" "$IMG_SIZE" "$MIRROR" "$SECURITY_MIRROR" \
           "${ROOT_PACKAGES[@]}" "${INITRD_MODULES[@]}" | hash_of)
INITRD_KEY=$( { cat "$HERE/initramfs_init.sh"; printf '%s\n' "${INITRD_MODULES[@]}" "$ROOT_KEY"; } | hash_of)

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock"
flock -w 1800 9 || die "could not lock $CACHE_DIR/.lock"

root_cached() {
    [ -z "${KGUEST_REBUILD:-}" ] && [ -f "$CACHE_DIR/root.img" ] && [ -f "$CACHE_DIR/vmlinuz" ] &&
        [ -d "$CACHE_DIR/initrd-modules" ] && [ -f "$CACHE_DIR/kernel-version" ] &&
        [ "$(cat "$CACHE_DIR/root.stamp" 2>/dev/null)" = "$ROOT_KEY" ]
}
initrd_cached() {
    [ -f "$CACHE_DIR/initramfs-base.cpio" ] &&
        [ "$(cat "$CACHE_DIR/initramfs.stamp" 2>/dev/null)" = "$INITRD_KEY" ]
}

if root_cached && initrd_cached; then
    log "cache hit: $CACHE_DIR (kernel $(cat "$CACHE_DIR/kernel-version"))"
    exit 0
fi

install_host_deps
T0=$(date +%s)

# ---------------------------------------------------------------- root image
build_root() {
    local work root ver
    work=$(mktemp -d "$CACHE_DIR/.build.XXXXXX")
    chmod 0755 "$work"   # lets mmdebstrap download as _apt (sandboxed)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    root="$work/root"
    log "mmdebstrap $SUITE (+updates, +security) from $MIRROR, $SECURITY_MIRROR into $root"
    local include
    include=$(IFS=,; echo "${ROOT_PACKAGES[*]}")
    # setsid: its own process group, so a signal reaches apt and dpkg too, not only
    # mmdebstrap (which otherwise finishes its current step before giving up).
    setsid mmdebstrap --mode=root --variant=minbase \
        --aptopt='Apt::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --include="$include" \
        --customize-hook='echo kguest > "$1/etc/hostname"' \
        --customize-hook='mkdir -p "$1/lane"' \
        --customize-hook='rm -f "$1"/boot/initrd.img-*' \
        "$SUITE" "$root" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main" >&2 &
    CHILD=$!
    wait "$CHILD" || die "mmdebstrap failed"
    CHILD=

    ver=$(cd "$root/lib/modules" && ls -1 | grep -- '-cloud-amd64$' | sort -V | tail -n1)
    [ -n "$ver" ] || die "no cloud kernel modules in the root"
    [ -f "$root/boot/vmlinuz-$ver" ] || die "no /boot/vmlinuz-$ver in the root"
    [ -d "$root/usr/src/linux-headers-$ver" ] || die "headers for $ver missing (kernel/headers mismatch?)"
    [ -L "$root/lib/modules/$ver/build" ] || [ -d "$root/lib/modules/$ver/build" ] || die "/lib/modules/$ver/build missing"
    log "guest kernel: $ver"

    # Modules for the initramfs, in dependency order, copied out of the root.
    rm -rf "$work/initrd-modules"; mkdir -p "$work/initrd-modules"
    : > "$work/initrd-modules/load.order"
    local m line path
    for m in "${INITRD_MODULES[@]}"; do
        while read -r line; do
            case "$line" in
            insmod\ *)
                path=${line#insmod }; path=${path%% *}
                path=${path#"$root"}
                local base; base=$(basename "$path")
                if ! grep -qxF "$base" "$work/initrd-modules/load.order"; then
                    case "$base" in
                    *.ko) cp "$root$path" "$work/initrd-modules/$base" ;;
                    *.ko.xz) xz -dc "$root$path" > "$work/initrd-modules/${base%.xz}"; base=${base%.xz} ;;
                    *.ko.zst) zstd -qdc "$root$path" > "$work/initrd-modules/${base%.zst}"; base=${base%.zst} ;;
                    *) die "unexpected module file $path" ;;
                    esac
                    grep -qxF "$base" "$work/initrd-modules/load.order" || echo "$base" >> "$work/initrd-modules/load.order"
                fi ;;
            builtin\ *) ;;
            esac
        done < <(modprobe -d "$root" -S "$ver" --show-depends "$m" 2>/dev/null || true)
    done
    log "initramfs modules: $(tr '\n' ' ' < "$work/initrd-modules/load.order")"
    grep -q '^virtio_blk' "$work/initrd-modules/load.order" || die "virtio_blk not found"

    log "mkfs.ext4 -d (size $IMG_SIZE)"
    rm -f "$work/root.img"
    mkfs.ext4 -q -F -L kguest-root -d "$root" "$work/root.img" "$IMG_SIZE" >&2
    cp "$root/boot/vmlinuz-$ver" "$work/vmlinuz"

    # Publish atomically-ish: stamp last.
    rm -f "$CACHE_DIR/root.stamp" "$CACHE_DIR/initramfs.stamp"
    mv -f "$work/root.img" "$CACHE_DIR/root.img"
    mv -f "$work/vmlinuz" "$CACHE_DIR/vmlinuz"
    rm -rf "$CACHE_DIR/initrd-modules"
    mv "$work/initrd-modules" "$CACHE_DIR/initrd-modules"
    echo "$ver" > "$CACHE_DIR/kernel-version"
    du -sh "$root" 2>/dev/null | awk '{print "root size " $1}' >&2 || true
    echo "$ROOT_KEY" > "$CACHE_DIR/root.stamp"
    rm -rf "$work"; trap - EXIT
}

# ---------------------------------------------------------------- initramfs
build_initrd() {
    local work
    work=$(mktemp -d "$CACHE_DIR/.initrd.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work"/{bin,dev,proc,sys,newroot,modules,lane}
    cp /bin/busybox "$work/bin/busybox"
    case "$(ldd /bin/busybox 2>&1 || true)" in *'not a dynamic'*|*'statically linked'*) ;; *) false ;; esac \
        || die "/bin/busybox is not static (install busybox-static)"
    ln -s busybox "$work/bin/sh"
    cp "$CACHE_DIR"/initrd-modules/*.ko "$CACHE_DIR/initrd-modules/load.order" "$work/modules/"
    install -m 0755 "$HERE/initramfs_init.sh" "$work/init"
    (cd "$work" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) \
        > "$CACHE_DIR/initramfs-base.cpio.tmp"
    mv -f "$CACHE_DIR/initramfs-base.cpio.tmp" "$CACHE_DIR/initramfs-base.cpio"
    echo "$INITRD_KEY" > "$CACHE_DIR/initramfs.stamp"
    rm -rf "$work"; trap - EXIT
}

root_cached || build_root
initrd_cached || build_initrd
log "done in $(( $(date +%s) - T0 )) s: $CACHE_DIR (kernel $(cat "$CACHE_DIR/kernel-version"))"
