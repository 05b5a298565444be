#!/usr/bin/env bash
# Installs the Debian/Ubuntu Slurm + munge packages the `slurm`-marked tests need (a throwaway
# local cluster: see tests/slurm_local.py). Idempotent: does nothing when they are already there.
# Usage (as root, or with sudo available): scripts/install_slurm.sh
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm packages already installed: ${PKGS[*]}"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Package scripts try to start services; there is no init system in CI containers, so keep
# them from starting anything (the tests start their own daemons).
policy_added=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    policy_added=1
fi
trap 'if [ $policy_added -eq 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi' EXIT
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "installed: ${missing[*]}"
