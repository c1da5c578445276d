#!/bin/bash
# Build (or reuse) the test guest of the vm_network_latency lab.
#
#   tests/harness/guest/build_guest.sh [CACHE_DIR]     (default /var/cache/vm-network-latency/guest,
#                                               or $VNL_GUEST_CACHE)
#
# Writes CACHE_DIR/vmlinuz, CACHE_DIR/initrd.cpio.gz (busybox initramfs with
# tests/harness/guest/init as /init, the virtio-net modules and /bin/vnl-traffic) and
# CACHE_DIR/vnl-traffic (the same static helper, for use on the host).
#
# - Installs what it needs with apt when missing (qemu-system-x86 without
#   recommends, busybox-static, cpio, gcc, libc6-dev, xz-utils).
# - The kernel is Debian's cloud kernel, resolved through the metapackage
#   linux-image-cloud-amd64, fetched with `apt-get download` and unpacked with
#   `dpkg-deb -x` into a scratch directory; it is never installed on the host.
#   The .deb is kept in CACHE_DIR/kernel/ so rebuilds do not download again.
# - Idempotent: when CACHE_DIR/stamp matches the hash of this script, init and
#   vnl-traffic.c and all outputs exist, it only checks the host packages and
#   exits (well under 2 s, downloads nothing).
# - Must run as root (apt, mknod of /dev/console in the initramfs).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CACHE_DIR=${1:-${VNL_GUEST_CACHE:-/var/cache/vm-network-latency/guest}}

PKGS=(qemu-system-x86 busybox-static cpio gcc libc6-dev xz-utils)
KERNEL_META=linux-image-cloud-amd64
# load order of the cloud kernel's virtio-net stack (see shared/LAB_FACTS.md)
KMODS=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
       failover net_failover virtio_net)
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
export DEBIAN_FRONTEND=noninteractive

T0=$(date +%s.%N)
log() { echo "build_guest: $*" >&2; }
die() { echo "build_guest: ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

# ---------------------------------------------------------------- packages
APT_UPDATED=0
apt_update() {
	if [ "$APT_UPDATED" -eq 0 ]; then
		log "apt-get update"
		apt-get "${APT_OPTS[@]}" -q update >&2 || die "apt-get update failed"
		APT_UPDATED=1
	fi
}

ensure_packages() {
	local missing=() p st
	for p in "${PKGS[@]}"; do
		st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
		case "$st" in ii*) ;; *) missing+=("$p") ;; esac
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	log "installing: ${missing[*]}"
	if ! apt-get "${APT_OPTS[@]}" -q install -y --no-install-recommends "${missing[@]}" >&2; then
		apt_update
		apt-get "${APT_OPTS[@]}" -q install -y --no-install-recommends "${missing[@]}" >&2 ||
			die "apt-get install ${missing[*]} failed"
	fi
}

ensure_packages
mkdir -p "$CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)

# one build at a time per cache dir
exec 9>"$CACHE_DIR/.lock"
flock 9

# ---------------------------------------------------------------- up to date?
WANT=$( {
	sha256sum "$SELF" "$HERE/init" "$HERE/vnl-traffic.c" | awk '{print $1}'
	echo "${KMODS[*]}"
} | sha256sum | awk '{print $1}')

if [ -s "$CACHE_DIR/vmlinuz" ] && [ -s "$CACHE_DIR/initrd.cpio.gz" ] &&
   [ -x "$CACHE_DIR/vnl-traffic" ] && [ -f "$CACHE_DIR/stamp" ] &&
   [ "$(cat "$CACHE_DIR/stamp")" = "$WANT" ]; then
	log "up to date in $CACHE_DIR ($(cat "$CACHE_DIR/kernel-version" 2>/dev/null || echo '?'); $(elapsed)s)"
	exit 0
fi
log "building guest in $CACHE_DIR"

WORK=$(mktemp -d "$CACHE_DIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ---------------------------------------------------------------- kernel .deb
resolve_kernel_pkg() {
	apt-cache depends "$KERNEL_META" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

KPKG=$(resolve_kernel_pkg || true)
if [ -z "$KPKG" ]; then
	apt_update
	KPKG=$(resolve_kernel_pkg || true)
fi
mkdir -p "$CACHE_DIR/kernel"
if [ -n "$KPKG" ]; then
	KVER=$(apt-cache policy "$KPKG" | awk '$1 == "Candidate:" { print $2; exit }')
	[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate version for $KPKG"
	# apt-get download names the file PKG_VERSION_ARCH.deb with ':' as %3a
	KDEB="$CACHE_DIR/kernel/${KPKG}_${KVER//:/%3a}_amd64.deb"
	if [ ! -s "$KDEB" ]; then
		log "downloading $KPKG $KVER (via $KERNEL_META)"
		mkdir -p "$WORK/dl"
		chmod 755 "$WORK"
		chown _apt "$WORK/dl" 2>/dev/null || true
		(cd "$WORK/dl" && apt-get "${APT_OPTS[@]}" -q download "$KPKG=$KVER" >&2) ||
			die "apt-get download $KPKG=$KVER failed"
		f=$(ls "$WORK/dl/"*.deb 2>/dev/null | head -n 1 || true)
		[ -s "$f" ] || die "apt-get download produced no .deb"
		# keep only the current kernel package in the cache
		rm -f "$CACHE_DIR/kernel/"*.deb
		mv "$f" "$KDEB"
	else
		log "using cached $(basename "$KDEB")"
	fi
else
	# offline and no package lists: fall back to a cached .deb, if any
	KDEB=$(ls -t "$CACHE_DIR/kernel/"*.deb 2>/dev/null | head -n 1 || true)
	[ -n "$KDEB" ] || die "cannot resolve $KERNEL_META (apt lists missing?) and no cached kernel"
	log "cannot resolve $KERNEL_META; using cached $(basename "$KDEB")"
fi

log "unpacking $(basename "$KDEB")"
dpkg-deb -x "$KDEB" "$WORK/kpkg"
VMLINUZ=$(ls "$WORK/kpkg/boot/"vmlinuz-* 2>/dev/null | head -n 1 || true)
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $(basename "$KDEB")"
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/kpkg/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "no lib/modules/$KREL in $(basename "$KDEB")"

# ---------------------------------------------------------------- initramfs tree
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,root,etc,lib/modules,usr}
ln -s bin "$ROOT/sbin"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"

# modules: copy in load order, decompressed (busybox insmod wants plain .ko)
: > "$ROOT/lib/modules/order"
for m in "${KMODS[@]}"; do
	f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n 1)
	if [ -z "$f" ]; then
		if grep -q "/$m\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then
			log "module $m is built in"
			continue
		fi
		die "module $m not found in $KREL"
	fi
	case "$f" in
	*.ko.xz)  xz -dc "$f" > "$ROOT/lib/modules/$m.ko" ;;
	*.ko.gz)  gzip -dc "$f" > "$ROOT/lib/modules/$m.ko" ;;
	*.ko.zst)
		command -v zstd >/dev/null || { PKGS=(zstd); ensure_packages; }
		zstd -qdc "$f" > "$ROOT/lib/modules/$m.ko" ;;
	*)        cp "$f" "$ROOT/lib/modules/$m.ko" ;;
	esac
	echo "$m" >> "$ROOT/lib/modules/order"
done

# static busybox with all its applets as symlinks
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	die "$BUSYBOX is dynamically linked (need busybox-static)"
fi
cp "$BUSYBOX" "$ROOT/bin/busybox"
for a in $("$ROOT/bin/busybox" --list); do
	[ "$a" = busybox ] || [ -e "$ROOT/bin/$a" ] || ln -s busybox "$ROOT/bin/$a"
done

# the traffic helper, static, for guest and host
gcc -static -O2 -Wall -Wextra -o "$WORK/vnl-traffic" "$HERE/vnl-traffic.c"
strip "$WORK/vnl-traffic" 2>/dev/null || true
cp "$WORK/vnl-traffic" "$ROOT/bin/vnl-traffic"

install -m 0755 "$HERE/init" "$ROOT/init"
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n10.77.0.2 guest\n10.77.0.3 remote\n' > "$ROOT/etc/hosts"
echo "$KREL" > "$ROOT/etc/vnl-kernel"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
	cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 > "$WORK/initrd.cpio.gz"

# ---------------------------------------------------------------- publish
cp "$VMLINUZ" "$WORK/vmlinuz"
rm -f "$CACHE_DIR/stamp"
mv -f "$WORK/vmlinuz" "$CACHE_DIR/vmlinuz"
mv -f "$WORK/initrd.cpio.gz" "$CACHE_DIR/initrd.cpio.gz"
mv -f "$WORK/vnl-traffic" "$CACHE_DIR/vnl-traffic"
echo "$KREL ($(basename "$KDEB"))" > "$CACHE_DIR/kernel-version"
echo "$WANT" > "$CACHE_DIR/stamp"
log "built $KREL guest in $(elapsed)s: $(du -h "$CACHE_DIR/initrd.cpio.gz" | cut -f1) initrd"
