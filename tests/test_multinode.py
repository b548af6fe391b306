"""A real multi-node Ray cluster on this machine: a head and two worker nodes started as separate
``ray start`` processes (own temp dirs, ports, resources and labels; this machine only), a short run
submitted with ``ray job submit`` exactly as docs/cluster.md tells users, and placement checked
from the run's ``roles.json`` against the node ids that Ray's state API reports for each node.

Addresses: the nodes are started with ``--node-ip-address=127.0.0.1``; Ray 2.60 replaces a loopback
node address by this machine's own interface address (``resolve_ip_for_localhost``, as ``ray.init``
does for the local cluster), so the traffic never leaves the machine; the dashboard and job API
listen on 127.0.0.1.

Isolation from the rest of the suite: this pytest process never calls ``ray.init`` for this
cluster (the session ``ray_local`` fixture may hold a local Ray in this process); everything goes
through CLI subprocesses. Teardown never runs ``ray stop``, which kills EVERY Ray process of the
machine (other test sessions' clusters included): each process started here carries a unique
marker in its environment (inherited by raylets, workers and the job's driver), and teardown
ends exactly the processes carrying it, by pid.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from test_distributed import system_config_dict

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "CORRECTION_RL_TEST_CLUSTER"

# name -> (CPUs, custom resources, labels): one node per role, pinned three different ways.
NODES = {
    "head": (1, {"teacher_node": 1}, {"pool": "head"}),
    "train": (2, {"learner_node": 1}, {"pool": "train"}),
    "gen": (2, {"rollout_node": 2}, {"pool": "gen"}),
}


def plain(text: str) -> str:
    """CLI output without its ANSI colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (one at a time,
    the OS can hand out the same port twice, and ``ray start`` then refuses two components on
    one port: seen in CI)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class LocalCluster:
    """Handles of a ``ray start`` cluster on 127.0.0.1."""

    root: Path
    env: dict[str, str]
    gcs: str = ""
    dashboard: str = ""
    logs: list[str] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
        self.logs.append(f"$ ray {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start_node(self, name: str, head: bool) -> None:
        cpus, resources, labels = NODES[name]
        temp = self.root / name[0]
        ports = iter(_free_ports(9))
        args = ["start", "--node-ip-address=127.0.0.1", f"--node-name={name}", f"--num-cpus={cpus}",
                "--num-gpus=0", f"--resources={json.dumps(resources)}",
                "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
                f"--temp-dir={temp}", "--object-store-memory=200000000", "--disable-usage-stats",
                f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}",
                f"--dashboard-agent-listen-port={next(ports)}", f"--dashboard-agent-grpc-port={next(ports)}",
                f"--runtime-env-agent-port={next(ports)}", f"--metrics-export-port={next(ports)}"]
        if head:
            gcs_port, dash_port = next(ports), next(ports)
            args += ["--head", f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={dash_port}", f"--ray-client-server-port={next(ports)}"]
            self.gcs, self.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
        else:
            args += [f"--address={self.gcs}"]
        self.ray(*args, timeout=180)

    def nodes(self) -> list[dict]:
        """Alive nodes as Ray's state API reports them (through the dashboard, not ray.init)."""
        out = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json", "--detail")
        return [n for n in json.loads(out.stdout) if n["state"] == "ALIVE"]

    def processes(self) -> list[int]:
        """Pids whose environment carries this cluster's marker: every process it started."""
        tag = f"{MARKER}={self.env[MARKER]}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if tag in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or another user's
                continue
        return pids

    def teardown(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_nodes():
    # Short root: Ray's unix sockets live under it and their paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="crl-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        MARKER: secrets.token_hex(8),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",  # Ray's default for new clusters, with a token of our own
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    })
    cluster = LocalCluster(root, env)
    try:
        cluster.start_node("head", head=True)
        cluster.start_node("train", head=False)
        cluster.start_node("gen", head=False)
        deadline = time.monotonic() + 60
        while len(cluster.nodes()) < 3:
            assert time.monotonic() < deadline, "worker nodes did not join:\n" + "\n".join(cluster.logs)
            time.sleep(1)
        yield cluster
    finally:
        cluster.teardown()
        leftover = cluster.processes()
        assert not leftover, f"processes of the test cluster survived teardown: {leftover}"


def run_config(tmp_path: Path, policy_dir: Path, name: str, **resources) -> Path:
    """A 2-step async run with every role pinned (learner by custom resource, rollout by node
    label, teacher by both); absolute paths, since the job runs in a copy of the repo."""
    pinned = {
        "num_rollout_workers": 2,
        "cpus_per_learner_rank": 1.0, "cpus_per_rollout_worker": 0.5, "cpus_per_teacher_worker": 0.5,
        "learner_resource": "learner_node",
        "rollout_labels": {"pool": "gen"},
        "teacher_resource": "teacher_node", "teacher_labels": {"pool": "head"},
        "custom_resource_amount": 1,
        "placement_timeout_s": 60, "start_timeout_s": 300, "call_timeout_s": 240,
        **resources,
    }
    cfg = system_config_dict(
        tmp_path / "shared", policy_dir, name, total_steps=2, task__num_train=200, task__num_eval=8,
        eval__every_steps=0, eval__num_prompts=8, eval__sampled=False, metrics__wandb_mode="disabled",
        **{f"resources__{k}": v for k, v in pinned.items()},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_job_submit_places_each_role_on_its_node(ray_nodes, tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, "multinode")
    job_id = f"crl_test_{secrets.token_hex(4)}"
    start = time.monotonic()
    submit = ray_nodes.ray(
        "job", "submit", "--address", ray_nodes.dashboard, "--submission-id", job_id,
        "--working-dir", str(REPO),
        # A job runtime_env that sets a variable the driver also sets for its actors: Ray refuses
        # to merge the two unless the driver leaves that key to the job (cluster.py).
        "--runtime-env-json", json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false", "CRL_FROM_JOB": "1"}}),
        "--",
        "python", "-m", "correction_rl.cli", "train", "--config", str(config),
        timeout=420, check=False,
    )
    elapsed = time.monotonic() - start
    status = plain(ray_nodes.ray("job", "status", "--address", ray_nodes.dashboard, job_id, check=False).stdout)
    logs = plain(ray_nodes.ray("job", "logs", "--address", ray_nodes.dashboard, job_id, check=False).stdout)
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in status, (
        f"job {job_id} did not succeed:\n{status}\n{logs[-6000:]}\n{submit.stderr[-3000:]}"
    )
    assert "run directory:" in logs and "step 2/2" in logs

    run_dir = tmp_path / "shared" / "multinode"
    roles = json.loads((run_dir / "roles.json").read_text())
    by_name = {n["node_name"]: n for n in ray_nodes.nodes()}
    assert set(by_name) == {"head", "train", "gen"}
    expected = {"learner": "train", "rollout": "gen", "teacher": "head"}
    for role, node_name in expected.items():
        assert len(roles[role]) == {"learner": 1, "rollout": 2, "teacher": 1}[role]
        for actor in roles[role]:
            assert actor["node_id"] == by_name[node_name]["node_id"], (role, actor, node_name)
            assert actor["node_ip"] == by_name[node_name]["node_ip"]
            assert actor["node_labels"]["pool"] == node_name
    assert roles["learner"][0]["bundle"] == {"CPU": 1.0, "learner_node": 1}
    assert roles["learner"][0]["node_custom_resources"] == {"learner_node": 1.0}
    assert roles["rollout"][0]["label_selector"] == {"pool": "gen"}
    assert roles["teacher"][0]["node_custom_resources"] == {"teacher_node": 1.0}
    assert len({a["pid"] for r in expected for a in roles[r]}) == 4
    # The run itself: two learner steps, the policy saved, the correction log on the shared path.
    assert (run_dir / "policy" / "config.json").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert (run_dir / "corrections.jsonl").stat().st_size > 0
    print(f"job submit -> SUCCEEDED in {elapsed:.1f} s; roles.json: {json.dumps(roles)}")


def _train_cli(ray_nodes, config: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """``correction-rl train --ray-address`` (the other way to join): a driver on the head."""
    start = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "correction-rl"), "train", "--config", str(config), "--ray-address", ray_nodes.gcs,
         *overrides],
        env=ray_nodes.env, capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    return proc, time.monotonic() - start


def test_a_request_the_cluster_cannot_satisfy_fails_fast_naming_the_resource(
    ray_nodes, tmp_path, tiny_model_dir
):
    config = run_config(tmp_path, tiny_model_dir, "unsatisfiable")
    # A custom resource no node advertises.
    proc, seconds = _train_cli(ray_nodes, config, "--resources.teacher_resource", "teacher_gpu_node")
    # a PlacementError is an expected failure: one `error:` line, exit code 2, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: the Ray cluster cannot host this run: teacher_gpu_node: requested 1, cluster has 0" in proc.stderr
    assert seconds < 90, f"took {seconds:.0f} s"
    # Enough CPUs in total (5), but no single node with 3 of them next to the learner resource:
    # Ray would wait forever; the pre-check says which bundle and what each node has.
    proc, seconds = _train_cli(ray_nodes, config, "--resources.cpus_per_learner_rank", "3")
    assert proc.returncode != 0
    assert "one learner actor needs {CPU: 3, learner_node: 1} on a single node" in proc.stderr, proc.stderr[-3000:]
    assert "node train (" in proc.stderr and "learner_node: 1" in proc.stderr
    assert seconds < 90, f"took {seconds:.0f} s"
    # A node label no node carries (custom resource and CPUs are fine).
    proc, seconds = _train_cli(ray_nodes, config, "--resources.learner_labels", "{pool: gpu}")
    assert proc.returncode != 0
    assert "one learner actor needs {CPU: 1, learner_node: 1} with node labels {pool: gpu}" in proc.stderr, (
        proc.stderr[-3000:])
    assert seconds < 90, f"took {seconds:.0f} s"
