#!/usr/bin/env bash
# A real two-node SLURM cluster on one Linux machine, for trying multi-node launches without a
# cluster: one slurmctld and one munged on this host, and two slurmd, each in its own network
# namespace with its own address on a private bridge (nodes n1 and n2). The file system is
# shared, as on a cluster. Needs root, iproute2, nsenter and Debian's slurmctld, slurmd,
# slurm-client and munge. All traffic stays on the bridge's addresses and the loopback.
#
#   tests/slurm/two_nodes.sh up DIR        start it; prints the SLURM_CONF line to export
#   tests/slurm/two_nodes.sh down DIR      stop everything and remove the namespaces
#   tests/slurm/two_nodes.sh kill-node DIR n2     cut n2's network, then kill every process in it
#   tests/slurm/two_nodes.sh revive-node DIR n2   reconnect n2 and start its slurmd again
#
# Then, for example:
#   export SLURM_CONF=DIR/slurm.conf
#   CONFIG=examples/configs/danube-tiny-cpu.yaml sbatch --nodes=2 --ntasks-per-node=2 \
#       --gpus-per-node=0 --cpus-per-task=1 slurm/pretrain_1.8b.sh
#
# Environment: TWO_NODES_SUBNET (default 10.213.77; pick one no interface here uses) and
# TWO_NODES_PREFIX (default danube; names the bridge, the veths and the namespaces),
# TWO_NODES_SLURMD_TIMEOUT (default 300, SLURM's: how long a silent node stays up in SLURM's
# view before its jobs end with NODE_FAIL) and TWO_NODES_CRED_EXPIRE (default 120, SLURM's:
# how long a requeued job waits before it starts again, so that requests still in flight for
# the job's previous run reach no task of the next). The scheduler looks every 2 s (SLURM's
# default: every 30 s), so a requeued job starts when its hold ends, not up to 30 s later; and
# after a node's loss the job ends 5 s after SLURM signals what is left of it (KillWait; 30 s
# by default), since the lost node's tasks never answer.
set -euo pipefail

action=${1:-}
dir=${2:-}
if [[ -z "$action" || -z "$dir" ]]; then
    echo "usage: $0 up|down|kill-node|revive-node DIR [NODE]" >&2
    exit 2
fi
SUBNET=${TWO_NODES_SUBNET:-10.213.77}
PREFIX=${TWO_NODES_PREFIX:-danube}
BRIDGE="${PREFIX}br0"
NODES=(n1 n2)
CPUS_PER_NODE=2

netns() { echo "${PREFIX}-$1"; }
veth() { echo "${PREFIX}v${1#n}"; }
address() { echo "$SUBNET.1${1#n}"; }
sbin() { command -v "$1" || echo "/usr/sbin/$1"; }

start_slurmd() {
    local node=$1
    # nsenter --net, not `ip netns exec`: the latter also makes a mount namespace with a fresh
    # /sys, which hides /sys/fs/cgroup from slurmd.
    nsenter --net="/var/run/netns/$(netns "$node")" "$(sbin slurmd)" -f "$dir/slurm.conf" \
        -N "$node" </dev/null >>"$dir/slurmd-$node.out" 2>&1
}

wait_idle() {
    local want=$1 deadline=$((SECONDS + 60)) idle
    while ((SECONDS < deadline)); do
        idle=$(SLURM_CONF="$dir/slurm.conf" sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
        if ((idle >= want)); then
            return 0
        fi
        sleep 0.5
    done
    echo "two_nodes: the nodes did not become idle within 60 s; see $dir/*.log" >&2
    return 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

up() {
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        echo "two_nodes: $BRIDGE exists; run '$0 down DIR' first" >&2
        exit 1
    fi
    if ip -o -4 addr | grep -q " $SUBNET\."; then
        echo "two_nodes: subnet $SUBNET.0/24 is in use here; set TWO_NODES_SUBNET" >&2
        exit 1
    fi
    mkdir -p "$dir/state" "$dir/munge"
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for node in "${NODES[@]}"; do
        ip netns add "$(netns "$node")"
        ip link add "$(veth "$node")" type veth peer name eth0 netns "$(netns "$node")"
        ip link set "$(veth "$node")" master "$BRIDGE" up
        ip -n "$(netns "$node")" addr add "$(address "$node")/24" dev eth0
        ip -n "$(netns "$node")" link set eth0 up
        ip -n "$(netns "$node")" link set lo up
    done

    "$(sbin mungekey)" --create --keyfile="$dir/munge/munge.key" --force
    chmod 600 "$dir/munge/munge.key"
    "$(sbin munged)" --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
        --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/seed" \
        --log-file="$dir/munge/munged.log"

    cat >"$dir/slurm.conf" <<EOF
ClusterName=danubetwo
SlurmctldHost=$(hostname)($SUBNET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=${TWO_NODES_CRED_EXPIRE:-120}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
KillWait=5
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SlurmdTimeout=${TWO_NODES_SLURMD_TIMEOUT:-300}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldPort=$(free_port)
SlurmdPort=6818
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
EOF
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=$(address "$node") NodeHostname=$node" \
            "CPUs=$CPUS_PER_NODE RealMemory=4000 State=UNKNOWN" >>"$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP" \
        "OverSubscribe=YES" >>"$dir/slurm.conf"

    "$(sbin slurmctld)" -f "$dir/slurm.conf" </dev/null >"$dir/slurmctld.out" 2>&1
    for node in "${NODES[@]}"; do
        start_slurmd "$node"
    done
    wait_idle 2
    echo "export SLURM_CONF=$dir/slurm.conf"
}

kill_pidfile() {
    local file=$1 pid
    [[ -f "$file" ]] || return 0
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

kill_namespace() {
    local pids
    pids=$(ip netns pids "$(netns "$1")" 2>/dev/null || true)
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
    fi
}

down() {
    kill_pidfile "$dir/slurmctld.pid"
    for node in "${NODES[@]}"; do
        kill_namespace "$node"
        ip netns del "$(netns "$node")" 2>/dev/null || true
        ip link del "$(veth "$node")" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    kill_pidfile "$dir/munge/munged.pid"
}

kill_node() {
    local node=$1
    # The network first, as when a machine loses power: its peers get no FIN or RST and learn
    # of the loss only from their own timeouts.
    ip link set "$(veth "$node")" down
    kill_namespace "$node"
}

revive_node() {
    local node=$1
    ip link set "$(veth "$node")" up
    start_slurmd "$node"
}

case "$action" in
    up) up ;;
    down) down ;;
    kill-node) kill_node "${3:?name the node: n1 or n2}" ;;
    revive-node) revive_node "${3:?name the node: n1 or n2}" ;;
    *)
        echo "usage: $0 up|down|kill-node|revive-node DIR [NODE]" >&2
        exit 2
        ;;
esac
