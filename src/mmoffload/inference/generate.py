"""The generate stage: complete the last prompt of each offloaded trace through an inference server.

For each trace with nodes, the last prompt is the path from the root to the
last node that has no sampled token (an environment or user turn): its token
ids joined, its nodes' sidecars merged (offsets are already absolute). The
server completes it from raw refs (``mmoffload serve``) and the completion is
written back as a new sampled node, a child of that prompt node: its tokens,
mask all true and one logprob per token. Existing nodes are kept as they are,
so a trace that already ended in a sampled turn gains a sibling branch.
Traces without a prompt node or without images are copied unchanged.

Two protocols (inference.md): stock vLLM's ``content_parts`` (the default: one
pad per image, images the server already verified sent as ``uuid`` alone, the
server's expansion checked against the family's) or ``mmraw:`` refs. With
``concurrency`` > 1 several records are in flight at once (the traces of one
record in order, so an episode's earlier images are held by the time its later
prompts go); the output keeps the input's order.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from mmoffload.errors import BadInputError, UsageError, Where
from mmoffload.inference.client import PROTOCOLS, Completion, InferenceClient
from mmoffload.inference.refs import InvalidImageRefError
from mmoffload.io.inputs import decode_json_line, iter_lines
from mmoffload.io.outputs import open_output

_ENCODER = msgspec.json.Encoder()


class GenerateReport(msgspec.Struct):
    """What ``generate`` did: records and traces read, traces completed, tokens sampled, time."""

    records: int = 0
    traces: int = 0
    traces_completed: int = 0
    traces_skipped: int = 0
    images_sent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    protocol: str = "content-parts"
    requests_resent: int = 0

    def add(self, other: GenerateReport) -> None:
        """Add another report's counts (of records completed elsewhere) to this one."""
        for field in ("traces", "traces_completed", "traces_skipped", "images_sent"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


def generate_traces(
    traces_path: Path,
    output: Path,
    server: str,
    sampling_params: dict[str, Any],
    *,
    protocol: str = "content-parts",
    concurrency: int = 1,
    advance: Callable[[int], None] | None = None,
) -> GenerateReport:
    """Complete the last prompt of every offloaded trace in a JSONL file; write the traces to ``output``.

    Args:
        traces_path: JSONL of episodes (``traces: [...]``) or traces (``nodes: [...]``).
        output: where the traces with their new sampled nodes go (written atomically).
        server: base URL of the inference server.
        sampling_params: vLLM sampling parameters (``max_tokens``, ``temperature``, ``seed``...);
            ``logprobs`` is set to 0 so each sampled token's logprob comes back.
        protocol: ``content-parts`` (stock vLLM's) or ``mmraw`` (raw refs).
        concurrency: records in flight at once.

    Raises:
        BadInputError: a line is not JSON, a trace is malformed, or the server's expansion of a
            prompt disagrees with the family's (names file, line, trace, image).
        InferenceServerError: the server refused a request.
        UsageError: the server cannot be reached, or an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"Unknown protocol `{protocol}`; known: {', '.join(PROTOCOLS)}")
    client = InferenceClient(server)
    sampling = {**sampling_params, "logprobs": 0}
    report = GenerateReport(protocol=protocol)
    started = time.perf_counter()

    def complete(record: object, where: Where) -> GenerateReport:
        counts = GenerateReport()
        if not isinstance(record, dict):
            raise BadInputError(f"Expected a JSON object, got `{type(record).__name__}`", where)
        traces = record.get("traces") if "traces" in record else [record] if "nodes" in record else []
        for index, trace in enumerate(traces or []):
            at = where.at(path=("traces", index)) if "traces" in record else where
            _complete_trace(trace, at, client, sampling, counts, protocol)
        return counts

    # Records in flight, oldest first: written in input order as each finishes.
    pending: collections.deque[tuple[Future[GenerateReport], object, int]] = collections.deque()
    # The pool's threads finish before the client's connections close.
    with client, open_output(output) as out, ThreadPoolExecutor(max(1, concurrency)) as pool:

        def write_oldest() -> None:
            future, record, size = pending.popleft()
            report.add(future.result())
            out.write(_ENCODER.encode(record) + b"\n")
            if advance is not None:
                advance(size)

        try:
            for where, line in iter_lines(traces_path):
                record = decode_json_line(line, where)
                report.records += 1
                pending.append((pool.submit(complete, record, where), record, len(line)))
                while len(pending) > 2 * concurrency:
                    write_oldest()
            while pending:
                write_oldest()
        finally:
            for future, _, _ in pending:
                future.cancel()
    report.requests_resent = client.resent
    report.seconds = time.perf_counter() - started
    return report


def _complete_trace(
    trace: object,
    where: Where,
    client: InferenceClient,
    sampling: dict[str, Any],
    report: GenerateReport,
    protocol: str,
) -> None:
    report.traces += 1
    nodes = trace.get("nodes") if isinstance(trace, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(node, dict) for node in nodes):
        raise BadInputError("Expected `nodes` as a list of objects", where)
    at = where.at(trace=str(trace.get("id"))) if trace.get("id") is not None else where  # type: ignore[union-attr]
    last = _last_prompt_node(nodes)
    path = _path_to(last, nodes, at) if last is not None else []
    sidecars = [nodes[i].get("multi_modal_data") for i in path]
    if not any(sidecars):
        report.traces_skipped += 1
        return
    token_ids: list[int] = [token for i in path for token in nodes[i].get("token_ids") or []]
    try:
        if protocol == "mmraw":
            completion = client.generate(token_ids, sidecars, sampling)
        else:
            completion = client.generate_parts(token_ids, sidecars, sampling)
    except InvalidImageRefError as exc:  # the server's expansion disagrees: name the trace too
        raise BadInputError(exc.message, at.at(image=exc.image)) from exc
    nodes.append(_sampled_node(last, completion))  # type: ignore[arg-type]
    report.traces_completed += 1
    report.images_sent += sum(len(((s or {}).get("mm_hashes") or {}).get("image") or []) for s in sidecars)
    report.prompt_tokens += len(token_ids)
    report.completion_tokens += len(completion.token_ids)


def _last_prompt_node(nodes: list[dict[str, Any]]) -> int | None:
    for index in range(len(nodes) - 1, -1, -1):
        if not any(nodes[index].get("mask") or []):
            return index
    return None


def _path_to(index: int, nodes: list[dict[str, Any]], where: Where) -> list[int]:
    path: list[int] = []
    seen: set[int] = set()
    current: int | None = index
    while current is not None:
        if type(current) is not int or not 0 <= current < len(nodes) or current in seen:
            raise BadInputError(f"Expected `parent` as an index of an earlier node, got `{current!r}`", where)
        seen.add(current)
        path.append(current)
        current = nodes[current].get("parent")
    return path[::-1]


def _sampled_node(parent: int, completion: Completion) -> dict[str, Any]:
    return {
        "parent": parent,
        "message": {"role": "assistant", "content": None},
        "token_ids": completion.token_ids,
        "mask": [True] * len(completion.token_ids),
        "logprobs": completion.logprobs,
        "sampled": True,
        "finish_reason": completion.finish_reason,
    }
