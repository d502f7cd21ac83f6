"""Who may use lf's web pages (`lf webui`, `lf webchat`) and where `lf webui` may write.

Every button of a Gradio page is also an HTTP endpoint that anyone reaching the address can call, so:
- the address is 127.0.0.1 (this machine only) unless --host or GRADIO_SERVER_NAME names another, and serving
  beyond this machine without a login is a warning at startup;
- --auth USER:PASSWORD (repeatable) or --auth-file PATH (USER:PASSWORD lines) is handed to Gradio's
  launch(auth=...): the page and every endpoint then need a login; without one the page says it is open;
- every path `lf webui` writes (a saved YAML, output_dir and the other folders a run writes, export_dir, its run
  folders) resolves, symlinks and `..` followed, under one root: --root DIR, else LF_WEBUI_ROOT, else the working
  directory. --allow-any-path lifts the check (the run folders stay in the root).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lf.errors import ConfigError

log = logging.getLogger("lf")
DEFAULT_HOST = "127.0.0.1"


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The options of the address and the login, shared by `lf webui` and `lf webchat`."""
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD")
    parser.add_argument("--auth-file", default=None, metavar="PATH")
    parser.add_argument("--lang", default=None)  # the page's language (lf.serve.webui_text)


@dataclass(frozen=True)
class Access:
    """Where the page is served and who may log in (no users: no login)."""

    host: str
    port: int | None  # None: GRADIO_SERVER_PORT, else Gradio's 7860
    users: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Access:
        users = [_user(text, "--auth") for text in args.auth]
        if args.auth_file:
            users += _auth_file(args.auth_file)
        return cls(args.host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST, args.port, tuple(users))

    @property
    def login(self) -> bool:
        return bool(self.users)

    def local(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may reach beyond this machine
            return False

    def announce(self, command: str, url: str) -> None:
        """The startup line: whether the page needs a login, and a warning when it is open beyond this machine."""
        if self.login:
            log.info("%s: %s, login required (%d user%s)", command, url, len(self.users),
                     "" if len(self.users) == 1 else "s")
        elif self.local():
            log.info("%s: %s, open (no login): anyone on this machine can use it; --auth USER:PASSWORD adds a "
                     "login", command, url)
        else:
            log.warning("%s: %s is served on %s with no login: anyone who can reach it can use it (train, write "
                        "files, chat); add --auth USER:PASSWORD or --auth-file PATH, or serve on 127.0.0.1",
                        command, url, self.host)


def _user(text: str, where: str) -> tuple[str, str]:
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise ConfigError(f"{where}: expected USER:PASSWORD (both non-empty), got {text!r}")
    return user.strip(), password


def _auth_file(path: str) -> list[tuple[str, str]]:
    """USER:PASSWORD lines; blank lines and # comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--auth-file: cannot read {path} ({exc}): name a file of USER:PASSWORD lines") from None
    users = [_user(line, f"--auth-file {path}:{number}") for number, line in enumerate(lines, 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not users:
        raise ConfigError(f"--auth-file: {path} has no USER:PASSWORD line: add one, or leave --auth-file out")
    return users


class Root:
    """The folder under which `lf webui` writes, and the check of each path it is asked to write."""

    def __init__(self, folder: str | None = None, any_path: bool = False):
        given = folder or os.environ.get("LF_WEBUI_ROOT") or os.getcwd()
        self.path, self.any_path = Path(given).resolve(), any_path
        if not self.path.is_dir():
            raise ConfigError(f"the web UI's root {given} is not a folder: create it, or name another with --root "
                              f"DIR or LF_WEBUI_ROOT")

    def check(self, key: str, path: str) -> Path:
        """`path` resolved (relative to the working directory, as `lf train` reads it; symlinks and `..`
        followed); a ConfigError when that is outside the root."""
        resolved = Path(path).resolve()
        if self.any_path or resolved.is_relative_to(self.path):
            return resolved
        raise ConfigError(f"{key}: {path} is outside {self.path}, the only folder this web UI writes to: choose a "
                          f"path under it, or restart lf webui with --root DIR (or LF_WEBUI_ROOT=DIR), or "
                          f"--allow-any-path")
