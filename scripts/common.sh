# shellcheck shell=bash
# Shared by the run_*.sh wrappers (sourced, not run): GPU count, precision flag, device and launcher.

# Number of GPUs nvidia-smi lists (0 when there is none or no driver).
count_gpus() {
  (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true
}

# setup_device NAME PRECISION NUM_GPUS: sets the arrays PREC (the precision flag) and DEVICE (--no_cuda on the
# CPU) and procs (processes to start), or fails naming the bad value.
# shellcheck disable=SC2034  # PREC, DEVICE and procs are read by the script that sources this file
setup_device() {
  local name=$1 precision=$2 num_gpus=$3
  case "$precision" in
    fp16) PREC=(--fp16) ;;
    bf16) PREC=(--bf16) ;;
    fp32|tf32) PREC=() ;;
    *) echo "$name: unknown precision '$precision' (fp16, bf16, tf32 or fp32)" >&2; return 1 ;;
  esac
  if [ "$num_gpus" -eq 0 ]; then
    if [ "$precision" = "fp16" ]; then
      echo "$name: fp16 needs a GPU; use bf16 or fp32 on the CPU" >&2; return 1
    fi
    DEVICE=(--no_cuda); procs=1
  else
    DEVICE=(); procs=$num_gpus
  fi
}

# set_launcher: LAUNCH = plain python for one process, torchrun for more (reads $procs and $PYTHON).
# shellcheck disable=SC2034  # LAUNCH is read by the script that sources this file
set_launcher() {
  if [ "$procs" -gt 1 ]; then
    LAUNCH=("${PYTHON:-python3}" -m torch.distributed.run --nproc_per_node="$procs")
  else
    LAUNCH=("${PYTHON:-python3}")
  fi
}
