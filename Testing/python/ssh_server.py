"""A real OpenSSH server on 127.0.0.1 for the remote-engine tests (and the remote bench).

Debian's ``openssh-server`` (``make setup`` installs it) runs in the foreground as the current user from a
throwaway folder: its own host key, one authorised user key, a free port, no PAM, no password logins.
The client side gets an ``ssh -F`` config file that knows the host key (StrictHostKeyChecking=yes) and
nothing of the user's own ``~/.ssh``. Nothing listens beyond loopback, nothing is installed as a service.

>>> with LoopbackSSHServer(tmp_path) as server:
...     target = server.target(remote_command=".venv/bin/decipher-mr")
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # root's sshd needs it (Debian's service creates it at boot)


def sshd_available() -> str | None:
    """None when a loopback sshd can run here, else why not (a skip reason)."""
    if not Path(SSHD).exists():
        return "OpenSSH server not installed (apt-get install openssh-server; `make setup` does it)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "OpenSSH client not installed"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "decipher-mr-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path


class LoopbackSSHServer:
    """``sshd -D`` on 127.0.0.1:<free port>, serving the current user with a throwaway key."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = keygen(self.folder / "host_key")
        self.user_key = keygen(self.folder / "user_key")
        self.stranger_key = keygen(self.folder / "stranger_key")  # never authorised: a refused key
        (self.folder / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text(encoding="utf-8"))
        self.config = self.folder / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {self.host_key}",
            f"PidFile {self.folder / 'sshd.pid'}", f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "AllowTcpForwarding no",
            "X11Forwarding no", "LogLevel ERROR", "MaxStartups 50", "",
        ]))
        # the client's config: only this server's host key is known, nothing from ~/.ssh is read
        host_pub = " ".join(Path(f"{self.host_key}.pub").read_text(encoding="utf-8").split()[:2])
        (self.folder / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        self.client_config = self.folder / "ssh_config"
        self.client_config.write_text("\n".join([
            "Host *", f"  UserKnownHostsFile {self.folder / 'known_hosts'}", "  StrictHostKeyChecking yes",
            "  GlobalKnownHostsFile /dev/null", "  IdentityAgent none", "  LogLevel ERROR", "",
        ]))
        self.process: subprocess.Popen | None = None

    def start(self) -> "LoopbackSSHServer":
        if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        subprocess.run([SSHD, "-t", "-f", str(self.config)], check=True, capture_output=True)
        self.log = open(self.folder / "sshd.log", "wb")
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=self.log, stderr=self.log,
                                        start_new_session=True)
        deadline = time.monotonic() + 30
        while True:  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(self.folder / 'sshd.log').read_text(encoding='utf-8')[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> "LoopbackSSHServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def engine(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def target(self, remote_command: str, identity: Path | None = None):
        """An :class:`EngineTarget` for this server (the authorised key unless told otherwise)."""
        from decipher_mr.inference.transport import EngineTarget

        return EngineTarget.parse(self.engine, identity=str(identity or self.user_key), remote_command=remote_command,
                                  ssh_config=str(self.client_config))

    def sessions(self) -> list:
        """psutil processes of the per-connection sshd children (kill one to drop a connection)."""
        import psutil

        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []
