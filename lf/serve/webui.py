"""`lf webui`: lf in the browser (Gradio), in the spirit of LLaMA Board.

- Train: the key fields of a training YAML (model, dataset, method, hyper-parameters, output_dir, and any other keys
  as YAML); the YAML they make is shown and can be saved, and Start runs exactly it with `lf train`, in a child
  process (its own process group, so Stop ends it, DeepSpeed/torchrun children included, and the page stays
  responsive). While it runs, the page shows the child's output (the live log) and the loss curve read from
  output_dir/trainer_log.jsonl; a run that finishes fills the Chat and Export tabs with its model or adapter.
- Chat: loads a model (and adapter) into an lf.serve.Engine and streams its replies; images, videos and audio clips
  uploaded with a message go to a model that takes them, checked as `lf api` checks its media (lf.serve.media;
  API_MAX_IMAGE_BYTES and API_MAX_IMAGE_PIXELS bound one message's uploads), and a model that takes none of a
  kind refuses it in one line.
- Evaluate & Predict: `lf train` with do_predict, or `lf eval` on a multiple-choice task, run as the Train tab's runs
  are; then their metrics and a table of predictions beside the labels (webeval.py).
- Export: lf.export.export, as `lf export` runs it.

Every word the page shows comes from webui_text.py (English, Simplified Chinese): components are made through
Page, which relabels them all when the page's language switch changes (remembered per browser).

`lf webchat cfg.yaml` (webchat.py) serves the chat panel alone, over the model the YAML names.
Several users: one training run (and one Evaluate & Predict run) per server, which every browser tab sees and only
the tab that started it (or one of the same login) stops; one chat model per server, which every tab chats with (each
its own conversation, a gr.State) and only the tab that loaded it (or one of the same login) unloads or replaces
(Owner.controls). What a tab owns becomes anyone's when that tab closes (or reloads).
Who may use the page and where it may write (the login, the address, the root every written path must be under):
webaccess.py. Save YAML and Start check the config as `lf train` does before writing anything; Export refuses a
non-empty export_dir unless told to overwrite; the run folders go when the server ends (Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import gradio as gr
import pandas as pd
import yaml

from lf.config import parse_infer_args, parse_train_args
from lf.config.export import GgufType
from lf.config.finetuning import PEFT_TYPES, FinetuningType
from lf.config.generation import GeneratingArguments
from lf.config.model import Dtype
from lf import stages
from lf.data import TEMPLATES
from lf.data.templates import image_templates
from lf.data.conversation import ASSISTANT, USER
from lf.data.registry import IMAGES, MEDIA_COLUMNS
from lf.errors import ConfigError, DataError, ModelError, RequestError, TrainError
from lf.export import export
from lf.serve.api import upload_limits
from lf.serve.backends import open_engine
from lf.serve.engine import Engine
from lf.serve.media import UPLOADS, Images, Limits, MediaError, marks, write
from lf.serve.webaccess import Access, Root, add_server_args
from lf.serve.webpreview import preview_html, preview_parts
from lf.serve.webeval import EVAL, EVAL_DEFAULTS, PREDICT, checked_eval_config, results
from lf.serve.webui_text import LANGS, TEXT, server_lang, words
from lf.train.callbacks import LOG_FILE
from lf.train.checkpoints import last as last_checkpoint
from lf.train.plot import smooth

USAGE = """usage: lf webui [--host HOST] [--port PORT] [--auth USER:PASSWORD | --auth-file PATH] [--root DIR]
                [--read DIR ...] [--allow-any-path] [--lang en|zh]

Opens lf's web UI at http://HOST:PORT (default 127.0.0.1:7860, or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT): a
Train tab that builds a training YAML from its fields, runs it with `lf train` (Start / Stop) and shows the live
log and loss curve; an Evaluate & Predict tab (`lf train` with do_predict: BLEU-4, ROUGE and the predictions;
or `lf eval` on a multiple-choice task: accuracy per category); a Chat tab to talk with a model or a trained
adapter (images, videos and audio uploaded with a message go to a model that takes them, within
API_MAX_IMAGE_BYTES / API_MAX_IMAGE_PIXELS as in `lf api`); an Export tab that merges an adapter into its model
(`lf export`). Start it from the folder your configs' relative paths (dataset_dir: data, output_dir: saves/...) are
relative to, e.g. lf's source tree for the quickstart.

  --auth USER:PASSWORD  a login for the page and its HTTP endpoints (repeat it for more users); --auth-file PATH
                        reads USER:PASSWORD lines. Without either the page is open to whoever reaches HOST, and
                        when HOST is not this machine's own (127.0.0.1) its runs may not use report_to trackers
                        beyond tensorboard, SwanLab's cloud, an HTTP reward model or trust_remote_code.
  --root DIR            the folder every file the UI writes must be under (saved YAMLs, output_dir, export_dir,
                        its run folders); default LF_WEBUI_ROOT, else the working directory.
  --read DIR            a folder the UI may read besides the root and lf's own data/ and evaluation/ (a model's;
                        repeatable): every model, adapter, dataset_dir, task_dir and YAML it reads must be under
                        one of them, so that a stranger cannot list or show other files.
  --allow-any-path      lets the UI read and write anywhere (the run folders stay in the root).
  --lang en|zh          the page's language (English, Simplified Chinese) until a browser picks another with the
                        switch on the page, which that browser remembers; default LF_WEBUI_LANG, else en."""

USER_ERRORS = (ConfigError, DataError, ModelError, TrainError, RequestError)

# The Train tab's fields and their starting values: the quickstart's (configs/quickstart.yaml), in the YAML's order.
TRAIN_DEFAULTS = {
    "model_name_or_path": "lf-tiny-llama", "template": "qwen", "stage": "sft", "finetuning_type": "lora",
    "dataset_dir": "data", "dataset": ["identity", "lf_demo_en"], "cutoff_len": 512, "max_samples": 0,
    "learning_rate": "2e-3", "num_train_epochs": 8.0, "max_steps": 0, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1, "lr_scheduler_type": "cosine", "lora_rank": 16, "lora_target": "all",
    "logging_steps": 5, "save_steps": 40, "output_dir": "saves/webui", "overwrite_output_dir": True, "extra": "",
}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
LORA_KEYS = ("lora_rank", "lora_target")
UNSET_WHEN_ZERO = ("max_samples", "max_steps")  # 0 in the form: the key is left out (all samples; epochs decide)
OVERWRITE_EXPORT = words("export.overwrite")
EXPORT_DTYPES = get_args(Dtype)
GGUF_TYPES = ("none", *get_args(GgufType))
LOG_LINES = 200  # of the child's output shown
WATCH_SECONDS = 2.0  # how often a tab looks for a run it did not start
# the config keys naming paths that a training run writes to: each must be under the root
WRITTEN_BY_TRAINING = ("output_dir", "logging_dir", "tokenized_path", "cache_dir", "swanlab_logdir")
YAML_SUFFIXES = (".yaml", ".yml")


# ---- Train: the YAML from the fields -----------------------------------------------------------------------------

def train_config(fields: dict) -> dict:
    """The config Start runs: the Train tab's fields as `lf train` keys, then the keys of its extra YAML over
    them. A field left empty (or 0 where UNSET_WHEN_ZERO) is left out, so lf's default applies."""
    config = {}
    for key, value in fields.items():
        if key == "extra" or value is None or value == "" or value == []:
            continue
        if (key in UNSET_WHEN_ZERO and value <= 0) or (key in LORA_KEYS and fields["finetuning_type"] != "lora"):
            continue
        if key == "stage":
            config["do_train"] = True
        config[key] = value.strip() if isinstance(value, str) else value
    if "dataset" in config:
        config["dataset"] = ",".join(config["dataset"])
    if "learning_rate" in config:
        config["learning_rate"] = _number("learning_rate", config["learning_rate"])
    config["plot_loss"] = True  # training_loss.png beside the model, as the quickstart writes it
    config.update(_extra_keys(fields.get("extra") or ""))
    return config


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a number: write it like 2e-4 or 0.0002") from None


def _extra_keys(text: str) -> dict:
    try:
        extra = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the other keys are not valid YAML ({exc}): write one `key: value` per line") from None
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError("the other keys must be `key: value` lines (a YAML mapping), e.g. warmup_ratio: 0.05")
    return extra or {}


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def fields_from_config(config: dict) -> dict:
    """The Train tab's fields for a config (a YAML it saved, or any `lf train` YAML): train_config's inverse, so
    train_config(fields_from_config(c)) == c for the configs it makes. A key with no field goes to the extra YAML
    (so do LoRA keys of a config that does not say finetuning_type: lora); a field whose key the config lacks is
    left empty, so lf's default still applies."""
    rest = {key: value for key, value in config.items() if not (key in ("do_train", "plot_loss") and value is True)}
    fields = {}
    for key in TRAIN_DEFAULTS:
        if key == "extra":
            continue
        lora_elsewhere = key in LORA_KEYS and config.get("finetuning_type") != "lora"
        value = None if lora_elsewhere else rest.pop(key, None)
        if key == "dataset" and isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        elif key == "learning_rate" and value is not None:
            value = str(value)
        elif key in UNSET_WHEN_ZERO and value is None:
            value = 0
        fields[key] = value
    fields["overwrite_output_dir"] = bool(fields["overwrite_output_dir"])
    return {**fields, "extra": to_yaml(rest) if rest else ""}  # in TRAIN_DEFAULTS' order: the page's inputs


def checked_config(fields: dict, root: Root, resume: bool = False, lang: str = "en") -> dict:
    """train_config(fields), or a ConfigError where `lf train` would refuse it (an unknown key, a wrong type, a
    broken rule: its parser's own message) or where the run would read or write outside the root's folders (checked
    first: the parser opens some files, such as a deepspeed config) or do what only a trusted page allows (a tracker,
    trust_remote_code: Root.check_trusted). `resume`: the run continues from output_dir's last checkpoint
    (resume_from_checkpoint: true), which must be there."""
    config = train_config(fields)
    if not config.get("output_dir"):
        raise ConfigError("output_dir is empty: name the folder the run writes to (e.g. saves/webui)")
    # the written keys (tokenized_path is read too) are checked against the root alone, after the parser
    root.check_reads({key: value for key, value in config.items() if key not in WRITTEN_BY_TRAINING})
    if resume:  # output_dir's checkpoints are looked at only under the root
        if last_checkpoint(str(root.check("output_dir", config["output_dir"]))) is None:
            raise ConfigError(words("run.no_checkpoint", lang, path=config["output_dir"]))
        config.update(overwrite_output_dir=False, resume_from_checkpoint=True)
    root.check_trusted(parse_train_args(dict(config)))
    for key in WRITTEN_BY_TRAINING:
        if config.get(key):
            root.check(key, config[key])
    return config


def remote_code_warning(config: dict) -> str:
    """What trust_remote_code means, said before a run that sets it starts (the run's log says it again)."""
    if config.get("trust_remote_code") is not True:
        return ""
    return (f"WARNING: trust_remote_code: true runs the Python code that {config.get('model_name_or_path')} "
            f"ships, with your rights, when the run loads it: keep it only for a model you trust")


def dataset_info(root: Root, dataset_dir: str) -> dict:
    """dataset_dir/dataset_info.json; empty when the folder is outside what the page reads, or the file is missing
    or unreadable (the dataset field then takes any name, and Start says what is wrong with it)."""
    try:
        root.check_reads({"dataset_dir": dataset_dir})
        info = json.loads((Path(dataset_dir) / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, ConfigError):
        return {}
    return info if isinstance(info, dict) else {}


def dataset_names(root: Root, dataset_dir: str) -> list[tuple[str, str]]:
    """The datasets of dataset_info(), as (label, name): one with media columns is labelled with them
    ("mllm_demo (images)")."""
    return [(f"{name} ({', '.join(media)})" if (media := media_columns(entry)) else name, name)
            for name, entry in dataset_info(root, dataset_dir).items()]


def media_columns(entry) -> list[str]:
    """The media columns (images, videos, audios) a dataset_info.json entry maps."""
    columns = entry.get("columns") if isinstance(entry, dict) else None
    return [column for column in MEDIA_COLUMNS if isinstance(columns, dict) and column in columns]


def media_note(root: Root, dataset_dir: str, chosen: list[str] | None, template: str | None,
               lang: str = "en") -> str:
    """What the Train tab says under chosen datasets with media: which media, the templates that take them all,
    and whether the chosen template is one (empty for text datasets)."""
    info = dataset_info(root, dataset_dir)
    media = {name: found for name in chosen or () if (found := media_columns(info.get(name)))}
    if not media:
        return ""
    columns = list(dict.fromkeys(column for found in media.values() for column in found))
    takers = sorted(set.intersection(*(set(image_templates(column)) for column in columns)))
    said = words("train.media", lang, datasets=", ".join(media), media=", ".join(columns),
                 templates=", ".join(takers) or words("train.media_none", lang))
    return said if template in takers else f"{said}; {words('train.media_wrong', lang, template=template)}"


# ---- Train: the run, its log and its loss curve ------------------------------------------------------------------

def read_log(path, since: float = 0.0) -> list[dict]:
    """The records of a trainer_log.jsonl; none if it is missing or older than `since` (an earlier run's log that
    the new run has not replaced yet). A line being written (not yet whole JSON) is skipped."""
    path = Path(path)
    try:
        if path.stat().st_mtime < since:
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def loss_frame(records: list[dict]) -> pd.DataFrame:
    """The loss plot's data: step, loss and curve ("original", and "smoothed" as training_loss.png draws it)."""
    points = [(r["current_steps"], r["loss"]) for r in records if "loss" in r and "current_steps" in r]
    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    return pd.DataFrame({"step": steps * 2, "loss": losses + smooth(losses),
                         "curve": ["original"] * len(points) + ["smoothed"] * len(points)})


def log_text(path, lines: int = LOG_LINES) -> str:
    """The last lines of a child's output; of a progress bar redrawn with carriage returns, the last drawing."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:  # newline="": keep the \r
            text = f.read()
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")[-lines:])


class Run:
    """One `lf <command>` child process (train, or eval): the YAML it runs and its output are files in a folder of
    its own (in `parent`), which remove() deletes. `done`: the TEXT key of what a finished run says."""

    def __init__(self, config: dict, parent: Path, command: str = "train", done: str = "run.finished",
                 owner: Owner | None = None):
        self.config, self.command, self.done, self.owner = config, command, done, owner
        self.folder = Path(tempfile.mkdtemp(prefix="lf-webui-", dir=parent))
        self.yaml_path, self.log_path = self.folder / f"{command}.yaml", self.folder / f"{command}.log"
        self.yaml_path.write_text(to_yaml(config), encoding="utf-8")
        self.started, self.stopped = time.time(), False
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "lf.cli", command, str(self.yaml_path)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def state(self) -> str:
        """running, finished, stopped or failed."""
        code = self.process.poll()
        if code is None:
            return "running"
        return "stopped" if self.stopped else "finished" if code == 0 else "failed"

    def stop(self, grace: float = 10.0) -> None:
        """Ends the run's process group: SIGTERM, then SIGKILL after `grace` seconds. Checkpoints already saved
        stay whole (lf writes them aside and renames them into place), for a later run to resume from."""
        if self.process.poll() is not None:
            return
        self.stopped = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:  # ended on its own meanwhile
                return
            try:
                self.process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def remove(self) -> None:
        """Stops the run and deletes its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def records(self) -> list[dict]:
        output_dir = self.config.get("output_dir")  # lf eval's run has none
        return read_log(Path(output_dir) / LOG_FILE, since=self.started) if output_dir else []

    def summary(self, lang: str = "en") -> str:
        """One line for the page: the state and, while running, the progress of the last logged step."""
        state = self.state()
        if state == "running":
            records = [r for r in self.records() if "loss" in r]
            if not records:
                return words("run.loading", lang)
            r = records[-1]
            return words("run.progress", lang, step=r["current_steps"], total=r["total_steps"],
                         percent=r["percentage"], loss=r["loss"], speed=r["throughput"], elapsed=r["elapsed_time"],
                         left=r["remaining_time"])
        if state == "failed":
            return words("run.failed", lang, code=self.process.returncode, path=self.log_path)
        path = self.config.get("output_dir") or self.config.get("save_dir")
        return words(self.done if state == "finished" else f"run.{state}", lang, path=path)

    def controls(self, who: Owner | None) -> bool:
        """Whether `who` may stop this run (Owner.controls)."""
        return Owner.controls(self.owner, who)

    def trained_model(self) -> tuple[str, str, str]:
        """What the Chat and Export tabs load after this run: model, adapter (LoRA or OFT) and template."""
        c = self.config
        if c.get("finetuning_type", "lora") in PEFT_TYPES:
            return c["model_name_or_path"], c["output_dir"], c.get("template", "")
        return c["output_dir"], "", c.get("template", "")


@dataclass(frozen=True)
class Owner:
    """Who started a run or loaded the chat model: the browser tab (Gradio's session of it) and the login it used,
    if any."""
    session: str | None
    user: str | None = None

    @classmethod
    def of(cls, request: gr.Request | None) -> Owner | None:
        return None if request is None else cls(request.session_hash, request.username)

    @staticmethod
    def controls(owner: Owner | None, who: Owner | None) -> bool:
        """Whether `who` may control what `owner` started or loaded: the same tab, or a tab of the same login; what
        has no owner (started from code, or its tab closed) is anyone's."""
        return owner is None or (who is not None and (who.session == owner.session or
                                                      (who.user is not None and who.user == owner.user)))

    @staticmethod
    def after_closing(owner: Owner | None, closed: Owner | None) -> Owner | None:
        """`owner` once the tab `closed` has closed (or reloaded): no one, if it was that tab."""
        return None if owner is not None and closed is not None and owner.session == closed.session else owner


class Trainer:
    """A tab's run (Train's, or Evaluate & Predict's): at most one at a time, its folder in the root. The folder of
    the run before goes when the next one starts, the last one's at close(). The run is the server's: every browser
    tab sees it, only its owner (Run.controls) stops it."""

    def __init__(self, root: Root | None = None):
        self.root = root or Root()
        self.run: Run | None = None
        self._lock = threading.Lock()

    def start(self, fields: dict, lang: str = "en", owner: Owner | None = None, resume: bool = False) -> str | None:
        """Starts a training run of the fields' config (`resume`: from output_dir's last checkpoint); None, or why
        it did not start."""
        return self.launch(lambda: ("train", checked_config(fields, self.root, resume, lang)), lang, owner=owner)

    def launch(self, make, lang: str = "en", done: str = "run.finished", owner: Owner | None = None) -> str | None:
        """Starts the run of (command, config) = make(); None, or why it did not start (a USER_ERRORS make()
        raises: the mistakes the command would refuse, said at once)."""
        with self._lock:
            if self.run is not None and self.run.state() == "running":
                return words("run.busy", lang)
            try:
                command, config = make()
            except USER_ERRORS as exc:
                return words("run.not_started", lang, error=exc)
            self.close()
            self.run = Run(config, self.root.path, command, done, owner)
            return None

    def stop(self, who: Owner | None = None, lang: str = "en") -> str | None:
        """Stops the run if `who` controls it; None, or why not."""
        if self.run is None:
            return None
        if not self.run.controls(who):
            return words("run.not_owner", lang)
        self.run.stop()
        return None

    def running(self) -> bool:
        return self.run is not None and self.run.state() == "running"

    def release(self, closed: Owner | None) -> None:
        """The tab `closed` has closed: a run it owned becomes anyone's to stop."""
        if self.run is not None:
            self.run.owner = Owner.after_closing(self.run.owner, closed)

    def shown(self, summary: str, who: Owner | None, lang: str) -> tuple[str, dict]:
        """(the run's summary as `who` sees it, the update of its Stop button): another tab's run is read-only."""
        if self.run is None or self.run.controls(who):
            return summary, gr.update(interactive=True)
        return f"{summary}\n\n{words('run.watching', lang)}", gr.update(interactive=False)

    def close(self) -> None:
        """Stops the run and removes its folder (the server is ending, or a new run replaces it)."""
        if self.run is not None:
            self.run.remove()


def save_yaml(root: Root, fields: dict, path: str, lang: str = "en") -> str:
    """Writes the fields' config, checked as Start checks it, to `path` (a .yaml file under the root)."""
    if not path.strip():
        return words("save.no_path", lang)
    try:
        target = root.check("the YAML's path", path.strip())
        if target.suffix not in YAML_SUFFIXES:
            raise ConfigError(words("save.not_yaml", lang, path=path.strip()))
        text = to_yaml(checked_config(fields, root))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except USER_ERRORS as exc:
        return words("save.failed", lang, error=exc)
    except OSError as exc:
        return words("save.unwritable", lang, path=path, error=exc)
    return words("save.done", lang, path=target)


def dataset_preview(root: Root, fields: dict, lang: str = "en") -> str:
    """The Train tab's dataset preview (webpreview) of the fields' config, as HTML; or why there is none (a dataset
    outside what the page reads among the reasons)."""
    try:
        config = train_config(fields)
        root.check_reads(config)
        cfg = parse_train_args(config)
        if cfg.finetuning.stage != "sft":
            said = words("preview.sft_only", lang, stage=cfg.finetuning.stage)
        else:
            return f"<p>{words('preview.legend', lang)}</p>" + preview_html(preview_parts(cfg.data))
    except USER_ERRORS as exc:
        said = words("preview.failed", lang, error=exc)
    return f"<p>{html.escape(said)}</p>"


def load_yaml(root: Root, path: str, lang: str = "en") -> tuple[str, dict | None]:
    """(what the page says, the Train tab's fields) of the YAML at `path`, a .yaml file in a folder the page reads;
    no fields when it cannot be read."""
    try:
        target = root.check_read("the YAML's path", path.strip())
        if target.suffix not in YAML_SUFFIXES:
            raise ConfigError(words("save.not_yaml", lang, path=path.strip()))
        try:
            config = yaml.safe_load(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(words("load.unreadable", lang, path=path.strip(), error=exc)) from None
        if not isinstance(config, dict):
            raise ConfigError(words("load.not_mapping", lang, path=path.strip()))
    except ConfigError as exc:
        return words("load.failed", lang, error=exc), None
    return words("load.done", lang, path=target), fields_from_config(config)


# ---- Chat and Export ---------------------------------------------------------------------------------------------

def model_config(model: str, adapter: str, template: str) -> dict:
    """The model keys the Chat and Export tabs pass to parse_infer_args."""
    config = {"model_name_or_path": model.strip()}
    if adapter.strip():
        config["adapter_name_or_path"] = adapter.strip()
    if template:
        config["template"] = template
    return config


@dataclass(frozen=True)
class Conversation:
    """A chat so far: the messages the engine reads (a placeholder where each image, video or clip was), the images
    in order, the videos' and clips' checked bytes as (column, bytes) in order, and what the page shows (each
    uploaded file before its message's text)."""
    messages: tuple = ()
    images: tuple = ()
    shown: tuple = ()
    files: tuple = ()


class Chat:
    """The server's chat model: an Engine, loaded from the Chat tab (lf webui) or given (lf webchat). Every tab
    chats with it; only its owner, the tab that loaded it (Owner.controls), unloads it or loads another. `limits`:
    what one message's uploaded images may cost (default: the API's variables, lf.serve.api.upload_limits)."""

    def __init__(self, engine: Engine | None = None, limits: Limits | None = None, root: Root | None = None):
        self.engine, self.root = engine, root  # root: what Load may read (lf webui's); None: lf webchat's own model
        self.limits = limits or upload_limits()
        self.owner: Owner | None = None
        self.loaded = ("", "")  # the model and adapter Load was given
        self.version = 0  # moves at each load, unload and release: the tabs then redraw what they show of it
        self._lock = threading.Lock()

    def load(self, model: str, adapter: str, template: str, lang: str = "en", who: Owner | None = None) -> str:
        """Loads the model (and adapter) for `who`, who then owns it; or why not (another tab owns the one loaded,
        a path outside what the page reads, lf's refusal)."""
        config = model_config(model, adapter, template)
        with self._lock:  # a second Load waits, then finds the model the first one loaded
            if not self.controls(who):
                return words("chat.not_owner", lang)
            try:
                if self.root is not None:
                    self.root.check_reads(config)
                self._set(None, None)  # the old model goes before the new one loads
                self._set(open_engine(parse_infer_args(config, "webchat")), who, model.strip(), adapter.strip())
            except USER_ERRORS as exc:
                return words("chat.not_loaded", lang, error=exc)
        return self.status(who, lang)

    def unload(self, lang: str = "en", who: Owner | None = None) -> str:
        with self._lock:
            if not self.controls(who):
                return words("chat.not_owner", lang)
            self._set(None, None)
        return words("chat.none", lang)

    def _set(self, engine: Engine | None, owner: Owner | None, *loaded: str) -> None:
        self.engine, self.owner, self.loaded = engine, owner, loaded or ("", "")
        self.version += 1

    def controls(self, who: Owner | None) -> bool:
        """Whether `who` may unload the model or load another (anyone, while none is loaded)."""
        return self.engine is None or Owner.controls(self.owner, who)

    def release(self, closed: Owner | None) -> None:
        """The tab `closed` has closed: a model it loaded becomes anyone's to unload."""
        with self._lock:
            owner = Owner.after_closing(self.owner, closed)
            if owner != self.owner:
                self.owner, self.version = owner, self.version + 1

    def status(self, who: Owner | None, lang: str = "en") -> str:
        """What the Chat tab of `who` says of the model: none, which one, and whether that tab may unload it."""
        if self.engine is None:
            return words("chat.none", lang)
        model, adapter = self.loaded
        said = (words("chat.loaded_adapter", lang, model=model, adapter=adapter) if adapter
                else words("chat.loaded", lang, model=model))
        return said if self.controls(who) else f"{said}\n\n{words('chat.watching', lang)}"

    def uploaded(self, files: list[str], lang: str = "en") -> tuple[list, list[tuple[str, bytes]]]:
        """(the images, the videos' and clips' (column, bytes)) of a message's uploaded files, told apart by their
        names' extensions and checked as `lf api` checks them (lf.serve.media: formats and containers from their
        bytes, a message's files counted together, bombs and huge videos refused from their header); a model
        that takes none of a kind refuses it before any file is read."""
        columns = []
        for path in files:
            column = UPLOADS.get(Path(path).suffix.lower())
            if column is None:
                raise gr.Error(words("chat.bad_file", lang, name=Path(path).name, kinds=", ".join(sorted(UPLOADS))))
            columns.append(column)
        refusal = next(filter(None, map(self.engine.refusal, dict.fromkeys(columns))), None)
        if refusal:
            raise gr.Error(refusal)
        decoder = Images(self.limits)
        try:
            read = [decoder.upload(path, Path(path).name) if column == IMAGES
                    else (column, decoder.upload_file(column, path, Path(path).name))
                    for path, column in zip(files, columns)]
        except MediaError as exc:
            raise gr.Error(str(exc)) from None
        return ([item for item, column in zip(read, columns) if column == IMAGES],
                [item for item, column in zip(read, columns) if column != IMAGES])

    def respond(self, conversation: Conversation, query: str, files: list[str] | None, system: str,
                max_new_tokens: int, temperature: float, top_p: float, lang: str = "en"):
        """Streams the reply to `query` and the images, videos and clips of `files` (uploaded paths): yields (chat
        shown, conversation, message box, upload box) as the reply grows. What cannot be answered (media a model
        does not take, an upload over the limits, a prompt past the context) is refused before the boxes are
        emptied."""
        if self.engine is None:
            raise gr.Error(words("chat.no_model", lang))
        files = files or []
        if not query.strip() and not files:
            yield list(conversation.shown), conversation, query, files
            return
        images, media = self.uploaded(files, lang)
        counts = {IMAGES: len(images), **{column: sum(c == column for c, _ in media) for column in MEDIA_COLUMNS
                                          if column != IMAGES}}
        messages = [*conversation.messages, {"role": USER, "content": marks(counts) + query}]
        shown = [*conversation.shown, *({"role": USER, "content": {"path": path}} for path in files),
                 *([{"role": USER, "content": query}] if query else [])]
        every = (*conversation.files, *media)
        try:
            # the videos and clips decode within stream(), from files that live as long as that call
            with tempfile.TemporaryDirectory(prefix="lf-media-") as folder:
                on_disk = write(folder, {column: [data for c, data in every if c == column]
                                         for column in MEDIA_COLUMNS if column != IMAGES})
                generation = self.engine.stream(messages, system.strip() or None,
                                                images=[*conversation.images, *images], files=on_disk,
                                                max_new_tokens=int(max_new_tokens), temperature=temperature,
                                                top_p=top_p)
            text = ""
            yield [*shown, {"role": ASSISTANT, "content": text}], conversation, "", None
            for piece in generation:
                text += piece
                yield [*shown, {"role": ASSISTANT, "content": text}], conversation, "", None
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from None
        reply = {"role": ASSISTANT, "content": text}
        done = Conversation((*messages, reply), (*conversation.images, *images), (*shown, reply), every)
        yield list(done.shown), done, "", None


def chat_panel(chat: Chat, generating: GeneratingArguments, page: Page) -> None:
    """The conversation, its message box, its media upload and the generation settings (defaults: `generating`)."""
    conversation = gr.State(Conversation())
    chatbot = page(gr.Chatbot, {"label": "chat.conversation"}, elem_id="chatbot", height=420)
    with gr.Row():
        query = page(gr.Textbox, {"label": "chat.message", "placeholder": "chat.message_hint"}, scale=5)
        send = page(gr.Button, {"value": "chat.send"}, variant="primary", scale=1)
        clear = page(gr.Button, {"value": "chat.clear"}, scale=1)
    files = page(gr.File, {"label": "chat.files"}, file_count="multiple", file_types=list(UPLOADS), type="filepath",
                 elem_id="chat_images", height=90)
    with page(gr.Accordion, {"label": "chat.settings"}, open=False):
        system = page(gr.Textbox, {"label": "chat.system"})
        with gr.Row():
            max_new_tokens = page(gr.Slider, {"label": "field.max_new_tokens"}, 1, 4096,
                                  value=generating.max_new_tokens, step=1)
            temperature = page(gr.Slider, {"label": "field.temperature"}, 0, 2, value=generating.temperature,
                               step=0.01)
            top_p = page(gr.Slider, {"label": "field.top_p"}, 0.01, 1, value=generating.top_p, step=0.01)
    gr.on([send.click, query.submit], chat.respond,
          [conversation, query, files, system, max_new_tokens, temperature, top_p, page.lang],
          [chatbot, conversation, query, files], api_name="chat")
    clear.click(lambda: ([], Conversation()), None, [chatbot, conversation])


def run_export(root: Root, model: str, adapter: str, template: str, export_dir: str, export_size: float,
               export_dtype: str, export_gguf: str, overwrite: bool, lang: str = "en") -> str:
    """`lf export` into export_dir, which must be under the root, and new or empty unless `overwrite`."""
    config = {**model_config(model, adapter, template), "export_dir": export_dir.strip(), "export_size": export_size,
              "export_dtype": export_dtype}
    if export_gguf != "none":
        config["export_gguf"] = export_gguf
    try:
        if config["export_dir"]:
            _check_export_dir(root.check("export_dir", config["export_dir"]), config["export_dir"], overwrite, lang)
        root.check_reads(config)
        written = export(parse_infer_args(config, "export"))
    except USER_ERRORS as exc:
        return words("export.failed", lang, error=exc)
    return words("export.done", lang, written=", ".join(f"{key} {path}" for key, path in written.items()))


def _check_export_dir(folder: Path, given: str, overwrite: bool, lang: str) -> None:
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(words("export.not_empty", lang, path=given, overwrite=words("export.overwrite", lang)))


# ---- the page ----------------------------------------------------------------------------------------------------

class Page:
    """A page whose words follow its language switch: its components are made through it, each with the TEXT keys
    of its words (or a function of the language); relabel(lang) gives their updates, in the order made. `lang`:
    the language switch (a radio), remembered in the browser (localStorage)."""

    def __init__(self, lang: str):
        self.start_lang, self.made = lang, []
        self.lang = self(gr.Radio, {"label": "page.lang"}, [(name, code) for code, name in LANGS.items()], value=lang,
                         elem_id="lang")

    def __call__(self, make, keys: dict, *args, **kwargs):
        component = make(*args, **{attr: self._words(key, self.start_lang) for attr, key in keys.items()}, **kwargs)
        self.made.append((component, keys))
        return component

    @staticmethod
    def _words(key, lang: str) -> str:
        return key(lang) if callable(key) else words(key, lang)

    def relabel(self, lang: str) -> list:
        return [gr.update(**{attr: self._words(key, lang) for attr, key in keys.items()}) for _, keys in self.made]

    def follow(self, demo: gr.Blocks, *redraws: tuple) -> None:
        """Wires the switch: a language chosen relabels the page (then each (refresh, outputs) of `redraws` redraws
        what the page says that is not a fixed text, with refresh(lang)) and is remembered in the browser, which
        picks it again on its next visit. The redraws run when the page loads, too."""
        chosen = gr.BrowserState(None, storage_key="lf_webui_lang")
        demo.load(lambda stored: stored if stored in LANGS else gr.skip(), chosen, self.lang)
        relabelled = self.lang.change(self.relabel, self.lang, [c for c, _ in self.made], queue=False)
        for refresh, outputs in redraws:
            relabelled.then(refresh, self.lang, outputs)
            demo.load(refresh, self.lang, outputs)
        self.lang.input(lambda lang: lang, self.lang, chosen, queue=False)


def _model_fields(page: Page) -> tuple[gr.Textbox, gr.Textbox, gr.Dropdown]:
    """model, adapter and template: what the Chat and Export tabs load."""
    with gr.Row():
        model = page(gr.Textbox, {"label": "field.model_name_or_path"}, TRAIN_DEFAULTS["model_name_or_path"], scale=2)
        adapter = page(gr.Textbox, {"label": "field.adapter_name_or_path"}, scale=2)
        template = page(gr.Dropdown, {"label": "field.template"}, sorted(TEMPLATES), value=TRAIN_DEFAULTS["template"],
                        allow_custom_value=True)
    return model, adapter, template


def watch(trainer: Trainer, timer: gr.Timer) -> None:
    """Every tab looks every few seconds for a run another tab started, and then follows it with `timer`."""
    gr.Timer(WATCH_SECONDS).tick(lambda: gr.Timer(active=True) if trainer.running() else gr.skip(), None, timer,
                                  queue=False, show_progress="hidden")


def _train_fields(page: Page, root: Root) -> dict[str, gr.components.Component]:
    """The Train tab's inputs, keyed (and labelled) by their YAML key, in TRAIN_DEFAULTS' order."""
    d, fields = TRAIN_DEFAULTS, {}

    def text(key, **kw):
        fields[key] = page(gr.Textbox, {"label": f"field.{key}"}, d[key], **kw)

    def number(key, integer=True):
        fields[key] = page(gr.Number, {"label": f"field.{key}"}, d[key], precision=0 if integer else None, minimum=0)

    def choice(key, choices, **kw):
        fields[key] = page(gr.Dropdown, {"label": f"field.{key}"}, list(choices), value=d[key], **kw)

    with gr.Row():
        text("model_name_or_path", scale=2)
        choice("template", sorted(TEMPLATES), allow_custom_value=True)
        choice("stage", [stage.name for stage in stages.trained()])
        choice("finetuning_type", get_args(FinetuningType))
    with gr.Row():
        text("dataset_dir")
        choice("dataset", dataset_names(root, d["dataset_dir"]), multiselect=True, allow_custom_value=True, scale=2)
        number("cutoff_len")
        number("max_samples")
    media = gr.Markdown("", elem_id="dataset_media")
    with gr.Row():
        text("learning_rate")
        number("num_train_epochs", integer=False)
        number("max_steps")
        number("per_device_train_batch_size")
        number("gradient_accumulation_steps")
        choice("lr_scheduler_type", SCHEDULERS)
    with gr.Row():
        number("lora_rank")
        text("lora_target")
        number("logging_steps")
        number("save_steps")
    with gr.Row():
        text("output_dir", scale=3)
        fields["overwrite_output_dir"] = page(gr.Checkbox, {"label": "field.overwrite_output_dir"},
                                              d["overwrite_output_dir"])
    with page(gr.Accordion, {"label": "train.extra"}, open=False):
        fields["extra"] = page(gr.Code, {"label": "train.extra_hint"}, d["extra"], language="yaml", lines=3)
    fields["dataset_dir"].change(lambda folder: gr.update(choices=dataset_names(root, folder)),
                                 fields["dataset_dir"], fields["dataset"], api_name="datasets")
    chosen = [fields["dataset_dir"], fields["dataset"], fields["template"]]
    gr.on([field.change for field in chosen] + [page.lang.change], functools.partial(media_note, root),
          [*chosen, page.lang], media)
    return fields


def _eval_tab(page: Page, evaluator: Trainer) -> tuple:
    """The Evaluate & Predict tab's fields and run (webeval): returns its model fields (which a finished training
    run fills), and its redraw for the page: (refresh(lang), the components it draws)."""
    d, fields = EVAL_DEFAULTS, {}
    model = _model_fields(page)
    fields["mode"] = page(gr.Radio, {"label": "eval.mode", "choices": lambda lang: [
        (words("eval.predict", lang), PREDICT), (words("eval.eval", lang), EVAL)]}, value=d["mode"],
        elem_id="eval_mode")

    def number(key):
        fields[key] = page(gr.Number, {"label": f"field.{key}"}, d[key], precision=0, minimum=0)

    with page(gr.Accordion, {"label": "eval.predict_fields"}, open=True), gr.Row():
        fields["dataset_dir"] = page(gr.Textbox, {"label": "field.dataset_dir"}, d["dataset_dir"])
        fields["eval_dataset"] = page(gr.Dropdown, {"label": "field.eval_dataset"},
                                      dataset_names(evaluator.root, d["dataset_dir"]),
                                      value=d["eval_dataset"], multiselect=True, allow_custom_value=True, scale=2)
        for key in ("cutoff_len", "max_samples", "per_device_eval_batch_size", "max_new_tokens"):
            number(key)
    with page(gr.Accordion, {"label": "eval.eval_fields"}, open=True), gr.Row():
        fields["task_dir"] = page(gr.Textbox, {"label": "field.task_dir"}, d["task_dir"])
        fields["task"] = page(gr.Textbox, {"label": "field.task"}, d["task"])
        number("n_shot")
        fields["lang"] = page(gr.Dropdown, {"label": "field.lang"}, list(LANGS), value=d["lang"])
        number("batch_size")
    fields["output_dir"] = page(gr.Textbox, {"label": "field.eval_output_dir"}, d["output_dir"])
    with gr.Row():
        start = page(gr.Button, {"value": "eval.start"}, variant="primary", elem_id="eval_start")
        stop = page(gr.Button, {"value": "train.stop"}, variant="stop", elem_id="eval_stop")
    status = gr.Markdown(words("run.none", page.start_lang), elem_id="eval_status")
    log = page(gr.Textbox, {"label": "train.log"}, lines=10, max_lines=10, autoscroll=True, elem_id="eval_log")
    with gr.Row():
        metrics = page(gr.Dataframe, {"label": "eval.metrics"}, interactive=False, elem_id="eval_metrics")
        predictions = page(gr.Dataframe, {"label": "eval.predictions"}, interactive=False, wrap=True, scale=3,
                           elem_id="eval_predictions")
    timer = gr.Timer(1.0, active=False)
    watch(evaluator, timer)
    fields["dataset_dir"].change(lambda folder: gr.update(choices=dataset_names(evaluator.root, folder)),
                                 fields["dataset_dir"], fields["eval_dataset"], api_name="eval_datasets")
    shown = [status, log, metrics, predictions, timer, stop]

    def refresh(request: gr.Request, lang: str):
        """What the tab shows of its run (read-only in a tab that did not start it): the state and log while it
        runs, then its metrics and predictions."""
        run = evaluator.run
        if run is None:
            return words("run.none", lang), "", None, None, gr.Timer(active=False), gr.update(interactive=True)
        state = run.state()  # first: the log read after it is at least as new
        output = log_text(run.log_path)
        said, stop_button = evaluator.shown(run.summary(lang), Owner.of(request), lang)
        if state != "finished":
            return said, output, None, None, gr.Timer(active=state == "running"), stop_button
        try:
            tables = results(run.command, run.config, lang)
        except (OSError, ValueError, KeyError, *USER_ERRORS) as exc:
            return words("eval.unreadable", lang, error=exc), output, None, None, gr.Timer(active=False), stop_button
        return said, output, *tables, gr.Timer(active=False), stop_button

    def start_run(request: gr.Request, *args):
        lang, chosen = args[-1], dict(zip(fields, args[len(model):-1]))
        problem = evaluator.launch(lambda: checked_eval_config(model_config(*args[:len(model)]), chosen,
                                                               evaluator.root), lang, "eval.finished",
                                   Owner.of(request))
        return (problem, *[gr.skip()] * (len(shown) - 1)) if problem else refresh(request, lang)

    def stop_run(request: gr.Request, lang: str):
        refused = evaluator.stop(Owner.of(request), lang)
        return (refused, *[gr.skip()] * (len(shown) - 1)) if refused else refresh(request, lang)

    start.click(start_run, [*model, *fields.values(), page.lang], shown, api_name="evaluate")
    stop.click(stop_run, page.lang, shown, api_name="stop_eval")
    timer.tick(refresh, page.lang, shown)
    return model, (refresh, shown)


def _preview(fields: dict) -> str:
    try:
        config = train_config(fields)
    except USER_ERRORS as exc:
        return f"# {exc}"
    warning = remote_code_warning(config)
    return (f"# {warning}\n" if warning else "") + to_yaml(config)


def _header(lang: str, login: bool, title: str = "page.title", about: str = "", path: Path | None = None) -> str:
    """What a page says first: its title (a TEXT key, or the text), `about` it (a TEXT key, of `path`), and that
    it is open when it has no login."""
    lines = (f"## {words(title, lang) if title in TEXT else title}", about and words(about, lang, path=path),
             "" if login else words("page.open", lang))
    return "\n\n".join(line for line in lines if line)


def create_ui(trainer: Trainer | None = None, chat: Chat | None = None, login: bool = False,
              lang: str = "en") -> gr.Blocks:
    """The `lf webui` page, in `lang` until a browser picks another; `login`: whether it is served behind one (the
    page says so when not). Paths it writes are checked against the trainer's root, where the Evaluate & Predict
    tab's runs (demo.evaluator) go too."""
    trainer, chat = trainer or Trainer(), chat or Chat()
    chat.root = trainer.root  # what its Load may read
    evaluator = Trainer(trainer.root)
    about = "page.any_path" if trainer.root.any_path else "page.root"
    with gr.Blocks(title="lf webui", analytics_enabled=False) as demo:
        page = Page(lang)
        page(gr.Markdown, {"value": lambda lang: _header(lang, login, about=about, path=trainer.root.path)},
             elem_id="header")
        with page(gr.Tab, {"label": "tab.train"}, elem_id="tab_train"):
            fields = _train_fields(page, trainer.root)
            names, inputs = list(fields), list(fields.values())

            def values(*args) -> dict:
                return dict(zip(names, args))

            with page(gr.Accordion, {"label": "train.preview"}, open=False):
                preview_button = page(gr.Button, {"value": "train.preview_button"}, elem_id="preview_button")
                preview = gr.HTML("", elem_id="dataset_preview")
            with page(gr.Accordion, {"label": "train.yaml"}, open=True):
                config = page(gr.Code, {"label": "train.yaml_file"}, _preview(TRAIN_DEFAULTS), language="yaml",
                              interactive=False, elem_id="train_yaml")
                with gr.Row():
                    save_path = page(gr.Textbox, {"label": "train.save_to"}, "saves/webui_train.yaml", scale=3)
                    save = page(gr.Button, {"value": "train.save"})
                    load_button = page(gr.Button, {"value": "train.load"}, elem_id="load_yaml")
                command_line = page(gr.Textbox, {"label": "train.command"}, "lf train saves/webui_train.yaml",
                                    interactive=False, buttons=["copy"], elem_id="train_command")
            with gr.Row():
                start = page(gr.Button, {"value": "train.start"}, variant="primary", elem_id="start")
                resume = page(gr.Button, {"value": "train.resume"}, elem_id="resume")
                stop = page(gr.Button, {"value": "train.stop"}, variant="stop", elem_id="stop")
            status = gr.Markdown(words("run.none", lang), elem_id="train_status")
            with gr.Row():
                log = page(gr.Textbox, {"label": "train.log"}, lines=18, max_lines=18, autoscroll=True,
                           elem_id="train_log")
                plot = page(gr.LinePlot, {"label": "train.loss"}, x="step", y="loss", color="curve",
                            elem_id="loss_plot", color_map={"original": "#9ecae1", "smoothed": "#1f77b4"})
            timer = gr.Timer(1.0, active=False)
            watch(trainer, timer)
        with page(gr.Tab, {"label": "tab.eval"}, elem_id="tab_eval"):
            eval_model, eval_redraw = _eval_tab(page, evaluator)
        with page(gr.Tab, {"label": "tab.chat"}, elem_id="tab_chat"):
            chat_model = _model_fields(page)
            with gr.Row():
                load = page(gr.Button, {"value": "chat.load"}, variant="primary", elem_id="load_model")
                unload = page(gr.Button, {"value": "chat.unload"}, elem_id="unload_model")
            chat_status = gr.Markdown(words("chat.none", lang), elem_id="chat_status")
            chat_panel(chat, GeneratingArguments(), page)
            chat_seen = gr.State(-1)  # the chat.version this tab shows
        with page(gr.Tab, {"label": "tab.export"}, elem_id="tab_export"):
            export_model = _model_fields(page)
            with gr.Row():
                export_dir = page(gr.Textbox, {"label": "field.export_dir"}, "saves/webui_merged", scale=2)
                export_size = page(gr.Number, {"label": "field.export_size"}, 5, minimum=0.001)
                export_dtype = page(gr.Dropdown, {"label": "field.export_dtype"}, list(EXPORT_DTYPES), value="auto")
                export_gguf = page(gr.Dropdown, {"label": "field.export_gguf"}, list(GGUF_TYPES), value="none")
            overwrite_export = page(gr.Checkbox, {"label": "export.overwrite"}, False)
            export_button = page(gr.Button, {"value": "export.run"}, variant="primary")
            export_status = gr.Markdown("", elem_id="export_status")

        gr.on([f.change for f in inputs], lambda *args: _preview(values(*args)), inputs, config)
        save.click(lambda path, *args: save_yaml(trainer.root, values(*args[:-1]), path, args[-1]),
                   [save_path, *inputs, page.lang], status, api_name="save_yaml")
        save_path.change(lambda path: f"lf train {shlex.quote(path.strip())}", save_path, command_line)

        def load_run(path: str, lang: str):
            said, loaded = load_yaml(trainer.root, path, lang)
            return (said, *(loaded.values() if loaded else [gr.skip()] * len(inputs)))

        preview_button.click(lambda *args: dataset_preview(trainer.root, values(*args[:-1]), args[-1]),
                             [*inputs, page.lang], preview, api_name="preview")
        load_button.click(load_run, [save_path, page.lang], [status, *inputs], api_name="load_yaml")

        def refresh(request: gr.Request, lang: str):
            """What the page shows of the run (read-only in a tab that did not start it); the timer runs while it
            does, and a run that ends fills the Chat and Export tabs with what it trained."""
            run = trainer.run
            if run is None:
                return (words("run.none", lang), "", None, gr.Timer(active=False), gr.update(interactive=True),
                        *[gr.skip()] * 9)
            # the state first: what is read after it is at least as new (an ended run's log and summary are final)
            running = run.state() == "running"
            frame, output = loss_frame(run.records()), log_text(run.log_path)
            trained = run.trained_model() if run.state() == "finished" else [gr.skip()] * 3
            said, stop_button = trainer.shown(run.summary(lang), Owner.of(request), lang)
            return (said, output, frame if len(frame) else None, gr.Timer(active=running), stop_button,
                    *trained, *trained, *trained)

        shown = [status, log, plot, timer, stop, *chat_model, *export_model, *eval_model]

        def started(resume: bool):
            def start_run(request: gr.Request, *args):
                problem = trainer.start(values(*args[:-1]), args[-1], Owner.of(request), resume)
                return (problem, *[gr.skip()] * (len(shown) - 1)) if problem else refresh(request, args[-1])
            return start_run

        def stop_run(request: gr.Request, lang: str):
            refused = trainer.stop(Owner.of(request), lang)
            return (refused, *[gr.skip()] * (len(shown) - 1)) if refused else refresh(request, lang)

        start.click(started(False), [*inputs, page.lang], shown, api_name="start")
        resume.click(started(True), [*inputs, page.lang], shown, api_name="resume")
        stop.click(stop_run, page.lang, shown, api_name="stop")
        timer.tick(refresh, page.lang, shown)
        chat_shown = [chat_status, load, unload, chat_seen]

        def chat_view(request: gr.Request, lang: str, said: str = ""):
            """The Chat tab's status (or `said`), its Load and Unload greyed where another tab owns the model."""
            who = Owner.of(request)
            mine = gr.update(interactive=chat.controls(who))
            return said or chat.status(who, lang), mine, mine, chat.version

        def load_model(request: gr.Request, model: str, adapter: str, template: str, lang: str):
            return chat_view(request, lang, chat.load(model, adapter, template, lang, Owner.of(request)))

        def unload_model(request: gr.Request, lang: str):
            return chat_view(request, lang, chat.unload(lang, Owner.of(request)))

        def follow_chat(request: gr.Request, seen: int, lang: str):
            """Every tab redraws its Chat status when another tab loads, unloads or releases the model."""
            return [gr.skip()] * len(chat_shown) if seen == chat.version else chat_view(request, lang)

        load.click(load_model, [*chat_model, page.lang], chat_shown, api_name="load_model")
        unload.click(unload_model, page.lang, chat_shown, api_name="unload_model")
        gr.Timer(WATCH_SECONDS).tick(follow_chat, [chat_seen, page.lang], chat_shown, queue=False,
                                     show_progress="hidden")

        def closed(request: gr.Request):
            """A tab closed (or reloaded): what it owned becomes anyone's."""
            for holder in (trainer, evaluator, chat):
                holder.release(Owner.of(request))

        demo.unload(closed)
        export_button.click(functools.partial(run_export, trainer.root),
                            [*export_model, export_dir, export_size, export_dtype, export_gguf, overwrite_export,
                             page.lang], export_status, api_name="export")
        page.follow(demo, (refresh, shown), eval_redraw, (chat_view, chat_shown))
    demo.trainer, demo.evaluator, demo.chat = trainer, evaluator, chat  # for `lf webui`'s exit, and tests
    return demo


def chat_app(engine: Engine, login: bool = False, limits: Limits | None = None, lang: str = "en") -> gr.Blocks:
    """The `lf webchat` page: the chat panel over a loaded model (`limits`: as Chat's)."""
    chat = Chat(engine, limits)
    with gr.Blocks(title=f"lf webchat: {engine.name}", analytics_enabled=False) as demo:
        page = Page(lang)
        page(gr.Markdown, {"value": lambda lang: _header(lang, login, title=demo.title)}, elem_id="header")
        chat_panel(chat, engine.generating, page)
        page.follow(demo)
    demo.chat = chat
    return demo


def launch(demo: gr.Blocks, access: Access) -> None:
    """Serves the page as `access` says (host, port, login), announces it, and returns when the server ends."""
    serve(demo, access)
    access.announce(demo.title, demo.local_url)
    demo.block_thread()  # until Ctrl-C (or a signal that _closed_at_exit turns into one)


def serve(demo: gr.Blocks, access: Access) -> None:
    """Starts serving the page in the background; an upload larger than a message's images may be is refused as
    it arrives (Gradio's max_file_size)."""
    try:
        demo.queue().launch(server_name=access.host, server_port=access.port, auth=list(access.users) or None,
                            prevent_thread_lock=True, max_file_size=demo.chat.limits.max_bytes)
    except OSError as exc:
        raise ConfigError(f"cannot serve the page at {access.host}:{access.port or 7860} ({exc}): pick a free port "
                          f"with --port or GRADIO_SERVER_PORT") from None


@contextlib.contextmanager
def _closed_at_exit(*runs: Trainer):
    """SIGTERM and SIGHUP end the server as Ctrl-C does (Gradio closes it on KeyboardInterrupt); however it ends,
    the runs are stopped and their folders removed on the way out."""
    ends = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in ends}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # a second signal while closing acts as it did before
            signal.signal(sig, handler)
        for trainer in runs:
            trainer.close()


def command(argv: list[str]) -> int:
    """`lf webui [options]` (USAGE); a run still going when the server exits is stopped, its folder removed."""
    parser = argparse.ArgumentParser(prog="lf webui", usage=USAGE)
    add_server_args(parser)
    parser.add_argument("--root", default=None)
    parser.add_argument("--read", action="append", default=[], metavar="DIR")
    parser.add_argument("--allow-any-path", action="store_true")
    args = parser.parse_args(argv)
    access = Access.from_args(args)
    root = Root(args.root, args.allow_any_path, tuple(args.read), trusted=access.trusted)
    demo = create_ui(Trainer(root), login=access.login, lang=server_lang(args.lang))
    with _closed_at_exit(demo.trainer, demo.evaluator):
        launch(demo, access)
    return 0
