"""lf.train: one recipe per stage over lf.config, lf.data and lf.model, with HF's Trainer underneath; which recipe
trains a stage is its entry in lf.stages.STAGES."""

from lf import stages


def run(cfg, callbacks=()) -> dict:
    """Runs the recipe of `cfg.finetuning.stage`; returns what was written where. A run that fails before writing
    anything leaves no new output_dir; a full disk is a TrainError in one line."""
    from lf.train.checkpoints import no_empty_folder_left
    from lf.train.disk import full_disk_in_one_line

    stage = stages.trainable(cfg.finetuning.stage)
    if cfg.model.use_lf_kernels or cfg.model.enable_liger_kernel:
        _kernel_backend_usable()
    output_dir = cfg.training.output_dir
    with no_empty_folder_left(output_dir), full_disk_in_one_line(output_dir):
        return stage.run(cfg, callbacks)


def _kernel_backend_usable() -> None:
    """A bad LF_KERNEL_BACKEND fails here, in one line, before minutes of data and model loading, not at step 1."""
    from lf import device

    device.current().kernel_backend()
