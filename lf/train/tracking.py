"""SwanLab tracking (`use_swanlab` and LLaMA-Factory's `swanlab_*` keys) through SwanLab's own transformers
callback: the run's logs and evaluations go to SwanLab's cloud, or to its local files (`swanlab_mode: local` or
`offline`, in `swanlab_logdir`)."""

from __future__ import annotations


def swanlab_callback(finetuning_args):
    """SwanLab's TrainerCallback for these keys, after logging in (swanlab_api_key) and registering the Lark
    notification (swanlab_lark_webhook_url), as LLaMA-Factory does."""
    import swanlab
    from swanlab.integration.transformers import SwanLabCallback

    fin = finetuning_args
    if fin.swanlab_api_key is not None:
        swanlab.login(api_key=fin.swanlab_api_key)
    if fin.swanlab_lark_webhook_url is not None:
        from swanlab.plugin.notification import LarkCallback

        swanlab.register_callbacks([LarkCallback(webhook_url=fin.swanlab_lark_webhook_url,
                                                 secret=fin.swanlab_lark_secret)])
    return SwanLabCallback(project=fin.swanlab_project, workspace=fin.swanlab_workspace,
                           experiment_name=fin.swanlab_run_name, mode=fin.swanlab_mode, log_dir=fin.swanlab_logdir,
                           tags=["lf"])


def finish_swanlab() -> None:
    """Ends the run SwanLab's callback began, so that its files are complete when lf train returns (SwanLab would
    end it as the process exits) and a next training in the same process (the web UI) begins its own."""
    import swanlab

    try:
        swanlab.get_run()
    except RuntimeError:  # none began (a process other than the main one)
        return
    swanlab.finish()
