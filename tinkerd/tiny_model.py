"""The built-in tiny model: random weights from a small Llama config and a BPE tokenizer trained
here on generated text. Built on first use, deterministic, no downloads.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinkerd.storage import umask_modes

_WORDS = (
    "the a one two three four five six seven eight nine ten cat dog bird fish tree river "
    "stone house road city sun moon star rain wind snow fire water light dark red green blue "
    "small big old new fast slow happy sad warm cold runs sees likes finds makes takes gives "
    "eats reads writes sings sleeps walks jumps swims flies grows falls and or but with from "
    "into over under near far is was are were has had will can may must yes no what why how "
    "who where when answer question user assistant system number add plus minus equals"
).split()
EOS_TOKEN = "<|endoftext|>"
_SPECIAL = [EOS_TOKEN, "<|im_start|>", "<|im_end|>", "<|pad|>"]
VOCAB_SIZE = 1024
MAX_POSITIONS = 2048
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_build_lock = threading.Lock()  # fcntl locks are per process: this orders its threads


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.3:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} + {b} = {a + b}")
        else:
            words = rng.choices(_WORDS, k=rng.randint(4, 14))
            lines.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return lines


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (every byte encodable), trained on the built-in corpus: the
    same every time. `tokenizers` only, so the API can build it without torch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """The trained tokenizer as a transformers fast tokenizer, with its chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = VOCAB_SIZE,
    max_positions: int = MAX_POSITIONS,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama model and its tokenizer to `path` (atomically) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock, _file_lock(path.parent / f".{path.name}.lock"):
        if (path / "config.json").is_file():  # another process built it while we waited
            return path
        tokenizer = build_tokenizer(vocab_size)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            dtype="float32",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            umask_modes(tmp)  # not mkdtemp's 0o700 and safetensors' 0o600: others load it too
            os.replace(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "config.json").is_file():  # not someone else's finished build
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on `lock_path`, held until the block ends: the processes that
    share a data directory (a cluster's workers and API) build the model one at a time."""
    with open(lock_path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX)  # POSIX record lock: also across hosts on NFS
        except OSError:  # a filesystem without locks: the build's rename settles who wins
            yield
            return
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
