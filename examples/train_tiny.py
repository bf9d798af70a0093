"""Train the built-in tiny model through the official Tinker SDK and print a falling loss.

Start a server first (`tinkerd serve`), or let ./demo.sh do everything. Nothing here is
tinkerd-specific: the same script runs against any Tinker-compatible service.
"""

from __future__ import annotations

import argparse
import os

import tinker
from _common import server_url
from tinker import types

TEXTS = [
    "The cat sees the dog near the river.",
    "Two plus three equals five.",
    "The bird flies over the old house.",
    "12 + 7 = 19",
]


def make_datum(tokenizer, text: str) -> types.Datum:
    """Next-token prediction on `text`: input position i predicts token i + 1."""
    tokens = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default="tinkerd/tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args, url = server_url(parser)

    api_key = os.environ.get("TINKER_API_KEY", "tml-local")
    with tinker.ServiceClient(base_url=url, api_key=api_key) as service:
        training = service.create_lora_training_client(base_model=args.base_model, rank=8, seed=0)
        training = training.result()
        tokenizer = training.get_tokenizer()
        batch = [make_datum(tokenizer, text) for text in TEXTS]
        n_tokens = sum(len(d.loss_fn_inputs["target_tokens"].data) for d in batch)
        losses = []
        for step in range(args.steps):
            # Submit both before waiting on either, so the server never idles between them.
            fwd_bwd = training.forward_backward(batch, "cross_entropy")
            optim = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
            loss = fwd_bwd.result().metrics["loss:sum"] / n_tokens
            optim.result()
            losses.append(loss)
            print(f"step {step:3d}  loss per token {loss:.4f}")
        print(f"loss fell from {losses[0]:.4f} to {losses[-1]:.4f}")
        if not losses[-1] < losses[0]:
            raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
