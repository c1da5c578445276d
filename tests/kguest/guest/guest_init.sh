#!/bin/bash
# PID 1 of the kguest guest after switch_root: set up the basic mounts, run the lane
# (guest_lane.sh), pack /lane/out onto the results disk (/dev/vdb, a raw tar archive
# the host unpacks), print the result marker on the serial console and power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
BB=/lane/bin/busybox

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null
hostname kguest
ip link set lo up

echo "KGUEST-GUEST-START: uptime $(cut -d' ' -f1 /proc/uptime) s, kernel $(uname -r)"
OUT=/lane/out
mkdir -p "$OUT"
cases=all
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    kguest.cases=*) cases=${arg#kguest.cases=} ;;
    kguest.env=*) export "${arg#kguest.env=}" ;;   # e.g. kguest.env=TOOL_ATTACH_WAIT=600
    esac
done

KGUEST_OUT=$OUT bash /lane/guest_lane.sh "$cases" 2>&1 | tee "$OUT/lane.log"
rc=${PIPESTATUS[0]}

echo "$rc" > "$OUT/rc"
if [ -b /dev/vdb ]; then
    if tar -C "$OUT" -cf /dev/vdb . 2>/tmp/tar.err; then
        echo "KGUEST-RESULTS-WRITTEN: $(du -sk "$OUT" | cut -f1) KiB"
    else
        echo "KGUEST-RESULTS-ERROR: $(cat /tmp/tar.err)"
    fi
else
    echo "KGUEST-RESULTS-ERROR: no /dev/vdb results disk"
fi
sync
if [ "$rc" = 0 ]; then res=PASS; else res=FAIL; fi
echo "KGUEST-LANE-RESULT: $res rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
"$BB" poweroff -f
sleep 3
echo o > /proc/sysrq-trigger
sleep 10
