#!/bin/bash
# run_lane.sh [--suite bullseye|bookworm|trixie] [--keep-log] [--cases A,B,tool]
#             [--timeout SECONDS] [--results DIR] [--cache DIR]
#             [--guest-env NAME=VALUE]...   (e.g. --guest-env TOOL_ATTACH_WAIT=600)
#             [--join a|b,LOCALPORT,PEERPORT]
#
# The kguest lane: runs vm_network_latency.py for real inside a QEMU guest (software
# emulation) whose Debian cloud kernel has kprobes and the OVS kernel datapath, which
# the CI machine's own kernel lacks; one Debian release (--suite, default bookworm)
# with its own kernel, BCC and Python.
#   1. build_image.sh builds or reuses the release's cached guest image (root.img,
#      vmlinuz, initramfs)
#   2. a fresh payload (guest scripts, a static vmstub, busybox, the tool itself) is
#      appended to the initramfs as a second cpio archive
#   3. QEMU boots (-accel tcg -smp 2 -m 2048 -nic none -no-reboot), root.img snapshot=on,
#      serial console to a log; the guest runs guest/guest_lane.sh, writes its results
#      as a tar archive onto a second (raw) virtio disk, prints a result marker, powers off
#   4. the results are unpacked into --results DIR (default /var/tmp/vnl-kguest/last)
# --join: this guest is host a or b of two (case J): its NIC a virtio-net device on a
# QEMU socket network device, UDP between 127.0.0.1:LOCALPORT and 127.0.0.1:PEERPORT, the
# other guest's (run the two at once: tests/harness/kguest.py run_join).
# Exit status: the lane's (0 = every step passed), 2 when the guest gave no result marker
# (crash or timeout), 130/143 when interrupted. QEMU is always killed on the way out.
#
# The total time (image + guest) is printed last and written to DIR/times.json. A whole
# lane takes 11-14 minutes on a 2-core machine (trixie's is the longest: its BCC compiles
# slowest under emulation); the timeout leaves a quarter on top of that, so that a
# slower CI machine does not lose a lane that was only late.
# Environment: KGUEST_CACHE, KGUEST_TIMEOUT (default 1020), KGUEST_CASES (default all),
# KGUEST_TOOL (default <repo>/vm_network_latency.py), KGUEST_QEMU_CPU (default qemu64),
# KGUEST_VERBOSE=1 streams the whole serial console instead of the lane's lines.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SUITE=${KGUEST_SUITE:-bookworm}
CACHE_DIR=${KGUEST_CACHE:-}
TIMEOUT=${KGUEST_TIMEOUT:-1020}
CASES=${KGUEST_CASES:-all}
TOOL=${KGUEST_TOOL:-$REPO/vm_network_latency.py}
RESULTS=${KGUEST_RESULTS:-/var/tmp/vnl-kguest/last}
KEEP_LOG=0
GUEST_ENV=()
JOIN=

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
    --keep-log) KEEP_LOG=1 ;;
    --suite) SUITE=$2; shift ;;
    --cases) CASES=$2; shift ;;
    --guest-env) GUEST_ENV+=("$2"); shift ;;
    --join) JOIN=$2; shift ;;
    --timeout) TIMEOUT=$2; shift ;;
    --results) RESULTS=$2; shift ;;
    --cache) CACHE_DIR=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_lane.sh: unknown argument $1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done

CACHE_DIR=${CACHE_DIR:-/var/cache/vm-network-latency/kguest/$SUITE}
export KGUEST_SUITE=$SUITE
T_START=$(date +%s.%N)
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b - a}'; }
log() { printf '[run_lane %s] %s\n' "$(date +%T)" "$*"; }

WORK=
QEMU_PID=
TAIL_PID=
BUILD_PID=
cleanup() {
    local sig=${1:-}
    # whoever reads our output may be gone (pytest killed): a write must not kill us
    # (SIGPIPE) before QEMU is
    trap '' PIPE
    if [ -n "$BUILD_PID" ]; then
        kill -TERM "$BUILD_PID" 2>/dev/null; wait "$BUILD_PID" 2>/dev/null; BUILD_PID=
    fi
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        log "stopping QEMU (pid $QEMU_PID)"
        kill -TERM "$QEMU_PID" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$QEMU_PID" 2>/dev/null
        wait "$QEMU_PID" 2>/dev/null
    fi
    QEMU_PID=
    if [ -n "$TAIL_PID" ]; then kill "$TAIL_PID" 2>/dev/null; wait "$TAIL_PID" 2>/dev/null; TAIL_PID=; fi
    [ -n "$WORK" ] && rm -rf "$WORK"
    WORK=
    if [ -n "$sig" ]; then
        log "interrupted ($sig) after $(secs "$T_START" "$(now)") s"
        [ "$sig" = INT ] && exit 130
        exit 143
    fi
}
trap 'cleanup INT' INT
trap 'cleanup TERM' TERM
trap 'cleanup HUP' HUP
trap 'cleanup' EXIT

[ "$(id -u)" = 0 ] || { echo "run_lane.sh: must run as root" >&2; exit 1; }

# ------------------------------------------------------------ 1. image
T0=$(now)
stamps() { cat "$CACHE_DIR/root.stamp" "$CACHE_DIR/initramfs.stamp" 2>/dev/null; }
STAMPS_BEFORE=$(stamps)
"$HERE/build_image.sh" "$CACHE_DIR" &
BUILD_PID=$!
wait "$BUILD_PID" || { BUILD_PID=; log "image build failed"; exit 1; }
BUILD_PID=
T_IMAGE=$(secs "$T0" "$(now)")
IMAGE_BUILT=false
[ "$STAMPS_BEFORE" = "$(stamps)" ] || IMAGE_BUILT=true
log "image ready in $T_IMAGE s ($SUITE, kernel $(cat "$CACHE_DIR/kernel-version"))"

# ------------------------------------------------------------ 2. payload
WORK=$(mktemp -d /var/tmp/vnl-kguest.XXXXXX)
P="$WORK/payload"
mkdir -p "$P/lane/bin"
cp "$HERE"/guest/*.sh "$HERE"/guest/*.py "$P/lane/"
chmod 0755 "$P"/lane/*.sh "$P"/lane/*.py
gcc -O2 -Wall -static -o "$P/lane/bin/vmstub" "$HERE/vmstub.c" || { log "building vmstub failed"; exit 1; }
gcc -O2 -Wall -static -o "$P/lane/bin/vhoststub" "$HERE/vhoststub.c" || { log "building vhoststub failed"; exit 1; }
cp /bin/busybox "$P/lane/bin/busybox"
if [ -f "$TOOL" ]; then
    cp "$TOOL" "$P/lane/vm_network_latency.py"
    log "payload: tool $TOOL ($(wc -l < "$TOOL") lines, sha256 $(sha256sum "$TOOL" | cut -c1-12))"
else
    log "payload: no tool at $TOOL (the lane skips the tool runs)"
fi
(cd "$P" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$WORK/payload.cpio"
cat "$CACHE_DIR/initramfs-base.cpio" "$WORK/payload.cpio" > "$WORK/initrd.cpio"
truncate -s 256M "$WORK/results.img"

# ------------------------------------------------------------ 3. boot
LOG="$WORK/serial.log"
: > "$LOG"
CMDLINE="console=ttyS0 loglevel=4 panic=-1 rdinit=/init kguest.cases=$CASES kguest.env=KGUEST_SUITE=$SUITE"
for kv in "${GUEST_ENV[@]}"; do
    [[ "$kv" =~ ^[A-Z_][A-Z0-9_]*=[^[:space:]]*$ ]] || { log "--guest-env '$kv': want NAME=VALUE without spaces"; exit 64; }
    CMDLINE+=" kguest.env=$kv"
done
NIC_ARGS=(-nic none)
if [ -n "$JOIN" ]; then
    IFS=, read -r join_role join_local join_peer <<< "$JOIN"
    [[ "$join_role" =~ ^[ab]$ && "$join_local" =~ ^[0-9]+$ && "$join_peer" =~ ^[0-9]+$ ]] ||
        { log "--join '$JOIN': want a|b,LOCALPORT,PEERPORT"; exit 64; }
    # the link stays on the host's loopback: UDP between the two QEMU processes
    NIC_ARGS=(-netdev "socket,id=join0,udp=127.0.0.1:$join_peer,localaddr=127.0.0.1:$join_local"
              -device "virtio-net-pci,netdev=join0,mac=52:54:00:78:00:$([ "$join_role" = a ] && echo 0a || echo 0b)")
    CMDLINE+=" kguest.env=JOIN_ROLE=$join_role"
fi
log "booting the guest (cases=$CASES, timeout ${TIMEOUT}s${JOIN:+, join $JOIN})"
T_BOOT=$(now)
qemu-system-x86_64 -name kguest-vnl -accel tcg -cpu "${KGUEST_QEMU_CPU:-qemu64}" -smp 2 -m 2048 \
    "${NIC_ARGS[@]}" -no-reboot -display none -monitor none -serial "file:$LOG" \
    -kernel "$CACHE_DIR/vmlinuz" -initrd "$WORK/initrd.cpio" -append "$CMDLINE" \
    -drive "file=$CACHE_DIR/root.img,if=virtio,format=raw,snapshot=on" \
    -drive "file=$WORK/results.img,if=virtio,format=raw" \
    </dev/null >"$WORK/qemu.out" 2>&1 &
QEMU_PID=$!
if [ "${KGUEST_VERBOSE:-0}" = 1 ]; then
    tail -n +1 -F --pid="$QEMU_PID" "$LOG" 2>/dev/null &
else
    tail -n +1 -F --pid="$QEMU_PID" "$LOG" 2>/dev/null | grep --line-buffered -E '^\[lane|KGUEST-|STEP|^    ' &
fi
TAIL_PID=$!

timed_out=0
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if [ "$(secs "$T_BOOT" "$(now)" | cut -d. -f1)" -ge "$TIMEOUT" ]; then
        timed_out=1
        log "TIMEOUT after ${TIMEOUT}s: killing QEMU"
        kill -TERM "$QEMU_PID" 2>/dev/null; sleep 2; kill -KILL "$QEMU_PID" 2>/dev/null
        break
    fi
    sleep 0.5
done
wait "$QEMU_PID" 2>/dev/null
qemu_rc=$?
QEMU_PID=
T_GUEST=$(secs "$T_BOOT" "$(now)")
sleep 0.3
kill "$TAIL_PID" 2>/dev/null; wait "$TAIL_PID" 2>/dev/null; TAIL_PID=

# ------------------------------------------------------------ 4. results
rm -rf "$RESULTS"; mkdir -p "$RESULTS"
tar -xf "$WORK/results.img" -C "$RESULTS" 2>/dev/null || log "no results archive on the results disk"
marker=$(grep -a -m1 'KGUEST-LANE-RESULT:' "$LOG" | tr -d '\r')
boot_up=$(grep -a -m1 'KGUEST-GUEST-START:' "$LOG" | sed -n 's/.*uptime \([0-9.]*\) s.*/\1/p')
if [ -n "$marker" ]; then
    rc=$(echo "$marker" | sed -n 's/.* rc=\([0-9]*\).*/\1/p'); rc=${rc:-1}
    [ "$rc" = 0 ] || rc=1   # 2 is kept for "no marker"
else
    rc=2
    log "no result marker from the guest (qemu exit $qemu_rc, timed out: $timed_out); last console lines:"
    tail -n 40 "$LOG" | sed 's/^/    /'
    cat "$WORK/qemu.out" 2>/dev/null | sed 's/^/    qemu: /'
fi
if [ "$KEEP_LOG" = 1 ] || [ "$rc" != 0 ]; then
    cp "$LOG" "$RESULTS/serial.log"
    log "serial console log: $RESULTS/serial.log"
fi
if [ -f "$RESULTS/steps.tsv" ]; then
    log "steps:"
    awk -F'\t' '{printf "    %-22s %-5s %s\n", $1, $2, substr($3, 1, 150)}' "$RESULTS/steps.tsv"
fi
log "results in $RESULTS"
log "guest marker: ${marker:-none}"
T_TOTAL=$(secs "$T_START" "$(now)")
printf '{"suite": "%s", "image_s": %s, "image_built": %s, "boot_to_lane_s": %s, "guest_s": %s, "total_s": %s, "guest_timeout_s": %s, "timed_out": %s, "rc": %s}\n' \
    "$SUITE" "$T_IMAGE" "$IMAGE_BUILT" "${boot_up:-null}" "$T_GUEST" "$T_TOTAL" "$TIMEOUT" \
    "$([ $timed_out = 1 ] && echo true || echo false)" "$rc" > "$RESULTS/times.json"
log "times: image ${T_IMAGE}s ($([ $IMAGE_BUILT = true ] && echo built || echo cached)), boot to lane ${boot_up:-?}s (guest uptime), guest run ${T_GUEST}s, total ${T_TOTAL}s"
exit "$rc"
