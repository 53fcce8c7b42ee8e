"""The poll state the gateway and the robot share (otad/transfer/backoff.py ManifestPoll).

Issue 13 (8): both kept the ETag of a manifest they had refused, so every later
poll was a 304 and the hold on the refused manifest never ended. The daemon tests
(test_gateway.py::test_a_release_refused_for_cache_size_is_fetched_at_once_when_cache_max_mb_is_raised,
test_robot.py::test_a_refused_release_is_held_back_then_taken_at_once_after_sighup)
show the SIGHUP path; the hold lasts 5 to 10 minutes, which no daemon test can
wait for, so its end is tested here on the real class with explicit times.
"""
from __future__ import annotations

from otad.transfer.backoff import ManifestPoll

BAD, GOOD = "a" * 64, "b" * 64


def test_a_refused_manifest_is_fetched_whole_again_when_its_hold_ends():
    poll = ManifestPoll()
    assert poll.etag(0.0) is None
    poll.seen('"bad"', BAD)
    hold = poll.reject(BAD, 0.0)
    assert 300 <= hold <= 600
    # While held: conditional polls (a 304 costs nothing), and a 200 of it is still held.
    assert poll.etag(hold - 1) == '"bad"'
    assert poll.held(BAD, hold - 1)
    # Hold over: an unconditional GET, and the same manifest is tried again.
    assert poll.etag(hold) is None
    assert not poll.held(BAD, hold)
    # Refused again: held longer (600 s doubling, up to 6 hours).
    poll.seen('"bad"', BAD)
    again = poll.reject(BAD, hold)
    assert 600 <= again <= 1200
    assert poll.etag(hold + again - 1) == '"bad"' and poll.etag(hold + again) is None


def test_a_manifest_dealt_with_keeps_its_etag_and_another_one_is_looked_at_at_once():
    poll = ManifestPoll()
    poll.seen('"bad"', BAD)
    poll.reject(BAD, 0.0)
    poll.seen('"good"', GOOD)  # the server published something else
    assert not poll.held(GOOD, 1.0)
    assert poll.etag(10**9) == '"good"'  # installed: 304s from now on, however long
    poll.forget()  # e.g. a download cut half way: look again next poll
    assert poll.etag(10**9) is None


def test_reset_forgets_the_etag_and_the_hold_at_the_next_poll():
    """SIGHUP: the operator may have removed the cause (CACHE_MAX_MB, keys, the clock)."""
    poll = ManifestPoll()
    poll.seen('"bad"', BAD)
    poll.reject(BAD, 0.0)
    poll.reset()
    assert poll.etag(1.0) is None
    assert not poll.held(BAD, 1.0)
    # A refusal after the reset starts the hold from the beginning again.
    assert 300 <= poll.reject(BAD, 1.0) <= 600
