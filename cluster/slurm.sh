#!/usr/bin/env bash
# SLURM batch script: start a Ray head on the first node of the allocation and Ray workers on the
# others, wait until all of them joined, submit a correction_rl run with `ray job submit`, and
# stop Ray when it ends (pass or fail). docs/cluster.md explains each step.
#
#   sbatch cluster/slurm.sh                                   # configs/multinode.yaml
#   CONFIG=configs/gpu_8.yaml sbatch --nodes=1 cluster/slurm.sh
#
# Which role lands where is set by the Ray custom resources each node advertises:
#   HEAD_RESOURCES   (first node)   default {"teacher_node": 4, "rollout_node": 4}
#   WORKER_RESOURCES (other nodes)  default {"learner_node": 8};{"rollout_node": 8}
#                    (";"-separated: worker i takes entry i modulo their number)
# matching configs/multinode.yaml's resources.{learner,rollout,teacher}_resource (3 nodes: 8
# learner ranks, 8 rollout engines, 4 teacher engines; tests/test_cluster_recipes.py checks it). Outputs go where
# the config's output_dir says: it must be a file system every node mounts (Lustre, GPFS, NFS).
#
#SBATCH --job-name=correction-rl
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${CONFIG:-configs/multinode.yaml}
VENV=${VENV:-$PWD/.venv}                     # the project's environment, on a shared file system
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
HEAD_RESOURCES=${HEAD_RESOURCES:-'{"teacher_node": 4, "rollout_node": 4}'}
WORKER_RESOURCES=${WORKER_RESOURCES:-'{"learner_node": 8};{"rollout_node": 8}'}
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-300}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}           # "h100:8" -> "8"
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-$(nproc)}

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export RAY_USAGE_STATS_ENABLED=0
# One token for the whole allocation (Ray 2.60 clusters use token authentication by default).
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c "import secrets; print(secrets.token_hex(32))")}
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}                             # this batch script runs on the head node
HEAD_IP=$(hostname --ip-address | awk '{print $1}')
echo "head $HEAD ($HEAD_IP), workers: ${NODES[*]:1}"

cleanup() {
    # Stops exactly the Ray processes of this job: each `srun` step below runs `ray start --block`
    # and is ended with its step; `ray stop` inside the allocation only touches our nodes.
    srun --overlap --nodes="${#NODES[@]}" --ntasks="${#NODES[@]}" --ntasks-per-node=1 ray stop --force || true
}
trap cleanup EXIT

srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" \
    ray start --head --block --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" \
    --resources="$HEAD_RESOURCES" --labels="pool=head" --disable-usage-stats &
sleep 15

IFS=';' read -r -a WORKER_KINDS <<< "$WORKER_RESOURCES"
for i in "${!NODES[@]}"; do
    [ "$i" -eq 0 ] && continue
    resources=${WORKER_KINDS[$(( (i - 1) % ${#WORKER_KINDS[@]} ))]}
    srun --nodes=1 --ntasks=1 -w "${NODES[$i]}" \
        ray start --block --address="$HEAD_IP:$RAY_PORT" \
        --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" \
        --resources="$resources" --labels="pool=worker$i" --disable-usage-stats &
done

# Wait (bounded) until every node has joined.
deadline=$((SECONDS + JOIN_TIMEOUT_S))
until [ "$(RAY_ADDRESS="$HEAD_IP:$RAY_PORT" python -c 'import ray; ray.init(logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null)" = "${#NODES[@]}" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "error: not all ${#NODES[@]} Ray nodes joined within ${JOIN_TIMEOUT_S} s" >&2
        exit 1
    fi
    sleep 5
done
echo "all ${#NODES[@]} nodes joined"

# The dashboard listens on the head's loopback, and this script runs on the head node.
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" \
    --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- correction-rl train --config "$CONFIG"
