#!/bin/bash
# guest_lane.sh [CASES] - the kguest lane, run inside the QEMU guest as root.
#
# CASES: comma list of  A (OVS kernel datapath topology), B (Linux bridge topology),
#        G (OVS with a Geneve port), V (Linux bridge on a VLAN of a bond), O (OVS with a
#        bond port and a second VM), M (the VM on a macvtap), tool (run
#        vm_network_latency.py on the topologies selected), J (one of two hosts joined
#        by a QEMU socket link: run_lane.sh --join), or "all" (all but J).
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
# topologies V, O, M: the bond and its second "NIC", the macvtap, the second VM
BOND=vnlbond0 PHY2=vnlphy1 VLAN_ID=100 MVT=vnlmvt0
TAP2=vnltap1 VMLINK2=vnlvm1 VM2_NS=vm2 VM2_IP=10.77.0.4
VMSTUB2_PID=
CAP_FILTER=ip         # what tcpdump keeps (V: VLAN-tagged frames too)
TOOL_DEVS=(--vm-dev "$TAP" --phy-dev "$PHY")   # V, O, M: none, as a user's first run

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
    for m in openvswitch tun veth bridge sch_netem 8021q macvtap; do
        modprobe "$m" || { say "modprobe $m failed"; ok=0; }
    done
    # no bond0 of its own: only the bonds the lane makes
    modprobe bonding max_bonds=0 || { say "modprobe bonding failed"; ok=0; }
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
    [ $ok = 1 ] && step modules PASS "openvswitch tun veth bridge sch_netem 8021q macvtap bonding" \
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
    [ -n "${2:-}" ] && { "$2" || return 1; }     # what must exist before the stub (M)
    start_vmstub "${STUB_DEV:-$TAP}" "$VMLINK" vmstub "$1" || return 1
    VMSTUB_PID=$STUB_PID
    sysctl -qw "net.ipv6.conf.${STUB_DEV:-$TAP}.disable_ipv6=1" \
        "net.ipv6.conf.$PHY.disable_ipv6=1" "net.ipv6.conf.$VMLINK.disable_ipv6=1" 2>/dev/null
    return 0
}

start_vmstub() { # start_vmstub DEV LINK NAME TOPO: a stand-in VM on DEV; STUB_PID
    rm -f "/run/$3.ready"
    "$LANE_DIR/bin/vmstub" "$1" "$2" "/run/$3.ready" 2>"$OUT/$3-$4.log" &
    STUB_PID=$!
    local i
    for i in $(seq 1 100); do [ -s "/run/$3.ready" ] && break; sleep 0.1; done
    [ -s "/run/$3.ready" ] || { say "$3 did not start: $(cat "$OUT/$3-$4.log")"; return 1; }
}

# A second VM (namespace vm2, 10.77.0.4) on tap vnltap1, which the caller puts on its switch
setup_second_vm() {
    ip netns add "$VM2_NS"
    ip netns exec "$VM2_NS" ip link set lo up
    ip netns exec "$VM2_NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip link add "$VMLINK2" type veth peer name eth0 netns "$VM2_NS"
    ip netns exec "$VM2_NS" ip addr add "$VM2_IP/24" dev eth0
    ip netns exec "$VM2_NS" ethtool -K eth0 tx off tso off gso off sg off >/dev/null 2>&1
    ip netns exec "$VM2_NS" ip link set eth0 up
    ip link set "$VMLINK2" up
    start_vmstub "$TAP2" "$VMLINK2" vmstub2 "$1" || return 1
    VMSTUB2_PID=$STUB_PID
    sysctl -qw "net.ipv6.conf.$TAP2.disable_ipv6=1" "net.ipv6.conf.$VMLINK2.disable_ipv6=1" 2>/dev/null
}

# The host's "NICs" bonded: vnlphy0 (from setup_endpoints) and vnlphy1, both veths into
# namespace remote, where their peers eth0 and eth1 are a bond of the same mode too
# (rbond; a VLAN rbond.100 on it for V), holding 10.77.0.3. Active-backup bonds prefer
# vnlphy0 / eth0: which slave is active is known.
setup_bond() { # setup_bond MODE [VLAN]
    local mode=$1 vlan=${2:-} rdev=rbond
    ip link add "$PHY2" type veth peer name eth1 netns "$REMOTE_NS" || return 1
    in_remote ip addr flush dev eth0
    in_remote ip link add rbond type bond mode "$mode" miimon 100 || return 1
    ip link add "$BOND" type bond mode "$mode" miimon 100 || return 1
    local d
    for d in eth0 eth1; do in_remote ip link set "$d" down; in_remote ip link set "$d" master rbond || return 1; done
    for d in "$PHY" "$PHY2"; do ip link set "$d" down; ip link set "$d" master "$BOND" || return 1; done
    if [ "$mode" = active-backup ]; then
        ip link set "$BOND" type bond primary "$PHY"
        in_remote ip link set rbond type bond primary eth0
    fi
    in_remote ip link set rbond up
    ip link set "$BOND" up
    ip link set "$PHY" up
    ip link set "$PHY2" up
    if [ -n "$vlan" ]; then
        in_remote ip link add link rbond name rbond.$vlan type vlan id "$vlan" || return 1
        in_remote ip link set rbond.$vlan up
        ip link add link "$BOND" name "$BOND.$vlan" type vlan id "$vlan" || return 1
        ip link set "$BOND.$vlan" up
        rdev=rbond.$vlan
    fi
    in_remote ip addr add "$REMOTE_IP/24" dev "$rdev"
    REMOTE_DEV=$rdev
    local i
    for i in $(seq 1 50); do
        grep -q "^MII Status: up" /proc/net/bonding/$BOND && \
            in_remote grep -q "^MII Status: up" /proc/net/bonding/rbond && break
        sleep 0.1
    done
    cat "/proc/net/bonding/$BOND" > "$OUT/bond-$mode.txt"
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

# TOPOLOGY V: production's "br0 -> bond0.100 -> bond0 -> eth0/eth1": the Linux bridge
# vnlbr0 with the tap and VLAN 100 of an active-backup bond of vnlphy0 and vnlphy1.
topo_v_up() {
    setup_endpoints V || return 1
    setup_bond active-backup "$VLAN_ID" || return 1
    ip link add "$LBR" type bridge stp_state 0 forward_delay 0 || return 1
    ip link set "$TAP" master "$LBR" || return 1
    ip link set "$BOND.$VLAN_ID" master "$LBR" || return 1
    ip link set "$LBR" up
}

# TOPOLOGY O: OVS ovsbr0 with the tap, a second VM's tap vnltap1 and a balance-xor bond
# of vnlphy0 and vnlphy1 as its uplink port (a Linux bond, not OVS's own bonding)
topo_o_up() {
    setup_endpoints O || return 1
    setup_bond balance-xor || return 1
    setup_second_vm O || return 1
    ovs-vsctl --timeout=30 add-br "$OVSBR" -- set bridge "$OVSBR" datapath_type=system || return 1
    ovs-vsctl --timeout=30 add-port "$OVSBR" "$TAP" -- add-port "$OVSBR" "$TAP2" -- \
        add-port "$OVSBR" "$BOND" || return 1
    ip link set "$OVSBR" up
}

# TOPOLOGY M: libvirt's <interface type='direct'>: the VM on macvtap vnlmvt0 (bridge
# mode) of vnlphy0 with the VM's MAC, held by vmstub through /dev/tapN; no switch
make_macvtap() {
    local mac
    mac=$(in_vm cat /sys/class/net/eth0/address)
    ip link add link "$PHY" name "$MVT" address "$mac" type macvtap mode bridge || return 1
    sysctl -qw "net.ipv6.conf.$MVT.disable_ipv6=1" 2>/dev/null
    ip link set "$MVT" up
}
topo_m_up() {
    STUB_DEV=$MVT setup_endpoints M make_macvtap
}

uplink_cases() { # uplink_cases V|O: the tool without device options on bonded uplinks
    TOPO=$1
    local t=$1
    static_arp "$REMOTE_DEV"
    if [ "$t" = O ]; then
        ovs-vsctl set Open_vSwitch . other_config:max-idle=3600000
        ovs-vsctl set bridge "$OVSBR" other_config:mac-aging-time=3600
        static_arp_vm2
    fi
    [ "$t" = V ] && CAP_FILTER="ip or (vlan and ip)"
    TOOL_DEVS=()
    warm_up
    [ "$t" = O ] && in_vm ping -n -c 2 -i 0.2 -W 3 "$VM2_IP" > /dev/null 2>&1
    run_pair "$t-mix" traffic_mix "$TAP" "$PHY" "$PHY2"
    [ "$t" = O ] && run_pair "O-vm2vm" traffic_vm2vm "$TAP" "$TAP2"
    [ "$t" = V ] && run_pair "V-failover" traffic_failover "$TAP" "$PHY" "$PHY2"
    TOOL_DEVS=(--vm-dev "$TAP" --phy-dev "$PHY")
    CAP_FILTER=ip
    TOPO=
}

macvtap_cases() {
    TOPO=M
    static_arp
    TOOL_DEVS=()
    warm_up
    run_pair "M-mix" traffic_mix "$MVT" "$PHY"
    TOOL_DEVS=(--vm-dev "$TAP" --phy-dev "$PHY")
    TOPO=
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
    local p
    for p in "$VMSTUB_PID" "$VMSTUB2_PID"; do
        [ -n "$p" ] && { kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; }
    done
    VMSTUB_PID= VMSTUB2_PID=
    rm -f /run/vmstub.ready /run/vmstub2.ready
    ovs-vsctl --timeout=10 --if-exists del-br "$OVSBR" 2>/dev/null
    ip addr flush dev "$PHY" 2>/dev/null
    ip link del "$LBR" 2>/dev/null
    ip link del "$MVT" 2>/dev/null
    ip link del "$BOND" 2>/dev/null
    ip link del "$PHY" 2>/dev/null
    ip link del "$PHY2" 2>/dev/null
    ip link del "$VMLINK" 2>/dev/null
    ip link del "$VMLINK2" 2>/dev/null
    ip netns del "$VM_NS" 2>/dev/null
    ip netns del "$VM2_NS" 2>/dev/null
    ip netns del "$REMOTE_NS" 2>/dev/null
    return 0
}

# ------------------------------------------------------------------ traffic
netem_on() { tc qdisc add dev "$PHY" root netem delay "${1:-20ms}"; }
netem_off() { tc qdisc del dev "$PHY" root 2>/dev/null || true; }

do_ping() { # do_ping COUNT [INTERVAL]
    in_vm ping -n -c "${1:-5}" -i "${2:-0.2}" -W 3 "$REMOTE_IP"
}

do_udp() { # do_udp COUNT [NS IP]: a burst 10.77.0.2:40000 -> 10.77.0.3:40001 (or IP in NS)
    local n=${1:-20} ns=${2:-$REMOTE_NS} dst=${3:-$REMOTE_IP} rc
    rm -f /run/udp.ready
    ip netns exec "$ns" "$PY" "$LANE_DIR/traffic.py" udp-server --bind "$dst" --port "$UDP_DPORT" \
        --count "$n" --timeout 60 --ready /run/udp.ready &
    local spid=$! i
    for i in $(seq 1 200); do [ -e /run/udp.ready ] && break; sleep 0.1; done
    in_vm "$PY" "$LANE_DIR/traffic.py" udp-burst --src "$VM_IP" --sport "$UDP_SPORT" \
        --dst "$dst" --dport "$UDP_DPORT" --count "$n"
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

ping_step() { # ping_step TOPO: three pings from the VM, the step TOPO.ping
    local out
    if out=$(do_ping 3 0.2 2>&1); then step "$1.ping" PASS "$(echo "$out" | tail -n1)"
    else step "$1.ping" FAIL "$(echo "$out" | tail -n2 | tr '\n' ' ')"; fi
    echo "$out"
}

basic_traffic_checks() { # basic_traffic_checks TOPO
    local t=$1 out
    ping_step "$t"
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
    # PYTHONFAULTHANDLER: an instance that does not stop is sent SIGABRT (tool_stop),
    # on which Python prints every thread's traceback to its stderr
    PYTHONFAULTHANDLER=1 "$PY" "$TOOL" --attach "$m" --output json "${TOOL_DEVS[@]}" --verbose \
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

tool_stop() { # tool_stop DIR METHOD...: SIGINT (the tool's Ctrl-C); 60 s later SIGABRT
    # (its threads' tracebacks, where it was stuck) and SIGKILL
    local d=$1 m pid i t0=$SECONDS
    shift
    for m in "$@"; do kill -INT "$(cat "$d/$m.pid")" 2>/dev/null; done
    for m in "$@"; do
        pid=$(cat "$d/$m.pid")
        for i in $(seq 1 600); do
            kill -0 "$pid" 2>/dev/null || break
            [ $((SECONDS - t0)) -ge 60 ] && break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "--attach $m still running 60 s after SIGINT: SIGABRT, then SIGKILL"
            cat "/proc/$pid/stack" > "$d/$m.stuck-stack" 2>&1
            kill -ABRT "$pid" 2>/dev/null
            sleep 2
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid"; echo $? > "$d/$m.rc"
    done
    echo "$((SECONDS - t0))" > "$d/stop_s"
}

CAP_PIDS=()
capture_start() { # capture_start DIR DEV: tcpdump -w DIR/DEV.pcap, returns once it listens
    local d=$1 dev=$2 i
    tcpdump -i "$dev" -w "$d/$dev.pcap" --immediate-mode -U -n -s 256 $CAP_FILTER \
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
    case "$TOPO" in A|G|O) ;; *) return 0 ;; esac
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

traffic_vhost_starved() { # the same, then the worker starved by a hog (--explain)
    local rc=0
    traffic_vhost || rc=1
    traffic_starved_worker || rc=1
    return $rc
}

vhost_case() { # topology B again, the tap served by the kernel's vhost-net worker
    modprobe vhost_net || { step B.vhost FAIL "modprobe vhost_net"; return 1; }
    kill "$VMSTUB_PID" 2>/dev/null; wait "$VMSTUB_PID" 2>/dev/null   # its tap goes with it
    rm -f /run/vmstub.ready
    VHOSTSTUB_LOG="$OUT/vhost-log.txt" "$LANE_DIR/bin/vhoststub" "$TAP" "$VMLINK" \
        /run/vmstub.ready -name guest=vhost-vm,debug-threads=on 2>"$OUT/vhoststub.log" &
    VMSTUB_PID=$!
    local i
    for i in $(seq 1 100); do [ -s /run/vmstub.ready ] && break; sleep 0.1; done
    [ -s /run/vmstub.ready ] || { step B.vhost FAIL "vhoststub: $(cat "$OUT/vhoststub.log")"; return 1; }
    sysctl -qw "net.ipv6.conf.$TAP.disable_ipv6=1" 2>/dev/null
    ip link set "$TAP" master "$LBR" || { step B.vhost FAIL "tap not on $LBR"; return 1; }
    warm_up
    # with --explain: the records of the worker's starved reads say why they waited
    TOOL_EXTRA=(--explain 1000)
    run_pair "B-vhost" traffic_vhost_starved "$TAP" "$PHY"
    TOOL_EXTRA=()
    # vhost-net unloaded again: the cases after this one trace what they traced before
    # it (with vhost_net loaded every kprobe instance also compiles and attaches the
    # vhost stages, which under emulation costs each lane minutes)
    # (rmmod: modprobe -r would take tun with it, /dev/net/tun and all)
    kill "$VMSTUB_PID" 2>/dev/null; wait "$VMSTUB_PID" 2>/dev/null
    rmmod vhost_net 2>/dev/null
}

vhost_worker_tid() { # the vhost-net worker serving process $1: a kernel thread vhost-$1
    # (before 6.4) or a thread of the process named so (6.4 on)
    local f
    for f in /proc/[0-9]*/task/[0-9]*/comm; do
        [ "$(cat "$f" 2>/dev/null)" = "vhost-$1" ] && { f=${f%/comm}; echo "${f##*/}"; return 0; }
    done
    return 1
}

# a busy loop in bursts of 20 ms, 10-50 ms apart at random (never in step with the pings), at
# SCHED_FIFO 10 on CPU 1, named vnl-hog
HOG_PY='
import ctypes, os, random, sys, time
ctypes.CDLL(None).prctl(15, b"vnl-hog", 0, 0, 0)
os.sched_setaffinity(0, {1})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
print(os.getpid(), flush=True)
while True:
    t = time.monotonic() + 0.02
    while time.monotonic() < t:
        pass
    time.sleep(random.uniform(0.01, 0.05))
'

traffic_starved_worker() { # remote -> VM and VM -> remote pings while a real-time hog
    # takes CPU 1 from the vhost worker (pinned there) 20 ms at a time: its reads (RX) and
    # its pick-ups after the guest's kicks (TX) wait in the run queue
    local worker hog rc=0 out vmping
    worker=$(vhost_worker_tid "$VMSTUB_PID") || { echo "no vhost-$VMSTUB_PID thread"; return 1; }
    "$PY" -c 'import os, sys; os.sched_setaffinity(int(sys.argv[1]), {1})' "$worker" || return 1
    "$PY" -c "$HOG_PY" > /run/hog.pid 2> /run/hog.err &
    hog=$!
    sleep 0.5
    # it runs, at real-time priority, on CPU 1 (chrt's and taskset's view of it)
    kill -0 "$hog" 2>/dev/null || { echo "the hog died: $(cat /run/hog.err)"; return 1; }
    echo "hog $hog: $(grep -E '^(policy|prio) ' "/proc/$hog/sched" | tr -s ' \n' ' ')"
    echo "hog $hog cpus: $(grep Cpus_allowed_list "/proc/$hog/status")"
    echo "worker $worker cpus: $(grep Cpus_allowed_list "/proc/$worker/status")"
    oracle '{"kind": "explain_hog", "hog_pid": '"$hog"', "worker_tid": '"$worker"', "cpu": 1, "hog_comm": "vnl-hog"}'
    grep -E '^(se.sum_exec_runtime|nr_switches|nr_involuntary_switches) ' "/proc/$hog/sched" "/proc/$worker/sched"
    in_vm ping -n -c 40 -i 0.1 -W 3 "$REMOTE_IP" > /run/vmping.out 2>&1 &
    vmping=$!
    out=$(in_remote ping -n -c 40 -i 0.1 -W 3 "$VM_IP") || rc=1
    wait "$vmping" || rc=1
    grep -E '^(se.sum_exec_runtime|nr_switches|nr_involuntary_switches) ' "/proc/$hog/sched" "/proc/$worker/sched"
    cat /proc/sys/kernel/sched_rt_runtime_us /proc/sys/kernel/sched_rt_period_us
    kill "$hog"; wait "$hog" 2>/dev/null
    "$PY" -c 'import os, sys; os.sched_setaffinity(int(sys.argv[1]), range(os.cpu_count()))' "$worker"
    echo "$out"; ping_oracle remote "$VM_IP" "$out"
    out=$(cat /run/vmping.out)
    echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    return $rc
}

traffic_vm2vm() { # VM -> the second VM on the same switch: pings, a UDP burst echoed back
    local rc=0 out
    oracle '{"kind": "vmstubs", "'"$TAP"'": '"$VMSTUB_PID"', "'"$TAP2"'": '"$VMSTUB2_PID"'}'
    out=$(in_vm ping -n -c 5 -i 0.2 -W 3 "$VM2_IP") || rc=1
    echo "$out"; ping_oracle vm "$VM2_IP" "$out"
    out=$(do_udp 10 "$VM2_NS" "$VM2_IP") || rc=1
    echo "$out"; echo "$out" | grep '^{' | while read -r l; do oracle "$l"; done
    return $rc
}

traffic_failover() { # VM -> remote pings every 50 ms; the active slave's link fails midway
    local out pid before after i
    before=$(cat "/sys/class/net/$BOND/bonding/active_slave")
    in_vm ping -n -c 60 -i 0.05 -W 3 "$REMOTE_IP" > /run/failover.ping 2>&1 &
    pid=$!
    sleep 1.5
    # its cable pulled: the peer goes down, vnlphy0 loses its carrier, the bonds' MII
    # monitors (100 ms) move both ends to the other link
    in_remote ip link set eth0 down
    for i in $(seq 1 50); do
        after=$(cat "/sys/class/net/$BOND/bonding/active_slave")
        [ "$after" != "$before" ] && break
        sleep 0.1
    done
    wait "$pid"
    out=$(cat /run/failover.ping); echo "$out"; ping_oracle vm "$REMOTE_IP" "$out"
    oracle '{"kind": "failover", "active_before": "'"$before"'", "active_after": "'"$after"'"}'
    in_remote ip link set eth0 up
    [ "$before" = "$PHY" ] && [ "$after" = "$PHY2" ]
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

static_arp_vm2() { # the two VMs know each other
    local vm_mac vm2_mac
    vm_mac=$(in_vm cat /sys/class/net/eth0/address)
    vm2_mac=$(ip netns exec "$VM2_NS" cat /sys/class/net/eth0/address)
    in_vm ip neigh replace "$VM2_IP" lladdr "$vm2_mac" dev eth0 nud permanent
    ip netns exec "$VM2_NS" ip neigh replace "$VM_IP" lladdr "$vm_mac" dev eth0 nud permanent
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
# CASE J (two hosts): this guest is host a or b ($JOIN_ROLE) of two QEMU guests whose
# virtio-net NICs are joined by a QEMU socket network device (UDP on the host's
# loopback: run_lane.sh --join). Each has a stand-in VM on a tap behind a bridge with
# its NIC:
#   ns vm: eth0 10.78.0.1 (a) / 10.78.0.2 (b)
#     | veth
#   vnlvm0 <-AF_PACKET-> vmstub <-fd-> vnltap0 -- vnlbr0 -- NIC ==socket== the other guest
#   (vnlbr0's own 10.78.0.101 / .102: the guests meet there, traffic.py barrier)
# Both run the tool with --write-events over the same traffic: each VM pings the other;
# a's VM sends UDP and TCP to b's, which echoes them; one UDP packet of 1028 bytes is
# dropped by a tc filter on b's NIC (tcpdump sees it there, the tool a drop). b's wall
# clock is set 5 minutes ahead first. The host joins the two recordings
# (tests/test_join_hosts.py), with tcpdump's captures of both NICs as the oracle.
JOIN_VM_A=10.78.0.1 JOIN_VM_B=10.78.0.2 JOIN_HOST_A=10.78.0.101 JOIN_HOST_B=10.78.0.102
JOIN_WALL_AHEAD_S=300 JOIN_DROP_LEN=1028
JOIN_PIDS=()

join_nic() { # the virtio-net NIC QEMU gave this guest
    local d
    for d in /sys/class/net/*; do
        [ "$(basename "$(readlink -f "$d/device/driver" 2>/dev/null)")" = virtio_net ] &&
            { basename "$d"; return 0; }
    done
    return 1
}

join_topology() { # join_topology ME_VM ME_HOST NIC
    ip netns add "$VM_NS" || return 1
    in_vm ip link set lo up
    in_vm sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1
    ip link add "$VMLINK" type veth peer name eth0 netns "$VM_NS" || return 1
    in_vm ip addr add "$1/24" dev eth0
    in_vm ethtool -K eth0 tx off tso off gso off sg off >/dev/null 2>&1
    in_vm ip link set eth0 up
    ip link set "$VMLINK" up
    start_vmstub "$TAP" "$VMLINK" vmstub J || return 1
    VMSTUB_PID=$STUB_PID
    ip link add "$LBR" type bridge stp_state 0 forward_delay 0 || return 1
    ip link set "$TAP" master "$LBR" || return 1
    ip link set "$3" master "$LBR" || return 1
    ip link set "$3" up
    ip link set "$LBR" up
    ip addr add "$2/24" dev "$LBR"
}

join_case() {
    local role=${JOIN_ROLE:-} me peer me_host peer_host nic d="$OUT/J" rc
    case "$role" in
    a) me=$JOIN_VM_A peer=$JOIN_VM_B me_host=$JOIN_HOST_A peer_host=$JOIN_HOST_B ;;
    b) me=$JOIN_VM_B peer=$JOIN_VM_A me_host=$JOIN_HOST_B peer_host=$JOIN_HOST_A ;;
    *) step J.topology FAIL "JOIN_ROLE is '$role', not a or b"; return ;;
    esac
    mkdir -p "$d"
    hostname "kguest-$role"
    modprobe virtio_net 2>/dev/null
    nic=$(join_nic) || { step J.topology FAIL "no virtio-net NIC (run_lane.sh --join)"; return; }
    echo "$nic" > "$d/nic"
    join_topology "$me" "$me_host" "$nic" || { step J.topology FAIL "could not build it"; return; }
    # both topologies up, the link working: the other guest answers
    if ! "$PY" "$LANE_DIR/traffic.py" barrier --bind "$me_host" --peer "$peer_host" --name up \
            --timeout 240 2> "$d/barrier-up.err"; then
        step J.topology FAIL "the other guest never came: $(cat "$d/barrier-up.err")"; return
    fi
    in_vm ping -n -c 3 -i 0.2 -W 3 "$peer" > "$d/warm-up.txt" 2>&1 ||
        { step J.topology FAIL "the VMs do not reach each other: $(tail -n 2 "$d/warm-up.txt")"; return; }
    step J.topology PASS "kguest-$role: $TAP + $nic on $LBR; the other guest's VM answers"
    if [ "$role" = b ]; then
        # the drop: UDP to the echo port with IP total length JOIN_DROP_LEN, on the NIC
        tc qdisc add dev "$nic" ingress &&
        tc filter add dev "$nic" parent ffff: protocol ip u32 match ip protocol 17 0xff \
            match ip dport "$UDP_DPORT" 0xffff match u16 "$JOIN_DROP_LEN" 0xffff at 2 action drop ||
            { step J.run FAIL "tc filter"; return; }
        "$PY" -c 'import sys, time
before = time.time()
time.clock_settime(time.CLOCK_REALTIME, before + float(sys.argv[1]))
print("wall clock set %s s ahead at %.6f (monotonic %.6f)" % (sys.argv[1], before,
      time.monotonic()))' "$JOIN_WALL_AHEAD_S" > "$d/wall.txt"
        in_vm "$PY" "$LANE_DIR/traffic.py" udp-server --bind "$me" --port "$UDP_DPORT" \
            --count 20 --timeout 900 > "$d/udp-server.json" &
        JOIN_PIDS+=($!)
        in_vm "$PY" "$LANE_DIR/traffic.py" tcp-server --bind "$me" --port "$TCP_DPORT" \
            --timeout 900 > "$d/tcp-server.json" &
        JOIN_PIDS+=($!)
    fi
    TOOL_DEVS=(--vm-dev "$TAP" --phy-dev "$nic")
    TOOL_EXTRA=(--drops --write-events "$d/host-$role.vnl")
    TOOL_MAX_RUN=1200
    tool_start "$d" auto
    if ! wait_tracing "$d" auto; then
        step J.run FAIL "the tool did not trace: $(tail -n 3 "$d/auto.stderr" | tr '\n' ' ')"
        tool_stop "$d" auto; return
    fi
    CAP_FILTER=ip capture_start "$d" "$nic" || { tool_stop "$d" auto; step J.run FAIL "tcpdump"; return; }
    say "J: tracing; waiting for the other guest's tool"
    rc=0
    "$PY" "$LANE_DIR/traffic.py" barrier --bind "$me_host" --peer "$peer_host" --name ready \
        --timeout 360 2> "$d/barrier-ready.err" || rc=1
    if [ $rc = 0 ]; then
        in_vm ping -n -c 10 -i 0.2 -W 3 "$peer" > "$d/ping.txt" 2>&1 || rc=1
        if [ "$role" = a ]; then
            in_vm "$PY" "$LANE_DIR/traffic.py" udp-burst --src "$me" --sport "$UDP_SPORT" \
                --dst "$peer" --dport "$UDP_DPORT" --count 20 > "$d/udp.json" || rc=1
            # dropped on b's NIC: no echo comes back (exit 1 expected)
            in_vm "$PY" "$LANE_DIR/traffic.py" udp-burst --src "$me" --sport "$UDP_SPORT" \
                --dst "$peer" --dport "$UDP_DPORT" --count 1 --size $((JOIN_DROP_LEN - 28)) \
                --reply-timeout 1 > "$d/udp-dropped.json"
            in_vm "$PY" "$LANE_DIR/traffic.py" tcp-client --src "$me" --sport "$TCP_SPORT" \
                --dst "$peer" --dport "$TCP_DPORT" --messages 10 > "$d/tcp.json" || rc=1
        fi
        "$PY" "$LANE_DIR/traffic.py" barrier --bind "$me_host" --peer "$peer_host" --name done \
            --timeout 240 2> "$d/barrier-done.err" || rc=1
    fi
    sleep 1
    capture_stop
    tool_stop "$d" auto
    local p
    for p in "${JOIN_PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    JOIN_PIDS=()
    [ "$role" = b ] && tc qdisc del dev "$nic" ingress 2>/dev/null
    if [ $rc = 0 ] && [ "$(cat "$d/auto.rc")" = 0 ]; then
        step J.run PASS "$(grep -h -o '"sent": [0-9]*\|[0-9]* received' "$d"/*.json "$d/ping.txt" | tr '\n' ' ')"
    else
        step J.run FAIL "traffic rc $rc, tool rc $(cat "$d/auto.rc"); $(cat "$d"/barrier-*.err | tr '\n' ' ')"
    fi
}

lane_main() {
    local cases=${1:-all} want_a=0 want_b=0 want_g=0 want_v=0 want_o=0 want_m=0 want_tool=0 c
    local want_j=0
    [ "$cases" = all ] && cases=A,B,G,V,O,M,tool
    for c in ${cases//,/ }; do
        case "$c" in A) want_a=1 ;; B) want_b=1 ;; G) want_g=1 ;; V) want_v=1 ;;
                     O) want_o=1 ;; M) want_m=1 ;; tool) want_tool=1 ;; J) want_j=1 ;; esac
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
            # --explain's histogram-mode programs (the walk at completion adding to the
            # shares, for all VMs and per VM) through the verifier of 5.10, the strictest of
            # the three (48 s under emulation: once); detailed mode's load in B-vhost on all
            if [ "${KGUEST_SUITE:-}" = bullseye ]; then
                if "$PY" "$TOOL" --explain --dry-run --attach tracepoint --mode histogram \
                        --per-vm > "$OUT/explain-verifier.txt" 2>&1; then
                    step tool.explain_verifier PASS "$(tail -n 1 "$OUT/explain-verifier.txt")"
                else
                    step tool.explain_verifier FAIL "$(grep -v '^note:' "$OUT/explain-verifier.txt" | tail -n 3 | tr '\n' ' ')"
                fi
            fi
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
        [ $want_g = 1 ] || [ $want_o = 1 ] || stop_ovs
    fi
    if [ $want_o = 1 ]; then
        [ $want_a = 1 ] || start_ovs || step ovs_start FAIL "see /var/log/openvswitch"
        if topo_o_up; then
            step O.topology PASS "$OVSBR: $TAP + $TAP2 + $BOND (balance-xor: $PHY $PHY2)"
            ping_step O > /dev/null
            [ $want_tool = 1 ] && uplink_cases O
        else
            step O.topology FAIL "could not build topology O"
        fi
        topo_down
        [ $want_g = 1 ] || stop_ovs
    fi
    if [ $want_g = 1 ]; then
        [ $want_a = 1 ] || [ $want_o = 1 ] || start_ovs || step ovs_start FAIL "see /var/log/openvswitch"
        if topo_g_up; then
            step G.topology PASS "$OVSBR: $TAP + geneve (genev_sys_6081, VNI $GENEVE_VNI) over $PHY"
            ping_step G > /dev/null
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
    if [ $want_v = 1 ]; then
        if topo_v_up; then
            step V.topology PASS "$LBR: $TAP + $BOND.$VLAN_ID (active-backup: $PHY $PHY2)"
            ping_step V > /dev/null
            [ $want_tool = 1 ] && uplink_cases V
        else
            step V.topology FAIL "could not build topology V"
        fi
        topo_down
    fi
    if [ $want_m = 1 ]; then
        if topo_m_up; then
            step M.topology PASS "$MVT (macvtap, bridge mode) on $PHY"
            ping_step M > /dev/null
            [ $want_tool = 1 ] && macvtap_cases
        else
            step M.topology FAIL "could not build topology M"
        fi
        topo_down
    fi
    if [ $want_j = 1 ]; then
        join_case
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
