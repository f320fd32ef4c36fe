#!/usr/bin/env bash
# Install SLURM + munge from the .deb files of .ci/slurm/fetch_debs.sh without apt or network: unpack them,
# copy the programs and plugins, and add only the shared libraries the host does not already have (its
# own stay in use). Called by setup.sh when PARARNN_SLURM_DEBS=DIR and SLURM is not installed. Root only.
#   bash .ci/slurm/install_debs.sh DIR
set -euo pipefail
debs="${1:?usage: install_debs.sh DIR (of .deb files)}"
# Never over an installed SLURM: rewriting the plugins of running daemons in place can crash them.
if command -v slurmctld >/dev/null || command -v slurmd >/dev/null; then
    echo "[slurm-debs] SLURM is already installed here ($(command -v slurmctld slurmd | tr '\n' ' ')): nothing done" >&2
    exit 1
fi
compgen -G "$debs/*.deb" >/dev/null || { echo "[slurm-debs] no .deb files in $debs" >&2; exit 1; }
x="$(mktemp -d)"
trap 'rm -rf "$x"' EXIT
for f in "$debs"/*.deb; do dpkg-deb -x "$f" "$x"; done
cp -an "$x/usr/bin/." /usr/bin/
cp -an "$x/usr/sbin/." /usr/sbin/
[ -d "$x/sbin" ] && cp -an "$x/sbin/." /usr/sbin/
# Debian ships the daemons as *-wlm and links the plain names through update-alternatives.
for b in slurmctld slurmd slurmstepd; do [ -e "/usr/sbin/$b" ] || ln -s "/usr/sbin/$b-wlm" "/usr/sbin/$b"; done
plugins=usr/lib/x86_64-linux-gnu/slurm-wlm
mkdir -p "/$plugins" && cp -an "$x/$plugins/." "/$plugins/"
# Shared libraries: only the sonames the host lacks, found through ldd (copying every library of the
# packages would let the older Debian builds shadow the host's own in the loader cache).
libs=/usr/local/lib/pararnn-slurm
mkdir -p "$libs"
echo "$libs" > /etc/ld.so.conf.d/pararnn-slurm.conf
programs=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmstepd /usr/sbin/munged /usr/bin/munge /usr/bin/unmunge
          /usr/bin/sbatch /usr/bin/squeue /usr/bin/scontrol /usr/bin/sinfo /usr/bin/scancel /usr/bin/srun)
# The plugins setup.sh's slurm.conf loads (others, e.g. PMIx or REST, need libraries not fetched).
for p in libslurmfull auth_munge cred_munge select_cons_tres sched_backfill proctrack_linuxproc task_none \
         switch_none mpi_none gres_gpu gpu_generic cgroup_v2 jobacct_gather_none accounting_storage_none jobcomp_none; do
    programs+=("/$plugins/$p.so")
done
missing() {
    shopt -s nullglob
    { ldd "${programs[@]}" "$libs"/* 2>/dev/null || true; } | awk '/not found/ {print $1}' | sort -u
}
for _ in 1 2 3 4 5; do  # a copied library may need another one
    need="$(missing)"
    [ -n "$need" ] || break
    for so in $need; do
        src="$(find "$x" -name "$so" | head -n 1)"
        [ -n "$src" ] || { echo "[slurm-debs] $so is needed but in none of the packages" >&2; exit 1; }
        cp -L "$src" "$libs/$so"
    done
    ldconfig
done
id munge >/dev/null 2>&1 || useradd -r -M -s /usr/sbin/nologin munge
mkdir -p /etc/munge
cp -an "$x/etc/." /etc/ 2>/dev/null || true
need="$(missing)"
[ -z "$need" ] || { echo "[slurm-debs] unresolved libraries: $need" >&2; exit 1; }
echo "[slurm-debs] installed $(slurmctld -V) from $debs ($(ls "$libs" | wc -l) libraries added under $libs)"
