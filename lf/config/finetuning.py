"""The finetuning group: the stage, which parameters train (full | freeze | lora) and their settings
(LLaMA-Factory's key names). Choices are Literals declared once here (see lf/config/model.py)."""

import types
from dataclasses import dataclass
from typing import Literal

from lf.config.model import QuantizationBit

FinetuningType = Literal["full", "freeze", "lora", "oft"]
PEFT_TYPES = ("lora", "oft")  # the finetuning types that train PEFT adapters
ReferenceFreeLoss = Literal["orpo", "simpo"]  # dpo losses that compare the policy's replies with each other only
# lf.kernels.fused_linear_preference_loss computes these (its PAIRED: the same names, tested)
PrefLoss = Literal["sigmoid", "hinge", "ipo", "kto_pair", ReferenceFreeLoss]
RayPlacement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]  # Ray placement group strategies
GaloreProjType = Literal["std", "reverse_std", "right", "left", "full"]  # which side GaLore projects gradients on
# the keys that choose an optimizer in place of `optim` (lf.train.optimizers.OPTIMIZERS builds each)
OPTIMIZER_KEYS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
APOLLO_OPTIMS = ("adamw_torch", "adamw_torch_fused")  # APOLLO's AdamW: the trainer's optim it stands for
GALORE_CLASSES = types.MappingProxyType({  # the trainer's optim -> galore_torch's class for it
    "adamw_torch": "GaLoreAdamW", "adamw_torch_fused": "GaLoreAdamW", "adamw_8bit": "GaLoreAdamW8bit",
    "adamw_bnb_8bit": "GaLoreAdamW8bit", "paged_adamw_8bit": "GaLoreAdamW8bit", "adafactor": "GaLoreAdafactor"})
ApolloProj = Literal["svd", "random"]
ApolloProjType = Literal["std", "right", "left"]
ApolloScaleType = Literal["channel", "tensor"]
BadamMode = Literal["layer", "ratio"]
BadamSwitchMode = Literal["ascending", "descending", "random", "fixed"]
BadamMaskMode = Literal["adjacent", "scatter"]
# LLaMA-Factory's swanlab_mode values (cloud: SwanLab's online) and SwanLab's own offline and disabled
SwanlabMode = Literal["cloud", "local", "offline", "disabled"]
RewardModelType = Literal["lora", "full", "api"]  # ppo's reward model: an rm adapter, a whole model, an endpoint


@dataclass
class FinetuningArguments:
    stage: str = "sft"  # a stage lf trains (lf.stages.STAGES): pt | sft | rm | dpo | kto | ppo
    finetuning_type: FinetuningType = "lora"
    # freeze: the last n layers train (negative: the first n); modules inside them ("all", or names like mlp)
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: str = "all"
    freeze_extra_modules: str | None = None  # modules outside the layers that train too (e.g. embed_tokens)
    # LLaMA Pro (lf.model.llama_pro): only the blocks `lf expand` added train (freeze), or take LoRA adapters (lora);
    # freeze_trainable_layers is then the number of blocks added
    use_llama_pro: bool = False
    # vision-language models: which parts may train (lf.data.mm_plugins names each family's parts)
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True
    freeze_language_model: bool = False
    train_mm_proj_only: bool = False  # full: the projector alone trains
    # lora
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_target: str = "all"  # "all": every linear layer but the output head; or comma-separated module names
    additional_target: str | None = None  # modules trained fully beside the adapter (e.g. embed_tokens,lm_head)
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices learn this many times faster
    loraplus_lr_embedding: float = 1e-6
    use_rslora: bool = False
    use_dora: bool = False
    pissa_init: bool = False  # PiSSA: adapters start from the weights' principal singular vectors (lf.model.pissa)
    pissa_iter: int = 16  # randomized SVD iterations; -1: exact SVD (slow on large weights)
    pissa_convert: bool = False  # saved adapter converted to apply to the original base model
    create_new_adapter: bool = False  # with adapter_name_or_path: train a new adapter over the merged ones
    # oft (PEFT's OFT: each target's output rotated by a learned block-diagonal orthogonal matrix); give one of
    # oft_rank (blocks per layer) and oft_block_size (their size), the other 0
    oft_rank: int = 0
    oft_block_size: int = 32
    oft_target: str = "all"  # as lora_target
    module_dropout: float = 0.0  # the chance a block is the identity in a training step (OFT's dropout)
    # dpo and kto: how better replies are preferred (lf.kernels.fused_linear_preference_loss has the formulas)
    pref_loss: PrefLoss = "sigmoid"  # sigmoid is DPO's; orpo and simpo need no reference model
    pref_beta: float = 0.1  # the loss's scale (DPO's beta: larger keeps the policy closer to the reference)
    pref_ftx: float = 0.0  # weight of an sft loss on the chosen replies, added to the preference loss
    simpo_gamma: float = 0.5  # simpo: the reward margin the chosen reply should win by
    pref_bco_weight: float = 0.0  # dpo: the weight of BCO's loss mixed in, (dpo + w bco) / (1 + w) (0: none)
    ld_alpha: float | None = None  # dpo: LD-DPO, the policy's tokens beyond the shorter reply's length count this much
    dpo_label_smoothing: float = 0.0  # sigmoid, simpo: the assumed chance that a pair is labelled the wrong way round
    ref_model: str | None = None  # the reference model; None: the model being trained, as it starts
    ref_model_adapters: str | None = None  # LoRA adapters merged into ref_model (comma-separated, in order)
    ref_model_quantization_bit: QuantizationBit | None = None  # ref_model loaded in 4 or 8 bits (bitsandbytes)
    kto_chosen_weight: float = 1.0  # kto: weight of the desirable replies' loss
    kto_rejected_weight: float = 1.0  # kto: weight of the undesirable replies' loss
    # ppo (lf.train.ppo): each step scores replies the policy writes and trains on them
    reward_model: str | None = None  # an rm output (adapter or model) or, with reward_model_type: api, a URL
    reward_model_type: RewardModelType = "lora"  # lora: an adapter over model_name_or_path (finetuning_type lora)
    reward_model_adapters: str | None = None  # full: adapters loaded onto reward_model
    reward_model_quantization_bit: QuantizationBit | None = None  # lora, full: the reward model loaded in 4 or 8 bits
    ppo_buffer_size: int = 1  # a step's rollouts: this many x per_device_train_batch_size x accumulation
    ppo_epochs: int = 4  # passes over a step's rollouts
    ppo_score_norm: bool = False  # scores normalised by the running mean and std of all scores so far
    ppo_target: float | None = 6.0  # the KL the adaptive coefficient steers to; null: a fixed coefficient 0.2
    ppo_whiten_rewards: bool = False  # rewards scaled to unit variance over a step's tokens before GAE
    pure_bf16: bool = False  # weights and adapters in bf16, trained without autocast (bf16 and fp16 stay false)
    compute_accuracy: bool = False  # sft: token accuracy (the logits' argmax against the labels) at evaluation
    use_dft_loss: bool = False  # sft: each token's loss weighted by its (detached) probability (DFT)
    # sft: each token's loss weighted by (entropy of its top-20 logits / 3) ** eaft_alpha, detached (EAFT)
    use_eaft_loss: bool = False
    eaft_alpha: float = 1.0
    # sft: DFT's loss plus asft_alpha x KL(reference's next-token distribution || the model's), per label token (ASFT)
    use_asft_loss: bool = False
    asft_alpha: float = 0.1
    early_stopping_steps: int | None = None  # stop after this many evaluations without a better metric_for_best_model
    # SwanLab tracking through its transformers callback (lf.train.tracking); LLaMA-Factory's keys and defaults
    use_swanlab: bool = False
    swanlab_project: str | None = "llamafactory"
    swanlab_workspace: str | None = None
    swanlab_run_name: str | None = None  # the experiment's name
    swanlab_mode: SwanlabMode = "cloud"
    swanlab_api_key: str | None = None  # logs in with it first
    swanlab_logdir: str | None = None  # where SwanLab writes its local files (its default: ./swanlog)
    swanlab_lark_webhook_url: str | None = None  # a Lark (Feishu) bot SwanLab notifies at the run's end
    swanlab_lark_secret: str | None = None
    # optimizers other than the trainer's `optim` (lf.train.optimizers; LLaMA-Factory's keys and defaults); at most one
    use_galore: bool = False  # GaLore: Adam's moments kept for low-rank projections of the weight matrices' gradients
    galore_target: str = "all"  # "all": every linear layer but the output head; or comma-separated module names
    galore_rank: int = 16
    galore_update_interval: int = 200  # steps between recomputing the projections (an SVD of the gradient)
    galore_scale: float = 2.0  # the projected update's scale
    galore_proj_type: GaloreProjType = "std"
    galore_layerwise: bool = False  # each parameter steps as soon as its gradient is ready (no gradient accumulation)
    use_apollo: bool = False  # APOLLO: Adam's moments of a (random) low-rank projection scale the raw gradient
    apollo_target: str = "all"
    apollo_rank: int = 16
    apollo_update_interval: int = 200
    apollo_scale: float = 32.0
    apollo_proj: ApolloProj = "random"
    apollo_proj_type: ApolloProjType = "std"
    apollo_scale_type: ApolloScaleType = "channel"  # one scaling factor per channel, or one per matrix
    apollo_layerwise: bool = False
    apollo_scale_front: bool = False  # the norm-growth limiter before the scaling, not after
    use_badam: bool = False  # BAdam: Adam on one block of parameters at a time
    badam_mode: BadamMode = "layer"  # layer: a decoder layer at a time; ratio: a share of each matrix's entries
    badam_start_block: int | None = None  # layer: the block trained first (None: by badam_switch_mode)
    badam_switch_mode: BadamSwitchMode = "ascending"  # layer: the order the blocks take turns in
    badam_switch_interval: int = 50  # layer: steps before the next block (-1: never switch)
    badam_update_ratio: float = 0.05  # ratio: the share of each weight matrix's entries that update
    badam_mask_mode: BadamMaskMode = "adjacent"  # ratio: adjacent entries, or scattered at random
    badam_verbose: int = 0  # 0: quiet; 1: the block trained; 2: its parameters too
    use_adam_mini: bool = False  # Adam-mini: one second moment per block (attention head, neuron) instead of per weight
    use_muon: bool = False  # torch's Muon (orthogonalised momentum) on hidden matrices, AdamW on the rest
    # Ray (USE_RAY=1: lf.train.ray_launch; LLaMA-Factory's keys)
    ray_num_workers: int = 1  # processes (Ray actors), one rank each
    ray_init_kwargs: dict | str | None = None  # ray.init's arguments (a mapping or its JSON text)
    resources_per_worker: dict | None = None  # each worker's Ray resources (default: 1 CPU, and 1 GPU on GPUs)
    placement_strategy: RayPlacement = "PACK"  # how Ray places the workers' bundles on its nodes
    master_addr: str | None = None  # rank 0's address for torch.distributed (default: its node's)
    master_port: int | None = None  # and port (default: a free one there)
    # outputs
    plot_loss: bool = False  # loss plot PNG in output_dir
    # transformers 5 dropped these two TrainingArguments; LLaMA-Factory YAMLs still carry them
    overwrite_output_dir: bool = False  # start afresh in a non-empty output_dir instead of resuming there
    logging_dir: str | None = None  # TensorBoard's folder (lf's trainer hands it to TensorBoard's callback)
    include_effective_tokens_per_second: bool = False
