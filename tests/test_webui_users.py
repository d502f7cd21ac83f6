"""`lf webui` with several users: one training run at a time, which only the tab that started it (or a tab of the
same login) stops; a stopped run resumed from the Train tab's Resume, through the functions its buttons call (lf
train children on the tiny model); and the multimodal datasets the Train tab offers (LLaMA-Factory's mllm_demo
beside the repository). Two browser tabs sharing a run and the chat model: test_webui.py's browser test; two
logins over HTTP: test_webui_http.py."""

import sys
import time
from pathlib import Path

from test_multimodal import shared_data  # LLaMA-Factory's data/ (mllm_demo and its media)
from test_train import lf_home  # noqa: F401  (the tiny model, built once in a temporary LF_HOME)

from lf.serve import webui
from lf.serve.webaccess import Root
from lf.serve.webui_text import words
from lf.train.checkpoints import last

REPO = Path(__file__).resolve().parent.parent
ANN, BOB = webui.Owner("ann-tab"), webui.Owner("bob-tab")


def form(out: Path, **changes) -> dict:
    """The Train tab's fields for a short tiny-model run into `out`."""
    return {**webui.TRAIN_DEFAULTS, "dataset_dir": str(REPO / "data"), "output_dir": str(out), "cutoff_len": 64,
            "max_samples": 8, "per_device_train_batch_size": 2, "logging_steps": 1, **changes}


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_stopped_run_resumes_from_its_last_checkpoint(tmp_path, lf_home):  # noqa: F811
    trainer, out = webui.Trainer(Root(str(tmp_path))), tmp_path / "run"
    try:
        assert trainer.start(form(out), resume=True) == words("run.not_started", error=words(
            "run.no_checkpoint", path=str(out)))
        assert trainer.start(form(out, max_steps=100000, save_steps=2), owner=ANN) is None
        run = trainer.run  # the child's command line: the run's own YAML, nothing from the fields
        assert run.process.args == [sys.executable, "-m", "lf.cli", "train", str(run.yaml_path)]
        _wait(lambda: last(str(out)) is not None or run.state() != "running", 300, "no checkpoint was saved")
        assert trainer.stop(BOB) == words("run.not_owner") and run.state() == "running"
        assert trainer.stop(webui.Owner("ann-other-tab")) == words("run.not_owner")
        assert trainer.stop(webui.Owner("ann-login-tab", "ann")) == words("run.not_owner")
        trainer.release(BOB)  # another tab closes: nothing changes
        assert trainer.stop(BOB) == words("run.not_owner") and run.state() == "running"
        trainer.release(ANN)  # Ann's tab closes (or reloads): the run is anyone's to stop
        assert trainer.stop(BOB) is None and run.state() == "stopped"
        step = int(Path(last(str(out))).name.removeprefix("checkpoint-"))
        kept = [r for r in webui.read_log(out / "trainer_log.jsonl") if r["current_steps"] <= step]

        # Resume, two steps further: the run goes on from that checkpoint and logs each step once
        assert trainer.start(form(out, max_steps=step + 2, save_steps=2, overwrite_output_dir=True), owner=BOB,
                             resume=True) is None
        resumed = trainer.run
        assert resumed.config["resume_from_checkpoint"] is True and resumed.config["overwrite_output_dir"] is False
        _wait(lambda: resumed.state() != "running", 300, "the resumed run did not end")
        output = webui.log_text(resumed.log_path, 10**6)
        assert resumed.state() == "finished", output
        steps = [r["current_steps"] for r in webui.read_log(out / "trainer_log.jsonl") if "loss" in r]
        assert steps == list(range(1, step + 3)), output
        # the first run's lines up to the checkpoint stay as they were (a fresh run starts a fresh log)
        assert webui.read_log(out / "trainer_log.jsonl")[:len(kept)] == kept and kept, output
    finally:
        trainer.close()


def test_the_train_tab_offers_multimodal_datasets_with_their_templates(tmp_path):
    shared = shared_data()
    root = Root(str(tmp_path), readable=(str(shared),))
    names = dict((name, label) for label, name in webui.dataset_names(root, str(shared)))
    assert names["mllm_demo"] == "mllm_demo (images)" and names["alpaca_en_demo"] == "alpaca_en_demo"
    assert names["mllm_video_audio_demo"] == "mllm_video_audio_demo (videos, audios)"
    note = webui.media_note(root, str(shared), ["alpaca_en_demo", "mllm_demo"], "qwen")
    assert note.startswith("mllm_demo: images in each row; templates that take them: ")
    assert "qwen2_vl" in note and note.endswith("the template qwen takes text only here: choose one of those")
    assert "choose one" not in webui.media_note(root, str(shared), ["mllm_demo"], "qwen2_vl")
    assert webui.media_note(root, str(shared), ["alpaca_en_demo"], "qwen") == ""
    zh = webui.media_note(root, str(shared), ["mllm_demo"], "qwen", "zh")
    assert zh.startswith("mllm_demo：每行带有 images") and "只接收文本" in zh
    # the preview: the rows as the template writes them, each image's placeholder where it goes
    shown = webui.dataset_preview(root, form(tmp_path / "out", dataset_dir=str(shared), dataset=["mllm_demo"],
                                             template="qwen2_vl"))
    assert shown.count("<pre") == 3 and "<mark>" in shown, shown
    # the first row asks of one image twice: each placeholder names its file
    first = shown.split("</pre>")[0]
    assert first.count("&lt;image: mllm_demo_data/1.jpg&gt;") == 2 and "&lt;image&gt;" not in first, first
    clip = webui.dataset_preview(root, form(tmp_path / "out", dataset_dir=str(shared),
                                            dataset=["mllm_video_audio_demo"], template="qwen2_vl"))
    assert "&lt;video: mllm_demo_data/4.mp4&gt;&lt;audio: mllm_demo_data/4.mp3&gt;" in clip, clip
