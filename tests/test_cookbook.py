"""tinker-cookbook's recipes, unmodified, against a live tinkerd.

Each recipe runs as its own command line (`python -m tinker_cookbook.recipes.<name>.train
key=value ...`, exactly as docs/sdk.md shows) against the `server` fixture, with the tiny local
model as `model_name` and `renderer_name=role_colon`. The tests read what the recipe itself
writes (`metrics.jsonl` and `checkpoints.jsonl` in its `log_path`, and its log output) and check
that it learns, and that a second run on the same `log_path` resumes from the first one's
checkpoint.

The cookbook is installed by scripts/setup.sh; when it is missing these tests fail, not skip.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tinker_cookbook  # noqa: F401  (an ImportError here is a failure: CI installs it)

COOKBOOK_VERSION = "0.6.1"  # scripts/setup.sh pins the same
RECIPE_TIMEOUT = 240
SL_CHATS, SL_BATCH = 96, 8
SL_EPOCH = SL_CHATS // SL_BATCH  # steps per epoch


def test_cookbook_version() -> None:
    from importlib.metadata import version

    assert version("tinker-cookbook") == COOKBOOK_VERSION


def run_recipe(args: list[str], log: Path) -> str:
    """Run one recipe command (arguments after `python`) to completion; return its output."""
    env = {
        **os.environ,
        "TINKER_API_KEY": "tml-cookbook",
        "TINKER_TELEMETRY": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            timeout=RECIPE_TIMEOUT,
        )
    text = log.read_text()
    assert proc.returncode == 0, f"{' '.join(args[:2])} failed:\n{text[-4000:]}"
    return text


def metrics(log_path: Path) -> dict[int, dict]:
    """metrics.jsonl by step (a resumed run drops rows past its checkpoint, then appends)."""
    rows: dict[int, dict] = {}
    for line in (log_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def checkpoints(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def arithmetic_chats(path: Path, n: int) -> Path:
    """Chat conversations in the arithmetic env's own prompt format (its few-shot turn first)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            x, y = rng.randint(0, 100), rng.randint(0, 100)
            messages = [
                {"role": "user", "content": "What is 4 + 5?"},
                {"role": "assistant", "content": "9"},
                {"role": "user", "content": f"What is {x} + {y}?"},
                {"role": "assistant", "content": str(x + y)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# -- supervised: recipes.chat_sl.train on a local JSONL ---------------------------------------


@pytest.fixture(scope="module")
def chat_sl(server, tiny_model_dir, tmp_path_factory) -> dict:
    """Two runs of chat_sl on one log_path: one epoch, then (resumed) a second epoch."""
    work = tmp_path_factory.mktemp("chat_sl")
    log_path = work / "run"
    args = [
        "-m",
        "tinker_cookbook.recipes.chat_sl.train",
        f"base_url={server.url}",
        f"model_name={tiny_model_dir}",
        "renderer_name=role_colon",
        f"dataset={arithmetic_chats(work / 'chats.jsonl', SL_CHATS)}",
        f"log_path={log_path}",
        f"batch_size={SL_BATCH}",
        "learning_rate=5e-3",
        "lr_schedule=constant",
        "lora_rank=8",
        "max_length=128",
        "save_every=4",
        "eval_every=0",
    ]
    first = run_recipe([*args, "num_epochs=1"], work / "first.log")
    after_first = checkpoints(log_path)
    second = run_recipe(
        [*args, "num_epochs=2", "behavior_if_log_dir_exists=resume"], work / "second.log"
    )
    return {
        "log_path": log_path,
        "first": first,
        "second": second,
        "after_first": after_first,
    }


def test_chat_sl_learns(chat_sl) -> None:
    rows = metrics(chat_sl["log_path"])
    assert sorted(rows) == list(range(2 * SL_EPOCH))
    nll = [rows[s]["train_mean_nll"] for s in range(2 * SL_EPOCH)]
    assert all(math.isfinite(x) for x in nll)
    # Random weights start near ln(vocab); the format tokens are learnable, the sums mostly not.
    assert nll[0] > 6.0
    assert nll[SL_EPOCH - 1] < nll[0] - 2.0
    # The second epoch goes lower still (min: lr 5e-3 on a tiny model can spike for a step).
    assert min(nll[SL_EPOCH:]) < min(nll[:SL_EPOCH])


def test_chat_sl_resumes_from_checkpoint(chat_sl) -> None:
    first_final = chat_sl["after_first"][-1]
    assert first_final["name"] == "final" and first_final["epoch"] == 1
    assert first_final["state_path"].startswith("tinker://")
    # The second run found that checkpoint and loaded it, optimizer state included.
    assert f"Resumed training from {first_final['state_path']}" in chat_sl["second"]
    assert "Starting epoch 1" in chat_sl["second"]
    assert "Starting epoch 0" not in chat_sl["second"]
    rows = metrics(chat_sl["log_path"])
    assert [rows[s]["epoch"] for s in sorted(rows)] == [0] * SL_EPOCH + [1] * SL_EPOCH
    nll = [rows[s]["train_mean_nll"] for s in range(2 * SL_EPOCH)]
    # It goes on from where the first run stopped, not from the random start.
    assert nll[SL_EPOCH] < nll[0] - 2.0
    assert nll[SL_EPOCH] < (nll[0] + nll[SL_EPOCH - 1]) / 2
    final = checkpoints(chat_sl["log_path"])[-1]
    assert final["name"] == "final" and final["epoch"] == 2
    assert final["state_path"] != first_final["state_path"]


# -- RL: recipes.math_rl.train env=arithmetic -------------------------------------------------


@pytest.fixture(scope="module")
def math_rl(server, tiny_model_dir, chat_sl, tmp_path_factory) -> dict:
    """Two runs of math_rl (arithmetic) on one log_path: 6 steps, then resumed to 12.

    A random model never ends an answer with the stop sequence, so every reward is the same and
    RL has nothing to learn from; it starts instead from the chat_sl run's final state
    (`load_checkpoint_path`), which ends its answers with `\\n\\nUser:` some of the time.
    `loss_fn=importance_sampling`: the recipe's default, `stable_reinforce`, is not served.
    learning_rate 5e-4: the RL run starts a fresh Adam on the chat_sl weights, and its first
    steps move every weight by about the learning rate; at 1e-3 that jolt undid the format in
    about 1 run in 3 (at 4e-3 in every run), at 5e-4 the format rate climbs steadily.
    """
    work = tmp_path_factory.mktemp("math_rl")
    log_path = work / "run"
    start = checkpoints(chat_sl["log_path"])[-1]["state_path"]
    args = [
        "-m",
        "tinker_cookbook.recipes.math_rl.train",
        "env=arithmetic",
        f"base_url={server.url}",
        f"model_name={tiny_model_dir}",
        "renderer_name=role_colon",
        f"log_path={log_path}",
        f"load_checkpoint_path={start}",
        "loss_fn=importance_sampling",
        "group_size=8",
        "groups_per_batch=8",
        "max_tokens=8",
        "learning_rate=5e-4",
        "save_every=3",
        "eval_every=0",
    ]
    first = run_recipe([*args, "max_steps=6"], work / "first.log")
    after_first = checkpoints(log_path)
    second = run_recipe(
        [*args, "max_steps=12", "behavior_if_log_dir_exists=resume"], work / "second.log"
    )
    return {
        "log_path": log_path,
        "start": start,
        "first": first,
        "second": second,
        "after_first": after_first,
    }


def test_math_rl_arithmetic_learns(math_rl) -> None:
    rows = metrics(math_rl["log_path"])
    steps = [s for s in sorted(rows) if "env/all/reward/total" in rows[s]]
    assert steps == list(range(12))
    assert f"Loaded weights from {math_rl['start']}" in math_rl["first"]
    fmt = [rows[s]["env/all/format"] for s in steps]
    reward = [rows[s]["env/all/reward/total"] for s in steps]
    # Some rollouts are well formed and some not, so the groups carry a learning signal ...
    assert 0.0 < mean(fmt[:4]) < 0.95, fmt
    assert any(rows[s]["grad_norm:mean"] > 1e-3 for s in steps)
    # ... and RL makes well-formed answers (the reward) more frequent. Twelve steps of 64
    # rollouts on a tiny model are noisy (about 0.04 on a half's mean), so the check is that the
    # second half (after the resume) is no worse than the first within that noise, and that its
    # best step beats the first half's average: a run that diverged or ignored the reward fails.
    assert mean(fmt[6:]) > mean(fmt[:6]) - 0.05, fmt
    assert max(reward[6:]) > mean(reward[:6]), reward


def test_math_rl_resumes_from_checkpoint(math_rl) -> None:
    first_final = math_rl["after_first"][-1]
    assert first_final["name"] == "final" and first_final["batch"] == 6
    # The resume takes precedence over load_checkpoint_path: it continues the RL run itself.
    assert f"Resumed training from {first_final['state_path']}" in math_rl["second"]
    assert f"Loaded weights from {math_rl['start']}" not in math_rl["second"]
    final = checkpoints(math_rl["log_path"])[-1]
    assert final["name"] == "final" and final["batch"] == 12
    rows = metrics(math_rl["log_path"])
    assert rows[6]["progress/batch"] == 6
    # Its counters go on from the checkpoint's loop state, not from zero.
    resumed = first_final["cumulative_tokens"]["sampled"]
    assert rows[6]["tokens/cumulative/sampled"] == resumed + rows[6]["tokens/sampled"]
    sampled = [rows[s]["tokens/sampled"] for s in range(12)]
    assert final["cumulative_tokens"]["sampled"] == sum(sampled)


def test_a_burst_of_concurrent_samples_does_not_stall(training_client) -> None:
    """An RL step samples every rollout at once (math_rl's defaults: 100 groups of 4), and the
    SDK opens a connection per request in flight, each followed by a long-poll. With waitress's
    default limit of 100 open connections such a burst stalled for minutes; tinkerd now accepts
    `connection_limit` (2000) of them."""
    import asyncio
    import time

    import tinker

    sampler = training_client.save_weights_and_get_sampling_client().result()
    prompt = tinker.ModelInput.from_ints([1, 2, 3])
    params = tinker.SamplingParams(max_tokens=2, temperature=1.0)

    async def burst() -> list:
        return await asyncio.gather(*[sampler.sample(prompt, 1, params) for _ in range(200)])

    start = time.monotonic()
    results = asyncio.run(burst())
    assert len(results) == 200 and all(len(r.sequences) == 1 for r in results)
    assert time.monotonic() - start < 60


# -- DPO: tinker_cookbook.preference.train_dpo on a local comparisons JSONL -------------------

DPO_DRIVER = """
import sys
from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

base_url, model, data, log_path, epochs = sys.argv[1:]
common = ChatDatasetBuilderCommonConfig(
    model_name_for_tokenizer=model, renderer_name="role_colon", max_length=128, batch_size=8
)
train_dpo.main(
    train_dpo.Config(
        log_path=log_path,
        model_name=model,
        recipe_name="tinkerd_test_dpo",
        renderer_name="role_colon",
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=common, comparison_builder=ComparisonBuilderFromJsonl(train_path=data)
        ),
        learning_rate=1e-3,
        lora_rank=8,
        base_url=base_url,
        save_every=2,
        eval_every=0,
        num_epochs=int(epochs),
    )
)
"""


def preference_pairs(path: Path, n: int = 32) -> Path:
    rng = random.Random(0)
    words = "cat dog bird fish tree river stone house".split()
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.choice(words)
            comparison = {
                "prompt_conversation": [{"role": "user", "content": f"Tell me about the {w}."}],
                "completion_A": [{"role": "assistant", "content": f"The {w} is happy."}],
                "completion_B": [{"role": "assistant", "content": f"The {w} is sad."}],
            }
            f.write(json.dumps({"comparison": comparison, "label": "A"}) + "\n")
    return path


def test_dpo_learns_and_resumes(server, tiny_model_dir, tmp_path: Path) -> None:
    data = preference_pairs(tmp_path / "pairs.jsonl")
    log_path = tmp_path / "run"
    args = ["-c", DPO_DRIVER, server.url, str(tiny_model_dir), str(data), str(log_path)]
    run_recipe([*args, "1"], tmp_path / "first.log")
    first_final = checkpoints(log_path)[-1]
    assert first_final["name"] == "final" and first_final["epoch"] == 1
    second = run_recipe([*args, "2"], tmp_path / "second.log")
    assert f"Resumed DPO training from {first_final['state_path']}" in second

    rows = metrics(log_path)
    assert sorted(rows) == list(range(8))  # 32 pairs, 8 per batch, 2 epochs
    loss = [rows[s]["dpo_loss"] for s in range(8)]
    # The reference is the policy a run starts from, so each run starts at ln 2 ...
    assert loss[0] == pytest.approx(math.log(2), abs=1e-3)
    # ... and the loss falls as the chosen answer gains on the rejected one.
    assert loss[3] < loss[0] - 0.02
    assert rows[3]["accuracy"] == 1.0 and rows[3]["margin"] > 0
    # The second run trains the second epoch only, from the first run's final state.
    assert [rows[s]["epoch"] for s in range(8)] == [0] * 4 + [1] * 4
    assert loss[4] == pytest.approx(math.log(2), abs=1e-3)
    assert loss[7] < loss[4] - 0.01
    final = checkpoints(log_path)[-1]
    assert final["name"] == "final" and final["epoch"] == 2
