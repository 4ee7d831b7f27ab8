#!/usr/bin/env bash
# Train a recipe on several machines under SLURM: srun starts one `accelerate launch` per node, and each node starts
# one process per GPU. Nothing here is specific to one cluster: the allocation comes from sbatch's flags, the rest
# from the arguments.
#
#   sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 4 accelerate_configs/slurm_multinode.sh \
#       --nodes 2 --gpus_per_node 4 --recipe recipes/sft_medical.py --config recipes/configs/medical.yaml \
#       -- --per_device_train_batch_size 2 --gradient_accumulation_steps 1
#   (8 processes: 2 x 1 x 8 keeps the global batch of 16 that medical.yaml sets for one GPU as 4 x 4 x 1)
#
#   # print the command each node would run, without SLURM (also the way to launch by hand, one line per machine):
#   accelerate_configs/slurm_multinode.sh --nodes 2 --gpus_per_node 4 --recipe recipes/sft_medical.py \
#       --config recipes/configs/medical.yaml --main_address 10.0.0.1 --dry_run \
#       -- --per_device_train_batch_size 2 --gradient_accumulation_steps 1
#
# Options:
#   --nodes N                 machines (must match sbatch --nodes)
#   --gpus_per_node G         GPUs per machine; processes = N x G, and the recipe prints the global batch
#   --recipe FILE             recipes/sft_<domain>.py
#   --config FILE             the recipe's YAML
#   --accelerate_config FILE  default accelerate_configs/multi_node.yaml (DDP); fsdp_qlora.yaml, deepspeed_*.yaml work
#   --main_address HOST       the rank-0 machine; default: first node of the SLURM allocation
#   --main_port PORT          a free TCP port on it; default 29500
#   --dry_run                 print the per-node commands instead of running them
#   -- ARGS...                everything after -- goes to the recipe (e.g. -- --output_dir /shared/run1)
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }

nodes="" gpus_per_node="" recipe="" config="" accelerate_config="accelerate_configs/multi_node.yaml"
main_address="" main_port=29500 dry_run=0 recipe_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) nodes="${2:?}"; shift 2 ;;
        --gpus_per_node) gpus_per_node="${2:?}"; shift 2 ;;
        --recipe) recipe="${2:?}"; shift 2 ;;
        --config) config="${2:?}"; shift 2 ;;
        --accelerate_config) accelerate_config="${2:?}"; shift 2 ;;
        --main_address) main_address="${2:?}"; shift 2 ;;
        --main_port) main_port="${2:?}"; shift 2 ;;
        --dry_run) dry_run=1; shift ;;
        --) shift; recipe_args=("$@"); break ;;
        -h|--help) usage ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '${nodes}'"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer, got '${gpus_per_node}'"
[[ "$main_port" =~ ^[0-9]+$ ]] || die "--main_port must be a port number, got '${main_port}'"
for file in "$recipe" "$config" "$accelerate_config"; do
    [[ -n "$file" && -f "$file" ]] || die "file not found: '${file}' (give --recipe, --config, --accelerate_config)"
done
if [[ -n "${SLURM_JOB_NUM_NODES:-}" && "$SLURM_JOB_NUM_NODES" != "$nodes" ]]; then
    die "--nodes ${nodes} but the SLURM allocation has ${SLURM_JOB_NUM_NODES} nodes"
fi
if [[ -z "$main_address" ]]; then
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "not inside a SLURM job: give --main_address HOST"
    # sed reads the whole list: `head -n 1` would end scontrol with SIGPIPE, fatal under pipefail
    main_address="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
fi

# The command one node runs, shell-quoted; the machine rank goes in verbatim, so srun's tasks can each expand theirs.
node_command() {
    local machine_rank="$1" head tail
    printf -v head '%q ' accelerate launch --config_file "$accelerate_config" \
        --num_machines "$nodes" --num_processes "$((nodes * gpus_per_node))" --machine_rank
    printf -v tail '%q ' --main_process_ip "$main_address" --main_process_port "$main_port" \
        "$recipe" --config "$config" "${recipe_args[@]}"
    echo "${head}${machine_rank} ${tail% }"
}

if [[ "$dry_run" == 1 ]]; then
    for ((rank = 0; rank < nodes; rank++)); do
        node_command "$rank"
    done
    exit 0
fi

# One task per node; each expands its own node index (0 = the first node = main_address) as the machine rank, and a
# failure on any node ends the whole job instead of leaving the others waiting.
srun --nodes "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c "$(node_command '$SLURM_NODEID')"
