"""`tinkerd sample`: text sampled from a base model or a checkpoint, tokenized on this side."""

from __future__ import annotations

import argparse

from tinkerd.client.server import ClientError, Server


def sample(server: Server, args: argparse.Namespace) -> None:
    from tinker import types

    from tinkerd.export import default_cache_dir
    from tinkerd.text import stop_cut, text_codec
    from tinkerd.types import UserError

    with server.service_client() as service:
        if args.checkpoint:
            sampler = service.create_sampling_client(model_path=args.checkpoint).result()
        else:
            model = args.model or _default_model(server)
            sampler = service.create_sampling_client(base_model=model).result()
        base_model = sampler.get_base_model()
        try:
            codec = text_codec(base_model, default_cache_dir())
        except UserError as e:
            raise ClientError(f"cannot load the tokenizer of {base_model} here: {e}") from None
        params = types.SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
        prompt = types.ModelInput.from_ints(codec.encode(args.prompt))
        result = sampler.sample(prompt, num_samples=args.num_samples, sampling_params=params)
        sequences = result.result().sequences
    for i, sequence in enumerate(sequences):
        if len(sequences) > 1:
            print(f"--- sample {i + 1} ---")
        text = codec.decode(list(sequence.tokens))
        print(text[: stop_cut(text, args.stop or ())])  # without the stop string, as /sample


def _default_model(server: Server) -> str:
    """The server's first listed model: its default (the built-in tiny model unless set)."""
    models = server.rest_client().get_server_capabilities().result().supported_models
    return next((m.model_name for m in models if m.model_name), "tinkerd/tiny")
