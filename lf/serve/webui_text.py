"""The words of `lf webui` and `lf webchat`, in English and Simplified Chinese: every label, hint, button and message
the pages show is a key of TEXT, looked up with words(key, lang, **fields). lf's own error messages (the config
parser's, the model loader's) stay English, as on the command line; the page's sentence around them is translated.

The language: `lf webui --lang zh`, else LF_WEBUI_LANG, else English; the switch on the page overrides it for one
browser and is remembered there (localStorage). LLaMA Board has no variable for this (it keeps the last choice in
its user config file), hence lf's own name.
"""

from __future__ import annotations

import os

from lf.errors import ConfigError

LANGS = {"en": "English", "zh": "简体中文"}
LANG_ENV = "LF_WEBUI_LANG"
ALIASES = {"zh-cn": "zh", "zh_cn": "zh", "zh-hans": "zh", "en-us": "en", "en_us": "en"}

# The Train tab's fields are labelled by their YAML key (what `lf train` reads), in Chinese with the key after.
_FIELDS_ZH = {
    "model_name_or_path": "模型路径", "template": "对话模板", "stage": "训练阶段", "finetuning_type": "微调方法",
    "dataset_dir": "数据目录", "dataset": "数据集", "cutoff_len": "截断长度", "max_samples": "最大样本数（0：全部）",
    "learning_rate": "学习率", "num_train_epochs": "训练轮数", "max_steps": "最大步数（0：按轮数）",
    "per_device_train_batch_size": "每卡批大小", "gradient_accumulation_steps": "梯度累积步数",
    "lr_scheduler_type": "学习率调度器", "lora_rank": "LoRA 秩", "lora_target": "LoRA 作用模块",
    "logging_steps": "日志间隔步数", "save_steps": "保存间隔步数", "output_dir": "输出目录",
    "overwrite_output_dir": "覆盖输出目录", "adapter_name_or_path": "适配器路径（留空：无）",
    "export_dir": "导出目录", "export_size": "每个分片大小（GB）", "export_dtype": "导出精度",
    "export_gguf": "导出 GGUF", "max_new_tokens": "最大生成长度", "top_p": "top_p 采样",
    "temperature": "温度（0：贪心解码）", "eval_dataset": "评估数据集", "per_device_eval_batch_size": "每卡评估批大小",
    "task_dir": "任务目录", "task": "评测任务", "n_shot": "示例数（n-shot）", "lang": "提示语言",
    "batch_size": "批大小", "eval_output_dir": "结果目录",
}
_KEYS = {"eval_output_dir": "output_dir / save_dir"}  # a field that is not one YAML key: the keys it sets
_FIELDS_EN = {"eval_output_dir": "output_dir (predict) / save_dir (eval)", "lang": "lang (the prompts' language)",
              "adapter_name_or_path": "adapter_name_or_path (empty: none)", "export_size": "export_size (GB per shard)",
              "temperature": "temperature (0: greedy)"}

TEXT: dict[str, dict[str, str]] = {
    **{f"field.{key}": {"en": _FIELDS_EN.get(key, key), "zh": f"{zh} ({_KEYS.get(key, key)})"}
       for key, zh in _FIELDS_ZH.items()},
    # the page
    "page.title": {"en": "lf webui", "zh": "lf 网页界面"},
    "page.root": {"en": "This UI writes under `{path}` only (--root DIR or LF_WEBUI_ROOT changes it).",
                  "zh": "本界面只写入 `{path}` 之下（可用 --root DIR 或 LF_WEBUI_ROOT 更改）。"},
    "page.any_path": {"en": "This UI writes wherever it is told (--allow-any-path); its run folders go in `{path}`.",
                      "zh": "本界面可写入任意位置（--allow-any-path）；运行文件夹位于 `{path}`。"},
    "page.open": {"en": "**open: no login**: whoever reaches this address can use this page and its HTTP endpoints; "
                        "restart it with --auth USER:PASSWORD to require one",
                  "zh": "**公开：无需登录**：能访问此地址的任何人都能使用本页面及其 HTTP 接口；如需登录，请用 "
                        "--auth USER:PASSWORD 重新启动"},
    "page.lang": {"en": "language", "zh": "语言"},
    "tab.train": {"en": "Train", "zh": "训练"},
    "tab.eval": {"en": "Evaluate & Predict", "zh": "评估与预测"},
    "tab.chat": {"en": "Chat", "zh": "对话"},
    "tab.export": {"en": "Export", "zh": "导出"},
    # Train
    "train.extra": {"en": "other keys (YAML, over the fields above)", "zh": "其他参数（YAML，覆盖上面的字段）"},
    "train.extra_hint": {"en": "e.g. warmup_ratio: 0.05", "zh": "例如 warmup_ratio: 0.05（每行一个 键: 值）"},
    "train.yaml": {"en": "the YAML Start runs", "zh": "“开始”将运行的 YAML"},
    "train.yaml_file": {"en": "train.yaml", "zh": "train.yaml（训练配置）"},
    "train.save_to": {"en": "save the YAML to", "zh": "YAML 保存路径"},
    "train.save": {"en": "Save YAML", "zh": "保存 YAML"},
    "train.load": {"en": "Load YAML", "zh": "加载 YAML"},
    "train.command": {"en": "the command line (after Save YAML)", "zh": "命令行（保存 YAML 之后）"},
    "train.preview": {"en": "dataset preview", "zh": "数据集预览"},
    "train.preview_button": {"en": "Preview the first rows", "zh": "预览前几行"},
    "preview.legend": {"en": "As lf train writes them with the template; highlighted: what the loss is computed on.",
                       "zh": "按模板写出的 lf train 训练文本；高亮部分：计算损失的内容。"},
    "preview.failed": {"en": "no preview: {error}", "zh": "无法预览：{error}"},
    "preview.sft_only": {"en": "no preview: the preview shows stage sft rows; this run's stage is {stage}",
                         "zh": "无法预览：预览只显示 sft 阶段的数据；本次训练阶段为 {stage}"},
    "train.start": {"en": "Start", "zh": "开始"},
    "train.stop": {"en": "Stop", "zh": "停止"},
    "train.resume": {"en": "Resume", "zh": "继续训练"},
    "train.media": {"en": "{datasets}: {media} in each row; templates that take them: {templates}",
                    "zh": "{datasets}：每行带有 {media}；能接收它们的模板：{templates}"},
    "train.media_none": {"en": "none (lf has no template for these media together)",
                         "zh": "无（lf 没有同时接收这些媒体的模板）"},
    "train.media_wrong": {"en": "the template {template} takes text only here: choose one of those",
                          "zh": "所选模板 {template} 在此只接收文本：请从上面选择一个"},
    "train.log": {"en": "log", "zh": "日志"},
    "train.loss": {"en": "loss", "zh": "损失"},
    # a run (Train's and Evaluate & Predict's)
    "run.none": {"en": "**no run yet**", "zh": "**尚未运行**"},
    "run.not_owner": {"en": "**not stopped**: another browser tab started this run; only it (or a tab of the same "
                            "login) can stop it",
                      "zh": "**未停止**：此运行由另一个浏览器标签页启动；只有它（或同一登录用户的标签页）可以停止"},
    "run.watching": {"en": "(started in another browser tab: shown read-only)",
                     "zh": "（由另一个浏览器标签页启动：仅供查看）"},
    "run.no_checkpoint": {"en": "output_dir {path} holds no checkpoint-N folder to resume from: press Start for a new "
                                "run (save_steps sets how often checkpoints are saved)",
                          "zh": "输出目录 {path} 中没有可继续的 checkpoint-N 文件夹：请点“开始”重新训练（save_steps 决定"
                                "保存检查点的间隔）"},
    "run.busy": {"en": "**a run is going already**: stop it first, or wait for it to finish",
                 "zh": "**已有任务在运行**：请先停止它，或等待其结束"},
    "run.not_started": {"en": "**not started**: {error}", "zh": "**未开始**：{error}"},
    "run.loading": {"en": "**running**: loading the model and data (the log below shows what happens)",
                    "zh": "**运行中**：正在加载模型和数据（下方日志显示进展）"},
    "run.progress": {"en": "**running**: step {step}/{total} ({percent}%), loss {loss:.4g}, {speed:,.0f} tokens/s, "
                           "{elapsed} elapsed, {left} left",
                     "zh": "**运行中**：第 {step}/{total} 步（{percent}%），损失 {loss:.4g}，{speed:,.0f} 词元/秒，"
                           "已用 {elapsed}，剩余 {left}"},
    "run.finished": {"en": "**finished**: the model or adapter is in {path}",
                     "zh": "**已完成**：模型或适配器位于 {path}"},
    "run.stopped": {"en": "**stopped**: the checkpoints saved so far stay in {path} (Resume continues from the last "
                          "one)",
                    "zh": "**已停止**：已保存的检查点仍在 {path}（点“继续训练”即从最后一个继续）"},
    "run.failed": {"en": "**failed** (exit code {code}): the log below says why; the whole output is {path}",
                   "zh": "**失败**（退出码 {code}）：原因见下方日志；完整输出在 {path}"},
    "save.no_path": {"en": "**not saved**: name the file to write (e.g. saves/my_run.yaml)",
                     "zh": "**未保存**：请填写要写入的文件（例如 saves/my_run.yaml）"},
    "save.not_yaml": {"en": "{path} is not a .yaml file: Save YAML writes YAML files only (e.g. saves/my_run.yaml)",
                      "zh": "{path} 不是 .yaml 文件：“保存 YAML”只写 YAML 文件（例如 saves/my_run.yaml）"},
    "save.failed": {"en": "**not saved**: {error}", "zh": "**未保存**：{error}"},
    "save.unwritable": {"en": "**not saved**: {path} cannot be written ({error}): choose a folder you can write to",
                        "zh": "**未保存**：无法写入 {path}（{error}）：请选择可写的文件夹"},
    "save.done": {"en": "**saved** to {path}; run it with `lf train {path}`",
                  "zh": "**已保存**到 {path}；用 `lf train {path}` 运行它"},
    # Evaluate & Predict
    "eval.mode": {"en": "what to run", "zh": "运行内容"},
    "eval.predict": {"en": "predict: generate answers to a dataset (BLEU-4, ROUGE)",
                     "zh": "预测：为数据集生成回答（BLEU-4、ROUGE）"},
    "eval.eval": {"en": "evaluate: a multiple-choice task (accuracy per category)",
                  "zh": "评测：多项选择题任务（各类别准确率）"},
    "eval.predict_fields": {"en": "predict: the dataset", "zh": "预测：数据集"},
    "eval.eval_fields": {"en": "evaluate: the task", "zh": "评测：任务"},
    "eval.start": {"en": "Start evaluation", "zh": "开始评估"},
    "eval.metrics": {"en": "metrics", "zh": "指标"},
    "eval.predictions": {"en": "predictions and labels", "zh": "预测与标签"},
    "eval.finished": {"en": "**finished**: the results are in {path}", "zh": "**已完成**：结果位于 {path}"},
    "eval.unreadable": {"en": "**finished, but its results cannot be read**: {error}",
                        "zh": "**已完成，但无法读取结果**：{error}"},
    "col.metric": {"en": "metric", "zh": "指标"},
    "col.value": {"en": "value (%)", "zh": "数值（%）"},
    "col.prompt": {"en": "prompt", "zh": "提示"},
    "col.predict": {"en": "prediction", "zh": "预测"},
    "col.label": {"en": "label", "zh": "标签"},
    "col.category": {"en": "category", "zh": "类别"},
    "col.accuracy": {"en": "accuracy (%)", "zh": "准确率（%）"},
    "col.questions": {"en": "questions", "zh": "题数"},
    "col.subject": {"en": "subject", "zh": "科目"},
    "col.question": {"en": "question", "zh": "题目"},
    "col.answer": {"en": "answer", "zh": "答案"},
    "load.failed": {"en": "**not loaded**: {error}", "zh": "**未加载**：{error}"},
    "load.unreadable": {"en": "{path} cannot be read ({error}): name a YAML file that is there",
                        "zh": "无法读取 {path}（{error}）：请填写存在的 YAML 文件"},
    "load.not_mapping": {"en": "{path} is not a YAML mapping of `key: value` lines, as `lf train` reads",
                         "zh": "{path} 不是 `键: 值` 形式的 YAML 映射（`lf train` 读取的格式）"},
    "load.done": {"en": "**loaded** {path}: the fields show its keys, the other keys are in the YAML box below them",
                  "zh": "**已加载** {path}：字段显示其中的参数，其余参数在字段下方的 YAML 框中"},
    # Chat
    "chat.load": {"en": "Load model", "zh": "加载模型"},
    "chat.unload": {"en": "Unload model", "zh": "卸载模型"},
    "chat.none": {"en": "**no model loaded**", "zh": "**未加载模型**"},
    "chat.not_loaded": {"en": "**not loaded**: {error}", "zh": "**未加载**：{error}"},
    "chat.loaded": {"en": "**loaded** {model}", "zh": "**已加载** {model}"},
    "chat.loaded_adapter": {"en": "**loaded** {model} with the adapter {adapter}",
                            "zh": "**已加载** {model}，适配器 {adapter}"},
    "chat.watching": {"en": "(loaded in another browser tab: chat with it here; only that tab, or a tab of the same "
                            "login, unloads it or loads another, until it closes)",
                      "zh": "（由另一个浏览器标签页加载：可在此与它对话；只有该标签页（或同一登录用户的标签页）可以卸载它或加载"
                            "其他模型，直到该标签页关闭）"},
    "chat.not_owner": {"en": "**refused**: another browser tab loaded the model in use; only it (or a tab of the same "
                             "login) unloads it or loads another, until it closes: chat with this one meanwhile",
                       "zh": "**已拒绝**：当前模型由另一个浏览器标签页加载；只有它（或同一登录用户的标签页）可以卸载它或加载"
                             "其他模型，直到该标签页关闭：在此之前可与当前模型对话"},
    "chat.conversation": {"en": "conversation", "zh": "对话记录"},
    "chat.message": {"en": "message", "zh": "消息"},
    "chat.message_hint": {"en": "Type a message and press Enter", "zh": "输入消息后按回车"},
    "chat.send": {"en": "Send", "zh": "发送"},
    "chat.clear": {"en": "Clear", "zh": "清空"},
    "chat.files": {"en": "images, videos or audio for the next message (for a model that takes them)",
                   "zh": "随下一条消息发送的图片、视频或音频（模型支持时）"},
    "chat.settings": {"en": "generation settings", "zh": "生成设置"},
    "chat.system": {"en": "system prompt (empty: the template's)", "zh": "系统提示词（留空：使用模板的）"},
    "chat.no_model": {"en": "No model is loaded: load one above first (model_name_or_path, and adapter_name_or_path "
                            "for an adapter a run trained)",
                      "zh": "未加载模型：请先在上方加载（model_name_or_path；训练得到的适配器填 adapter_name_or_path）"},
    "chat.bad_file": {"en": "{name}: the chat takes {kinds} files: upload one of those",
                      "zh": "{name}：对话只接受 {kinds} 文件：请上传其中一种"},
    # Export
    "export.overwrite": {"en": "overwrite a non-empty export_dir", "zh": "覆盖非空的导出目录（export_dir）"},
    "export.run": {"en": "Export", "zh": "导出"},
    "export.not_empty": {"en": "export_dir: {path} is not empty: tick \"{overwrite}\" to write over its files, or name "
                               "a new or empty folder",
                         "zh": "export_dir：{path} 不为空：勾选“{overwrite}”以覆盖其中文件，或换一个新的或空的文件夹"},
    "export.failed": {"en": "**not exported**: {error}", "zh": "**未导出**：{error}"},
    "export.done": {"en": "**exported**: {written}", "zh": "**已导出**：{written}"},
}


def words(key: str, lang: str = "en", **fields) -> str:
    """TEXT[key] in `lang`, its {fields} filled."""
    text = TEXT[key][lang]
    return text.format(**fields) if fields else text


def server_lang(given: str | None = None) -> str:
    """The language a page starts in: `given` (--lang), else LF_WEBUI_LANG, else English."""
    name = given or os.environ.get(LANG_ENV) or "en"
    lang = ALIASES.get(name.lower(), name.lower())
    if lang not in LANGS:
        source = "--lang" if given else LANG_ENV
        raise ConfigError(f"{source}: {name!r} is not a language of the web UI: use one of {', '.join(LANGS)}")
    return lang
