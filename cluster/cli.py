"""``ftune cluster local up|down|status|add-worker|kill-worker|drain-worker``: a Ray cluster on this machine.

Example session::

    ftune cluster local up --workers 2 --cpus-per-worker 1
    RAY_AUTH_MODE=token python -c "import ray; ray.init(address='127.0.0.1:PORT')"
    ftune cluster local kill-worker 0          # lose a spot node
    ftune cluster local drain-worker 1 --deadline-s 120
    ftune cluster local status
    ftune cluster local down
"""

from __future__ import annotations

import argparse
import signal
import time

import pydantic

from cluster.local import ClusterError, LocalCluster, default_state_path
from cluster.local_config import LocalClusterConfig
from ftune.entrypoint import prog


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m cluster"), description=__doc__.split("\n")[0])
    targets = parser.add_subparsers(dest="target", required=True, metavar="local")
    local = targets.add_parser("local", help="a multi-node Ray cluster on this machine")
    local.add_argument(
        "--state-file", default=None, help="cluster state file (default: $FTUNE_HOME/cluster/local.json)"
    )
    actions = local.add_subparsers(dest="action", required=True)

    up = actions.add_parser("up", help="start a head and N worker nodes")
    up.add_argument("--workers", type=int, required=True, help="number of worker nodes")
    fields = LocalClusterConfig.model_fields
    up.add_argument("--cpus-per-worker", type=int, default=fields["cpus_per_worker"].default)
    up.add_argument("--head-cpus", type=int, default=fields["head_cpus"].default)
    up.add_argument("--spot-resource", type=float, default=fields["spot_resource"].default,
                    help="'spot' resource per worker (0: on-demand workers)")  # fmt: skip

    actions.add_parser("down", help="stop every process the cluster started")
    actions.add_parser("status", help="show nodes alive/draining/dead with their resources")
    actions.add_parser("add-worker", help="start one more worker node")
    kill = actions.add_parser("kill-worker", help="kill a worker node (lose a spot instance)")
    kill.add_argument("node", help="worker index, name or node id")
    kill.add_argument("--signal", default="SIGKILL", choices=["SIGKILL", "SIGTERM"],
                      help="SIGKILL: whole process tree; SIGTERM: ray start only (Ray drains, then exits)")  # fmt: skip
    drain = actions.add_parser("drain-worker", help="drain a worker node with reason PREEMPTION")
    drain.add_argument("node", help="worker index, name or node id")
    drain.add_argument("--deadline-s", type=float, default=120.0)
    return parser


def main(argv: list[str]) -> int:
    """Run one ``ftune cluster`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    state_path = args.state_file or default_state_path()
    if args.action == "up":
        try:
            config = LocalClusterConfig(
                cpus_per_worker=args.cpus_per_worker,
                head_cpus=args.head_cpus,
                spot_resource=args.spot_resource,
            )
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors()
            )
            raise ClusterError(f"invalid cluster shape: {problems}") from None
        cluster = LocalCluster(config, state_path=state_path).up(args.workers)
        print(f"local Ray cluster up: head + {args.workers} worker(s); state in {state_path}")
        print(f"  drivers:  RAY_AUTH_MODE=token RAY_ADDRESS={cluster.address} python ...")
        print(
            f"  jobs:     RAY_AUTH_MODE=token ray job submit --address {cluster.dashboard_url} "
            "--working-dir . -- python -m train --config configs/train/tiny.yaml"
        )
        print(f"  logs:     {cluster.base_dir}")
        return 0
    cluster = LocalCluster.load(state_path)
    if args.action == "down":
        address = cluster.address
        cluster.down()
        print(f"stopped the local cluster at {address} and removed {cluster.base_dir}")
    elif args.action == "status":
        print(_status_table(cluster))
    elif args.action == "add-worker":
        record = cluster.add_worker()
        print(f"started {record.name} ({record.node_id})")
    elif args.action == "kill-worker":
        node_id = cluster.kill_worker(_node_arg(args.node), getattr(signal, args.signal))
        print(f"sent {args.signal} to worker {args.node} ({node_id})")
    elif args.action == "drain-worker":
        node_id = cluster.drain_worker(_node_arg(args.node), deadline_s=args.deadline_s)
        print(f"draining worker {args.node} ({node_id}), reason PREEMPTION, deadline {args.deadline_s:g} s")
    return 0


def _node_arg(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _status_table(cluster: LocalCluster) -> str:
    lines = [f"cluster {cluster.cluster_id} at {cluster.address}, dashboard {cluster.dashboard_url}"]
    views = {}
    if cluster.head_is_running():
        views = {v.node_id: v for v in cluster.list_nodes()}
    else:
        lines.append(
            "  head unreachable: its GCS port is closed (run `ftune cluster local down` to clean up)"
        )
    rows = [("NODE", "NODE ID", "STATE", "PROCS", "RESOURCES", "NOTE")]
    for record in cluster.nodes:
        view = views.get(record.node_id)
        state = view.state if view else "UNKNOWN"
        note = ""
        if view and view.state == "DEAD":
            note = f"{view.death_reason}: {view.death_message}"
        elif view and view.state == "DRAINING" and view.draining_deadline_ms:
            note = f"deadline in {max(0, view.draining_deadline_ms / 1000 - time.time()):.0f} s"
        resources = view.resources if view else record.resources
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:")
                          and k not in ("memory", "object_store_memory"))  # fmt: skip
        rows.append(
            (record.name, record.node_id or "-", state, str(len(cluster.pids(record.name))), shown, note)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines).rstrip()
