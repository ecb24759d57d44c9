#!/bin/bash
# One MPI world over the StatefulSet's pods (FT's multi-node Triton backend: one tritonserver per pod). Every pod
# runs sshd; rank 0 (the pod whose name ends in -0) waits until every rank accepts ssh, then runs `mpirun` with one
# process per pod, each running this script's arguments (the server command). Needs bash, OpenSSH (sshd, ssh,
# ssh-keygen) and OpenMPI's mpirun in the image, run as root (as NVIDIA's Triton containers are).
# Environment: MPI_HOSTS (the pods' DNS names in rank order, comma-separated), SSH_PORT.
set -euo pipefail
mkdir -p "$HOME/.ssh" /run/sshd
chmod 700 "$HOME/.ssh"
install -m 600 /etc/ft-exporter/mpi-key/id_ecdsa "$HOME/.ssh/id_ecdsa"
ssh-keygen -y -f "$HOME/.ssh/id_ecdsa" > "$HOME/.ssh/authorized_keys"
chmod 600 "$HOME/.ssh/authorized_keys"
printf 'Host *\n  Port %s\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n' "$SSH_PORT" \
  > "$HOME/.ssh/config"
ssh-keygen -A >/dev/null  # host keys, when the image has none
if [ "${HOSTNAME##*-}" != "0" ]; then
  exec /usr/sbin/sshd -D -e -p "$SSH_PORT"  # rank > 0: mpirun on rank 0 starts the server here
fi
/usr/sbin/sshd -e -p "$SSH_PORT"
IFS=, read -ra hosts <<< "$MPI_HOSTS"
for host in "${hosts[@]}"; do
  until ssh -o ConnectTimeout=5 "$host" true; do
    echo "waiting for rank $host"
    sleep 5
  done
done
exec mpirun --allow-run-as-root --bind-to none -np "${#hosts[@]}" --host "$MPI_HOSTS" \
  -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH "$@"
