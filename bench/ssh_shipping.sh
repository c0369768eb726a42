#!/usr/bin/env bash
# Manual check of the SSH provider's wheel shipping (no `python:`): a pool on an sshd
# bound to 127.0.0.1, made and removed here. Needs root, openssh-server and the package
# registry (the venv on the "host" installs skybatch's dependencies). Prints apply times.
set -euo pipefail
D=/tmp/ship/run; rm -rf $D; mkdir -p $D/remote $D/home
ssh-keygen -q -t ed25519 -N '' -f $D/hostkey; ssh-keygen -q -t ed25519 -N '' -f $D/key
cp $D/key.pub $D/authorized_keys
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p /run/sshd
cat > $D/sshd_config <<CFG
ListenAddress 127.0.0.1
Port $PORT
HostKey $D/hostkey
AuthorizedKeysFile $D/authorized_keys
StrictModes no
UsePAM no
PidFile $D/sshd.pid
PermitRootLogin yes
CFG
/usr/sbin/sshd -f $D/sshd_config -E $D/sshd.log
trap 'kill $(cat $D/sshd.pid) 2>/dev/null || true' EXIT
cat > $D/ssh_config <<CFG
Host shiptest
  HostName 127.0.0.1
  Port $PORT
  User root
  IdentityFile $D/key
  UserKnownHostsFile $D/known_hosts
  StrictHostKeyChecking accept-new
CFG
cat > $D/pool.yaml <<CFG
pool: {workers: 1}
provider:
  type: ssh
  hosts: [shiptest]
  ssh_config: $D/ssh_config
  remote_dir: $D/remote
CFG
cat > $D/job.py <<'PY'
import skybatch
@skybatch.remote_function
def double():
    for batch in skybatch.load():
        skybatch.save_results([{"x": r["x"] * 2} for r in batch])
out = skybatch.Dataset.from_items([{"x": i} for i in range(10)]).map(double, pool_name="ship", batch_size=3)
print(list(out) if not hasattr(out, "results") else out.results())
PY
export SKYBATCH_HOME=$D/home
cd $D
command -v skybatch >/dev/null || { echo "activate the venv that has skybatch first" >&2; exit 1; }
t0=$(date +%s.%N); skybatch pool apply pool.yaml --pool ship -y; t1=$(date +%s.%N)
echo "cold apply (wheel install): $(python3 -c "print(round($t1-$t0,1))") s"
ls $D/remote
python job.py
skybatch pool down ship -y
t0=$(date +%s.%N); skybatch pool apply pool.yaml --pool ship -y; t1=$(date +%s.%N)
echo "warm apply (venv cached): $(python3 -c "print(round($t1-$t0,1))") s"
skybatch pool down ship -y
skybatch server stop
ls -la $D/remote
