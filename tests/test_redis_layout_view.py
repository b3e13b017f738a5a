"""Who serves a slot, from ``CLUSTER NODES`` answers (ssegw/broker/redis_layout.py ``View``):
the claimant with the highest config epoch, whatever stale answers say; nodes named anywhere
are remembered; failing or migrating claims do not win over current ones."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ssegw.broker.redis_layout import View, pick_tags

A, B, C, RA = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.4:7000"


def line(nid: str, addr: str, flags: str, master: str, epoch: int, *slots: str) -> str:
    return " ".join([nid, f"{addr}@17000", flags, master, "0", "0", str(epoch), "connected", *slots])


def before(myself: str) -> str:
    """The view of a healthy cluster: A, B, C primaries, RA replica of A."""
    rows = [("a", A, "master", "-", 1, "0-5460"), ("b", B, "master", "-", 2, "5461-10922"),
            ("c", C, "master", "-", 3, "10923-16383"), ("ra", RA, "slave", "a", 1)]
    return "\n".join(line(n, addr, ("myself," if addr == myself else "") + fl, m, e, *sl)
                     for n, addr, fl, m, e, *sl in rows)


def after_failover(myself: str) -> str:
    """RA promoted with config epoch 4; A a replica of it (planned) or failed (killed)."""
    rows = [("a", A, "slave", "ra", 4), ("b", B, "master", "-", 2, "5461-10922"),
            ("c", C, "master", "-", 3, "10923-16383"), ("ra", RA, "master", "-", 4, "0-5460")]
    return "\n".join(line(n, addr, ("myself," if addr == myself else "") + fl, m, e, *sl)
                     for n, addr, fl, m, e, *sl in rows)


def test_healthy_cluster():
    v = View()
    v.add(A, before(A))
    assert v.owner(0) == A and v.owner(5460) == A and v.owner(5461) == B and v.owner(16383) == C
    assert v.nodes == {A, B, C, RA}
    assert v.primaries() == {A, B, C}


def test_the_promoted_replica_wins_over_stale_answers():
    v = View()
    v.add(B, before(B))  # B has not heard of the promotion yet
    v.add(C, before(C))
    v.add(RA, after_failover(RA))
    assert v.owner(100) == RA
    assert v.primaries() == {RA, B, C}


def test_a_restarted_old_primary_that_still_claims_its_slots_loses():
    v = View()
    v.add(A, before(A))  # A came back from disk, believing in config epoch 1
    v.add(B, after_failover(B))
    assert v.owner(100) == RA


def test_failing_claim_is_still_the_answer_when_nobody_else_claims():
    v = View()
    text = before(B).replace(f"{A}@17000 master", f"{A}@17000 master,fail")
    v.add(B, text)
    assert v.owner(100) == A  # the connect fails and is retried: better than no answer


def test_myself_without_an_address_is_the_node_asked_and_noaddr_is_skipped():
    v = View()
    text = "\n".join([
        line("a", ":7000", "myself,master", "-", 1, "0-16383"),
        line("x", ":0", "master,noaddr", "-", 9, "0-16383"),
    ])
    v.add("127.0.0.1:7000", text)
    assert v.owner(5) == "127.0.0.1:7000"
    assert v.nodes == {"127.0.0.1:7000"}


def test_migrating_slots_are_not_claims():
    v = View()
    text = before(A).replace("0-5460", "0-5460 [5460->-b]")
    v.add(A, text)
    assert v.owner(5460) == A


def test_no_claim_means_no_owner_and_no_tags():
    v = View()
    v.add(A, line("a", A, "myself,master", "-", 0))
    assert v.owner(0) is None
    with pytest.raises(RedisConnectionError, match="not all served"):
        pick_tags(v)  # never a partial layout: it would be stored for good


def test_pick_tags_gives_one_tag_per_primary():
    v = View()
    v.add(A, before(A))
    tags = pick_tags(v)
    assert len(tags) == 3
