#!/usr/bin/env bash
# Install what tests/cluster needs for its one-machine Slurm cluster (Debian 12, run as root).
# Idempotent: installs only the packages that are missing.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-slurm.sh: must run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# slurm-wlm: slurmctld + slurmd + client tools; slurmdbd + mariadb: accounting (sacct);
# munge: authentication; iproute2: network namespaces/bridge; procps: pgrep/ps;
# mariadb-client: the mysql CLI used to create the accounting database.
PKGS=(slurm-wlm slurmdbd munge mariadb-server mariadb-client iproute2 procps)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-slurm.sh: all packages present"
  exit 0
fi

echo "install-slurm.sh: installing ${missing[*]}"
# No init system here: keep package postinst scripts from trying to start services.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-slurm.sh: done"
