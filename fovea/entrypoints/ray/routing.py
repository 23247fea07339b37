"""What the ingress sends a replica (`ForwardedRequest`), and the prefix-affinity request router.

Ray Serve's HTTP proxy hands a replica the raw ASGI request, whose body a request router cannot read, so the
ingress deployment reads it and calls the engine replicas through a deployment handle with a
`ForwardedRequest`: the HTTP request as it came (the replica runs it through fovea's own OpenAI app) plus its
`prefix`, the part of a prompt that decides what a replica may have cached: the messages' roles and texts in
order, each image as a digest of its URL (a data URL is the image's bytes, so the same image gives the same
digest wherever it is in the batch of requests), or a completion's prompt.

`PrefixAffinityRouter` (Ray Serve's `RequestRouter` API, run in the ingress) remembers which replica it sent
each prefix to, as a chain of hashes over 32-character blocks (the engine's prefix cache works on a block hash
chain in the same way). A request goes to the replica that got the longest matching prefix, unless that
replica's queue is `imbalance_threshold` requests longer than the shortest, and otherwise to the less loaded
of the candidates (power of two choices). A full replica (at max_ongoing_requests) is never chosen: Serve
moves on to the next rank.

Ray's own `ray.serve.llm.request_router.PrefixCacheAffinityRouter` does the same with a shared prefix-tree
actor, but in Ray 2.60 importing it requires vLLM or SGLang (`ray.serve.llm` imports its OpenAI models, which
import one of them), and it reads only the text parts of messages, so two requests differing in their image
would look alike to it.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK_CHARS = 32
_DIGEST_CHARS = 16


@dataclass(slots=True)
class ForwardedRequest:
    """One HTTP request, from the ingress to an engine replica."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prefix: str = ""  # what the router matches (see routing_prefix); empty: no affinity
    client: tuple[str, int] | None = None


@dataclass(slots=True)
class ResponseStart:
    """The first item a replica streams back: the status and headers; the body's chunks (bytes) follow."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def routing_prefix(path: str, body: bytes) -> str:
    """The prefix of a chat or completion request (see the module docstring); "" for anything else."""
    if not path.endswith(("/chat/completions", "/completions")) or not body:
        return ""
    try:
        request = json.loads(body)
    except ValueError:
        return ""  # the replica answers the 400
    if not isinstance(request, dict):
        return ""
    if isinstance(request.get("messages"), list):
        return "".join(_message_prefix(m) for m in request["messages"] if isinstance(m, dict))
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # one prompt in a list is that prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt))
    return ""  # several prompts in one request: no single prefix


def _message_prefix(message: dict) -> str:
    content = message.get("content")
    parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
    out = [f"<{message.get('role')}>"]
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind == "text":
                out.append(str(part.get("text", "")))
            elif isinstance(part.get(kind), dict):  # image_url / video_url: {"url": ...}
                url = str(part[kind].get("url", ""))
                out.append(f"<{kind}:{hashlib.sha256(url.encode()).hexdigest()[:_DIGEST_CHARS]}>")
    return "".join(out)


def block_hashes(prefix: str) -> list[str]:
    """Hash chain over BLOCK_CHARS-character blocks; the last, partial block counts too (a whole-prompt match)."""
    hashes, previous = [], ""
    for start in range(0, len(prefix), BLOCK_CHARS):
        previous = hashlib.blake2b(f"{previous}|{prefix[start:start + BLOCK_CHARS]}".encode(),
                                   digest_size=12).hexdigest()
        hashes.append(previous)
    return hashes


def _router_base():
    from ray.serve.request_router import FIFOMixin, RequestRouter

    return FIFOMixin, RequestRouter


class PrefixAffinityRouter(*_router_base()):
    """See the module docstring. Its state lives in the caller (the ingress), so with one ingress it is global."""

    def initialize_state(self, imbalance_threshold: int = 8, max_entries: int = 200_000) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.max_entries = max_entries
        self.owner: OrderedDict[str, str] = OrderedDict()  # block hash -> replica's full id (LRU order)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        hashes = block_hashes(_prefix_of(pending_request))
        chosen = self._longest_match(hashes, candidate_replicas)
        if chosen is not None:
            shortest = min(map(self._queue_len, candidate_replicas))
            if self._queue_len(chosen) - shortest > self.imbalance_threshold:
                chosen = None
        if chosen is None:
            chosen = min(random.sample(candidate_replicas, min(2, len(candidate_replicas))), key=self._queue_len)
        # Recorded now, not in on_request_routed: Serve calls that only with strict max_ongoing_requests on. If
        # the chosen replica turns the request down (full), Serve tries the next rank and this entry is wrong
        # for one request.
        for h in hashes:
            self.owner[h] = chosen.replica_id.to_full_id_str()
            self.owner.move_to_end(h)
        while len(self.owner) > self.max_entries:
            self.owner.popitem(last=False)
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        dead = replica_id.to_full_id_str()
        for h in [h for h, r in self.owner.items() if r == dead]:
            del self.owner[h]

    def _longest_match(self, hashes: list[str], candidates):
        by_id = {r.replica_id.to_full_id_str(): r for r in candidates}
        match = None
        for h in hashes:
            replica = by_id.get(self.owner.get(h))
            if replica is None:
                break
            match = replica
        return match

    def _queue_len(self, replica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if cached is None else cached


def _prefix_of(pending_request) -> str:
    if pending_request is None:
        return ""
    for arg in pending_request.args:
        # by attribute: Serve may hand the router a copy of the class (its deployment code travels pickled)
        prefix = getattr(arg, "prefix", None)
        if isinstance(prefix, str):
            return prefix
    return ""
