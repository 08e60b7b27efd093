# A throwaway PostgreSQL 15 for tests: initdb into a temp dir, started on a free port of 127.0.0.1
# (its unix socket in the same dir), stopped and removed at the end. A test module takes the
# fixtures with `pytest_plugins = ["pg_server"]`: `pg_server`, one server per test session;
# `pg_url`, a fresh database on it for each test, so tests stay independent; `pg_own_server`, a
# server of the test's own, to stop or restart. Debian's postgresql-15 (tools/system-deps.sh)
# has the binaries in /usr/lib/postgresql/15/bin ($CITYNODE_PG_BIN elsewhere). PostgreSQL
# refuses to run as root: as root the server runs as the `postgres` user (runuser), in a temp
# dir it owns.

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time

import psycopg
import pytest

PG_BIN = os.environ.get("CITYNODE_PG_BIN", "/usr/lib/postgresql/15/bin")
RUN_AS = "postgres"  # the server's user when the tests run as root
START_TRIES = 3  # a free port can be taken by someone else between choosing it and binding it

# A TEST server: nothing in it outlives the test run, so it skips what makes a real server
# survive a power cut. fsync=off: the kernel still has every write, so a server process killed
# (pg_ctl stop -m immediate) loses nothing: only a crash of the whole machine would.
# synchronous_commit stays on: a commit returns once its WAL is written to the kernel, which is
# what a test of "committed before write() returns" across a server restart needs.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_connections": "off",
}

_names = itertools.count(1)
_shared = None  # the session's server (shared_server)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binaries():
    """The directory of initdb and pg_ctl, or skip (fail as root: tools/system-deps.sh, run by
    `make test` and CI as root, installs them, so missing there is a broken set-up)."""
    if all(os.access(os.path.join(PG_BIN, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
        return PG_BIN
    reason = "PostgreSQL 15 not found in %s (tools/system-deps.sh installs postgresql-15)" % PG_BIN
    if os.geteuid() == 0:
        pytest.fail(reason + ": as root it must be there; run `bash tools/system-deps.sh`")
    pytest.skip(reason)


class PgServer:
    """One PostgreSQL server in its own temp dir; trust authentication on 127.0.0.1 and on its
    unix socket. start(), stop(mode), restart(mode), cleanup(); url(db) for psycopg; admin()
    an autocommit connection to the `postgres` database; create_database() a fresh one."""

    def __init__(self):
        self.bin = binaries()
        self.as_root = os.geteuid() == 0
        self.dir = None
        self.data = None
        self.port = None
        self.start_s = None  # seconds the last start() took (initdb included on the first)
        self.initdb_s = None

    # --- running the server's programs ----------------------------------------------------

    def _run(self, program, *args, timeout=60, check=True):
        command = [os.path.join(self.bin, program), *args]
        if self.as_root:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        # No PG* variables of the caller's (PGPORT, PGDATA, ...) reach the server's tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(
            command,
            cwd=self.dir,  # `postgres` may not be able to read the caller's directory
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                "%s exited %d: %s%s%s"
                % (program, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:], self.log())
            )
        return proc

    def log(self):
        """The server log's last lines, for error messages."""
        try:
            with open(os.path.join(self.dir, "server.log")) as f:
                return "\nserver log:\n" + "".join(f.readlines()[-20:])
        except (OSError, TypeError):
            return ""

    # --- life cycle ---------------------------------------------------------------------

    def start(self):
        """initdb (the first time) and start on a free port; waits until it takes connections."""
        began = time.monotonic()
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="citynode-pg-")
            atexit.register(self.cleanup)
            if self.as_root:
                shutil.chown(self.dir, RUN_AS, RUN_AS)
            self.data = os.path.join(self.dir, "data")
            # --no-sync: nothing here needs to survive a machine crash (SETTINGS).
            self._run(
                "initdb",
                "-D",
                self.data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
            self.initdb_s = time.monotonic() - began
        for attempt in range(START_TRIES):
            if self.port is None or attempt:
                self.port = free_port()
                self._configure()
            proc = self._run(
                "pg_ctl",
                "-D",
                self.data,
                "-l",
                os.path.join(self.dir, "server.log"),
                "-w",
                "-t",
                "30",
                "start",
                check=False,
            )
            if proc.returncode == 0:
                self.start_s = time.monotonic() - began
                return self
            if "already in use" not in self.log() or attempt == START_TRIES - 1:
                raise RuntimeError(
                    "pg_ctl start exited %d: %s%s" % (proc.returncode, proc.stderr, self.log())
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _configure(self):
        # postgresql.auto.conf, read last, so that a restart keeps the port (pg_ctl restart
        # would reuse -o options too, but a file is plainer).
        lines = ["%s = %s" % item for item in SETTINGS.items()]
        lines += ["port = %d" % self.port, "unix_socket_directories = '%s'" % self.dir]
        path = os.path.join(self.data, "postgresql.auto.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        if self.as_root:
            shutil.chown(path, RUN_AS, RUN_AS)

    def running(self):
        return (
            self.data is not None
            and self._run("pg_ctl", "-D", self.data, "status", check=False).returncode == 0
        )

    def stop(self, mode="fast"):
        """pg_ctl stop: "fast" (clients disconnected, a clean shutdown) or "immediate" (the
        server processes killed, as in a crash: recovery replays the WAL at the next start)."""
        if self.running():
            self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")

    def restart(self, mode="fast"):
        """Stop and start again on the same port: every connection is dropped."""
        self.stop(mode)
        return self.start()

    def cleanup(self):
        """Stop the server and remove its dir; safe to call twice."""
        if self.dir is None:
            return
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = self.data = None

    # --- databases ------------------------------------------------------------------------

    def url(self, dbname="postgres", user="postgres", password=None):
        auth = user if password is None else "%s:%s" % (user, password)
        return "postgresql://%s@127.0.0.1:%d/%s" % (auth, self.port, dbname)

    def admin(self, dbname="postgres"):
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def create_database(self, name=None):
        """A fresh, empty database (from template0); its name."""
        name = name or "test_%d_%d" % (os.getpid(), next(_names))
        with self.admin() as conn:
            conn.execute("CREATE DATABASE %s TEMPLATE template0" % name)
        return name

    def drop_database(self, name):
        """Drop it, ending any connection a test left open."""
        with self.admin() as conn:
            conn.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)


def shared_server():
    """The one server of this test session, started on first use."""
    global _shared
    if _shared is None or _shared.dir is None:
        _shared = PgServer().start()
    return _shared


@pytest.fixture(scope="session")
def pg_server():
    server = shared_server()
    yield server
    server.cleanup()


@pytest.fixture
def pg_own_server():
    """A server of this test's own, to stop and restart; removed after the test."""
    server = PgServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server):
    """postgresql://postgres@127.0.0.1:PORT/DB: a fresh database for this test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
