# ---- the part every template shares (slurm/run-training.sh) ----------------------------------
# The batch shell runs the training under srun in the background and waits, so that it can take
# SLURM's USR1 (sent {{ signal_grace_s }} s before the time limit, or on pre-emption, or by
# `scancel --signal=USR1 --batch`) and forward it to srun, which passes it to every rank. The
# ranks finish their optimizer step, agree, save one checkpoint and rank 0 requeues the job
# (`scontrol requeue`); the rerun continues with resume=auto.
{{ setup }}
set -uo pipefail
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export LM_CONFIG_DIR={{ config_dir }}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
{{ activate }}
echo "lm-slurm: job $SLURM_JOB_ID start restart_count=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST at $(date +%FT%T)"

got_usr1=""
child=""
forward_usr1() {
    got_usr1=1
    echo "lm-slurm: USR1 at $(date +%FT%T); forwarding it to the training ranks"
    if [ -n "$child" ]; then kill -USR1 "$child" 2>/dev/null; fi
}
trap forward_usr1 USR1

srun --kill-on-bad-exit=1 --ntasks-per-node={{ tasks_per_node }} --cpus-per-task={{ cpus_per_task }} \
    {{ python }} -m lm.cli.main train {{ train_args }} resume=auto &
child=$!
if [ -n "$got_usr1" ]; then kill -USR1 "$child" 2>/dev/null; fi  # USR1 came before srun started
# a trapped signal interrupts `wait`: wait again until srun has really exited
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
status=$?

if [ "$status" -ne 0 ] && [ -n "$got_usr1" ]; then
    # the ranks died before they could checkpoint and requeue (e.g. USR1 before training started):
    # requeue from here; the rerun resumes from the last complete checkpoint
    echo "lm-slurm: training exited with status $status after USR1; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
echo "lm-slurm: job $SLURM_JOB_ID training exited with status $status at $(date +%FT%T)"
exit "$status"
