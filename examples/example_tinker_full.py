"""A whole Tinker workflow against a tinkerd server: supervised fine-tuning, then reinforcement
learning on a toy reward, then a checkpoint that a new training client resumes from.

    tinkerd serve &                                   # the built-in tiny model, no downloads
    python examples/example_tinker_full.py [--url http://127.0.0.1:8000] [--loss ppo]

The RL task: the reward of a completion is the fraction of its tokens that are the word " cat".
Each iteration samples a group of completions per prompt, centres the rewards within each group
(advantage = reward - group mean) and takes one importance_sampling (or ppo) step on the sampled
tokens, with the sampler's logprobs as the behaviour policy. The mean reward per iteration
rises. The last line is a machine-readable summary.
"""

from __future__ import annotations

import argparse
import os

import tinker
from _common import server_url
from tinker import types

SFT_TEXTS = [
    "The cat sees the dog near the river.",
    "The bird flies over the old house.",
    "A small cat sleeps under the tree.",
    "Two plus three equals five.",
]
PROMPTS = ["The", "A dog", "One bird sees"]
TARGET_WORD = " cat"


def sft_datum(tokenizer, text: str) -> types.Datum:
    tokens = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def rl_datum(
    prompt: list[int], completion: list[int], logprobs: list[float], advantage: float
) -> types.Datum:
    """One sampled completion as a policy-gradient datum: the whole sequence is the input, and
    only the completion's tokens carry the sampler's logprobs and the advantage."""
    tokens = prompt + completion
    n_prompt = len(prompt) - 1  # targets that belong to the prompt
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(completion),
        },
    )


def reward(completion: list[int], target: int) -> float:
    return sum(t == target for t in completion) / max(len(completion), 1)


def rollouts(sampler, prompts, target, group_size, max_tokens, seed):
    """Sample a group per prompt (all requests in flight at once); returns the data for a
    policy-gradient step and the mean reward."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop=[])
    futures = [
        sampler.sample(
            types.ModelInput.from_ints(p), num_samples=group_size, sampling_params=params
        )
        for p in prompts
    ]
    data, rewards = [], []
    for prompt, future in zip(prompts, futures, strict=True):
        sequences = future.result().sequences
        group = [reward(list(s.tokens), target) for s in sequences]
        mean = sum(group) / len(group)
        rewards += group
        for sequence, r in zip(sequences, group, strict=True):
            if r != mean:  # a zero advantage teaches nothing
                data.append(rl_datum(prompt, list(sequence.tokens), sequence.logprobs, r - mean))
    return data, sum(rewards) / len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default="tinkerd/tiny")
    parser.add_argument(
        "--loss", default="importance_sampling", choices=["importance_sampling", "ppo"]
    )
    parser.add_argument("--sft-steps", type=int, default=6)
    parser.add_argument("--rl-iterations", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args, url = server_url(parser)

    api_key = os.environ.get("TINKER_API_KEY", "tml-local")
    service = tinker.ServiceClient(base_url=url, api_key=api_key)
    training = service.create_lora_training_client(
        base_model=args.base_model, rank=8, seed=0
    ).result()
    tokenizer = training.get_tokenizer()
    adam = types.AdamParams(learning_rate=args.learning_rate)
    print(f"Training run {training.model_id} on {args.base_model}")

    # 1. Supervised fine-tuning on a few sentences.
    batch = [sft_datum(tokenizer, text) for text in SFT_TEXTS]
    n_tokens = sum(len(d.loss_fn_inputs["target_tokens"].data) for d in batch)
    for step in range(args.sft_steps):
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(adam)
        loss = fwd_bwd.result().metrics["loss:sum"] / n_tokens
        optim.result()
        print(f"SFT step {step + 1}: loss per token {loss:.4f}")

    # 2. RL: sample from the current weights, score, and take a policy-gradient step.
    [target] = tokenizer.encode(TARGET_WORD)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    history = []
    for iteration in range(args.rl_iterations):
        sampler = training.save_weights_and_get_sampling_client().result()
        data, mean_reward = rollouts(
            sampler, prompts, target, args.group_size, args.max_tokens, seed=iteration
        )
        history.append(mean_reward)
        if data:  # empty when every group's completions scored alike
            fwd_bwd = training.forward_backward(data, args.loss)
            optim = training.optim_step(adam)
            fwd_bwd.result()
            optim.result()
        print(
            f"RL iteration {iteration + 1:2d}: mean reward {mean_reward:.3f} "
            f"({len(data)} completions with a nonzero advantage)"
        )

    # 3. Save the training state, resume it in a new training client, and sample from it.
    state = training.save_state("example-full-rl").result()
    print(f"Saved state: {state.path}")
    resumed = service.create_training_client_from_state_with_optimizer(state.path).result()
    print(f"Resumed as training run {resumed.model_id}")
    check = [sft_datum(tokenizer, SFT_TEXTS[0])]
    same = [
        list(out["logprobs"].data)
        for client in (training, resumed)
        for out in client.forward(check, "cross_entropy").result().loss_fn_outputs
    ]
    max_diff = max(abs(a - b) for a, b in zip(same[0], same[1], strict=True))
    print(f"Resumed model's logprobs differ by at most {max_diff:.2e}")
    sampler = resumed.save_weights_and_get_sampling_client().result()
    _, resumed_reward = rollouts(sampler, prompts, target, args.group_size, args.max_tokens, 1234)
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=0, stop=[])
    for prompt in PROMPTS[:2]:
        tokens = tokenizer.encode(prompt)
        sample = sampler.sample(types.ModelInput.from_ints(tokens), 1, params).result()
        print(f"Sample: {prompt}{tokenizer.decode(sample.sequences[0].tokens)!r}")

    service.close("success").result()
    first, last = history[0], sum(history[-3:]) / len(history[-3:])
    print(
        f"SUMMARY loss={args.loss} reward_first={first:.3f} reward_last3={last:.3f} "
        f"resumed_reward={resumed_reward:.3f} resume_max_logprob_diff={max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
