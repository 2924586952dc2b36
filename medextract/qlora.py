"""The model train.py trains and bench/bench_train.py measures: Qwen-1.8B-Chat frozen in 4-bit NF4 with double
quantisation (or unquantized, for plain LoRA), LoRA adapters on every linear layer but lm_head, and the compute
precision that goes with the hardware. Every function raises the typed errors of medextract.errors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils import cpu_computes_bf16, native_bf16

from .errors import ConfigError


@dataclass(frozen=True)
class QLoRASettings:
    """What decides the model: the base directory, its quantization and the adapter (train.py's flags of the same
    names)."""

    model_name_or_path: str
    quantization: str = "nf4"  # nf4: QLoRA on a 4-bit NF4 base; none: plain LoRA on the unquantized base
    gradient_checkpointing: bool = False
    lora_dim: int = 16  # the rank r
    lora_alpha: int = 64  # the update is scaled by alpha / r
    lora_dropout: float = 0.1


def computes_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a GPU of compute capability 8.0 (Ampere) and later, or a CPU with
    AVX512-BF16 or AMX (the check inference's `--dtype auto` makes). There QLoRA trains 2x as fast in bf16 as in fp32
    at the 1.8B width (bench/RESULTS.md); elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cpu":
        return cpu_computes_bf16()
    return native_bf16(device)


def resolve_precision(choice: str, device: torch.device) -> str:
    """bf16 where the hardware computes it natively (Ampere and later GPUs, CPUs with AVX512-BF16 or AMX); fp32
    elsewhere (older GPUs, other CPUs), never fp16."""
    bf16_ok = computes_bf16(device)
    if choice == "auto":
        return "bf16" if bf16_ok else "fp32"
    if choice == "bf16" and device.type == "cuda" and not bf16_ok:
        raise ConfigError("--precision bf16: this GPU does not support bf16")
    return choice


def precision_note(choice: str, precision: str, device: torch.device) -> str | None:
    """One line for train.py to print when `--precision auto` took bf16 on a CPU, a choice that a user of the chapter
    (fp32 on every CPU) would not expect; None otherwise."""
    if choice == "auto" and precision == "bf16" and device.type == "cpu":
        return "precision auto: bf16 (this CPU computes bf16 natively; --precision fp32 to override)"
    return None


def build_model(settings: QLoRASettings, precision: str, device: torch.device) -> nn.Module:
    """The base in 4-bit NF4 (or unquantized), frozen, with LoRA on every linear layer but lm_head."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from qwen1_8.modeling_qwen import QWenLMHeadModel

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device_map = {"": str(device)}
    if settings.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = QWenLMHeadModel.from_pretrained(settings.model_name_or_path, dtype=dtype, quantization_config=quant,
                                                device_map=device_map)
        # Freezes the base and upcasts its norms/embeddings; checkpointing is left to our own flag below.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_training_kernels(model)
    else:
        model = QWenLMHeadModel.from_pretrained(settings.model_name_or_path, dtype=dtype, device_map=device_map)
        model.requires_grad_(False)
    model.config.use_cache = False
    if settings.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return add_lora(model, settings.lora_dim, settings.lora_alpha, settings.lora_dropout)


def keep_4bit_training_kernels(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking a Linear4bit for its CPU inference kernel when train.py evaluates.

    On a CPU with AVX512-BF16, a Linear4bit run in eval mode without grad repacks its weight for a bf16 gemv kernel
    and keeps it so until its state_dict is taken, which unpacks it through a lossy inverse (absmax rounded to bf16,
    then quantized again). Each evaluation here is followed by a checkpoint save, so each one nudged the frozen base a
    little, and a run resumed between two evaluations no longer matched the uninterrupted one; a training step between
    the two would have run the base through that kernel, which has no backward. With this, training computes the same
    before and after an evaluation, and the same as on a CPU without AVX512-BF16 or on a GPU.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_target_names(model: nn.Module) -> list[str]:
    """Short names of every linear layer but the output head: {c_attn, c_proj, w1, w2} for Qwen.

    bitsandbytes' Linear4bit subclasses nn.Linear, so this finds the same layers quantized or not.
    """
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not head})


def add_lora(model: nn.Module, lora_dim: int, lora_alpha: int, lora_dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_dim, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=lora_target_names(model), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def enable_activation_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with a frozen embedding, so no input-grad hook is needed.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name (5.23 has it, 5.17 does not)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
