"""Tinker SDK basics against a tinkerd server: a service client, the server's capabilities, a LoRA
training client, a few supervised steps, a checkpoint, and sampling from it.

    tinkerd serve &                                   # the built-in tiny model, no downloads
    python examples/example_tinker_client.py [--url URL]     # default $TINKERD_URL

Only the official `tinker` SDK is used: the same script runs against any Tinker-compatible service
(pass another --base-model there).
"""

from __future__ import annotations

import argparse
import os

import tinker
from _common import server_url
from tinker import types

TEXTS = [
    "The cat sees the dog near the river.",
    "The bird flies over the old house.",
    "Two plus three equals five.",
    "12 + 7 = 19",
]


def sft_datum(tokenizer, text: str) -> types.Datum:
    """Next-token prediction on `text`: input position i predicts token i + 1, every token
    weighted 1."""
    tokens = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default="tinkerd/tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args, url = server_url(parser)

    api_key = os.environ.get("TINKER_API_KEY", "tml-local")  # tinkerd takes any tml- key
    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    rest = tinker.RestClient(base_url=url, api_key=api_key)

    # 1. What the server offers.
    capabilities = rest.get_server_capabilities().result()
    print(
        "Supported models:", ", ".join(m.model_name or "?" for m in capabilities.supported_models)
    )

    # 2. A LoRA training client: the server creates the adapter on the base model.
    training = service.create_lora_training_client(
        base_model=args.base_model, rank=8, seed=0
    ).result()
    print(f"Training run: {training.model_id}")
    tokenizer = training.get_tokenizer()
    batch = [sft_datum(tokenizer, text) for text in TEXTS]
    n_tokens = sum(len(d.loss_fn_inputs["target_tokens"].data) for d in batch)

    # 3. Supervised steps: forward_backward accumulates gradients, optim_step applies them.
    # Both are submitted before waiting on either, so the server never idles between them.
    losses = []
    for step in range(args.steps):
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
        result = fwd_bwd.result()
        optim.result()
        losses.append(result.metrics["loss:sum"] / n_tokens)
        print(f"--- Step {step + 1} ---  loss per token {losses[-1]:.4f}")

    # 4. Checkpoints: the training state (adapter + optimizer), and weights for sampling.
    state = training.save_state("example-client").result()
    sampler_path = training.save_weights_for_sampler("example-client").result().path
    print(f"Saved state: {state.path}")
    print(f"Saved sampler weights: {sampler_path}")
    for checkpoint in rest.list_checkpoints(training.model_id).result().checkpoints:
        print(f"  {checkpoint.checkpoint_type:8s} {checkpoint.tinker_path}")

    # 5. Sampling from the saved weights.
    sampler = service.create_sampling_client(model_path=sampler_path).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("The cat"))
    params = types.SamplingParams(max_tokens=12, temperature=0.7, seed=0)
    samples = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
    for i, sequence in enumerate(samples.sequences):
        print(f"Sample {i + 1}: The cat{tokenizer.decode(sequence.tokens)!r}")

    service.close("success").result()
    print(f"SUMMARY sft_loss_first={losses[0]:.4f} sft_loss_last={losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
