#!/bin/sh
# /init of the kguest busybox initramfs: load virtio + ext4 modules, mount the Debian
# root (/dev/vda, a snapshot=on disk, so writes are thrown away), copy the lane payload
# (/lane, appended to the initramfs as a second cpio archive) onto a tmpfs inside it,
# and switch_root into the payload's guest_init.sh.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp

fail() {
    echo "KGUEST-INITRAMFS-ERROR: $*"
    echo "KGUEST-LANE-RESULT: ERROR rc=99"
    sync
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger
}

while read -r m; do
    [ -n "$m" ] || continue
    insmod "/modules/$m" 2>/tmp/insmod.err || {
        grep -q 'File exists' /tmp/insmod.err || echo "initramfs: insmod $m: $(cat /tmp/insmod.err)"
    }
done < /modules/load.order

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || fail "no /dev/vda (virtio_blk not loaded?)"
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"

init=/lane/guest_init.sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in kguest.init=*) init=${arg#kguest.init=} ;; esac
done
[ -d /lane ] || fail "no /lane payload in the initramfs"
mkdir -p /newroot/lane
mount -t tmpfs -o size=512m,mode=0755 lane /newroot/lane || fail "tmpfs on /newroot/lane"
cp -a /lane/. /newroot/lane/ || fail "copying the payload"
[ -x "/newroot$init" ] || fail "payload has no executable $init"

umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
