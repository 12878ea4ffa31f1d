"""How the ranks of a launch find each other, across nodes too.

Three things that a one-node launch never meets and that otherwise hang for the whole
collective timeout:
- a `MASTER_ADDR` that does not resolve (SLURM node names often resolve only on the cluster's
  own DNS): under SLURM the node's `NodeAddr` is used, else the run stops with one line;
- gloo choosing its interface from what the machine's hostname resolves to, which another node
  may not reach: unless `GLOO_SOCKET_IFNAME` is set, gloo uses the interface that routes to the
  rendezvous address, which every peer reaches by construction;
- a rendezvous that cannot complete (rank 0 not started, a port closed between nodes): it
  fails after `train.rendezvous_timeout_s` with a message naming the address, the rank and
  the host, instead of waiting out the collective timeout.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import re
import socket
import struct
import subprocess
from typing import Optional, Tuple

from megatron_danube.errors import DanubePeerLost, DanubeRankError

logger = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, family=socket.AF_INET)
        return True
    except (socket.gaierror, UnicodeError):
        return False


def slurm_node_address(node: str) -> Optional[str]:
    """The address SLURM reaches `node` at (its NodeAddr), or None without scontrol."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
    return match.group(1) if match else None


def master_address(host: str, launcher: str) -> str:
    """`host` where it resolves; under SLURM, else, the node's NodeAddr; else a one-line error."""
    if resolves(host):
        return host
    if launcher == "slurm":
        address = slurm_node_address(host)
        if address and resolves(address):
            logger.info(
                "rendezvous host %s does not resolve here: using its NodeAddr %s", host, address
            )
            return address
    raise DanubeRankError(
        f"MASTER_ADDR {host!r} does not resolve on {socket.gethostname()}; set MASTER_ADDR to an "
        f"address every node can reach (its IP, or the node's NodeAddr from "
        f"`scontrol show node {host}`)"
    )


def interface_addresses() -> dict:
    """{interface name: IPv4 address} of this network namespace's interfaces that have one."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            found[name] = socket.inet_ntoa(answer[20:24])
    return found


def route_to(address: str, port: int) -> Tuple[Optional[str], Optional[str]]:
    """(interface, local address) this host sends from to reach `address` (nothing is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, port))
            local = probe.getsockname()[0]
    except OSError:
        return None, None
    names = [name for name, ip in interface_addresses().items() if ip == local]
    return (names[0] if names else None), local


def choose_gloo_interface(address: str, port: int) -> None:
    """Point gloo at the interface that routes to the rendezvous, unless the user chose one."""
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        logger.info("gloo: interface %s (GLOO_SOCKET_IFNAME)", chosen)
        return
    interface, local = route_to(address, port)
    if interface is None:
        logger.warning(
            "gloo: no interface found that routes to %s; gloo picks one from this host's name "
            "(set GLOO_SOCKET_IFNAME if the ranks cannot connect)",
            address,
        )
        return
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    logger.info(
        "gloo: interface %s (%s), the route to the rendezvous %s; set GLOO_SOCKET_IFNAME to "
        "choose another",
        interface,
        local,
        address,
    )


def connect(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """The launch's TCP store: rank 0 serves it and waits for every rank; the others connect.

    Fails after `timeout_s` with one line naming what did not arrive."""
    import torch.distributed as dist

    where = f"{address}:{port}"
    try:
        return dist.TCPStore(
            address,
            port,
            world_size,
            is_master=rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=True,
        )
    except RuntimeError as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        host = socket.gethostname()
        if rank == 0 and "in use" in cause.lower():
            raise DanubeRankError(
                f"rank 0 on {host} cannot serve the rendezvous on port {port}: it is in use; "
                f"set MASTER_PORT to a free port"
            ) from None
        if rank == 0:
            raise DanubeRankError(
                f"rendezvous at {where}: not all {world_size} ranks arrived within "
                f"{timeout_s:g} s ({cause}); check that every node started its ranks and can "
                f"reach {where} (train.rendezvous_timeout_s)"
            ) from None
        raise DanubeRankError(
            f"rank {rank} on {host} could not reach the rendezvous at {where} within "
            f"{timeout_s:g} s ({cause}); check that rank 0 started, that MASTER_ADDR/MASTER_PORT "
            f"name its node, and that the port is open between nodes (train.rendezvous_timeout_s)"
        ) from None


def start_process_group(
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    launcher: str,
    *,
    rendezvous_timeout_s: float,
    timeout_minutes: float,
) -> None:
    """torch.distributed's default group over a store reached as above; collectives (gloo and
    NCCL) give up after `timeout_minutes` rather than wait forever for a lost rank."""
    import torch.distributed as dist

    address = master_address(master_addr, launcher)
    if backend == "gloo" and world_size > 1:
        choose_gloo_interface(address, master_port)
    store = connect(address, master_port, rank, world_size, rendezvous_timeout_s)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


# What gloo and NCCL say when a peer stops answering or its connection drops.
_LOST_PEER_MARKERS = (
    "Timed out waiting",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
)


def lost_peer(exc: BaseException, rank: int, timeout_minutes: float) -> Optional[DanubePeerLost]:
    """The one-line error for a collective that failed because another rank went away, or
    None when `exc` is something else."""
    import torch.distributed as dist

    text = str(exc).strip()
    if not (isinstance(exc, dist.DistBackendError) or any(m in text for m in _LOST_PEER_MARKERS)):
        return None
    cause = text.splitlines()[0][:300] if text else type(exc).__name__
    return DanubePeerLost(
        f"rank {rank} on {socket.gethostname()}: another rank stopped answering ({cause}; "
        f"collectives wait train.distributed_timeout_minutes={timeout_minutes:g}); a node or a "
        f"rank was lost: resubmit (or let SLURM requeue) and the run resumes from its last "
        f"complete checkpoint"
    )
