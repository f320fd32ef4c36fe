#!/usr/bin/env bash
# Download SLURM 22.05 + munge and the libraries a stock Ubuntu/Debian image may lack, as Debian 12 .deb
# files, for a host without network (a GPU machine): carry the folder there and run
#   PARARNN_SLURM_DEBS=DIR bash .ci/slurm/setup.sh
# Run on a Debian 12 (bookworm) host with apt sources; writes DIR (default .slurmdeb, ~5 MB).
set -euo pipefail
out="$(realpath -m "${1:-.slurmdeb}")"
mkdir -p "$out"
cd "$out"
apt-get download slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge libmunge2 \
    libaudit1 libbz2-1.0 libcap-ng0 libdbus-1-3 libgcrypt20 libgpg-error0 libhwloc15 libjson-c5 liblua5.1-0 \
    liblz4-1 libnuma1 libpam0g libreadline8 libudev1 libyaml-0-2
ls -la "$out"
