#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine (for tests/slurm/): munge, slurmctld, slurmd
# from Debian packages, configured for quick requeues (AuthInfo=cred_expire=5).
#
# Idempotent: packages already installed are not reinstalled, daemons already running (pidfile with
# a live process) are left alone, a config this script wrote before is rewritten only when it
# changed. A /etc/slurm/slurm.conf written by someone else is never touched: if that cluster
# answers, it is used as it is; otherwise the script stops with an error.
# The daemons must not inherit the lock's file descriptor (9>&-), or the lock outlives the script.
# Needs root and apt-get. Exit status: 0 ready; 3 cannot install here (not root / no apt-get);
# 1 anything else. The last line of output says which.
set -euo pipefail

MARK="# written by tests/slurm/cluster.sh"
CONF=/etc/slurm/slurm.conf
LOCK=/run/lm-slurm-cluster.lock

say() { echo "cluster.sh: $*"; }
cannot() { say "cannot install SLURM here: $*"; exit 3; }

[ "$(id -u)" = 0 ] || cannot "not root"
command -v apt-get >/dev/null 2>&1 || cannot "no apt-get"

exec 9>"$LOCK"
flock -w 300 9 || { say "timed out waiting for $LOCK"; exit 1; }

cluster_answers() { timeout 10 sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)'; }

# ---------------------------------------------------------------------------------- packages
need=()
for bin in /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd /usr/bin/sbatch:slurm-client /usr/sbin/munged:munge; do
    [ -x "${bin%%:*}" ] || need+=("${bin##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/tmp/lm-slurm-apt.log 2>&1; then
        apt-get update -q >>/tmp/lm-slurm-apt.log 2>&1 || true
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>/tmp/lm-slurm-apt.log 2>&1 \
            || cannot "apt-get install failed (see /tmp/lm-slurm-apt.log: $(tail -n 1 /tmp/lm-slurm-apt.log))"
    fi
fi

# --------------------------------------------------------------------------- host and config
host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    if cluster_answers; then
        say "using the existing cluster configured in $CONF"
        say "ready: $(sinfo -h -o '%N %t' | head -n 1)"
        exit 0
    fi
    say "$CONF exists, was not written by this script, and its cluster does not answer; not touching it"
    exit 1
fi

node_line=$(/usr/sbin/slurmd -C | grep '^NodeName=' | sed 's/ *$//')
[ -n "$node_line" ] || { say "slurmd -C printed no node line"; exit 1; }
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new=$(mktemp)
cat > "$new" <<CONF
$MARK
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire+1 s after it ended (the default 120 s is too slow)
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
$node_line State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
changed=0
if ! cmp -s "$new" "$CONF" 2>/dev/null; then
    mv "$new" "$CONF"
    chmod 644 "$CONF"
    changed=1
else
    rm -f "$new"
fi

# ---------------------------------------------------------------------------------- daemons
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! alive /run/munge/munged.pid; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged 9>&-
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { say "munge does not work"; exit 1; }

if alive /run/slurmctld.pid && [ $changed = 1 ]; then
    scontrol reconfigure || true
fi
alive /run/slurmctld.pid || /usr/sbin/slurmctld 9>&-
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
alive /run/slurmd.pid || /usr/sbin/slurmd 9>&-

# the node comes up idle; one left down or drained by an earlier run is resumed
for _ in $(seq 100); do
    state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n 1)
    case "$state" in
        idle|mix|alloc|comp*) break ;;
        down*|drain*|fail*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
cluster_answers || { say "node $host did not become available (state '$state'; see /var/log/slurm/)"; exit 1; }
say "ready: $(sinfo -h -o '%N %t %c' | head -n 1)"
