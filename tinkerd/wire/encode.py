"""Results -> the SDK's protobuf: a SampleResponse, a ForwardBackwardOutput."""

from __future__ import annotations

import numpy as np

from tinkerd.types import ForwardBackwardResult, SampleResult
from tinkerd.wire import pb


def encode_sample_response(result: SampleResult) -> bytes:
    """A protobuf SampleResponse; prompt logprobs carry NaN for the first token."""
    out = pb.SampleResponse()
    for seq in result.sequences:
        out.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=seq.tokens.astype("<i4").tobytes(),
            logprobs=seq.logprobs.astype("<f4").tobytes(),
        )
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = result.prompt_logprobs.astype("<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        ids, lps = result.topk_prompt_logprobs
        out.topk_prompt_logprobs.CopyFrom(
            pb.TopkLogprobs(
                token_ids=ids.astype("<i4").tobytes(),
                logprobs=lps.astype("<f4").tobytes(),
                k=ids.shape[1],
                length=ids.shape[0],
            )
        )
    return out.SerializeToString()


def encode_forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """A protobuf ForwardBackwardOutput: one ArrayRecord per run of datums with equal trailing
    shape."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        out.metrics[key] = float(value)
    groups: list[list[dict[str, np.ndarray]]] = []
    for outputs in result.loss_fn_outputs:
        shapes = {k: v.shape[1:] for k, v in outputs.items()}
        if groups and {k: v.shape[1:] for k, v in groups[-1][0].items()} == shapes:
            groups[-1].append(outputs)
        else:
            groups.append([outputs])
    for group in groups:
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
        for name, first in group[0].items():
            arrays = [np.ascontiguousarray(g[name], dtype="<f4") for g in group]
            offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
            field = record.fields[name]
            field.data = b"".join(a.tobytes() for a in arrays)
            field.offsets = offsets.astype("<i8").tobytes()
            field.dtype = pb.DTYPE_FLOAT32
            field.trailing_shape.extend(first.shape[1:])
    return out.SerializeToString()
