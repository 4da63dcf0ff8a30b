"""A real PostgreSQL cluster and a real PgBouncer (transaction pooling), for tests.

``running_postgres()`` runs ``initdb`` into a fresh temp dir, starts the cluster with
``pg_ctl`` on a free loopback port (its Unix socket in the same temp dir), creates a role
with a password and a database it owns, then starts PgBouncer from
``docs/ops/pgbouncer.ini`` (only addresses, ports and file paths overridden; its
``pool_mode = transaction`` and the rest kept) on another free port, with a userlist
``auth_file``. Everything is stopped and removed afterwards.

PostgreSQL and PgBouncer refuse to run as root, so when the tests run as root the
programs run as the ``postgres`` OS user (``subprocess`` ``user=``/``group=``, no
intermediate ``su``) and the temp dir is owned by it.

The ``pg`` fixture (``pg_fixture``, session-scoped) shares one cluster between every test
module that imports it: ``from tests.support.postgres import pg_fixture  # noqa: F401``.
"""

from __future__ import annotations

import configparser
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

from tests.support.proxy_process import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
TEMPLATE = Path(__file__).resolve().parents[2] / "docs" / "ops" / "pgbouncer.ini"
OS_USER = "postgres"
DB_NAME = "switchboard"
DB_USER = "switchboard"
DB_PASSWORD = "sb-test-password"


@dataclass(frozen=True)
class PgEnv:
    """Where the test cluster and its PgBouncer listen."""

    host: str
    port: int
    """PostgreSQL, direct."""
    bouncer_port: int
    """PgBouncer, transaction pooling, in front of ``port``."""
    socket_dir: Path
    database: str
    user: str
    password: str
    startup_seconds: float
    """initdb + start + role/database + PgBouncer, measured."""

    @property
    def direct_dsn(self) -> str:
        return self.dsn(bouncer=False)

    @property
    def bouncer_dsn(self) -> str:
        return self.dsn(bouncer=True)

    def dsn(self, *, database: str | None = None, bouncer: bool = True) -> str:
        """A libpq URL for the test role, through PgBouncer or straight to PostgreSQL."""
        port = self.bouncer_port if bouncer else self.port
        return (
            f"postgresql://{self.user}:{self.password}@{self.host}:{port}/"
            f"{database or self.database}?connect_timeout=5"
        )

    def create_database(self) -> str:
        """A new empty database owned by the test role; its name."""
        name = f"sb_{uuid.uuid4().hex[:12]}"
        with self.superuser_connect() as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    psycopg.sql.Identifier(name), psycopg.sql.Identifier(self.user)
                )
            )
        return name

    def superuser_connect(self) -> psycopg.Connection[Any]:
        """The ``postgres`` superuser over the Unix socket (trust), autocommit."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=OS_USER,
            dbname="postgres",
            autocommit=True,
        )


def available() -> str | None:
    """Why the tools are missing, or None when they are all here."""
    for tool in (PG_BIN / "initdb", PG_BIN / "pg_ctl", Path(PGBOUNCER)):
        if not tool.exists():
            return f"{tool} is not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root and there is no {OS_USER!r} OS user to run PostgreSQL"
    return None


def _as_owner() -> dict[str, Any]:
    """subprocess keyword arguments that drop root to the postgres OS user."""
    if os.geteuid() != 0:
        return {}
    return {"user": OS_USER, "group": OS_USER, "extra_groups": []}


def _run(args: list[str], *, env: Mapping[str, str] | None = None) -> None:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        cwd="/",
        check=False,
        **_as_owner(),
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited ({proc.returncode}):\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer never listened on {port}:\n{_tail(log)}") from None
            time.sleep(0.02)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return "(no log)"


def pgbouncer_config(
    *, pg_port: int, listen_port: int, auth_file: Path, logfile: Path, pidfile: Path
) -> str:
    """``docs/ops/pgbouncer.ini`` with the test's addresses, ports and paths."""
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
    parser.read_string(TEMPLATE.read_text())
    parser["databases"] = {
        DB_NAME: f"host=127.0.0.1 port={pg_port} dbname={DB_NAME}",
        # Fallback: any other database name goes to the same-named database, so tests
        # can use a fresh database per test through PgBouncer too.
        "*": f"host=127.0.0.1 port={pg_port}",
    }
    section = parser["pgbouncer"]
    section["listen_addr"] = "127.0.0.1"
    section["listen_port"] = str(listen_port)
    section["unix_socket_dir"] = ""
    section["auth_file"] = str(auth_file)
    section["logfile"] = str(logfile)
    section["pidfile"] = str(pidfile)
    section["admin_users"] = DB_USER
    lines: list[str] = []
    for name in parser.sections():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in parser[name].items())
        lines.append("")
    return "\n".join(lines)


@contextmanager
def running_postgres() -> Iterator[PgEnv]:
    """Start PostgreSQL + PgBouncer in a temp dir; stop and remove them on exit."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="sb-pg-"))
    owner = _as_owner()
    if owner:
        entry = pwd.getpwnam(OS_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data = root / "data"
    sockets = root / "sock"
    port = free_port()
    bouncer_port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    pg_started = False
    bouncer: subprocess.Popen[bytes] | None = None
    try:
        _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                OS_USER,
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ],
            env=env,
        )
        _run(["mkdir", "-m", "700", str(sockets)], env=env)
        options = (
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        _run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            ],
            env=env,
        )
        pg_started = True
        with psycopg.connect(
            host=str(sockets), port=port, user=OS_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    psycopg.sql.Identifier(DB_USER), psycopg.sql.Literal(DB_PASSWORD)
                )
            )
            conn.execute(
                psycopg.sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    psycopg.sql.Identifier(DB_NAME), psycopg.sql.Identifier(DB_USER)
                )
            )

        auth_file = root / "userlist.txt"
        auth_file.write_text(f'"{DB_USER}" "{DB_PASSWORD}"\n')
        log = root / "pgbouncer.log"
        config = root / "pgbouncer.ini"
        config.write_text(
            pgbouncer_config(
                pg_port=port,
                listen_port=bouncer_port,
                auth_file=auth_file,
                logfile=log,
                pidfile=root / "pgbouncer.pid",
            )
        )
        if owner:
            entry = pwd.getpwnam(OS_USER)
            for path in (auth_file, config):
                os.chown(path, entry.pw_uid, entry.pw_gid)
                path.chmod(0o600)
        bouncer = subprocess.Popen(
            [PGBOUNCER, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=env,
            **owner,
        )
        _wait_port(bouncer_port, bouncer, log, timeout=10.0)
        yield PgEnv(
            host="127.0.0.1",
            port=port,
            bouncer_port=bouncer_port,
            socket_dir=sockets,
            database=DB_NAME,
            user=DB_USER,
            password=DB_PASSWORD,
            startup_seconds=time.monotonic() - started,
        )
    finally:
        if bouncer is not None:
            bouncer.terminate()
            try:
                bouncer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                bouncer.kill()
                bouncer.wait()
        if pg_started:
            _run(
                [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                env=env,
            )
        shutil.rmtree(root, ignore_errors=True)


_shared: PgEnv | None = None
_shared_stop = ExitStack()
_users = 0


@pytest.fixture(scope="session", name="pg")
def pg_fixture() -> Iterator[PgEnv]:
    """One cluster for the whole session, however many modules import this fixture."""
    global _shared, _users
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    if _shared is None:
        _shared = _shared_stop.enter_context(running_postgres())
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared = None
            _shared_stop.close()


def bouncer_admin(env: PgEnv, *commands: str) -> None:
    """Run commands on PgBouncer's admin console (the test role is in ``admin_users``).
    Without parameters psycopg sends each as a simple query, all the console speaks."""
    with psycopg.connect(
        env.dsn(database="pgbouncer"), autocommit=True, prepare_threshold=None
    ) as conn:
        for command in commands:
            conn.execute(command)


def bouncer_refuse(env: PgEnv, database: str) -> None:
    """Make the real PgBouncer refuse ``database`` as in an outage: new connections fail
    at once ("database is disabled") and the open ones are dropped. Other databases of
    the shared cluster are untouched."""
    name = _console_name(database)
    # KILL leaves the database paused (new clients would hang); RESUME lifts only that.
    bouncer_admin(env, f"DISABLE {name}", f"KILL {name}", f"RESUME {name}")


def bouncer_accept(env: PgEnv, database: str) -> None:
    """Undo ``bouncer_refuse``."""
    bouncer_admin(env, f"ENABLE {_console_name(database)}")


def _console_name(database: str) -> str:
    # The console takes bare names only; create_database() names are plain identifiers.
    if not database.isidentifier():
        raise ValueError(f"not a plain database name: {database!r}")
    return database
