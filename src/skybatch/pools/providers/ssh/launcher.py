"""Starts one agent on a host, detached; run there as ``python -c <this file's text>``.

Standard library only: it runs under whatever interpreter the host has. Its request
comes on stdin as one JSON line (so the token is on no command line that ``ps``
shows): the agent's home, directory, interpreter, environment and the token, which
it hands to the agent on the agent's stdin, as the local provider does. It answers
one JSON line: the agent's pid, its start time (``/proc/<pid>/stat`` field 22, which
tells a reused pid apart), and its home and directory made absolute.
"""

import json
import os
import subprocess
import sys


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: count from after its ")".
        return f.read().rsplit(")", 1)[1].split()[19]


def main() -> None:
    request = json.loads(sys.stdin.readline())
    home = os.path.abspath(os.path.expanduser(request["home"]))
    workdir = os.path.join(home, request["dir"])
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    os.chmod(home, 0o700)  # the agents' home, like a SKYBATCH_HOME: ours alone
    private = os.path.join(workdir, ".skybatch")
    os.makedirs(private, mode=0o700, exist_ok=True)
    log = os.open(os.path.join(private, "agent.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    env = dict(os.environ)
    env.pop("SKYBATCH_TOKEN", None)
    env.update(request["env"])
    env["SKYBATCH_HOME"] = home
    proc = subprocess.Popen(
        [request["python"], "-m", "skybatch.agent"],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own session: it outlives this ssh session, and a signal to its group
        # reaches what it started.
        start_new_session=True,
    )
    os.close(log)
    assert proc.stdin is not None
    try:
        # The certificate of an HTTPS server follows the token (the agent pins it).
        proc.stdin.write(request["token"].encode() + b"\n" + (request["cert"] or "").encode())
        proc.stdin.close()
    except OSError:
        pass  # it died at once; the server's liveness check sees it gone
    answer = {"pid": proc.pid, "start": _start_time(proc.pid), "home": home, "dir": workdir}
    sys.stdout.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
