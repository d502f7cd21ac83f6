"""Who may use lf's web pages (`lf webui`, `lf webchat`) and where `lf webui` may write.

Every button of a Gradio page is also an HTTP endpoint that anyone reaching the address can call, so:
- the address is 127.0.0.1 (this machine only) unless --host or GRADIO_SERVER_NAME names another, and serving
  beyond this machine without a login is a warning at startup;
- --auth USER:PASSWORD (repeatable) or --auth-file PATH (USER:PASSWORD lines) is handed to Gradio's
  launch(auth=...): the page and every endpoint then need a login; without one the page says it is open;
- every path `lf webui` writes (a saved YAML, output_dir and the other folders a run writes, export_dir, its run
  folders) resolves, symlinks and `..` followed, under one root: --root DIR, else LF_WEBUI_ROOT, else the working
  directory;
- every path it reads (a YAML loaded, and each key of READ_KEYS its runs, chat, export and dataset preview read:
  models, adapters, dataset_dir, task_dir, ...) resolves under the root, lf's own data/ and evaluation/ folders,
  or a folder named with --read DIR (the models the page may load), so that a stranger cannot list or show files
  from elsewhere. A value that is not on this machine (a hub id, lf-tiny-llama) is not a path and passes.
  --allow-any-path lifts both checks (the run folders stay in the root);
- what would use the server's credentials beyond this machine, or run code a model ships (TRUSTED_ONLY: report_to
  trackers other than none and tensorboard, SwanLab's cloud, a reward model over HTTP, trust_remote_code, a Ray
  cluster to join) is refused unless the page is trusted: behind a login, or served on this machine only (Access.trusted). push_to_hub
  is refused on every page.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lf.errors import ConfigError
from lf.resources import shipped

log = logging.getLogger("lf")
DEFAULT_HOST = "127.0.0.1"
# The config keys whose values a run (or the chat, the export, the dataset preview) reads from this machine when they
# name a local path; the COMMA_LISTS among them hold several. HF's deepspeed, fsdp_config, accelerator_config and
# generation_config take a file's path too.
READ_KEYS = ("model_name_or_path", "adapter_name_or_path", "dataset_dir", "media_dir", "tokenized_path", "task_dir",
             "cache_dir", "ref_model", "ref_model_adapters", "reward_model", "reward_model_adapters",
             "resume_from_checkpoint", "deepspeed", "fsdp_config", "accelerator_config", "generation_config",
             "new_special_tokens_config")
COMMA_LISTS = ("adapter_name_or_path", "ref_model_adapters", "reward_model_adapters")
# Keys that would reach beyond the machine with the server's own credentials (HF's upload of each save).
UPLOAD_KEYS = ("push_to_hub",)
# report_to values that only write files, into logging_dir (under the root); the others log in to a service with
# the server's credentials (wandb's, mlflow's and SwanLab's variables and files) or write outside the root
LOCAL_TRACKERS = ("none", "tensorboard")
LOCAL_SWANLAB = ("local", "offline", "disabled")  # swanlab_mode values that keep the run in swanlab_logdir
# What a run of a parsed config does that only a trusted page allows: (key, whether the config does it, what it
# does, said after "key: ").
TRUSTED_ONLY = (
    ("report_to", lambda c: [name for name in c.training.report_to or () if name not in LOCAL_TRACKERS],
     "{} would send the run to a service with this server's credentials (report_to: tensorboard keeps it in "
     "logging_dir)"),
    ("use_swanlab", lambda c: c.finetuning.use_swanlab and c.finetuning.swanlab_mode not in LOCAL_SWANLAB,
     "SwanLab's cloud would get the run with this server's credentials (swanlab_mode: offline keeps it in "
     "swanlab_logdir)"),
    ("swanlab_api_key", lambda c: c.finetuning.use_swanlab and c.finetuning.swanlab_api_key is not None,
     "would log this server in to SwanLab"),
    ("swanlab_lark_webhook_url", lambda c: c.finetuning.use_swanlab and c.finetuning.swanlab_lark_webhook_url,
     "would make this server call a URL"),
    ("reward_model_type", lambda c: c.finetuning.stage == "ppo" and c.finetuning.reward_model_type == "api",
     "api would make this server call the reward_model URL"),
    ("trust_remote_code", lambda c: c.model.trust_remote_code,
     "true would run the Python code the model ships, with this server's rights"),
    ("ray_init_kwargs", lambda c: c.finetuning.ray_init_kwargs is not None,
     "would make this server join the Ray cluster it names (USE_RAY=1)"),
)


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

    @property
    def trusted(self) -> bool:
        """Whether those who can use the page may use the server's credentials and run code (TRUSTED_ONLY): the
        operator gave them a login, or only this machine reaches it."""
        return self.login or self.local()

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
    """The folder under which `lf webui` writes, and the checks of what it is asked to read, write or run.
    `trusted`: whether its runs may do what TRUSTED_ONLY names (Access.trusted; refused by default)."""

    def __init__(self, folder: str | None = None, any_path: bool = False, readable: tuple[str, ...] = (),
                 trusted: bool = False):
        given = folder or os.environ.get("LF_WEBUI_ROOT") or os.getcwd()
        self.path, self.any_path, self.trusted = Path(given).resolve(), any_path, trusted
        if not self.path.is_dir():
            raise ConfigError(f"the web UI's root {given} is not a folder: create it, or name another with --root "
                              f"DIR or LF_WEBUI_ROOT")
        for folder in readable:
            if not Path(folder).is_dir():
                raise ConfigError(f"--read {folder} is not a folder: name a folder the web UI may read (a model's)")
        # what the page may read: the root, lf's own demo data and tasks, and the folders --read names
        self.readable = tuple(dict.fromkeys(Path(p).resolve() for p in (
            self.path, shipped("data"), shipped("evaluation"), *readable)))

    def check(self, key: str, path: str) -> Path:
        """`path` resolved (relative to the working directory, as `lf train` reads it; symlinks and `..`
        followed); a ConfigError when that is outside the root."""
        resolved = Path(path).resolve()
        if self.any_path or resolved.is_relative_to(self.path):
            return resolved
        raise ConfigError(f"{key}: {path} is outside {self.path}, the only folder this web UI writes to: choose a "
                          f"path under it, or restart lf webui with --root DIR (or LF_WEBUI_ROOT=DIR), or "
                          f"--allow-any-path")

    def check_read(self, key: str, path: str) -> Path:
        """`path` resolved as check() resolves it; a ConfigError when that is outside every readable folder."""
        resolved = Path(path).resolve()
        if self.any_path or any(resolved.is_relative_to(folder) for folder in self.readable):
            return resolved
        raise ConfigError(f"{key}: {path} is outside the folders this web UI reads "
                          f"({', '.join(map(str, self.readable))}): choose a path under one of them, or restart "
                          f"lf webui with --read DIR for a folder it may read (a model's), or --allow-any-path")

    def check_reads(self, config: dict) -> None:
        """A ConfigError for the first READ_KEYS value of `config` that names a local path outside the readable
        folders, or for a key that would upload (UPLOAD_KEYS). adapter_folder is checked joined onto each adapter,
        as the parser joins it (a link inside an adapter could lead out)."""
        folder, adapters = config.get("adapter_folder"), config.get("adapter_name_or_path")
        if isinstance(folder, str) and isinstance(adapters, str):
            joined = ",".join(os.path.join(path.strip(), folder) for path in adapters.split(",") if path.strip())
            config = {**config, "adapter_name_or_path": joined}
        for key in UPLOAD_KEYS:
            if config.get(key):
                raise ConfigError(f"{key}: the web UI uploads nothing with this server's credentials: remove the key "
                                  f"(run lf train yourself to upload)")
        for key in READ_KEYS:
            value = config.get(key)
            if not isinstance(value, str):  # absent, a flag (resume_from_checkpoint: true) or an inline mapping
                continue
            for path in value.split(",") if key in COMMA_LISTS else (value,):
                if local(path.strip()):
                    self.check_read(key, path.strip())

    def check_trusted(self, cfg) -> None:
        """A ConfigError for the first thing of TRUSTED_ONLY that the parsed config `cfg` (parse_train_args's)
        does, unless the page is trusted."""
        if self.trusted:
            return
        for key, does, what in TRUSTED_ONLY:
            if found := does(cfg):
                said = what.format(", ".join(found) if isinstance(found, list) else "")
                raise ConfigError(f"{key}: {said}; this web UI allows that only behind a login or on this machine "
                                  f"alone: remove it, or restart lf webui with --auth USER:PASSWORD (or on "
                                  f"127.0.0.1), or run lf train yourself")


def local(value: str) -> bool:
    """Whether a run would read `value` from this machine: an absolute path, a path out through `..`, or anything
    there (relative to the working directory, as the run reads it); else it is a hub id or a name lf knows."""
    return bool(value) and (Path(value).is_absolute() or ".." in Path(value).parts or os.path.lexists(value))
