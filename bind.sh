#!/bin/bash
# CPU, memory and InfiniBand binding of one training task, then exec of its command (run.sub wraps every task):
#   bind.sh [--cpu=MODE] [--mem=MODE] [--ib=MODE] [--cluster=NAME] [--] COMMAND [ARG...]
# The task's local rank comes from LOCAL_RANK, SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK; one task per GPU.
# Where there is nothing to bind to (no numactl, one NUMA node for --cpu=node, no IB device) it says so on local
# rank 0 and runs the command unbound.
set -euo pipefail

usage() {
  cat <<EOF
Usage: ${0##*/} [options] [--] COMMAND [ARG...]
Bind each task (one per GPU) near its GPU, then run COMMAND.
  --cpu=MODE      exclusive: an exclusive set of cores (and their SMT siblings) near the GPU
                  exclusive,nosmt: the same without SMT siblings
                  node: all cores of the GPU's NUMA node [default]
                  FILE.sh: the bash array bind_cpu_cores or bind_cpu_nodes from FILE.sh, indexed by local rank
                  off: no CPU binding
  --mem=MODE      node: memory of the GPU's NUMA node [default]; FILE.sh: the array bind_mem; off
  --ib=MODE       single: one InfiniBand device near the GPU (OMPI_MCA_btl_openib_if_include); off [default]
  --cluster=NAME  circe or selene: their fixed IB device lists (otherwise read from ibstat -l)
EOF
}

cpu_mode=node; mem_mode=node; ib_mode=off; cluster=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cpu=*) cpu_mode=${1#*=}; shift ;;
    --cpu) cpu_mode=$2; shift 2 ;;
    --mem=*) mem_mode=${1#*=}; shift ;;
    --mem) mem_mode=$2; shift 2 ;;
    --ib=*) ib_mode=${1#*=}; shift ;;
    --ib) ib_mode=$2; shift 2 ;;
    --cluster=*) cluster=${1#*=}; shift ;;
    --cluster) cluster=$2; shift 2 ;;
    --) shift; break ;;
    -*) echo "bind.sh: unknown option '$1'" >&2; usage >&2; exit 1 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "bind.sh: no command given" >&2; usage >&2; exit 1; }

local_rank=${LOCAL_RANK:-${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-}}}
[ -n "$local_rank" ] || { echo "bind.sh: no LOCAL_RANK, SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK set" >&2; exit 1; }
note() { [ "$local_rank" != 0 ] || echo "bind.sh: $*" >&2; }

# One task per GPU; without GPUs, one per task of this node.
if command -v nvidia-smi >/dev/null 2>&1 && num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') \
    && [ "$num_gpus" -gt 0 ]; then :
else
  num_gpus=${LOCAL_WORLD_SIZE:-${SLURM_NTASKS_PER_NODE:-1}}
  num_gpus=${num_gpus%%(*}  # SLURM writes "8(x4)" for 8 tasks on each of 4 nodes
fi
if [ "$local_rank" -ge "$num_gpus" ]; then
  echo "bind.sh: local rank $local_rank, but only $num_gpus GPUs (tasks) on this node" >&2; exit 1
fi

lscpu_value() { lscpu 2>/dev/null | awk -F: -v k="$1" '$1 == k { gsub(/ /, "", $2); print $2 }'; }
sockets=$(lscpu_value 'Socket(s)'); numa_nodes=$(lscpu_value 'NUMA node(s)')
cores_per_socket=$(lscpu_value 'Core(s) per socket'); threads_per_core=$(lscpu_value 'Thread(s) per core')
numa_nodes=${numa_nodes:-1}; threads_per_core=${threads_per_core:-1}
gpus_per_node=$(( num_gpus > numa_nodes ? num_gpus / numa_nodes : 1 ))
local_node=$(( local_rank / gpus_per_node < numa_nodes ? local_rank / gpus_per_node : numa_nodes - 1 ))
cores=$(( ${sockets:-1} * ${cores_per_socket:-0} ))
cores_per_gpu=$(( cores / num_gpus ))

numactl_args=()
case "$cpu_mode" in
  exclusive|exclusive,nosmt)
    if [ "$cores_per_gpu" -lt 1 ]; then
      note "$cores cores for $num_gpus tasks: no exclusive cores to bind to"
    else
      first=$(( local_rank * cores_per_gpu )); last=$(( first + cores_per_gpu - 1 ))
      cpus="$first-$last"
      # Linux numbers SMT siblings after all physical cores: core c's sibling is c + cores.
      if [ "$cpu_mode" = exclusive ] && [ "$threads_per_core" -gt 1 ]; then
        cpus+=",$(( first + cores ))-$(( last + cores ))"
      fi
      numactl_args+=(--physcpubind="$cpus")
    fi ;;
  node)
    if [ "$numa_nodes" -gt 1 ]; then numactl_args+=(--cpunodebind="$local_node")
    else note "one NUMA node: --cpu=node binds nothing"; fi ;;
  *.sh)
    # shellcheck source=/dev/null
    source "$cpu_mode"
    if [ -n "${bind_cpu_cores:-}" ]; then numactl_args+=(--physcpubind="${bind_cpu_cores[$local_rank]}")
    elif [ -n "${bind_cpu_nodes:-}" ]; then numactl_args+=(--cpunodebind="${bind_cpu_nodes[$local_rank]}")
    else echo "bind.sh: $cpu_mode defines neither bind_cpu_cores nor bind_cpu_nodes" >&2; exit 1; fi ;;
  off|'') ;;
  *) echo "bind.sh: invalid --cpu mode '$cpu_mode'" >&2; usage >&2; exit 1 ;;
esac

case "$mem_mode" in
  node)
    if [ "$numa_nodes" -gt 1 ]; then numactl_args+=(--membind="$local_node")
    else note "one NUMA node: --mem=node binds nothing"; fi ;;
  *.sh)
    # shellcheck source=/dev/null
    source "$mem_mode"
    [ -n "${bind_mem:-}" ] || { echo "bind.sh: $mem_mode defines no bind_mem array" >&2; exit 1; }
    numactl_args+=(--membind="${bind_mem[$local_rank]}") ;;
  off|'') ;;
  *) echo "bind.sh: invalid --mem mode '$mem_mode'" >&2; usage >&2; exit 1 ;;
esac

ibdevs=()
case "$cluster" in
  circe) ibdevs=(mlx5_1 mlx5_2 mlx5_3 mlx5_4 mlx5_7 mlx5_8 mlx5_9 mlx5_10) ;;
  selene) ibdevs=(mlx5_0 mlx5_1 mlx5_2 mlx5_3 mlx5_6 mlx5_7 mlx5_8 mlx5_9) ;;
  '') if command -v ibstat >/dev/null 2>&1; then mapfile -t ibdevs < <(ibstat -l 2>/dev/null | sort -V); fi ;;
  *) echo "bind.sh: unknown --cluster '$cluster' (circe or selene)" >&2; exit 1 ;;
esac
case "$ib_mode" in
  single)
    if [ "${#ibdevs[@]}" -eq 0 ]; then
      note "no InfiniBand device found: --ib=single binds no NIC"
    else
      export OMPI_MCA_btl_openib_if_include="${OMPI_MCA_btl_openib_if_include-${ibdevs[$(( local_rank * ${#ibdevs[@]} / num_gpus ))]}}"
    fi ;;
  off|'') ;;
  *) echo "bind.sh: invalid --ib mode '$ib_mode'" >&2; usage >&2; exit 1 ;;
esac

if [ "${#numactl_args[@]}" -gt 0 ]; then
  if command -v numactl >/dev/null 2>&1; then
    exec numactl "${numactl_args[@]}" -- "$@"
  fi
  note "numactl is not installed: running without CPU/memory binding (${numactl_args[*]})"
fi
exec "$@"
