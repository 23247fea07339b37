"""The prefix-affinity router and what it routes on, without a cluster: the prefix of a request (images by a
digest of their URL), its block hash chain, and the replica `choose_replicas` ranks first; and the replica
counts handed to Serve."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from fovea.entrypoints.ray.routing import BLOCK_CHARS, ForwardedRequest, PrefixAffinityRouter, block_hashes, \
    routing_prefix
from fovea.entrypoints.ray.serve import ReplicaScaling

CHAT = "/v1/chat/completions"


def chat(url: str, text: str) -> bytes:
    return json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]},
    ]}).encode()


def test_prefix_names_the_image_by_digest_and_keeps_text_order():
    a, b = routing_prefix(CHAT, chat("data:image/png;base64,AAAA", "hi")), routing_prefix(CHAT, chat("data:x", "hi"))
    assert a.startswith("<system>be brief<user><image_url:") and a.endswith(">hi")
    assert a != b and len(a) == len(b)  # another image, another digest of the same size
    assert a == routing_prefix(CHAT, chat("data:image/png;base64,AAAA", "hi"))
    assert routing_prefix("/v1/completions", json.dumps({"prompt": ["one prompt"]}).encode()) == "one prompt"
    assert routing_prefix("/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode()) == "1 2 3"
    assert routing_prefix("/v1/completions", json.dumps({"prompt": ["two", "prompts"]}).encode()) == ""
    assert routing_prefix("/v1/models", b"") == routing_prefix(CHAT, b"{not json") == ""


def test_block_hashes_chain_so_a_shared_start_shares_hashes():
    base = "x" * (2 * BLOCK_CHARS)
    assert block_hashes(base + "tail")[:2] == block_hashes(base + "other")[:2]
    assert block_hashes(base + "tail")[2] != block_hashes(base + "other")[2]
    assert block_hashes("y" + base)[0] != block_hashes(base)[0] and block_hashes("") == []


@dataclass(eq=False)  # compared and hashed by identity, as Serve's RunningReplica
class FakeReplica:
    replica_id: ReplicaID
    max_ongoing_requests: int = 64


def request(prefix: str):
    @dataclass
    class Pending:
        args: list

    return Pending([ForwardedRequest("POST", CHAT, b"", [], b"", prefix=prefix)])


def test_same_prefix_goes_to_the_same_replica_unless_it_is_far_busier():
    deployment = DeploymentID(name="EngineReplica", app_name="fovea")
    router = PrefixAffinityRouter(deployment, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(imbalance_threshold=4)
    replicas = [FakeReplica(ReplicaID(f"r{i}", deployment)) for i in range(3)]
    prompt = "<user><image_url:0123456789abcdef>describe the picture in detail"

    def choose(prefix: str, candidates=replicas):
        return asyncio.run(router.choose_replicas(candidates, request(prefix)))

    first = choose(prompt)[0][0]
    for _ in range(5):
        ranks = choose(prompt)
        assert ranks[0] == [first] and set(ranks[1]) == set(replicas) - {first}
    assert choose(prompt + ", and its colours")[0] == [first]  # the longest match wins
    others = [r for r in replicas if r is not first]
    router.replica_queue_len_cache.update(first.replica_id, 10)  # 10 > 0 + 4: load wins over affinity
    for r in others:
        router.replica_queue_len_cache.update(r.replica_id, 0)
    moved = choose(prompt)[0][0]
    assert moved is not first
    router.replica_queue_len_cache.update(first.replica_id, 0)
    assert choose(prompt)[0] == [moved]  # the prefix now lives where it went
    assert choose(prompt, [r for r in replicas if r is not moved])[0][0] is not moved  # gone: not chosen


@pytest.mark.parametrize("scaling, options", [
    (ReplicaScaling(num_replicas=3), {"num_replicas": 3}),
    (ReplicaScaling(num_replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=8),
     {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                             "target_ongoing_requests": 8}}),
    (ReplicaScaling(num_replicas=1, max_replicas=3), {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                                             "initial_replicas": 1}}),
])
def test_replica_counts_become_serve_options(scaling, options):
    assert scaling.deployment_options() == options


@pytest.mark.parametrize("scaling, message", [
    (ReplicaScaling(num_replicas=0), "num_replicas must be >= 1"),
    (ReplicaScaling(min_replicas=3, max_replicas=2), "min_replicas <= max_replicas"),
    (ReplicaScaling(target_ongoing_requests=0), "target_ongoing_requests must be > 0"),
])
def test_bad_replica_counts_are_refused_by_name(scaling, message):
    with pytest.raises(ValueError, match=message):
        scaling.deployment_options()
