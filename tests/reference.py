"""The independent computations the tests compare tinkerd against: plain transformers + PEFT.

Nothing here calls tinkerd: these are the references, written the way a user would.
"""

from __future__ import annotations

import torch

RANK, SEED = 8, 0  # what the training_client fixture asks for
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_TARGETS = [*ATTN, *MLP, "lm_head"]


def reference_model(model_dir, rank=RANK, seed=SEED, targets=ALL_TARGETS):
    """A fresh PeftModel on the base weights, its adapter initialised under `seed`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, config)


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters, named as the server's adapter_state names them."""
    return {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}


def reference_logprobs(model, seqs) -> list[torch.Tensor]:
    """log_softmax(logits) at the targets, one unpadded sequence at a time."""
    out = []
    for tokens, targets in seqs:
        logits = model(input_ids=torch.as_tensor(tokens)[None]).logits[0]  # (T, V)
        t = torch.as_tensor(targets)
        out.append(logits.float().log_softmax(-1).gather(-1, t.view(len(t), -1)).view(t.shape))
    return out
