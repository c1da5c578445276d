#!/bin/bash
# overhead.sh - what does vm_network_latency.py cost per packet, next to tcpdump,
#               bpftrace and the cheapest possible BPF filter?
#
# Run as root:  bench/overhead.sh [-r REPS] [-n FRAMES] [options]   (--help for all)
#
# The lab (every name starts with "vnb"; nothing else on the machine is touched):
#
#   tapflood (holds vnbtap0, writes frames as a VM would)
#      |  write() -> tun_get_user -> netif_receive_skb        (all in the writer's thread)
#   vnbtap0 --- vnbbr0 (bridge, no IP, stp off, static fdb) --- vnbphy0 (veth)
#                                                                 |
#                                  namespace vnb-remote: eth0 10.78.0.3/24 (52:54:00:78:00:03)
#                                  static ARP 10.78.0.2 -> 52:54:00:78:00:02
#
# Frames: 64-byte UDP/IPv4, 10.78.0.2:5000 -> 10.78.0.3:9000. Nobody listens on port 9000
# in the namespace; its ICMP error generator is switched off by the namespace's own
# global ICMP rate limit (net.ipv4.icmp_msgs_per_sec=0, icmp_msgs_burst=0, and
# icmp_ratelimit at its maximum), so every frame takes the same path
#   tap -> bridge -> veth -> namespace eth0 -> udp_rcv (no socket) -> icmp_send (rate
#   limited, nothing sent) -> kfree_skb(NO_SOCKET)
# and nothing ever comes back towards the tap. The script checks it (the namespace's eth0
# sends 0 packets, UdpNoPorts counts every frame).
#
# The whole host path runs in the writer's thread, so the generator's own CPU time per
# frame (getrusage, user+sys) is the cost of the path, tracers' BPF programs included.
# Each configuration is measured REPS times, interleaved (rotating order), medians reported.
#
# Everything created (devices, namespace, processes, work files) is removed on exit,
# on failure and on Ctrl-C. The generator binary is cached in
# /var/cache/vm-network-latency/bench, and results are written there as JSON.
#
# MIT License (see LICENSE).

set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TOOL_SRC=$REPO/vm_network_latency.py     # snapshotted at start: see --tool / --rev
TOOL_REV=""
PY=/usr/bin/python3                 # BCC's bindings live in Debian's interpreter
CACHE=/var/cache/vm-network-latency/bench
LOCK=/run/vnb-bench.lock

# lab names: "vnb" prefix only
BR=vnbbr0; TAP=vnbtap0; PHY=vnbphy0; NS=vnb-remote
VM_MAC=52:54:00:78:00:02; REMOTE_MAC=52:54:00:78:00:03
VM_IP=10.78.0.2; REMOTE_IP=10.78.0.3

# defaults
REPS=5
FRAMES=200000
NPORTS=1
KEEPUP_RATES="50000 75000 100000 150000"
KEEPUP_SECONDS=3
STARTUP_RUNS=3
MAX_SECONDS=900
BPF_STATS=1
JSON_OUT=""

usage() {
    cat <<EOF
usage: $0 [options]     (run as root)
  -r, --reps N            repetitions per configuration, interleaved (default $REPS)
  -n, --frames N          frames per flood (default $FRAMES)
  -p, --ports N           vary the source port over N values 5000.. (default $NPORTS)
      --keepup-rates "R.." paced rates (frames/s) tried for detailed mode, ascending,
                          until one loses packets (default "$KEEPUP_RATES")
      --keepup-seconds S  length of each paced run (default $KEEPUP_SECONDS)
      --startup-runs N    start-up time measurements (default $STARTUP_RUNS)
      --no-bpf-stats      skip the per-program breakdown (kernel.bpf_stats_enabled run)
  -o, --json FILE         where to write the results (default $CACHE/overhead-<time>.json)
      --tool FILE         the tool to measure (default $TOOL_SRC); it is copied at
                          start, so every run measures the same version
      --rev REV           measure the tool as committed at git revision REV
                          (read with 'git show', the working tree is not touched)
      --max-seconds S     hard limit for the whole run (default $MAX_SECONDS)
  -h, --help              this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        -r|--reps) REPS=$2; shift 2 ;;
        -n|--frames) FRAMES=$2; shift 2 ;;
        -p|--ports) NPORTS=$2; shift 2 ;;
        --keepup-rates) KEEPUP_RATES=$2; shift 2 ;;
        --keepup-seconds) KEEPUP_SECONDS=$2; shift 2 ;;
        --startup-runs) STARTUP_RUNS=$2; shift 2 ;;
        --no-bpf-stats) BPF_STATS=0; shift ;;
        -o|--json) JSON_OUT=$2; shift 2 ;;
        --max-seconds) MAX_SECONDS=$2; shift 2 ;;
        --tool) TOOL_SRC=$2; shift 2 ;;
        --rev) TOOL_REV=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in REPS FRAMES NPORTS KEEPUP_SECONDS STARTUP_RUNS MAX_SECONDS; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || { echo "$v must be a positive integer" >&2; exit 2; }
done
for r in $KEEPUP_RATES; do
    [[ $r =~ ^[0-9]+$ ]] || { echo "--keepup-rates: $r is not a rate" >&2; exit 2; }
done

now() { local t=$EPOCHREALTIME; echo "${t/,/.}"; }
START_EPOCH=$(now)
elapsed() { awk -v a="$START_EPOCH" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[overhead %6.1fs] %s\n' "$(elapsed)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || { echo "$0: must run as root" >&2; exit 2; }
[ -n "$TOOL_REV" ] || [ -f "$TOOL_SRC" ] || { echo "$0: $TOOL_SRC not found" >&2; exit 2; }

# ------------------------------------------------------------------ state and cleanup

W=""                    # work directory
GEN_PID=""              # the generator
TRACER_PIDS=()          # tracers currently running
WATCHDOG_PID=""
BPF_STATS_OLD=""        # kernel.bpf_stats_enabled before we changed it
CLEANED=0
LOCKED=0

kill_pid() {            # kill_pid PID SIGNAL GRACE_SECONDS: one process, by its id
    local pid=$1 sig=$2 grace=$3 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill "-$sig" "$pid" 2>/dev/null
    for ((i = 0; i < grace * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}

lab_down() {
    ip link del "$BR" 2>/dev/null
    ip link del "$PHY" 2>/dev/null          # takes its peer in the namespace with it
    ip link del "$TAP" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    return 0
}

cleanup() {
    [ "$CLEANED" = 1 ] && return
    CLEANED=1
    trap '' INT TERM HUP
    local p
    for p in "${TRACER_PIDS[@]}"; do kill_pid "$p" INT 5; done
    TRACER_PIDS=()
    if [ -n "$GEN_PID" ]; then
        { echo quit >&7; } 2>/dev/null
        kill_pid "$GEN_PID" TERM 2
        rm -f "$CACHE/generator.pid"
    fi
    exec 7>&- 8<&-
    lab_down
    if [ -n "$BPF_STATS_OLD" ]; then
        sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS_OLD" 2>/dev/null
    fi
    [ -n "$WATCHDOG_PID" ] && kill "$WATCHDOG_PID" 2>/dev/null
    [ -n "$W" ] && rm -rf "$W"
    [ "$LOCKED" = 1 ] && rm -f "$LOCK"
}

on_signal() { log "interrupted: cleaning up"; cleanup; exit 130; }
trap cleanup EXIT
trap on_signal INT TERM HUP
trap '' PIPE            # a dead generator makes writes to its FIFO fail, not kill us

# one benchmark at a time (the lock is per machine; fd 9 is closed for every child)
exec 9>"$LOCK"
if command -v flock >/dev/null; then
    flock -n 9 || die "another overhead.sh holds $LOCK"
    LOCKED=1
fi

# a hard limit: every wait below is bounded, this is the safety net
MAIN_PID=$$
(
    trap 'exit 0' TERM
    end=$(( $(date +%s) + MAX_SECONDS ))
    while kill -0 "$MAIN_PID" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$end" ]; then
            echo "[overhead] hard limit of ${MAX_SECONDS}s reached: stopping" >&2
            kill -TERM "$MAIN_PID"
            exit 0
        fi
        sleep 2
    done
) 9>&- &
WATCHDOG_PID=$!

# ------------------------------------------------------------------ dependencies

need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need ip iproute2
need bridge iproute2
need tcpdump tcpdump
need bpftrace bpftrace
need bpftool bpftool
need gcc gcc
need flock util-linux
[ -e /usr/include/linux/if_tun.h ] || need_pkgs+=(linux-libc-dev)
[ -e /usr/include/stdio.h ] || need_pkgs+=(libc6-dev)
$PY -c 'import bcc' 2>/dev/null || need_pkgs+=(python3-bpfcc)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "$@" 9>&-; }
    if ! apt_install "${need_pkgs[@]}" >/dev/null; then
        apt-get -o DPkg::Lock::Timeout=600 update 9>&- >/dev/null
        apt_install "${need_pkgs[@]}" >/dev/null || die "apt-get install ${need_pkgs[*]} failed"
    fi
fi
$PY -c 'import bcc' 2>/dev/null || die "$PY cannot import bcc"

# BCC needs tracefs for tracepoints, bpftrace needs it too (left mounted: others use it)
if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing || die "cannot mount tracefs"
    log "mounted tracefs on /sys/kernel/tracing (left mounted)"
fi
# BCC compiles against /lib/modules/<release>/build (see LAB_FACTS: the 6.1 headers)
KREL=$(uname -r)
if [ ! -e "/lib/modules/$KREL/build" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    common=${hdr%-amd64}-common
    [ -n "$hdr" ] && [ -d "$common" ] || die "no kernel headers for BCC (install linux-headers-amd64)"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    ln -sfn "$common" "/lib/modules/$KREL/source"
    log "linked /lib/modules/$KREL/build -> $hdr (left in place)"
fi

# ------------------------------------------------------------------ generator build

mkdir -p "$CACHE"
W=$(mktemp -d /tmp/vnb-bench.XXXXXX) || die "mktemp failed"
# the tool under test: a private copy, so that edits made while we run change nothing
TOOL=$W/vm_network_latency.py
if [ -n "$TOOL_REV" ]; then
    git -C "$REPO" show "$TOOL_REV:vm_network_latency.py" >"$TOOL" 2>"$W/git.err" ||
        die "cannot read vm_network_latency.py at $TOOL_REV: $(cat "$W/git.err")"
    TOOL_DESC="git $(git -C "$REPO" rev-parse --short "$TOOL_REV" 2>/dev/null || echo "$TOOL_REV")"
else
    cp "$TOOL_SRC" "$TOOL" || die "cannot copy $TOOL_SRC"
    TOOL_DESC=$TOOL_SRC
fi
TOOL_SHA=$(sha256sum "$TOOL" | cut -c1-16)
log "tool under test: $TOOL_DESC (sha256 $TOOL_SHA...)"

SRC=$HERE/tapflood.c
[ -f "$SRC" ] || die "$SRC not found"
SUM=$(sha256sum "$SRC" | cut -c1-16)
GEN=$CACHE/tapflood-$SUM
if [ ! -x "$GEN" ]; then
    log "building $GEN"
    gcc -O2 -Wall -o "$GEN.tmp.$$" "$SRC" 9>&- || die "gcc failed"
    mv -f "$GEN.tmp.$$" "$GEN"
fi

# a generator left by a SIGKILLed run (its pid file, checked against the binary)
if [ -f "$CACHE/generator.pid" ]; then
    old=$(cat "$CACHE/generator.pid" 2>/dev/null)
    if [[ $old =~ ^[0-9]+$ ]] && [[ $(readlink "/proc/$old/exe" 2>/dev/null) == "$CACHE"/tapflood-* ]]; then
        log "stopping a generator left by an earlier run (pid $old)"
        kill -TERM "$old" 2>/dev/null
        sleep 0.3
    fi
    rm -f "$CACHE/generator.pid"
fi

# ------------------------------------------------------------------ lab

rsysctl() { ip netns exec "$NS" sysctl -qw "$@" >/dev/null || die "sysctl $* in $NS failed"; }

lab_up() {
    lab_down            # leftovers of an earlier run (vnb names only)
    ip netns add "$NS" || die "ip netns add $NS failed"
    ip link add "$BR" type bridge stp_state 0 || die "cannot create $BR"
    ip link add "$PHY" type veth peer name eth0 netns "$NS" || die "cannot create $PHY"
    sysctl -qw "net.ipv6.conf.$BR.disable_ipv6=1" "net.ipv6.conf.$PHY.disable_ipv6=1" >/dev/null
    rsysctl net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    # no ICMP port-unreachable replies: the namespace's global ICMP budget is zero
    rsysctl net.ipv4.icmp_msgs_per_sec=0 net.ipv4.icmp_msgs_burst=0 \
            net.ipv4.icmp_ratelimit=2147483647
    ip -n "$NS" link set lo up
    ip -n "$NS" link set eth0 address "$REMOTE_MAC"
    ip -n "$NS" addr add "$REMOTE_IP/24" dev eth0
    ip -n "$NS" link set eth0 up
    ip -n "$NS" neigh replace "$VM_IP" lladdr "$VM_MAC" dev eth0 nud permanent
    ip link set "$PHY" master "$BR"
    ip link set "$PHY" up
    ip link set "$BR" up
    bridge fdb replace "$REMOTE_MAC" dev "$PHY" master static || die "bridge fdb failed"

    # the generator creates and holds the tap, and is driven through two FIFOs
    mkfifo "$W/gen.in" "$W/gen.out"
    "$GEN" -i "$TAP" --serve -p 1 <"$W/gen.in" >"$W/gen.out" 2>"$W/gen.err" 9>&- &
    GEN_PID=$!
    echo "$GEN_PID" >"$CACHE/generator.pid"
    exec 7>"$W/gen.in" 8<"$W/gen.out"
    local line
    read -r -t 10 line <&8 || die "generator did not start: $(cat "$W/gen.err")"
    [[ $line == created* ]] || die "generator: $line $(cat "$W/gen.err")"
    sysctl -qw "net.ipv6.conf.$TAP.disable_ipv6=1" >/dev/null
    ip link set "$TAP" master "$BR" || die "cannot add $TAP to $BR"
    line=$(gen_cmd up 10) || die "generator: cannot bring $TAP up"
    bridge fdb replace "$VM_MAC" dev "$TAP" master static
    TAP_IFINDEX=$(cat "/sys/class/net/$TAP/ifindex")
    PHY_IFINDEX=$(cat "/sys/class/net/$PHY/ifindex")
    local i
    for ((i = 0; i < 100; i++)); do     # both bridge ports forwarding
        [ "$(bridge link show dev "$TAP" | grep -c 'state forwarding')" = 1 ] &&
            [ "$(bridge link show dev "$PHY" | grep -c 'state forwarding')" = 1 ] && break
        sleep 0.1
    done
    [ "$i" -lt 100 ] || die "bridge ports do not forward"
    log "lab up: $TAP (ifindex $TAP_IFINDEX) -> $BR -> $PHY (ifindex $PHY_IFINDEX) -> $NS eth0 $REMOTE_IP"
}

gen_cmd() {             # gen_cmd "COMMAND" TIMEOUT: one line to the generator, its answer on stdout
    local line
    echo "$1" >&7 || return 1
    read -r -t "$2" line <&8 || return 1
    echo "$line"
}

ns_counter() {          # the namespace eth0's packet counters: "rx tx"
    ip netns exec "$NS" sh -c 'cat /sys/class/net/eth0/statistics/rx_packets /sys/class/net/eth0/statistics/tx_packets' | tr '\n' ' '
}
ns_nstat() {            # Udp NoPorts, Icmp OutMsgs in the namespace (absolute)
    ip netns exec "$NS" cat /proc/net/snmp | awk '
        $1 == "Udp:" || $1 == "Icmp:" {
            if (!($1 in names)) { names[$1] = $0; next }
            split(names[$1], n)
            for (i = 2; i <= NF; i++) v[$1 n[i]] = $i
        }
        END { printf "%d %d", v["Udp:NoPorts"], v["Icmp:OutMsgs"] }'
}

# ------------------------------------------------------------------ tracers

write_helpers() {
    # bpftrace: tap netif_receive_skb -> veth net_dev_start_xmit, by skb address
    cat >"$W/lat.bt" <<EOF
tracepoint:net:netif_receive_skb /str(args->name) == "$TAP"/
{
    @start[args->skbaddr] = nsecs;
}
tracepoint:net:net_dev_start_xmit /@start[args->skbaddr] && str(args->name) == "$PHY"/
{
    @lat_ns = hist(nsecs - @start[args->skbaddr]);
    delete(@start[args->skbaddr]);
}
EOF
    # the floor: 4 raw tracepoints, each reads skb->dev->ifindex and compares it
    cat >"$W/floor.py" <<'EOF'
import signal, sys, time
from bcc import BPF
skb_dev, dev_ifindex, tap, phy = (int(a) for a in sys.argv[1:5])
text = """
#define SKB_DEV %d
#define DEV_IFINDEX %d
#define TAP_IF %d
#define PHY_IF %d
BPF_PERCPU_ARRAY(hits, u64, 1);
static __always_inline int check(struct bpf_raw_tracepoint_args *ctx)
{
    void *dev = 0;
    u32 idx = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), (u8 *)ctx->args[0] + SKB_DEV);
    bpf_probe_read_kernel(&idx, sizeof(idx), (u8 *)dev + DEV_IFINDEX);
    if (idx == TAP_IF || idx == PHY_IF) {
        u32 zero = 0;
        u64 *v = hits.lookup(&zero);
        if (v)
            (*v)++;
    }
    return 0;
}
RAW_TRACEPOINT_PROBE(netif_receive_skb) { return check(ctx); }
RAW_TRACEPOINT_PROBE(net_dev_queue) { return check(ctx); }
RAW_TRACEPOINT_PROBE(net_dev_start_xmit) { return check(ctx); }
RAW_TRACEPOINT_PROBE(skb_copy_datagram_iovec) { return check(ctx); }
""" % (skb_dev, dev_ifindex, tap, phy)
stop = []
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda *a: stop.append(1))
b = BPF(text=text)
sys.stderr.write("Attached 4 raw tracepoints\n")
sys.stderr.flush()
while not stop:
    time.sleep(0.1)
print("hits %d" % sum(v for v in b["hits"][0]))
EOF
}

# struct offsets for the floor: the tool's own BTF-derived layout (--ebpf), checked
# against pahole when it is there
find_offsets() {
    local text
    text=$($PY "$TOOL" --ebpf --vm-dev "$TAP" --phy-dev "$PHY" 9>&- 2>"$W/ebpf.err") ||
        die "vm_network_latency.py --ebpf failed: $(cat "$W/ebpf.err")"
    SKB_DEV=$(awk '$1=="#define" && $2=="SKB_DEV"{print $3}' <<<"$text")
    DEV_IFINDEX=$(awk '$1=="#define" && $2=="DEV_IFINDEX"{print $3}' <<<"$text")
    [[ $SKB_DEV =~ ^[0-9]+$ && $DEV_IFINDEX =~ ^[0-9]+$ ]] || die "no SKB_DEV/DEV_IFINDEX in --ebpf output"
    if command -v pahole >/dev/null; then
        local p1 p2
        p1=$(pahole -C sk_buff /sys/kernel/btf/vmlinux 2>/dev/null | awk '$0 ~ /struct net_device \*[ \t]+dev;/ {for(i=1;i<=NF;i++) if($i=="/*"){print $(i+1); exit}}')
        p2=$(pahole -C net_device /sys/kernel/btf/vmlinux 2>/dev/null | awk '$1=="int" && $2=="ifindex;" {for(i=1;i<=NF;i++) if($i=="/*"){print $(i+1); exit}}')
        if [ -n "$p1" ] && [ -n "$p2" ] && { [ "$p1" != "$SKB_DEV" ] || [ "$p2" != "$DEV_IFINDEX" ]; }; then
            log "warning: pahole says sk_buff.dev=$p1 net_device.ifindex=$p2, the tool $SKB_DEV/$DEV_IFINDEX"
        fi
    fi
    log "offsets: sk_buff.dev=$SKB_DEV net_device.ifindex=$DEV_IFINDEX"
}

wait_for() {            # wait_for PATTERN TIMEOUT PID FILE...: until a FILE matches, or PID dies
    local pat=$1 t=$2 pid=$3 i
    shift 3
    for ((i = 0; i < t * 20; i++)); do
        cat "$@" 2>/dev/null | grep -q -- "$pat" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

tool_args() {           # the tool's command line for a configuration
    case "$1" in
        tool_hist) echo "--vm-dev $TAP --phy-dev $PHY --mode histogram --interval 3600" ;;
        tool_thresh) echo "--vm-dev $TAP --phy-dev $PHY --mode detailed --latency-threshold 1000000" ;;
        tool_detail) echo "--vm-dev $TAP --phy-dev $PHY --mode detailed --output json" ;;
        tool_filtered) echo "--vm-dev $TAP --phy-dev $PHY --dst-port 9999" ;;
        tool_sample) echo "--vm-dev $TAP --phy-dev $PHY --mode histogram --interval 3600 --sample 100" ;;
    esac
}

# start_tracers CONFIG TAG: starts what CONFIG needs, waits until attached; sets TRACER_PIDS
start_tracers() {
    local cfg=$1 tag=$2 pid
    TRACER_PIDS=()
    case "$cfg" in
        baseline) ;;
        tool_*)
            # shellcheck disable=SC2046
            $PY "$TOOL" $(tool_args "$cfg") >"$W/$tag.out" 2>"$W/$tag.err" 7>&- 8<&- 9>&- &
            pid=$!; TRACER_PIDS=("$pid")
            wait_for "^Tracing" 60 "$pid" "$W/$tag.err" || die "$cfg did not start: $(tail -3 "$W/$tag.err")" ;;
        tcpdump)
            local dev
            for dev in "$TAP" "$PHY"; do
                tcpdump -n -i "$dev" -w /dev/null >"$W/$tag.$dev.out" 2>"$W/$tag.$dev.err" 7>&- 8<&- 9>&- &
                pid=$!; TRACER_PIDS+=("$pid")
                wait_for "listening on" 30 "$pid" "$W/$tag.$dev.err" || die "tcpdump on $dev did not start: $(cat "$W/$tag.$dev.err")"
            done ;;
        bpftrace)
            bpftrace "$W/lat.bt" >"$W/$tag.out" 2>"$W/$tag.err" 7>&- 8<&- 9>&- &
            pid=$!; TRACER_PIDS=("$pid")
            wait_for "^Attaching" 60 "$pid" "$W/$tag.out" "$W/$tag.err" ||
                die "bpftrace did not start: $(cat "$W/$tag.err")"
            sleep 0.5 ;;    # "Attaching N probes..." is printed just before attaching
        floor)
            $PY "$W/floor.py" "$SKB_DEV" "$DEV_IFINDEX" "$TAP_IFINDEX" "$PHY_IFINDEX" \
                >"$W/$tag.out" 2>"$W/$tag.err" 7>&- 8<&- 9>&- &
            pid=$!; TRACER_PIDS=("$pid")
            wait_for "^Attached" 60 "$pid" "$W/$tag.err" || die "floor program did not start: $(cat "$W/$tag.err")" ;;
        *) die "unknown configuration $cfg" ;;
    esac
    # attach messages come right after the attach calls; let everything settle
    [ "$cfg" = baseline ] || sleep 0.5
}

stop_tracers() {
    local p
    for p in "${TRACER_PIDS[@]}"; do kill_pid "$p" INT 60; done
    TRACER_PIDS=()
}

proc_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
pids_cpu_ticks() {      # CPU ticks (10 ms) used so far by the given processes
    local p t=0 v
    for p in "$@"; do v=$(proc_cpu_ticks "$p"); t=$((t + ${v:-0})); done
    echo "$t"
}
KSOFTIRQD=$(for p in /proc/[0-9]*; do
    [[ $(cat "$p/comm" 2>/dev/null) == ksoftirqd/* ]] && echo "${p#/proc/}"; done)
# whole machine, from /proc/stat: "busy steal total" in ticks
machine_ticks() {
    local _c u n sy idle iow irq sirq steal _rest
    read -r _c u n sy idle iow irq sirq steal _rest </proc/stat
    echo "$((u + n + sy + irq + sirq)) $steal $((u + n + sy + idle + iow + irq + sirq + steal))"
}
# snapshot before a flood, and the differences after it, as key=value words
snap_begin() {
    SNAP_TR=$(pids_cpu_ticks "${TRACER_PIDS[@]}")
    # shellcheck disable=SC2086
    SNAP_KS=$(pids_cpu_ticks $KSOFTIRQD)
    SNAP_M=$(machine_ticks)
}
snap_end() {
    local tr ks m b0 s0 t0 b1 s1 t1
    tr=$(pids_cpu_ticks "${TRACER_PIDS[@]}")
    # shellcheck disable=SC2086
    ks=$(pids_cpu_ticks $KSOFTIRQD)
    m=$(machine_ticks)
    read -r b0 s0 t0 <<<"$SNAP_M"; read -r b1 s1 t1 <<<"$m"
    echo "tracer_ticks=$((tr - SNAP_TR)) ksoftirqd_ticks=$((ks - SNAP_KS)) machine_busy_ticks=$((b1 - b0)) machine_steal_ticks=$((s1 - s0)) machine_total_ticks=$((t1 - t0))"
}
proc_hwm_kb() { awk '$1=="VmHWM:"{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# the tool's summary as one line in $W/$tag.summary
save_summary() {
    local tag=$1
    if grep -q '"type": "summary"' "$W/$tag.out" 2>/dev/null; then
        grep '"type": "summary"' "$W/$tag.out" | tail -1 >"$W/$tag.summary"
    else
        grep '^Summary:' "$W/$tag.out" | tail -1 >"$W/$tag.summary"
    fi
}

# measure CONFIG REP: one flood under one configuration; one line in runs.txt
measure() {
    local cfg=$1 rep=$2 tag="$1-$2" res hwm=0 snap
    start_tracers "$cfg" "$tag"
    snap_begin
    res=$(gen_cmd "flood $FRAMES $NPORTS 0" 300) || die "flood failed ($cfg)"
    snap=$(snap_end)
    [[ $cfg == tool_* || $cfg == floor ]] && hwm=$(proc_hwm_kb "${TRACER_PIDS[0]}")
    stop_tracers
    local extra=""
    case "$cfg" in
        tool_*) save_summary "$tag"
                [ -s "$W/$tag.summary" ] || log "warning: $cfg run $rep printed no summary: $(tail -2 "$W/$tag.err")"
                rm -f "$W/$tag.out" ;;
        tcpdump) extra="captured=$(cat "$W/$tag.$TAP.err" "$W/$tag.$PHY.err" | awk '/packets captured/{s+=$1} END{print s+0}')"
                 extra+=" kernel_dropped=$(cat "$W/$tag.$TAP.err" "$W/$tag.$PHY.err" | awk '/dropped by kernel/{s+=$1} END{print s+0}')" ;;
        bpftrace) extra="hist_count=$(awk '/^\[/{for(i=1;i<=NF;i++) if($i ~ /^[0-9]+$/ && $(i+1) ~ /^\|/){s+=$i}} END{print s+0}' "$W/$tag.out")" ;;
        floor) extra="hits=$(awk '$1=="hits"{print $2}' "$W/$tag.out")" ;;
    esac
    echo "cfg=$cfg rep=$rep ${res#result } $snap hwm_kb=$hwm $extra" >>"$W/runs.txt"
    log "$(printf '%-13s rep %d: %s ns/frame, %s frames/s, background %s %s' "$cfg" "$rep" \
        "$(sed -n 's/.*cpu_ns_per_frame=\([0-9.]*\).*/\1/p' <<<"$res")" \
        "$(sed -n 's/.*pps=\([0-9]*\).*/\1/p' <<<"$res")" "$(bg_pct "$snap" "$res")" "$extra")"
}

bg_pct() {              # bg_pct SNAP RESULT: other processes' share of all CPUs during a flood
    awk -v s="$1 $2" 'BEGIN{n=split(s,a," "); for(i=1;i<=n;i++){split(a[i],kv,"="); v[kv[1]]=kv[2]}
        t=v["machine_total_ticks"]; if(t<=0){print "?%"; exit}
        o=v["machine_busy_ticks"]-v["cpu_s"]*100-v["tracer_ticks"]-v["ksoftirqd_ticks"]; if(o<0)o=0
        printf "%.0f%%", 100*o/t}'
}

# keep-up: detailed mode, every packet reported, at a paced rate
keepup() {
    local rate=$1 n tag="keepup-$1" res pid
    n=$((rate * KEEPUP_SECONDS))
    # shellcheck disable=SC2046
    $PY "$TOOL" $(tool_args tool_detail) >"$W/$tag.out" 2>"$W/$tag.err" 7>&- 8<&- 9>&- &
    pid=$!; TRACER_PIDS=("$pid")
    wait_for "^Tracing" 60 "$pid" "$W/$tag.err" || die "tool did not start: $(tail -3 "$W/$tag.err")"
    sleep 0.5
    snap_begin
    res=$(gen_cmd "flood $n $NPORTS $rate" $((KEEPUP_SECONDS * 10 + 60))) || die "paced flood failed"
    local snap
    snap=$(snap_end)
    sleep 0.5
    stop_tracers
    save_summary "$tag"
    rm -f "$W/$tag.out"
    echo "rate=$rate ${res#result } $snap" >>"$W/keepup.txt"
    local rep lost
    rep=$(grep -o '"reported": [0-9]*' "$W/$tag.summary" | awk '{print $2}')
    lost=$(grep -o '"lost": [0-9]*' "$W/$tag.summary" | awk '{print $2}')
    log "keep-up at $rate/s: sent $n ($(sed -n 's/.*pps=\([0-9]*\).*/\1/p' <<<"$res")/s achieved), reported ${rep:-?}, lost ${lost:-?} ($(bg_pct "$snap" "$res") background)"
    [ "${lost:-1}" = 0 ] && [ "${rep:-0}" = "$n" ]
}

# start-up: launch the tool while the generator sends one frame every 10 ms
startup() {
    local i=$1 tag="startup-$1" t_launch pid first=""
    t_launch=$(now)
    # shellcheck disable=SC2046
    $PY "$TOOL" $(tool_args tool_detail) >"$W/$tag.out" 2>"$W/$tag.err" 7>&- 8<&- 9>&- &
    pid=$!; TRACER_PIDS=("$pid")
    echo "tick 10000" >&7
    local k
    for ((k = 0; k < 600; k++)); do         # 30 s at most
        first=$(grep -m1 '"type": "packet"' "$W/$tag.out" 2>/dev/null)
        [ -n "$first" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    local ticked
    echo stop >&7
    read -r -t 10 ticked <&8 || die "generator did not stop ticking"
    stop_tracers
    [ -n "$first" ] || { log "startup run $i: no packet record ($(tail -2 "$W/$tag.err"))"; echo "run=$i t_launch=$t_launch first_ts=none" >>"$W/startup.txt"; return; }
    local ts
    ts=$(sed -n 's/.*"timestamp": \([0-9.]*\).*/\1/p' <<<"$first")
    echo "run=$i t_launch=$t_launch first_ts=$ts ${ticked#ticked }" >>"$W/startup.txt"
    log "startup run $i: first record $(awk -v a="$t_launch" -v b="$ts" 'BEGIN{printf "%.3f", b-a}') s after launch"
    rm -f "$W/$tag.out"
}

# per-program BPF run time (kernel.bpf_stats_enabled) during one flood
bpf_stats_run() {
    local cfg=$1 tag="stats-$1" pid
    start_tracers "$cfg" "$tag"
    pid=${TRACER_PIDS[0]}
    # the tracer's programs: the prog_id of each BPF program fd it holds
    cat /proc/"$pid"/fdinfo/* 2>/dev/null | awk '$1=="prog_id:"{print $2}' | sort -u |
        tr '\n' ' ' >"$W/$tag.ids"
    bpftool prog show -j >"$W/$tag.before.json" 2>/dev/null
    local res
    res=$(gen_cmd "flood $FRAMES $NPORTS 0" 300) || die "flood failed (stats $cfg)"
    bpftool prog show -j >"$W/$tag.after.json" 2>/dev/null
    stop_tracers
    rm -f "$W/$tag.out"
    echo "cfg=$cfg pid=$pid ${res#result }" >>"$W/stats.txt"
    log "bpf_stats run $cfg done"
}

# ------------------------------------------------------------------ run

lab_up
write_helpers
find_offsets
for cfg in tool_hist tool_thresh tool_detail tool_filtered tool_sample; do   # fail early
    # shellcheck disable=SC2046
    timeout 120 $PY "$TOOL" $(tool_args "$cfg") --dry-run >"$W/dry.out" 2>&1 7>&- 8<&- 9>&- ||
        die "the tool fails its --dry-run for $cfg: $(tail -3 "$W/dry.out")"
done

CONFIGS=(baseline tool_hist tool_thresh tool_detail tool_filtered tool_sample tcpdump bpftrace floor)
NS0=$(ns_counter); NST0=$(ns_nstat)

log "warm-up flood"
gen_cmd "flood $FRAMES $NPORTS 0" 300 >/dev/null || die "warm-up flood failed"
NS1=$(ns_counter); NST1=$(ns_nstat)
read -r rx0 tx0 <<<"$NS0"; read -r rx1 tx1 <<<"$NS1"
read -r u0 i0 <<<"$NST0"; read -r u1 i1 <<<"$NST1"
log "path check: namespace eth0 received $((rx1 - rx0)) of $FRAMES, sent $((tx1 - tx0)); UdpNoPorts +$((u1 - u0)), IcmpOutMsgs +$((i1 - i0))"
[ $((rx1 - rx0)) -ge "$FRAMES" ] || die "the frames do not reach the namespace"
PATH_CHECK="rx=$((rx1 - rx0)) tx=$((tx1 - tx0)) udp_noports=$((u1 - u0)) icmp_out=$((i1 - i0))"

: >"$W/runs.txt"
for ((rep = 1; rep <= REPS; rep++)); do
    n=${#CONFIGS[@]}
    for ((j = 0; j < n; j++)); do
        measure "${CONFIGS[$(((j + rep - 1) % n))]}" "$rep"
    done
done

: >"$W/keepup.txt"
first=1
for rate in $KEEPUP_RATES; do
    if keepup "$rate"; then
        first=0
        continue
    fi
    if [ "$first" = 1 ]; then       # not even the lowest rate: look lower, what does it keep up with?
        r=$((rate * 2 / 3))
        for ((k = 0; k < 4 && r >= 5000; k++)); do
            keepup "$r" && break
            r=$((r * 2 / 3))
        done
    fi
    break
done

: >"$W/startup.txt"
for ((i = 1; i <= STARTUP_RUNS; i++)); do
    startup "$i"
done

: >"$W/stats.txt"
if [ "$BPF_STATS" = 1 ]; then
    BPF_STATS_OLD=$(sysctl -n kernel.bpf_stats_enabled)
    sysctl -qw kernel.bpf_stats_enabled=1
    for cfg in tool_hist tool_detail tool_filtered floor; do
        bpf_stats_run "$cfg"
    done
    sysctl -qw kernel.bpf_stats_enabled="$BPF_STATS_OLD"
    BPF_STATS_OLD=""
fi

NS2=$(ns_counter); NST2=$(ns_nstat)
read -r rx2 tx2 <<<"$NS2"; read -r u2 i2 <<<"$NST2"
PATH_TOTAL="rx=$((rx2 - rx0)) tx=$((tx2 - tx0)) udp_noports=$((u2 - u0)) icmp_out=$((i2 - i0))"

[ -n "$JSON_OUT" ] || JSON_OUT=$CACHE/overhead-$(date +%Y%m%d-%H%M%S).json
TOTAL_S=$(elapsed)

# ------------------------------------------------------------------ report

$PY - "$W" "$JSON_OUT" "$FRAMES" "$REPS" "$NPORTS" "$TOTAL_S" "$PATH_CHECK" "$PATH_TOTAL" \
    "$(uname -r)" "$(nproc)" "$KEEPUP_SECONDS" "$TOOL_DESC" "$TOOL_SHA" <<'PYEOF'
import json, os, re, statistics, sys

(W, out_path, frames, reps, nports, total_s, path_check, path_total, krel, ncpu, keep_s,
 tool_desc, tool_sha) = sys.argv[1:14]
frames, reps = int(frames), int(reps)

def kv(line):
    return dict(p.split("=", 1) for p in line.split() if "=" in p)

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def summary(tag):
    path = os.path.join(W, tag + ".summary")
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    if not text:
        return None
    if text.startswith("{"):
        return json.loads(text)
    m = re.match(r"Summary: (\d+) packets reported \(tx (\d+), rx (\d+)\); (\d+) below the "
                 r"latency threshold; (\d+) dropped by the kernel; (\d+) left the traced path "
                 r"before its end; (\d+) still in flight; (\d+) not tracked \(tracking table "
                 r"full\); (\d+) lost by the output buffer; (\d+) vanished untraced", text)
    if not m:
        return {"unparsed": text}
    keys = ["reported", "reported_tx", "reported_rx", "below_threshold", "dropped",
            "left_path", "in_flight", "not_tracked", "lost", "vanished"]
    return dict(zip(keys, (int(g) for g in m.groups())))

def background(r):
    """Other processes' share of all CPUs during the flood, in percent (from /proc/stat)."""
    t = int(r.get("machine_total_ticks", 0))
    if t <= 0:
        return None
    o = (int(r["machine_busy_ticks"]) - float(r["cpu_s"]) * 100 - int(r["tracer_ticks"])
         - int(r["ksoftirqd_ticks"]))
    return max(0.0, o) * 100.0 / t

def steal(r):
    t = int(r.get("machine_total_ticks", 0))
    return int(r["machine_steal_ticks"]) * 100.0 / t if t > 0 else None

runs = [kv(l) for l in open(os.path.join(W, "runs.txt")) if l.strip()]
CONFIGS = ["baseline", "tool_hist", "tool_thresh", "tool_detail", "tool_filtered",
           "tool_sample", "tcpdump", "bpftrace", "floor"]
LABEL = {
    "baseline": "1 baseline (nothing attached)",
    "tool_hist": "2 tool histogram",
    "tool_thresh": "3 tool detailed, threshold 1 s",
    "tool_detail": "4 tool detailed json, every pkt",
    "tool_filtered": "5 tool filtered (--dst-port 9999)",
    "tool_sample": "5b tool histogram --sample 100",
    "tcpdump": "6 tcpdump -w on tap + veth",
    "bpftrace": "7 bpftrace rx->xmit hist()",
    "floor": "8 floor: 4 raw tp, ifindex only",
}
res = {}
for c in CONFIGS:
    rr = [r for r in runs if r["cfg"] == c]
    ns = [float(r["cpu_ns_per_frame"]) for r in rr]
    pps = [float(r["pps"]) for r in rr]
    d = {"runs": len(rr), "cpu_ns_per_frame": ns, "pps": pps,
         "cpu_ns_per_frame_median": statistics.median(ns) if ns else None,
         "pps_median": statistics.median(pps) if pps else None,
         "errors": sum(int(r.get("errors", 0)) for r in rr),
         "background_cpu_pct": [background(r) for r in rr],
         "steal_pct": [steal(r) for r in rr],
         "ksoftirqd_ticks": [int(r["ksoftirqd_ticks"]) for r in rr],
         "tracer_process_ns_per_frame": [int(r["tracer_ticks"]) * 1e7 / frames for r in rr]}
    bgs = [b for b in d["background_cpu_pct"] if b is not None]
    d["background_cpu_pct_median"] = statistics.median(bgs) if bgs else None
    if c.startswith("tool_") or c == "floor":
        d["vmhwm_kb"] = [int(r["hwm_kb"]) for r in rr]
    if c.startswith("tool_"):
        d["summaries"] = [summary("%s-%s" % (c, r["rep"])) for r in rr]
    for extra in ("captured", "kernel_dropped", "hist_count", "hits"):
        vals = [int(r[extra]) for r in rr if r.get(extra, "").isdigit()]
        if vals:
            d[extra] = vals
    res[c] = d

base = res["baseline"]["cpu_ns_per_frame_median"]
for c in CONFIGS:
    m = res[c]["cpu_ns_per_frame_median"]
    res[c]["added_ns"] = None if m is None or base is None else m - base
    # paired per repetition (same rep's baseline), a check on drift
    pairs = []
    for r in (x for x in runs if x["cfg"] == c):
        b = [float(x["cpu_ns_per_frame"]) for x in runs
             if x["cfg"] == "baseline" and x["rep"] == r["rep"]]
        if b:
            pairs.append(float(r["cpu_ns_per_frame"]) - b[0])
    res[c]["added_ns_paired_median"] = statistics.median(pairs) if pairs else None

def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b

add = dict((c, res[c]["added_ns"]) for c in CONFIGS)
for c in CONFIGS:
    res[c]["ratio_to_tcpdump"] = ratio(add[c], add["tcpdump"]) if c.startswith("tool_") else None
    res[c]["ratio_to_bpftrace"] = ratio(add[c], add["bpftrace"]) if c.startswith("tool_") else None
res["tool_filtered"]["ratio_to_floor"] = ratio(add["tool_filtered"], add["floor"])
# the same with each configuration's least disturbed run (minimum) instead of its median:
# background load only ever adds time, so minima are a second, noise-resistant view
mins = dict((c, min(res[c]["cpu_ns_per_frame"])) for c in CONFIGS)
add_min = dict((c, mins[c] - mins["baseline"]) for c in CONFIGS)
for c in CONFIGS:
    res[c]["added_ns_min_based"] = add_min[c]
min_view = {
    "tool_hist_to_tcpdump": ratio(add_min["tool_hist"], add_min["tcpdump"]),
    "tool_hist_to_bpftrace": ratio(add_min["tool_hist"], add_min["bpftrace"]),
    "tool_filtered_to_floor": ratio(add_min["tool_filtered"], add_min["floor"]),
}

# keep-up ladder
keepup = []
for l in open(os.path.join(W, "keepup.txt")):
    if not l.strip():
        continue
    r = kv(l)
    s = summary("keepup-%s" % r["rate"]) or {}
    n = int(r["frames"])
    ok = s.get("lost") == 0 and s.get("reported") == n
    keepup.append({"target_rate": int(r["rate"]), "frames": n, "achieved_pps": float(r["pps"]),
                   "wall_s": float(r["wall_s"]), "reported": s.get("reported"),
                   "lost": s.get("lost"), "not_tracked": s.get("not_tracked"),
                   "reported_per_s": (s.get("reported") or 0) / float(r["wall_s"]),
                   "background_cpu_pct": background(r),
                   "kept_up": ok})
kept = [k for k in keepup if k["kept_up"]]
best = max(kept, key=lambda k: k["achieved_pps"]) if kept else None

startup = []
for l in open(os.path.join(W, "startup.txt")):
    r = kv(l)
    if r.get("first_ts", "none") != "none":
        startup.append(float(r["first_ts"]) - float(r["t_launch"]))
startup_med = statistics.median(startup) if startup else None

hwm = {c: res[c]["vmhwm_kb"] for c in ("tool_hist", "tool_detail", "tool_thresh", "tool_filtered")}
hwm_max_mb = max(max(hwm["tool_hist"] or [0]), max(hwm["tool_detail"] or [0])) / 1024.0

# per-program BPF statistics
stats = {}
for l in open(os.path.join(W, "stats.txt")):
    if not l.strip():
        continue
    r = kv(l)
    cfg = r["cfg"]
    try:
        ids = set(int(x) for x in open(os.path.join(W, "stats-%s.ids" % cfg)).read().split())
    except OSError:
        ids = set()
    def load(which):
        try:
            return json.load(open(os.path.join(W, "stats-%s.%s.json" % (cfg, which))))
        except (OSError, ValueError):
            return []
    before = dict((p["id"], p) for p in load("before"))
    progs = []
    for p in load("after"):
        if p["id"] not in ids:
            continue
        b = before.get(p["id"], {})
        cnt = p.get("run_cnt", 0) - b.get("run_cnt", 0)
        t = p.get("run_time_ns", 0) - b.get("run_time_ns", 0)
        progs.append({"name": p.get("name"), "run_cnt": cnt, "run_time_ns": t,
                      "ns_per_run": t / cnt if cnt else None,
                      "runs_per_frame": cnt / float(r["frames"]),
                      "ns_per_frame": t / float(r["frames"])})
    progs.sort(key=lambda p: -p["run_time_ns"])
    stats[cfg] = {"writer_cpu_ns_per_frame_with_stats": float(r["cpu_ns_per_frame"]),
                  "programs": progs,
                  "bpf_ns_per_frame_total": sum(p["ns_per_frame"] for p in progs)}

def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)

lines = []
P = lines.append
P("")
P("tool: %s (sha256 %s...)" % (tool_desc, tool_sha))
P("vm_network_latency.py overhead: %d frames of 64 bytes per flood, %d repetitions interleaved, "
  "medians; kernel %s, %s CPUs; source ports: %s" % (frames, reps, krel, ncpu, nports))
P("")
hdr = "%-36s %10s %9s %8s %8s %8s %8s  %-13s %s" % (
    "configuration", "frames/s", "ns/frame", "added", "/tcpdump", "/bpftrc", "/floor",
    "min-max ns", "bg cpu")
P(hdr)
P("-" * len(hdr))
for c in CONFIGS:
    d = res[c]
    ns = d["cpu_ns_per_frame"]
    P("%-36s %10s %9s %8s %8s %8s %8s  %-13s %s" % (
        LABEL[c], f(d["pps_median"]), f(d["cpu_ns_per_frame_median"]),
        "-" if c == "baseline" else f(d["added_ns"], "{:+,.0f}"),
        f(d.get("ratio_to_tcpdump"), "{:.2f}"), f(d.get("ratio_to_bpftrace"), "{:.2f}"),
        f(d.get("ratio_to_floor"), "{:.2f}"),
        "%s-%s" % (f(min(ns)), f(max(ns))) if ns else "-",
        f(d["background_cpu_pct_median"], "{:.0f}%")))
P("(frames/s: the writer's wall-clock rate; ns/frame: its CPU time per frame, median; added: "
  "minus the baseline's median; /tcpdump, /bpftrc, /floor: added ns over theirs; bg cpu: other "
  "processes' share of both CPUs during the floods, median)")
P("")
P("paired added ns (median over reps of run minus same-rep baseline): " + ", ".join(
    "%s %s" % (c, f(res[c]["added_ns_paired_median"], "{:+,.0f}")) for c in CONFIGS[1:]))

P("with each configuration's minimum instead of its median: added " + ", ".join(
    "%s %s" % (c, f(add_min[c], "{:+,.0f}")) for c in CONFIGS[1:]) +
  "; histogram/tcpdump %s, histogram/bpftrace %s, filtered/floor %s" % (
      f(min_view["tool_hist_to_tcpdump"], "{:.2f}"), f(min_view["tool_hist_to_bpftrace"], "{:.2f}"),
      f(min_view["tool_filtered_to_floor"], "{:.2f}")))

def sums(c, key):
    return [s.get(key) if s else None for s in res[c].get("summaries", [])]

P("tool checks: histogram reported %s of %d; threshold run below_threshold %s, reported %s; "
  "filtered reported %s" % (sums("tool_hist", "reported"), frames,
                            sums("tool_thresh", "below_threshold"),
                            sums("tool_thresh", "reported"), sums("tool_filtered", "reported")))
P("detailed mode, unpaced flood (config 4): reported %s, lost %s, not_tracked %s (of %d each)" % (
    sums("tool_detail", "reported"), sums("tool_detail", "lost"),
    sums("tool_detail", "not_tracked"), frames))
P("tool process CPU per frame (user space + its syscalls, 10 ms ticks): histogram %s ns, "
  "detailed %s ns" % (f(statistics.median(res["tool_hist"]["tracer_process_ns_per_frame"])),
                      f(statistics.median(res["tool_detail"]["tracer_process_ns_per_frame"]))))
for c in ("tcpdump", "bpftrace", "floor"):
    extra = dict((k, res[c][k]) for k in ("captured", "kernel_dropped", "hist_count", "hits")
                 if k in res[c])
    P("%s: %s" % (c, extra))
P("detailed mode keep-up (paced, %s s each): " % keep_s + "; ".join(
    "%d/s -> achieved %s/s, reported %s, lost %s,%s (bg cpu %s)" % (
        k["target_rate"], f(k["achieved_pps"]), k["reported"], k["lost"],
        " OK" if k["kept_up"] else " FAILS", f(k["background_cpu_pct"], "{:.0f}%"))
    for k in keepup))
P("start-up to first traced packet: %s s (median of %d: %s)" % (
    f(startup_med, "{:.2f}"), len(startup), ", ".join("%.2f" % s for s in startup)))
P("peak RSS (VmHWM): histogram %s MB, detailed %s MB (max over runs); for scale, the floor's "
  "minimal BCC program in the same interpreter: %s MB" % (
    f(max(hwm["tool_hist"]) / 1024.0, "{:.1f}"), f(max(hwm["tool_detail"]) / 1024.0, "{:.1f}"),
    f(max(res["floor"]["vmhwm_kb"]) / 1024.0, "{:.1f}")))
P("ksoftirqd ticks during floods (0 = all softirq work ran in the writer's thread): %s" % (
    sum(sum(res[c]["ksoftirqd_ticks"]) for c in CONFIGS)))
P("path check (warm-up flood): %s; whole run: %s" % (path_check, path_total))
if stats:
    P("")
    P("BPF run time per program during one flood (kernel.bpf_stats_enabled=1, separate runs):")
    for cfg, s in stats.items():
        P("  %s: total %s ns/frame in BPF programs (writer %s ns/frame with stats on)" % (
            cfg, f(s["bpf_ns_per_frame_total"]), f(s["writer_cpu_ns_per_frame_with_stats"])))
        for p in s["programs"]:
            P("    %-18s %7.2f runs/frame %7s ns/run %7s ns/frame" % (
                p["name"], p["runs_per_frame"], f(p["ns_per_run"], "{:,.1f}"),
                f(p["ns_per_frame"], "{:,.1f}")))

targets = []
def target(name, ok, detail):
    targets.append({"target": name, "pass": ok, "detail": detail})

r = res["tool_hist"]["ratio_to_tcpdump"]
target("histogram added <= tcpdump added", r is not None and r <= 1.0,
       "ratio %s" % f(r, "{:.2f}"))
r = res["tool_hist"]["ratio_to_bpftrace"]
target("histogram added <= 0.5 x bpftrace added", r is not None and r <= 0.5,
       "ratio %s" % f(r, "{:.2f}"))
r = res["tool_filtered"]["ratio_to_floor"]
target("filtered added <= 1.5 x floor added", r is not None and r <= 1.5,
       "ratio %s" % f(r, "{:.2f}"))
# the generator paces to within a fraction of a percent of the asked rate: a rate
# counts as kept up when every packet sent at it was reported
kept_rates = [k["target_rate"] for k in keepup if k["kept_up"] and
              k["achieved_pps"] >= 0.99 * k["target_rate"]]
target("detailed >= 50,000 packets/s reported without loss",
       bool(kept_rates) and max(kept_rates) >= 50000,
       "highest rate kept up with: %s/s (achieved %s/s)" % (
           f(max(kept_rates)) if kept_rates else "none",
           f(best["achieved_pps"]) if best else "none"))
target("start-up < 3 s", startup_med is not None and startup_med < 3.0,
       "median %s s" % f(startup_med, "{:.2f}"))
target("RSS < 150 MB", hwm_max_mb < 150.0, "max VmHWM %.1f MB" % hwm_max_mb)
P("")
P("targets:")
for t in targets:
    P("  %-4s %-52s %s" % ("PASS" if t["pass"] else "FAIL", t["target"], t["detail"]))

result = {"tool": tool_desc, "tool_sha256_prefix": tool_sha, "frames": frames, "reps": reps, "source_ports": int(nports), "kernel": krel,
          "cpus": int(ncpu), "configs": res, "keepup": keepup,
          "keepup_best_pps": best["achieved_pps"] if best else None,
          "startup_s": startup, "startup_median_s": startup_med,
          "vmhwm_kb": hwm, "bpf_stats": stats, "targets": targets, "min_based_ratios": min_view,
          "path_check_warmup": path_check, "path_check_total": path_total,
          "total_seconds": float(total_s)}
with open(out_path, "w") as fo:
    json.dump(result, fo, indent=2)
print("\n".join(lines))
print("\nJSON: %s" % out_path)
PYEOF
rc=$?
log "total run time: $(elapsed) s"
exit $rc
