#!/usr/bin/env bash
# Installs what the live-Slurm test (tests/test_slurm.py, marker slurm) and the
# systemd unit check (tests/test_systemd.py) need, from Debian: slurm-wlm (slurmctld,
# slurmd and the client commands), munge, and systemd for systemd-analyze.
# Idempotent: nothing is fetched when every command is already there. Needs root
# (or sudo). The test starts its own daemons with its own configuration; none of
# the services these packages install is used or started here.
set -euo pipefail

need=()
for tool in slurmctld slurmd sbatch squeue scancel sinfo; do
    command -v "$tool" >/dev/null || { need+=(slurm-wlm); break; }
done
command -v munged >/dev/null || need+=(munge)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ "${#need[@]}" -eq 0 ]; then
    echo "install-slurm: slurm-wlm, munge and systemd-analyze already installed"
    exit 0
fi
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
echo "install-slurm: installed ${need[*]}"
