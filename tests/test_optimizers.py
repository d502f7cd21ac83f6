"""lf's own optimizers (lf.train.optimizers) against the reference implementations, and in `lf train`.

Muon (use_muon): one step of lf's MuonWithAdamW equals torch.optim.Muon's step on the hidden matrices and AdamW's on
the rest, given the same parameters and gradients; a scheduler's learning rate reaches both; its state survives a
checkpoint; and `lf train` with use_muon lowers the loss of the tiny Llama.
"""

import copy

import torch
from test_train import lf_home, losses, train  # noqa: F401 (lf_home: the module's tiny model)
from transformers import TrainerCallback

from lf.train.optimizers import MUON_MOMENTUM, MuonWithAdamW, on_muon

LR, DECAY, BETAS, EPS = 0.02, 0.1, (0.9, 0.95), 1e-8


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.embed_tokens = torch.nn.Embedding(11, 6)
    net.proj = torch.nn.Linear(6, 9)  # a hidden matrix (Muon) and its bias (AdamW)
    net.norm = torch.nn.LayerNorm(9)
    net.lm_head = torch.nn.Linear(9, 11, bias=False)
    return net


def named(net) -> dict[str, torch.nn.Parameter]:
    return dict(net.named_parameters())


def lf_optimizer(net) -> MuonWithAdamW:
    params = named(net)
    muon = [p for n, p in params.items() if on_muon(n, p)]
    adamw = [p for n, p in params.items() if not on_muon(n, p)]
    return MuonWithAdamW([{"params": muon, "lr": LR, "weight_decay": DECAY}],
                         [{"params": adamw, "lr": LR, "weight_decay": DECAY}], betas=BETAS, eps=EPS)


def give_grads(net, seed) -> None:
    torch.manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn_like(p)


def test_muon_takes_the_hidden_matrices_only():
    net = tiny_net()
    assert [n for n, p in named(net).items() if on_muon(n, p)] == ["proj.weight"]
    assert on_muon("base_model.model.layers.0.q_proj.lora_A.default.weight", torch.empty(4, 8))
    assert not on_muon("base_model.model.embed_tokens.lora_embedding_A.default", torch.empty(4, 8))


def test_one_step_equals_torch_muon_and_adamw():
    net, ref = tiny_net(), tiny_net()
    optimizer = lf_optimizer(net)
    ref_params = named(ref)
    muon = torch.optim.Muon([ref_params["proj.weight"]], lr=LR, weight_decay=DECAY, momentum=MUON_MOMENTUM,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for n, p in ref_params.items() if n != "proj.weight"], lr=LR,
                              weight_decay=DECAY, betas=BETAS, eps=EPS)
    before = copy.deepcopy(named(net))
    for seed in (1, 2):  # the second step uses the momentum and moments of the first
        give_grads(net, seed)
        give_grads(ref, seed)
        optimizer.step()
        muon.step()
        adamw.step()
    for name, param in named(net).items():
        torch.testing.assert_close(param, ref_params[name], rtol=0, atol=0)
        assert not torch.equal(param, before[name]), f"{name} did not move"


def test_a_scheduler_reaches_both_and_the_state_survives_a_checkpoint():
    net = tiny_net()
    optimizer = lf_optimizer(net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    give_grads(net, 1)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for o in optimizer.inner.values() for g in o.param_groups] == [LR / 2, LR / 2]
    assert isinstance(optimizer.inner["adamw"], torch.optim.AdamW)

    saved = copy.deepcopy(optimizer.state_dict())
    restored_net = copy.deepcopy(net)
    restored = lf_optimizer(restored_net)
    restored.load_state_dict(saved)
    for opt, trained in ((restored, restored_net), (optimizer, net)):
        give_grads(trained, 2)
        opt.step()
    for name, param in named(net).items():
        torch.testing.assert_close(param, named(restored_net)[name], rtol=0, atol=0)


class OptimizerSeen(TrainerCallback):
    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen.add(type(getattr(optimizer, "optimizer", optimizer)))


def test_lf_train_with_muon_lowers_the_loss(tmp_path):
    """A full fine-tune: Muon steps the layers' matrices, AdamW the embeddings, norms and head."""
    seen = OptimizerSeen()
    out = train(tmp_path, callbacks=[seen], use_muon=True, finetuning_type="full", max_steps=8,
                learning_rate=2e-3, save_steps=8)
    assert seen.seen == {MuonWithAdamW}
    history = losses(out["output_dir"])
    assert len(history) == 8 and sum(history[-3:]) < sum(history[:3]), history
