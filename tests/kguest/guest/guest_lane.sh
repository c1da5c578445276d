#!/bin/bash
# guest_lane.sh [CASES] - the kguest lane, run inside the QEMU guest as root.
#
# CASES: comma list of  A (OVS kernel datapath topology), B (Linux bridge topology),
#        tool (run vm_network_latency.py on the topologies selected), or "all".
#
# TOPOLOGY A                                   TOPOLOGY B
#   ns vm: eth0 10.77.0.2/24                     the same, with a Linux bridge vnlbr0
#     | veth                                     in place of ovsbr0
#   vnlvm0 <-AF_PACKET-> vmstub <-fd-> vnltap0 (tap, as QEMU holds it)
#                                        |
#                                   ovsbr0 (OVS kernel datapath)
#                                        |
#                                     vnlphy0 (veth standing in for the NIC)
#                                        | veth
#                                  ns remote: eth0 10.77.0.3/24
#
# `ip netns exec vm ping 10.77.0.3` is traffic from the VM: it enters the host through
# tun_get_user on vnltap0, crosses the switch, leaves through vnlphy0; replies come
# back through vnlphy0, the switch, tun_net_xmit on vnltap0 and vmstub's read().
#
# Sourcing with KGUEST_LIB=1 only defines the functions (for interactive use).
# Everything the lane produces goes to $KGUEST_OUT (default /lane/out).

LANE_DIR=${LANE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
OUT=${KGUEST_OUT:-/lane/out}
VM_NS=${VM_NS:-vm}
REMOTE_NS=${REMOTE_NS:-remote}
VM_IP=10.77.0.2
REMOTE_IP=10.77.0.3
TAP=vnltap0
PHY=vnlphy0
VMLINK=vnlvm0
OVSBR=ovsbr0
LBR=vnlbr0
UDP_SPORT=40000 UDP_DPORT=40001 TCP_DPORT=40002 TCP_SPORT=40003
HOST_IP=10.77.0.1   # the host's own address on the switch (host-local runs)
HOST_UDP_SPORT=40010 HOST_UDP_PORT=40011 HOST_TCP_PORT=40012 HOST_TCP_SPORT=40013
TOOL=${TOOL:-$LANE_DIR/vm_network_latency.py}
TOOL_ATTACH_WAIT=${TOOL_ATTACH_WAIT:-300} # BCC compiles ~20x slower under TCG
PY=/usr/bin/python3
OVS_RUN=/run/openvswitch

FAILS=0
STEPS="$OUT/steps.tsv"

say() { printf '[lane %6ss] %s\n' "$(cut -d' ' -f1 /proc/uptime)" "$*"; }
step() { # step NAME STATUS DETAIL...
    local name=$1 st=$2; shift 2
    printf '%s\t%s\t%s\n' "$name" "$st" "$*" >> "$STEPS"
    say "STEP $name: $st${*:+ - $*}"
    [ "$st" = FAIL ] && FAILS=$((FAILS + 1))
    return 0
}
in_vm() { ip netns exec "$VM_NS" "$@"; }
in_remote() { ip netns exec "$REMOTE_NS" "$@"; }

# ------------------------------------------------------------------ kernel + OVS
prepare_kernel() {
    local m ok=1
    for m in openvswitch tun veth bridge sch_netem; do
        modprobe "$m" || { say "modprobe $m failed"; ok=0; }
    done
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
    [ $ok = 1 ] && step modules PASS "openvswitch tun veth bridge sch_netem" \
                || step modules FAIL "see log"
    {
        echo "kernel: $(uname -r)"
        echo "kprobe_events: $([ -e /sys/kernel/tracing/kprobe_events ] && echo yes || echo no)"
        echo "btf: $([ -e /sys/kernel/btf/vmlinux ] && echo yes || echo no)"
        echo "headers: $(readlink -f /lib/modules/$(uname -r)/build)"
        echo "ovs symbols: $(grep -c ' ovs_' /proc/kallsyms)"
        echo "python3-bpfcc: $(dpkg-query -W -f='${Version}' python3-bpfcc 2>/dev/null)"
        echo "python3: $(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
        echo "debian: $(cat /etc/debian_version)"
        echo "openvswitch-switch: $(dpkg-query -W -f='${Version}' openvswitch-switch 2>/dev/null)"
    } | tee "$OUT/guest-env.txt"
    # which OVS tracepoints this kernel has (openvswitch:ovs_dp_upcall decides whether
    # the tracepoint instance can see upcalls)
    ls /sys/kernel/tracing/events/openvswitch/ > "$OUT/ovs-tracepoints.txt" 2>/dev/null
    # whether kfree_skb carries a drop reason here (5.17+): the oracle for the drop run
    cat /sys/kernel/tracing/events/skb/kfree_skb/format > "$OUT/kfree_skb.format" 2>&1
    echo "openvswitch tracepoints: $(tr '\n' ' ' < "$OUT/ovs-tracepoints.txt")"
}

start_ovs() {
    mkdir -p "$OVS_RUN" /var/log/openvswitch
    # /etc/openvswitch/conf.db is a dangling link in a fresh root: keep the DB in /run.
    rm -f "$OVS_RUN/conf.db"
    ovsdb-tool create "$OVS_RUN/conf.db" /usr/share/openvswitch/vswitch.ovsschema || return 1
    ovsdb-server "$OVS_RUN/conf.db" --remote=punix:"$OVS_RUN/db.sock" \
        --pidfile="$OVS_RUN/ovsdb-server.pid" --detach --log-file=/var/log/openvswitch/ovsdb-server.log \
        || return 1
    ovs-vsctl --db=unix:"$OVS_RUN/db.sock" --no-wait init || return 1
    # ovs-vswitchd 3.1 started within ~10 s of boot runs 0 upcall handler threads and loses
    # every upcall; a time namespace whose monotonic clock is 1000 s ahead avoids that.
    unshare --time --monotonic 1000 --fork \
        ovs-vswitchd unix:"$OVS_RUN/db.sock" --pidfile="$OVS_RUN/ovs-vswitchd.pid" --detach \
        --log-file=/var/log/openvswitch/ovs-vswitchd.log || return 1
    ovs-vsctl --timeout=60 show >/dev/null || return 1
}

stop_ovs() {
    local f
    for f in ovs-vswitchd ovsdb-server; do
        [ -f "$OVS_RUN/$f.pid" ] && kill "$(cat "$OVS_RUN/$f.pid")" 2>/dev/null
    done
    sleep 0.5
}

# ------------------------------------------------------------------ topologies
VMSTUB_PID=
setup_endpoints() {
    ip netns add "$VM_NS"
    ip netns add "$REMOTE_NS"
    local ns
    for ns in "$VM_NS" "$REMOTE_NS"; do
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    done
    sysctl -qw net.ipv6.conf.default.disable_ipv6=1
    ip link add "$VMLINK" type veth peer name eth0 netns "$VM_NS"
    ip link add "$PHY" type veth peer name eth0 netns "$REMOTE_NS"
    in_vm ip addr add "$VM_IP/24" dev eth0
    in_remote ip addr add "$REMOTE_IP/24" dev eth0
    # The stand-in VM copies whole frames through AF_PACKET: no checksum/segmentation
    # offload on the VM's NIC, so every frame is complete and MTU-sized, as from a guest.
    in_vm ethtool -K eth0 tx off tso off gso off sg off >/dev/null 2>&1 || say "ethtool -K failed"
    in_vm ip link set eth0 up
    in_remote ip link set eth0 up
    ip link set "$PHY" up
    ip link set "$VMLINK" up
    "$LANE_DIR/bin/vmstub" "$TAP" "$VMLINK" /run/vmstub.ready 2>"$OUT/vmstub-$1.log" &
    VMSTUB_PID=$!
    local i
    for i in $(seq 1 100); do [ -s /run/vmstub.ready ] && break; sleep 0.1; done
    [ -s /run/vmstub.ready ] || { say "vmstub did not start: $(cat "$OUT/vmstub-$1.log")"; return 1; }
    sysctl -qw "net.ipv6.conf.$TAP.disable_ipv6=1" "net.ipv6.conf.$PHY.disable_ipv6=1" \
        "net.ipv6.conf.$VMLINK.disable_ipv6=1" 2>/dev/null
}

topo_a_up() {
    setup_endpoints A || return 1
    ovs-vsctl --timeout=30 add-br "$OVSBR" -- set bridge "$OVSBR" datapath_type=system || return 1
    ovs-vsctl --timeout=30 add-port "$OVSBR" "$TAP" -- add-port "$OVSBR" "$PHY" || return 1
    ip link set "$OVSBR" up
}

topo_b_up() {
    setup_endpoints B || return 1
    ip link add "$LBR" type bridge stp_state 0 forward_delay 0 || return 1
    sysctl -qw "net.ipv6.conf.$LBR.disable_ipv6=1" 2>/dev/null
    ip link set "$TAP" master "$LBR" || return 1
    ip link set "$PHY" master "$LBR" || return 1
    ip link set "$LBR" up
}

# TOPOLOGY G: an OVN-like host. OVS bridge ovsbr0 with the tap and a Geneve tunnel
# port (VNI 42, remote 10.88.0.2): OVS's metadata-mode genev_sys_6081 device does the
# encapsulation; the underlay is vnlphy0 (10.88.0.1) to namespace remote, whose eth0
# (10.88.0.2) carries a Linux Geneve device gnv0 holding the VM's peer 10.77.0.3.
UND_LOCAL=10.88.0.1 UND_REMOTE=10.88.0.2 GENEVE_VNI=42
topo_g_up() {
    modprobe geneve || return 1
    modprobe vport_geneve 2>/dev/null    # OVS loads it itself where it is built in
    setup_endpoints G || return 1
    in_vm ip link set eth0 mtu 1400         # room for the outer headers
    in_remote ip addr flush dev eth0
    in_remote ip addr add "$UND_REMOTE/24" dev eth0
    ip addr add "$UND_LOCAL/24" dev "$PHY" || return 1
    in_remote ip link add gnv0 type geneve id "$GENEVE_VNI" remote "$UND_LOCAL" || return 1
    in_remote ip addr add "$REMOTE_IP/24" dev gnv0
    in_remote ip link set gnv0 up
    ovs-vsctl --timeout=30 add-br "$OVSBR" -- set bridge "$OVSBR" datapath_type=system || return 1
    ovs-vsctl --timeout=30 add-port "$OVSBR" "$TAP" -- add-port "$OVSBR" gnv -- \
        set interface gnv type=geneve options:remote_ip="$UND_REMOTE" \
        options:key="$GENEVE_VNI" || return 1
    ip link set "$OVSBR" up
    local i
    for i in $(seq 1 50); do [ -e /sys/class/net/genev_sys_6081 ] && break; sleep 0.2; done
    [ -e /sys/class/net/genev_sys_6081 ] || { say "no genev_sys_6081"; return 1; }
    sysctl -qw net.ipv6.conf.genev_sys_6081.disable_ipv6=1 2>/dev/null
    ip link show genev_sys_6081 > "$OUT/genev_sys_6081.txt"
}

geneve_case() { # the VM <-> its peer across the Geneve overlay: ICMP and UDP
    TOPO=G
    static_arp gnv0
    ovs-vsctl set Open_vSwitch . other_config:max-idle=3600000
    warm_up
    run_pair "G-overlay" traffic_vhost "$TAP" "$PHY"
    TOPO=
}

topo_down() {
    netem_off 2>/dev/null
    if [ -n "$VMSTUB_PID" ]; then
        kill "$VMSTUB_PID" 2>/dev/null; wait "$VMSTUB_PID" 2>/dev/null; VMSTUB_PID=
    fi
    rm -f /run/vmstub.ready
    ovs-vsctl --timeout=10 --if-exists del-br "$OVSBR" 2>/dev/null
    ip addr flush dev "$PHY" 2>/dev/null
    ip link del "$LBR" 2>/dev/null
    ip link del "$PHY" 2>/dev/null
    ip link del "$VMLINK" 2>/dev/null
    ip netns del "$VM_NS" 2>/dev/null
    ip netns del "$REMOTE_NS" 2>/dev/null
    return 0
}

# ------------------------------------------------------------------ traffic
netem_on() { tc qdisc add dev "$PHY" root netem delay "${1:-20ms}"; }
netem_off() { tc qdisc del dev "$PHY" root 2>/dev/null || true; }

do_ping() { # do_ping COUNT [INTERVAL]
    in_vm ping -n -c "${1:-5}" -i "${2:-0.2}" -W 3 "$REMOTE_IP"
}

do_udp() { # do_udp COUNT: a burst with the fixed 5-tuple 10.77.0.2:40000 -> 10.77.0.3:40001
    local n=${1:-20} rc
    rm -f /run/udp.ready
    in_remote "$PY" "$LANE_DIR/traffic.py" udp-server --bind "$REMOTE_IP" --port "$UDP_DPORT" \
        --count "$n" --timeout 60 --ready /run/udp.ready &
    local spid=$! i
    for i in $(seq 1 200); do [ -e /run/udp.ready ] && break; sleep 0.1; done
    in_vm "$PY" "$LANE_DIR/traffic.py" udp-burst --src "$VM_IP" --sport "$UDP_SPORT" \
        --dst "$REMOTE_IP" --dport "$UDP_DPORT" --count "$n"
    rc=$?
    wait "$spid"
    return $rc
}

do_tcp() { # do_tcp MESSAGES: one connection 10.77.0.2:40003 -> 10.77.0.3:40002, echoes
    local n=${1:-5} rc
    rm -f /run/tcp.ready
    in_remote "$PY" "$LANE_DIR/traffic.py" tcp-server --bind "$REMOTE_IP" --port "$TCP_DPORT" \
        --timeout 60 --ready /run/tcp.ready &
    local spid=$! i
    for i in $(seq 1 200); do [ -e /run/tcp.ready ] && break; sleep 0.1; done
    in_vm "$PY" "$LANE_DIR/traffic.py" tcp-client --src "$VM_IP" --sport "$TCP_SPORT" \
        --dst "$REMOTE_IP" --dport "$TCP_DPORT" --messages "$n"
    rc=$?
    wait "$spid"
    return $rc
}

# ------------------------------------------------------------------ checks
check_ovs_forwarding() {
    local show flows lost
    show=$(ovs-dpctl show 2>&1)
    flows=$(ovs-dpctl dump-flows 2>&1)
    echo "$show" > "$OUT/ovs-dpctl-show.txt"
    echo "$flows" > "$OUT/ovs-dpctl-flows.txt"
    echo "$show"
    echo "$flows" | head -n 8
    ovs-appctl --timeout=10 upcall/show 2>&1 | head -n 12 | tee "$OUT/ovs-upcall-show.txt"
    lost=$(echo "$show" | sed -n 's/.*lost:\([0-9]*\).*/\1/p' | head -n1)
    if [ -z "$lost" ]; then
        step ovs_dpctl FAIL "no lookups line in ovs-dpctl show"
    elif [ "$lost" != 0 ]; then
        step ovs_dpctl FAIL "lost upcalls: $lost"
    elif ! echo "$flows" | grep -q 'in_port'; then
        step ovs_dpctl FAIL "no datapath flows after traffic"
    else
        step ovs_dpctl PASS "lost:0, $(echo "$flows" | grep -c in_port) flows"
    fi
}

basic_traffic_checks() { # basic_traffic_checks TOPO
    local t=$1 out
    if out=$(do_ping 3 0.2 2>&1); then step "$t.ping" PASS "$(echo "$out" | tail -n1)"
    else step "$t.ping" FAIL "$(echo "$out" | tail -n2 | tr '\n' ' ')"; fi
    echo "$out"
    if out=$(do_udp 20 2>&1); then step "$t.udp" PASS "$(echo "$out" | grep udp_burst)"
    else step "$t.udp" FAIL "$(echo "$out" | tr '\n' ' ')"; fi
    if out=$(do_tcp 5 2>&1); then step "$t.tcp" PASS "$(echo "$out" | grep tcp_client)"
    else step "$t.tcp" FAIL "$(echo "$out" | tr '\n' ' ')"; fi
    [ "$t" = A ] && check_ovs_forwarding
    # kprobes attach and count while the VM pings
    local req="tun_net_xmit,__dev_queue_xmit,__netif_receive_skb,icmp_rcv"
    [ "$t" = A ] && req="ovs_dp_process_packet,$req"
    [ "$t" = B ] && req="br_handle_frame,$req"
    if out=$("$PY" "$LANE_DIR/kprobe_hits.py" --require "$req" -- \
            ip netns exec "$VM_NS" ping -n -c 5 -i 0.2 -W 3 "$REMOTE_IP" 2>&1); then
        step "$t.kprobes" PASS "$(echo "$out" | grep kprobe_hits)"
    else
        step "$t.kprobes" FAIL "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
    fi
    echo "$out" | tee "$OUT/kprobe-hits-$t.txt"
    # netem on the "NIC": ping RTT grows by the delay
    if netem_on 20ms; then
        out=$(do_ping 3 0.2 2>&1)
        netem_off
        local avg
        avg=$(echo "$out" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
        if [ -n "$avg" ] && awk -v a="$avg" 'BEGIN{exit !(a >= 20)}'; then
            step "$t.netem" PASS "rtt avg ${avg} ms with netem delay 20ms on $PHY"
        else
            step "$t.netem" FAIL "rtt avg '${avg}' ms: $(echo "$out" | tail -n2 | tr '\n' ' ')"
        fi
    else
        step "$t.netem" FAIL "tc qdisc add netem failed"
    fi
}

# ------------------------------------------------------------------ the tool
# Every traced run starts TWO instances side by side on the same traffic:
#   --attach kprobe     and     --attach tracepoint
# both "--output json --vm-dev vnltap0 --phy-dev vnlphy0 --verbose". The traffic starts
# once both print "Tracing"; tcpdump on the devices (--immediate-mode) is the packet
# oracle, the generators' own counts and ovs-dpctl's lookup counters are the others.
# Each run leaves runs/NAME/: {kprobe,tracepoint}.{jsonl,stderr,rc,pid}, DEV.pcap,
# DEV.tcpdump.stderr, oracle.jsonl (one JSON object a line), traffic.log, meta.json,
# kprobe_events.attached. tests/test_kguest.py (on the host) decides pass/fail from them.
METHODS="kprobe tracepoint"   # every run; the mix run adds auto and tp_btf instances
ALL_METHODS="kprobe tracepoint auto tp_btf"
TOOL_EXTRA=()                 # extra tool arguments of the current run (the drop run: --drops)
TOOL_MAX_RUN=${TOOL_MAX_RUN:-300}   # the tools' own --timeout: a safety net; the lane stops
                                    # them with SIGINT one second after the traffic
TFS=/sys/kernel/tracing
ORACLE=/dev/null
TOPO=

oracle() { printf '%s\n' "$1" >> "$ORACLE"; }

tool_start() { # tool_start DIR METHOD: the tool in the background; TOOL_PID is python's pid
    local d=$1 m=$2
    "$PY" "$TOOL" --attach "$m" --output json --vm-dev "$TAP" --phy-dev "$PHY" --verbose \
        --timeout "$TOOL_MAX_RUN" "${TOOL_EXTRA[@]}" > "$d/$m.jsonl" 2> "$d/$m.stderr" &
    TOOL_PID=$!
    echo "$TOOL_PID" > "$d/$m.pid"
}

wait_tracing() { # wait_tracing DIR METHOD...: 0 once every instance printed "Tracing"
    local d=$1 t0=$SECONDS m ok
    shift
    while :; do
        ok=1
        for m in "$@"; do
            grep -q '^Tracing' "$d/$m.stderr" 2>/dev/null && continue
            ok=0
            kill -0 "$(cat "$d/$m.pid")" 2>/dev/null || { say "--attach $m died before tracing"; return 1; }
        done
        [ $ok = 1 ] && return 0
        [ $((SECONDS - t0)) -ge "$TOOL_ATTACH_WAIT" ] && { say "no 'Tracing' after ${TOOL_ATTACH_WAIT}s"; return 1; }
        sleep 0.5
    done
}

tool_stop() { # tool_stop DIR METHOD...: SIGINT (the tool's Ctrl-C), SIGKILL after 60 s
    local d=$1 m pid i
    shift
    for m in "$@"; do kill -INT "$(cat "$d/$m.pid")" 2>/dev/null; done
    for m in "$@"; do
        pid=$(cat "$d/$m.pid")
        for i in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid"; echo $? > "$d/$m.rc"
    done
}

CAP_PIDS=()
capture_start() { # capture_start DIR DEV: tcpdump -w DIR/DEV.pcap, returns once it listens
    local d=$1 dev=$2 i
    tcpdump -i "$dev" -w "$d/$dev.pcap" --immediate-mode -U -n -s 256 ip \
        2> "$d/$dev.tcpdump.stderr" &
    CAP_PIDS+=($!)
    for i in $(seq 1 300); do
        grep -q 'listening on' "$d/$dev.tcpdump.stderr" 2>/dev/null && return 0
        sleep 0.1
    done
    say "tcpdump on $dev did not start: $(cat "$d/$dev.tcpdump.stderr")"
    return 1
}
capture_stop() {
    local p
    for p in "${CAP_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${CAP_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    CAP_PIDS=()
}

ovs_lookups() { # ovs_lookups WHEN: the datapath's hit/missed/lost counters into the oracle
    case "$TOPO" in A|G) ;; *) return 0 ;; esac
    local when=$1 l
    l=$(ovs-dpctl show 2>/dev/null | sed -n 's/.*lookups: hit:\([0-9]*\) missed:\([0-9]*\) lost:\([0-9]*\).*/\1 \2 \3/p' | head -n1)
    set -- $l
    oracle "$(printf '{"kind": "ovs_lookups", "when": "%s", "hit": %s, "missed": %s, "lost": %s}' \
        "$when" "${1:-null}" "${2:-null}" "${3:-null}")"
}

ping_oracle() { # ping_oracle FROM DST OUTPUT: transmitted/received of one ping run
    local n
    n=$(echo "$3" | sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p')
    set -- "$1" "$2" $n
    oracle "$(printf '{"kind": "ping", "from": "%s", "dst": "%s", "transmitted": %s, "received": %s}' \
        "$1" "$2" "${3:-null}" "${4:-null}")"
}

flows_reset() { # datapath flows deleted: the next packet of every flow is an upcall
    case "$TOPO" in A|G) ;; *) return 0 ;; esac
    ovs-dpctl del-flows && oracle '{"kind": "del_flows"}'
}

# traffic of one run: every generator's own counts go to the oracle
traffic_mix() { # VM <-> remote: ICMP, UDP, TCP; on A the flows are deleted before each
    local rc=0 out
    flows_reset
    out=$(do_ping 5 0.2) || rc=1
    echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    flows_reset
    out=$(do_udp 10) || rc=1
    echo "$out"; echo "$out" | grep '^{' | while read -r l; do oracle "$l"; done
    flows_reset
    out=$(do_tcp 3) || rc=1
    echo "$out"; echo "$out" | grep '^{' | while read -r l; do oracle "$l"; done
    return $rc
}

traffic_netem() { # VM -> remote pings through netem delay 20ms on the "NIC" (see tool_cases)
    local rc=0 out
    tc qdisc show dev "$PHY" | grep -q "netem" || return 1
    oracle '{"kind": "netem", "dev": "'"$PHY"'", "delay_ms": 20}'
    out=$(do_ping 8 0.2) || rc=1
    echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    return $rc
}

traffic_drop() { # VM -> remote pings into netem loss 100% on the "NIC": every one dropped
    local out
    tc qdisc show dev "$PHY" | grep -q "loss 100%" || return 1
    oracle '{"kind": "netem_loss", "dev": "'"$PHY"'", "loss_percent": 100}'
    out=$(do_ping 5 0.2)        # exits 1: no replies, as intended
    echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    return 0
}

traffic_vhost() { # VM <-> remote through vhost-net: ICMP and UDP
    local rc=0 out
    out=$(do_ping 5 0.2) || rc=1
    echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    out=$(do_udp 10) || rc=1
    echo "$out"; echo "$out" | grep '^{' | while read -r l; do oracle "$l"; done
    return $rc
}

vhost_case() { # topology B again, the tap served by the kernel's vhost-net worker
    modprobe vhost_net || { step B.vhost FAIL "modprobe vhost_net"; return 1; }
    kill "$VMSTUB_PID" 2>/dev/null; wait "$VMSTUB_PID" 2>/dev/null   # its tap goes with it
    rm -f /run/vmstub.ready
    "$LANE_DIR/bin/vhoststub" "$TAP" "$VMLINK" /run/vmstub.ready \
        -name guest=vhost-vm,debug-threads=on 2>"$OUT/vhoststub.log" &
    VMSTUB_PID=$!
    local i
    for i in $(seq 1 100); do [ -s /run/vmstub.ready ] && break; sleep 0.1; done
    [ -s /run/vmstub.ready ] || { step B.vhost FAIL "vhoststub: $(cat "$OUT/vhoststub.log")"; return 1; }
    sysctl -qw "net.ipv6.conf.$TAP.disable_ipv6=1" 2>/dev/null
    ip link set "$TAP" master "$LBR" || { step B.vhost FAIL "tap not on $LBR"; return 1; }
    warm_up
    run_pair "B-vhost" traffic_vhost "$TAP" "$PHY"
}

traffic_cost() { # VM <-> remote: ICMP and a bigger UDP burst, for the programs' run time
    local rc=0 out
    out=$(do_ping 5 0.2) || rc=1
    echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    out=$(do_udp "$COST_UDP") || rc=1
    echo "$out"; echo "$out" | grep '^{' | while read -r l; do oracle "$l"; done
    return $rc
}
COST_UDP=200

cost_case() { # tp_btf and raw tracepoints side by side: what each costs the kernel
    # kernel.bpf_stats_enabled only while the traffic runs (run_pair), then each
    # instance's programs are read from /proc (prog_cost.py): both see the same events,
    # so the run counts must agree and the run times compare the two methods on one run.
    # Twice, in both attach orders: under emulation the same program (kfree_skb's, raw in
    # both) was seen to cost 1.2-8.7 times as much in one instance as in the other
    RUN_METHODS="tracepoint tp_btf" BPF_STATS=1 run_pair "$TOPO-cost" traffic_cost "$TAP" "$PHY"
    RUN_METHODS="tp_btf tracepoint" BPF_STATS=1 run_pair "$TOPO-cost-reversed" traffic_cost \
        "$TAP" "$PHY"
}

traffic_host() { # remote -> the host's own address on the switch: ICMP, UDP, TCP
    local rc=0 out spid i
    out=$(in_remote ping -n -c 5 -i 0.2 -W 3 "$HOST_IP") || rc=1
    echo "$out"; ping_oracle remote "$HOST_IP" "$out"
    rm -f /run/hudp.ready
    "$PY" "$LANE_DIR/traffic.py" udp-server --bind "$HOST_IP" --port "$HOST_UDP_PORT" \
        --count 10 --timeout 60 --ready /run/hudp.ready > /run/hudp.out &
    spid=$!
    for i in $(seq 1 200); do [ -e /run/hudp.ready ] && break; sleep 0.1; done
    out=$(in_remote "$PY" "$LANE_DIR/traffic.py" udp-burst --src "$REMOTE_IP" --sport "$HOST_UDP_SPORT" \
        --dst "$HOST_IP" --dport "$HOST_UDP_PORT" --count 10) || rc=1
    wait "$spid"
    echo "$out"; cat /run/hudp.out
    for l in "$out" "$(cat /run/hudp.out)"; do oracle "$l"; done
    rm -f /run/htcp.ready
    "$PY" "$LANE_DIR/traffic.py" tcp-server --bind "$HOST_IP" --port "$HOST_TCP_PORT" \
        --timeout 60 --ready /run/htcp.ready > /run/htcp.out &
    spid=$!
    for i in $(seq 1 200); do [ -e /run/htcp.ready ] && break; sleep 0.1; done
    out=$(in_remote "$PY" "$LANE_DIR/traffic.py" tcp-client --src "$REMOTE_IP" --sport "$HOST_TCP_SPORT" \
        --dst "$HOST_IP" --dport "$HOST_TCP_PORT" --messages 3) || rc=1
    wait "$spid"
    echo "$out"; cat /run/htcp.out
    for l in "$out" "$(cat /run/htcp.out)"; do oracle "$l"; done
    return $rc
}

run_pair() { # run_pair NAME TRAFFIC_FN CAPTURE_DEV...: the instances of $RUN_METHODS
    local name=$1 traffic=$2 METHODS=${RUN_METHODS:-$METHODS}
    shift 2
    local d="$OUT/runs/$name" m t0=$SECONDS t_att t_traffic trc=0 dev
    mkdir -p "$d"
    ORACLE="$d/oracle.jsonl"; : > "$ORACLE"
    say "run $name: --attach ${METHODS// / and --attach } side by side (waiting for 'Tracing')"
    local started=""
    for m in $METHODS; do
        tool_start "$d" "$m"
        started+=" $m"
        # cost runs attach one instance after the other: a tracepoint calls its programs
        # in the order they attached, and under emulation the order moved a program's
        # cost several times over
        [ -n "${BPF_STATS:-}" ] && { wait_tracing "$d" $started || break; }
    done
    if ! wait_tracing "$d" $METHODS; then
        tool_stop "$d" $METHODS
        for m in $METHODS; do say "stderr --attach $m:"; tail -n 20 "$d/$m.stderr" | sed 's/^/    /'; done
        step "run.$name" FAIL "the tool did not start tracing (both methods)"
        return 1
    fi
    t_att=$((SECONDS - t0))
    cat "$TFS/kprobe_events" > "$d/kprobe_events.attached" 2>&1
    for dev in "$@"; do capture_start "$d" "$dev"; done
    say "run $name: both tracing after ${t_att}s; traffic: $traffic"
    ovs_lookups before
    local stats_was
    if [ -n "${BPF_STATS:-}" ]; then
        stats_was=$(sysctl -n kernel.bpf_stats_enabled)
        sysctl -qw kernel.bpf_stats_enabled=1
    fi
    t_traffic=$SECONDS
    "$traffic" > "$d/traffic.log" 2>&1 || trc=1
    t_traffic=$((SECONDS - t_traffic))
    sleep 1     # the last ACK/FIN and anything still in a queue
    if [ -n "${BPF_STATS:-}" ]; then
        # counting stops first: then every instance's counts cover the same events
        sysctl -qw kernel.bpf_stats_enabled="$stats_was"
        local pids=()
        for m in $METHODS; do pids+=("$m=$(cat "$d/$m.pid")"); done
        "$PY" "$LANE_DIR/prog_cost.py" "$d/prog_cost.json" "${pids[@]}" 2>&1 | sed 's/^/    /'
    fi
    ovs_lookups after
    capture_stop
    tool_stop "$d" $METHODS
    printf '{"name": "%s", "topology": "%s", "traffic": "%s", "attach_s": %s, "traffic_s": %s, "total_s": %s, "traffic_rc": %s, "vmstub_pid": %s, "capture_devs": "%s", "methods": "%s", "extra": "%s"}\n' \
        "$name" "$TOPO" "$traffic" "$t_att" "$t_traffic" "$((SECONDS - t0))" "$trc" "${VMSTUB_PID:-null}" "$*" "$METHODS" "${TOOL_EXTRA[*]}" > "$d/meta.json"
    local verdict vrc=0 line
    for m in $METHODS; do
        line=$("$PY" "$LANE_DIR/check_tool_output.py" --samples 0 --case "$TOPO-$m-${name#*-}" \
            "$d/$m.jsonl" "$d/$m.rc" 2>&1) || vrc=1
        echo "$line" | sed 's/^/    /'
        verdict+="$m: $(echo "$line" | tail -n1 | cut -c1-160); "
    done
    for dev in "$@"; do verdict+="$dev: $(grep -h 'captured\|dropped by kernel' "$d/$dev.tcpdump.stderr" | tr '\n' ' ')"; done
    [ $trc = 0 ] || { vrc=1; verdict+=" traffic failed: $(tail -n 3 "$d/traffic.log" | tr '\n' ' ')"; }
    say "run $name: ${t_att}s to attach, ${t_traffic}s of traffic, $((SECONDS - t0))s in all"
    if [ $vrc = 0 ]; then step "run.$name" PASS "$verdict"; else step "run.$name" FAIL "$verdict"; fi
}

warm_up() { # untraced: ARP, MAC learning and datapath flows in place before a run
    do_ping 2 0.2 >/dev/null 2>&1
}

sigkill_case() { # a kprobe instance killed with SIGKILL: what stays registered?
    local d="$OUT/sigkill" pid i t0 left
    mkdir -p "$d"
    say "sigkill: starting one --attach kprobe instance"
    tool_start "$d" kprobe
    pid=$TOOL_PID
    if ! wait_tracing "$d" kprobe; then
        kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        step sigkill FAIL "the kprobe instance never printed Tracing"
        return 1
    fi
    grep -h '^prog_id:' /proc/"$pid"/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -un > "$d/prog_ids.txt"
    ls -l /proc/"$pid"/fd > "$d/fds.txt" 2>&1
    cat "$TFS/kprobe_events" > "$d/kprobe_events.running"
    bpftool -j prog show > "$d/bpftool-prog.running.json" 2>&1
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null; echo $? > "$d/kprobe.rc"
    # the kernel frees the programs once the last reference (fd, perf event, link) is gone
    t0=$(date +%s.%N)
    for i in $(seq 1 200); do
        bpftool -j prog show > "$d/bpftool-prog.after_kill.json" 2>&1
        left=$("$PY" -c 'import json,sys; ids={int(x) for x in open(sys.argv[1]).read().split()}
print(len(ids & {p["id"] for p in json.load(open(sys.argv[2]))}))' "$d/prog_ids.txt" "$d/bpftool-prog.after_kill.json")
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    cat "$TFS/kprobe_events" > "$d/kprobe_events.after_kill"
    # How an event can be removed from kprobe_events (evidence for the report): Python's
    # open(path, "a") seeks to the end, which tracefs' seq_file refuses (EINVAL);
    # os.open(O_WRONLY | O_APPEND) does not seek. Tried on an event of our own.
    local diag="p_vnl_diag_bcc_$pid"
    echo "p:kprobes/$diag tun_net_xmit" >> "$TFS/kprobe_events"
    "$PY" - "$TFS/kprobe_events" "$diag" > "$d/remove_diag.json" 2>&1 <<'PYEOF'
import json, os, sys
path, name = sys.argv[1], sys.argv[2]
out = {"event": name, "present_before": name in open(path).read()}
try:
    with open(path, "a") as f:
        f.write("-:%s\n" % name)
    out["python_open_a"] = "ok"
except (IOError, OSError) as e:
    out["python_open_a"] = "%s: %s" % (type(e).__name__, e)
out["present_after_open_a"] = name in open(path).read()
try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, ("-:%s\n" % name).encode())
    finally:
        os.close(fd)
    out["os_open_wronly_append"] = "ok"
except OSError as e:
    out["os_open_wronly_append"] = "%s: %s" % (type(e).__name__, e)
out["present_after_os_open"] = name in open(path).read()
print(json.dumps(out))
PYEOF
    # What BCC writes to kprobe_events where the kernel has no kprobe PMU (the legacy
    # interface): an event named after the (now dead) pid. The next run must remove it.
    local planted="p_tun_net_xmit_bcc_$pid"
    if echo "p:kprobes/$planted tun_net_xmit" >> "$TFS/kprobe_events"; then
        echo "$planted" > "$d/planted_event.txt"
    fi
    cat "$TFS/kprobe_events" > "$d/kprobe_events.planted"
    printf '{"pid": %s, "prog_ids": %s, "programs_left": %s, "programs_gone_after_s": %s, "planted": "%s"}\n' \
        "$pid" "$(wc -l < "$d/prog_ids.txt")" "${left:-null}" \
        "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b - a}')" "$planted" > "$d/meta.json"
    step sigkill PASS "pid $pid killed; $(wc -l < "$d/prog_ids.txt") program ids, $left left after the kill; kprobe_events after the kill: $(grep -c "_bcc_$pid" "$d/kprobe_events.after_kill") entries of it; planted $planted for the next run"
}

host_addr() { # host_addr add|del: the host's own address on the switch
    local br=$OVSBR
    [ "$TOPO" = B ] && br=$LBR
    ip addr "$1" "$HOST_IP/24" dev "$br"
}

static_arp() { # the VM and the remote know each other: no ARP during the traced runs
    local vm_mac remote_mac rdev=${1:-eth0}   # the remote's device holding 10.77.0.3
    vm_mac=$(in_vm cat /sys/class/net/eth0/address)
    remote_mac=$(in_remote cat "/sys/class/net/$rdev/address")
    in_vm ip neigh replace "$REMOTE_IP" lladdr "$remote_mac" dev eth0 nud permanent
    in_remote ip neigh replace "$VM_IP" lladdr "$vm_mac" dev "$rdev" nud permanent
}

tool_cases() { # tool_cases TOPO
    TOPO=$1
    local t=$1
    static_arp
    if [ "$t" = A ]; then
        # Datapath flows must stay while idle, so that only the runs that delete them see
        # upcalls. ovs-vswitchd runs in a time namespace 1000 s ahead (see start_ovs), while
        # the kernel reports a flow's last use on the host's clock: to vswitchd every used
        # flow looks idle for 1000 s, and with the default max-idle (10 s) its revalidators
        # delete the flows within a second. A max-idle of one hour keeps them.
        ovs-vsctl set Open_vSwitch . other_config:max-idle=3600000
        ovs-vsctl set bridge "$OVSBR" other_config:mac-aging-time=3600
    fi
    warm_up
    RUN_METHODS=$ALL_METHODS run_pair "$t-mix" traffic_mix "$TAP" "$PHY"
    warm_up
    # netem in place before the tracers start, and warmed up untraced: under emulation
    # the first packets through code never run before (netem's timer and dequeue) were
    # seen to leave 4 ms late, which is the emulator translating, not the qdisc's delay
    netem_on 20ms
    in_vm ping -n -c 3 -i 0.2 -W 3 "$REMOTE_IP" > /dev/null 2>&1
    run_pair "$t-netem" traffic_netem "$TAP" "$PHY"
    netem_off
    # drops with reasons: netem loses every packet at the "NIC"'s qdisc (phy_queue)
    tc qdisc add dev "$PHY" root netem loss 100%
    TOOL_EXTRA=(--drops)
    run_pair "$t-drop" traffic_drop "$TAP"
    TOOL_EXTRA=()
    netem_off
    host_addr add
    in_remote ping -n -c 2 -i 0.2 -W 3 "$HOST_IP" > /dev/null 2>&1   # ARP, MAC learning
    run_pair "$t-host" traffic_host "$TAP" "$PHY"
    host_addr del
    [ "$t" = A ] && sigkill_case
    [ "$t" = B ] && cost_case
    [ "$t" = B ] && vhost_case
    TOPO=
}

# ------------------------------------------------------------------ main
lane_main() {
    local cases=${1:-all} want_a=0 want_b=0 want_g=0 want_tool=0 c
    [ "$cases" = all ] && cases=A,B,G,tool
    for c in ${cases//,/ }; do
        case "$c" in A) want_a=1 ;; B) want_b=1 ;; G) want_g=1 ;; tool) want_tool=1 ;; esac
    done
    mkdir -p "$OUT"; : > "$STEPS"
    say "lane start: cases=$cases"
    prepare_kernel
    if [ $want_tool = 1 ]; then
        if [ -f "$TOOL" ]; then
            if "$PY" "$TOOL" --list-stages > "$OUT/list-stages.txt" 2>&1; then
                step tool.list_stages PASS "$(tr '\n' ' ' < "$OUT/list-stages.txt" | cut -c1-200)"
            else
                step tool.list_stages FAIL "$(tail -n 3 "$OUT/list-stages.txt" | tr '\n' ' ')"
            fi
            cat "$OUT/list-stages.txt"
            # what each method traces on this kernel: the tests' expected stages
            for m in $ALL_METHODS; do
                "$PY" "$TOOL" --list-stages --output json --attach "$m" \
                    > "$OUT/list-stages-$m.json" 2>&1 ||
                    step "tool.list_stages_$m" FAIL "$(tail -n 3 "$OUT/list-stages-$m.json" | tr '\n' ' ')"
            done
        else
            step tool SKIP "no $TOOL in the payload"
            want_tool=0
        fi
    fi
    if [ $want_a = 1 ]; then
        if start_ovs; then step ovs_start PASS "ovs-vswitchd $(ovs-vswitchd --version | head -n1 | awk '{print $NF}')"
        else step ovs_start FAIL "see /var/log/openvswitch"; fi
        if topo_a_up; then
            step A.topology PASS "$OVSBR: $TAP + $PHY"
            basic_traffic_checks A
            [ $want_tool = 1 ] && tool_cases A
        else
            step A.topology FAIL "could not build topology A"
        fi
        topo_down
        cp /var/log/openvswitch/*.log "$OUT/" 2>/dev/null
        [ $want_g = 1 ] || stop_ovs
    fi
    if [ $want_g = 1 ]; then
        [ $want_a = 1 ] || start_ovs || step ovs_start FAIL "see /var/log/openvswitch"
        if topo_g_up; then
            step G.topology PASS "$OVSBR: $TAP + geneve (genev_sys_6081, VNI $GENEVE_VNI) over $PHY"
            if out=$(do_ping 3 0.2 2>&1); then step G.ping PASS "$(echo "$out" | tail -n1)"
            else step G.ping FAIL "$(echo "$out" | tail -n2 | tr '\n' ' ')"; fi
            [ $want_tool = 1 ] && geneve_case
        else
            step G.topology FAIL "could not build topology G"
        fi
        topo_down
        cp /var/log/openvswitch/ovs-vswitchd.log "$OUT/ovs-vswitchd-G.log" 2>/dev/null
        stop_ovs
    fi
    if [ $want_b = 1 ]; then
        if topo_b_up; then
            step B.topology PASS "$LBR: $TAP + $PHY"
            basic_traffic_checks B
            [ $want_tool = 1 ] && tool_cases B
        else
            step B.topology FAIL "could not build topology B"
        fi
        topo_down
    fi
    say "steps:"; column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
    say "lane end: $FAILS failed step(s)"
    [ "$FAILS" = 0 ]
}

if [ -z "${KGUEST_LIB:-}" ]; then
    trap 'topo_down; stop_ovs' EXIT
    lane_main "$@"
fi
