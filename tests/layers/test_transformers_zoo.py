"""GPT-2, BERT, Llama, ViT, Mixtral and GPT-OSS (transformers, tiny configs, no weights) against their true axes.

The tables below are written from each model's source (the shapes its modules build), not from lightning_gc's
registry: GPT-2's ``Conv1D`` stores ``(in, out)``; Mixtral's experts ``(E, out, in)``; GPT-OSS's experts
``(E, in, out)`` (``@use_experts_implementation(is_transposed=True)``); MoE routers are ``F.linear`` weights
``(E, hidden)``; ViT's class/mask tokens and position embeddings are not neuron weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from layer_zoo import (
    DIM0,
    SKIP_BIAS,
    SKIP_EMBEDDING,
    SKIP_NORM,
    SKIP_TOKEN,
    Skip,
    Truth,
    Units,
    check_centralization,
    run_and_check,
    set_offset_gradients,
)
from torch import nn

import lightning_gc

transformers = pytest.importorskip("transformers")

SKIP_EXPERT_BIAS = Skip("experts' biases (E, out)")
COMMON: list[tuple[str, Truth]] = [
    ("*bias", SKIP_BIAS),
    ("*norm*.weight", SKIP_NORM),
    ("*ln_*.weight", SKIP_NORM),
    ("*LayerNorm.weight", SKIP_NORM),
    ("*.layernorm_*.weight", SKIP_NORM),
    ("layernorm.weight", SKIP_NORM),
]


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=11, n_positions=6)
    return transformers.GPT2LMHeadModel(config)


GPT2_TABLE: list[tuple[str, Truth]] = [
    *COMMON,
    ("transformer.wte.weight", SKIP_EMBEDDING),
    ("transformer.wpe.weight", SKIP_EMBEDDING),
    ("*.c_attn.weight", Units((1,))),  # Conv1D (in, 3 * out): fused qkv along the output dim
    ("*.c_proj.weight", Units((1,))),
    ("*.c_fc.weight", Units((1,))),
]


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12, vocab_size=11,
        max_position_embeddings=6, type_vocab_size=2,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


BERT_TABLE: list[tuple[str, Truth]] = [
    *COMMON,
    ("bert.embeddings.*_embeddings.weight", SKIP_EMBEDDING),
    ("*.weight", DIM0),  # nn.Linear (out, in)
]


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=11, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


LLAMA_TABLE: list[tuple[str, Truth]] = [
    *COMMON,
    ("model.embed_tokens.weight", SKIP_EMBEDDING),
    ("*.weight", DIM0),  # q/k/v/o, gate/up/down projections and lm_head: nn.Linear
]


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12, image_size=8, patch_size=4,
        num_channels=3,
    )  # fmt: skip
    return transformers.ViTModel(config, use_mask_token=True)


VIT_TABLE: list[tuple[str, Truth]] = [
    *COMMON,
    ("embeddings.cls_token", SKIP_TOKEN),  # (1, 1, hidden)
    ("embeddings.mask_token", SKIP_TOKEN),  # (1, 1, hidden)
    ("embeddings.position_embeddings", SKIP_TOKEN),  # (1, patches + 1, hidden)
    ("*.weight", DIM0),  # patch Conv2d (out, in, k, k), nn.Linear
]


def mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=11, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


MIXTRAL_TABLE: list[tuple[str, Truth]] = [
    *COMMON,
    ("model.embed_tokens.weight", SKIP_EMBEDDING),
    ("*.experts.gate_up_proj", Units((0, 1))),  # (E, 2 * intermediate, hidden): F.linear(x, w[e])
    ("*.experts.down_proj", Units((0, 1))),  # (E, hidden, intermediate)
    ("*.weight", DIM0),  # router (E, hidden): F.linear(x, weight); nn.Linear
]


def gpt_oss() -> nn.Module:
    config = transformers.GptOssConfig(
        hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, vocab_size=11, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=16,
        layer_types=["full_attention"],
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


GPT_OSS_TABLE: list[tuple[str, Truth]] = [
    ("*.experts.*_bias", SKIP_EXPERT_BIAS),  # (E, out)
    *COMMON,
    ("model.embed_tokens.weight", SKIP_EMBEDDING),
    ("*.self_attn.sinks", Skip("1-D attention sinks")),
    ("*.experts.gate_up_proj", Units((0, 2))),  # (E, hidden, 2 * intermediate): x @ w[e]
    ("*.experts.down_proj", Units((0, 2))),  # (E, intermediate, hidden)
    ("*.weight", DIM0),
]

MODELS: dict[str, tuple[Callable[[], nn.Module], list[tuple[str, Truth]]]] = {
    "gpt2": (gpt2, GPT2_TABLE),
    "bert": (bert, BERT_TABLE),
    "llama": (llama, LLAMA_TABLE),
    "vit": (vit, VIT_TABLE),
    "mixtral": (mixtral, MIXTRAL_TABLE),
    "gpt_oss": (gpt_oss, GPT_OSS_TABLE),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny configs: transformers notes token ids outside the vocabulary
        return MODELS[name][0]().double()


def centralize_quietly(model: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assumed" layouts (MoE routers) warn once: checked in describe
        lightning_gc.centralize_gradients(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_is_centralized_along_its_true_output_axis_or_left_alone(name: str) -> None:
    model = build(name)
    truths = run_and_check(model, MODELS[name][1], centralize_quietly)
    assert any(isinstance(t, Units) for t in truths.values())
    assumed = lightning_gc.describe(model).by_decision("assumed")
    assert not assumed, f"audited models have no assumed layouts: {[r.name for r in assumed]}"


def test_gpt2_through_the_callback_in_a_trainer() -> None:
    """The callback path: the gradients GradientCentralization hands to the optimizer are the reference."""
    lightning = pytest.importorskip("lightning.pytorch")
    model = build("gpt2")
    table = GPT2_TABLE
    seen: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}

    class Recording(torch.optim.Optimizer):
        """Runs the closure, then records the gradients it would apply (no update)."""

        def __init__(self, params: object) -> None:
            super().__init__(params, {})  # type: ignore[arg-type]

        def step(self, closure: Callable[[], object] | None = None) -> None:  # type: ignore[override]
            if closure is not None:
                closure()
            seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(input_ids=batch, labels=batch).loss

        def on_after_backward(self) -> None:
            originals.update(set_offset_gradients(self.net, seed=1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return Recording(self.parameters())

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(torch.randint(0, 11, (2, 5)), batch_size=2)

    trainer = lightning.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[lightning_gc.GradientCentralization()],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module())
    assert set(seen) == set(originals)
    for name, grad in seen.items():
        model.get_parameter(name).grad = grad
    check_centralization(model, table, originals)
