"""`Streams`: the per-user and per-process bounds on open event streams, counted in one process."""

from __future__ import annotations

import pytest
from imgpipe.web import ApiError
from imgpipe_status.streams import Streams


def _refused(streams: Streams, user: str) -> ApiError:
    """The error a new stream of `user` is refused with (it fails the test if none)."""
    with pytest.raises(ApiError) as refused, streams.slot(user):
        pass
    return refused.value


def test_a_user_at_the_limit_is_refused_429_and_others_are_not() -> None:
    streams = Streams(per_user=2, total=10)
    with streams.slot("alice"), streams.slot("alice"):
        refused = _refused(streams, "alice")
        assert (refused.status, refused.code) == (429, "too_many_streams")
        assert refused.headers["Retry-After"] == "5"
        with streams.slot("bob"):
            assert (streams.of("alice"), streams.of("bob"), streams.open) == (2, 1, 3)
    assert (streams.of("alice"), streams.open) == (0, 0)


def test_a_full_process_is_503_but_a_user_at_their_own_limit_hears_that_first() -> None:
    streams = Streams(per_user=1, total=2)
    with streams.slot("alice"), streams.slot("bob"):
        full = _refused(streams, "carol")
        assert (full.status, full.code) == (503, "streams_at_capacity")
        own = _refused(streams, "alice")
        assert (own.status, own.code) == (429, "too_many_streams")
    with streams.slot("carol"):
        assert streams.open == 1


def test_a_stream_that_fails_gives_its_place_back_and_users_are_not_kept() -> None:
    streams = Streams(per_user=1, total=1)
    with pytest.raises(RuntimeError), streams.slot("alice"):
        raise RuntimeError("the handler failed")
    assert streams.open == 0
    assert not streams._by_user  # a user with nothing open costs no memory
    with streams.slot("alice"):
        pass


def test_zero_means_no_limit() -> None:
    streams = Streams(per_user=0, total=0)
    with streams.slot("alice"), streams.slot("alice"), streams.slot("alice"):
        assert streams.open == 3
