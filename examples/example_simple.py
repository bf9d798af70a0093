"""The simple JSON API with plain `requests`: supervised steps on chat data, one PPO step on
sampled answers, and the adapters the server holds.

Start a server first (`tinkerd serve`; its adapters train the built-in tiny model by default),
then `python examples/example_simple.py [--url URL]` (default $TINKERD_URL, else
http://127.0.0.1:8000). No SDK, no token ids: conversations go in as JSON and the server renders
them with the model's chat template.
"""

from __future__ import annotations

import argparse
import time

import requests
from _common import server_url

CHATS = [
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "What flies over the house?"},
        {"role": "assistant", "content": "The bird."},
    ],
]


class Client:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()

    def get(self, path: str) -> dict:
        r = self.http.get(self.url + path, timeout=60)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(self.url + path, json=body, timeout=180)
        if not r.ok:
            raise SystemExit(f"{path}: {r.status_code} {r.text}")
        return r.json()

    def result(self, request_id: str) -> dict:
        """Wait for a request: retrieve_future holds each poll until the result is ready (or
        answers try_again after a while)."""
        while True:
            out = self.post("/retrieve_future", {"request_id": request_id})
            if out.get("type") != "try_again":
                return out
            time.sleep(0.1)


def supervised(client: Client, model_id: str, steps: int, learning_rate: float) -> list[float]:
    print(f"\n=== Supervised learning (cross_entropy) on {model_id} ===")
    losses = []
    for step in range(1, steps + 1):
        # Submit both, then wait: the server runs them in order without idling in between.
        fwdbwd = client.post(
            "/fwdbwd", {"model_id": model_id, "data": CHATS, "loss_fn": "cross_entropy"}
        )
        optim = client.post("/optim_step", {"model_id": model_id, "learning_rate": learning_rate})
        out = client.result(fwdbwd["request_id"])
        client.result(optim["request_id"])
        losses.append(out["loss"])
        print(f"--- Step {step} ---")
        print(f"Loss: {out['loss']:.4f}")
        print("Metrics:")
        for name, value in out["metrics"].items():
            print(
                f"  - {name}: {value:.4f}" if isinstance(value, float) else f"  - {name}: {value}"
            )
    return losses


def ppo_step(client: Client, model_id: str, learning_rate: float) -> dict:
    """Sample answers, score them, and take one PPO step on them (token ids and the sampler's
    logprobs, as an RL loop does)."""
    print(f"\n=== RL (ppo) on {model_id} ===")
    client.post("/add_lora", {"model_id": model_id, "rank": 8})
    question = [{"role": "user", "content": "What is 10-3?"}]
    out = client.post(
        "/sample",
        {"model_id": model_id, "messages": question, "max_tokens": 8, "num_samples": 4, "seed": 0},
    )
    # The reward: the share of digits in the answer (we want a number); advantage = reward -
    # the group's mean reward.
    rewards = [sum(c.isdigit() for c in s["text"]) / max(len(s["text"]), 1) for s in out["samples"]]
    baseline = sum(rewards) / len(rewards)
    prompt = out["prompt_tokens"]
    data, logprobs, advantages = [], [], []
    for sample, reward in zip(out["samples"], rewards, strict=True):
        print(f"  sampled {sample['text']!r}: reward {reward:.2f}")
        data.append(prompt + sample["tokens"])  # predicting each sampled token from the prefix
        logprobs.append([0.0] * (len(prompt) - 1) + sample["logprobs"])
        advantages.append([0.0] * (len(prompt) - 1) + [reward - baseline] * len(sample["tokens"]))
    fwdbwd = client.post(
        "/fwdbwd",
        {
            "model_id": model_id,
            "data": data,
            "loss_fn": "ppo",
            "loss_fn_inputs": {"logprobs": logprobs, "advantages": advantages},
        },
    )
    optim = client.post("/optim_step", {"model_id": model_id, "learning_rate": learning_rate})
    result = client.result(fwdbwd["request_id"])
    client.result(optim["request_id"])
    metrics = result["metrics"]
    print("--- Step 1 ---")
    print(f"Loss: {result['loss']:.4f}")
    print("PPO Metrics:")
    print(f"  - Mean advantage: {metrics['mean_advantage']:.4f}")
    print(f"  - Mean ratio: {metrics['mean_ratio']:.4f}")
    print(f"  - Clip fraction: {metrics['clip_fraction']:.4f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args, url = server_url(parser)
    client = Client(url)

    print("=== Health ===")
    print(client.get("/healthz"))
    print("\n=== Loss functions ===")
    losses = client.get("/loss_functions")
    for name in losses["available_loss_functions"]:
        print(f"  {name}: {losses['descriptions'][name]}")

    sft = supervised(client, "example-sft", args.steps, args.learning_rate)
    reply = client.post(
        "/generate",
        {"model_id": "example-sft", "messages": CHATS[0][:1], "max_tokens": 8, "temperature": 0},
    )
    print(f"example-sft answers {CHATS[0][0]['content']!r} with {reply['text']!r}")
    ppo_step(client, "example-rl", args.learning_rate)

    print("\n=== Adapters ===")
    for adapter in client.get("/adapters")["adapters"]:
        print(
            f"  {adapter['model_id']}: base {adapter['base_model']}, rank {adapter['lora_rank']}, "
            f"{adapter['trainable_params']} trainable parameters, {adapter['status']}"
        )
    print(f"\nsupervised loss fell from {sft[0]:.4f} to {sft[-1]:.4f}")
    if not sft[-1] < sft[0]:
        raise SystemExit("the supervised loss did not fall")


if __name__ == "__main__":
    main()
