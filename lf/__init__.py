"""lf: a kernel-first toolkit for fine-tuning large language models."""

import logging

from lf import threads as _threads

__version__ = "0.1.0"

# bitsandbytes (imported by peft and transformers) warns on every start on AVX512-BF16 CPUs that it could not fetch an
# optional CPU kernel from the model hub ("pip install kernels"). lf runs 4-bit LoRA through its own kernel
# (lf.kernels.lora_nf4_linear) and works offline, so the line only alarms; every other bitsandbytes message stays.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.msg)

_threads.apply_wait_policy()  # before anything loads torch (and with it OpenMP)
